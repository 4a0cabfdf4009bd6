"""The package against the `blip` program: the same tokens and, within 1e-6, the same scores,
for images given as paths, bytes, PIL images and numpy arrays; errors of the right class; one
object shared by threads."""

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blip
from conftest import FIXTURES, IMAGES, cli, model


def as_kinds(path: Path):
    """The same image as a path, a PathLike, bytes (and bytearray, memoryview), a PIL image and
    numpy arrays in C order, Fortran order and as a flipped view of a flipped copy."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return {
        "path": str(path),
        "pathlike": path,
        "bytes": path.read_bytes(),
        "bytearray": bytearray(path.read_bytes()),
        "memoryview": memoryview(path.read_bytes()),
        "pil": Image.open(path),
        "numpy": pixels,
        "fortran": np.asfortranarray(pixels),
        "strided": np.ascontiguousarray(pixels[::-1, :, ::-1])[::-1, :, ::-1],
    }


@pytest.fixture(scope="module")
def captioner():
    return blip.Captioner(model("tiny-caption-bin"))


@pytest.fixture(scope="module")
def matcher():
    return blip.ImageTextMatcher(model("tiny-itm"))


@pytest.fixture(scope="module")
def answerer():
    return blip.QuestionAnswerer(model("tiny-vqa"))


@pytest.mark.parametrize("kind", ["path", "pathlike", "bytes", "bytearray", "memoryview", "pil", "numpy", "fortran",
                                  "strided"])
def test_captions_equal_the_cli_for_every_kind_of_image(captioner, kind):
    expected = cli("caption", "--model", model("tiny-caption-bin"), "--num-beams", "2", *map(str, IMAGES))
    got = captioner.caption([as_kinds(p)[kind] for p in IMAGES], num_beams=2)
    assert [g["tokens"] for g in got] == [e["tokens"] for e in expected]
    assert [g["caption"] for g in got] == [e["caption"] for e in expected]
    for g, e in zip(got, expected):
        assert abs(g["score"] - e["score"]) < 1e-6 and abs(g["log_prob"] - e["log_prob"]) < 1e-5


def test_several_captions_a_prompt_and_sampling(captioner, images):
    expected = cli("caption", "--model", model("tiny-caption-bin"), "--prompt", "a picture of", "--do-sample",
                   "--top-k", "0", "--seed", "3", "--num-captions", "2", images[0])
    got = captioner.caption(images[0], "a picture of", do_sample=True, top_k=0, seed=3, num_return_sequences=2)
    assert [c["tokens"] for c in got[0]["captions"]] == [c["tokens"] for c in expected[0]["captions"]]


def test_answers_and_ranked_answers_equal_the_cli(answerer, images, tmp_path):
    question = "what is in the picture?"
    expected = cli("vqa", "--model", model("tiny-vqa"), "--question", question, *images)
    got = answerer.answer([as_kinds(Path(p))["pil"] for p in images], question)
    assert [g["tokens"] for g in got] == [e["tokens"] for e in expected]
    assert all(abs(g["score"] - e["score"]) < 1e-6 for g, e in zip(got, expected))
    # One question per image, one image per batch: the same answers.
    per_image = answerer.answer(images, [question] * 3, batch_size=1)
    assert [g["tokens"] for g in per_image] == [e["tokens"] for e in expected]
    with pytest.raises(ValueError, match="questions: 2 given for 3 images"):
        answerer.answer(images, [question] * 2)

    answers = ["a cat", "a rocket", "two", "yes"]
    (tmp_path / "answers.txt").write_text("\n".join(answers))
    expected = cli("vqa", "--model", model("tiny-vqa"), "--question", question, "--answers",
                   str(tmp_path / "answers.txt"), "--top", "3", *images)
    got = answerer.rank(images, question, answers, top=3)
    for g, e in zip(got, expected):
        assert [a["answer"] for a in g] == [a["answer"] for a in e["answers"]]
        assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(g, e["answers"]))


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "numpy"])
def test_match_embeddings_and_classification_equal_the_cli(matcher, kind):
    texts = ["a cat on a sofa", "a rocket"]
    inputs = [as_kinds(p)[kind] for p in IMAGES]
    expected = cli("match", "--model", model("tiny-itm"), "--text", texts[0], "--text", texts[1], *map(str, IMAGES))
    got = [score for row in matcher.match(inputs, texts) for score in row]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g["text"] == e["text"]
        assert abs(g["itm"] - e["itm"]) < 1e-6 and abs(g["itc"] - e["itc"]) < 1e-6

    embeddings = matcher.embed_images(inputs)
    expected = cli("embed", "--model", model("tiny-itm"), "--image", *map(str, IMAGES))
    assert embeddings.dtype == np.float32 and embeddings.shape == (3, matcher.embedding_dim)
    assert np.abs(embeddings - np.array([e["embedding"] for e in expected], dtype=np.float32)).max() < 1e-6
    texts_expected = cli("embed", "--model", model("tiny-itm"), "--text", *texts)
    assert np.abs(matcher.embed_texts(texts) - np.array([e["embedding"] for e in texts_expected])).max() < 1e-6

    expected = cli("classify", "--model", model("tiny-itm"), "--labels", "cat,rocket,person", "--rerank",
                   "--rerank-top", "2", *map(str, IMAGES))
    got = matcher.classify(inputs, ["cat", "rocket", "person"], rerank=2)
    for g, e in zip(got, expected):
        assert [l["label"] for l in g] == [l["label"] for l in e["labels"]]
        assert all(abs(a["probability"] - b["probability"]) < 1e-6 for a, b in zip(g, e["labels"]))


def test_embeddings_are_numpy_arrays_without_a_copy(matcher, images):
    embeddings = matcher.embed_images(images)
    assert not embeddings.flags["OWNDATA"] and embeddings.base is not None  # a view of Rust's buffer
    assert embeddings.flags["C_CONTIGUOUS"]


def test_pil_images_and_arrays_are_converted_as_transformers_converts_them(captioner):
    """PIL: alpha composited over white (transformers' convert_to_rgb), other modes through
    convert("RGB"); arrays: gray repeated, RGBA over white as each processor backend does it."""
    from blip._images import prepare

    rgba = Image.open(IMAGES[0]).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composited = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    assert np.array_equal(prepare([rgba])[0], composited)
    assert not np.array_equal(composited, np.asarray(rgba.convert("RGB")))
    assert captioner.caption(rgba)[0]["tokens"] == captioner.caption(composited)[0]["tokens"]
    gray = Image.open(IMAGES[1]).convert("L")
    assert np.array_equal(prepare([gray])[0], np.asarray(gray.convert("RGB")))
    assert captioner.caption(gray)[0]["tokens"] == captioner.caption(np.asarray(gray))[0]["tokens"]
    assert np.array_equal(prepare([np.asarray(gray)[..., None]])[0], np.asarray(gray.convert("RGB")))

    # RGBA arrays: transformers 5's torchvision backend in float32, truncating x * 255.999
    # (TorchvisionBackend.convert_to_rgb), its PIL backend in float64, rounding.
    array = np.asarray(rgba)
    x = array.astype(np.float32) * np.float32(1 / 255)  # to_dtype(float32, scale=True): mul(1/255)
    torchvision = ((x[..., :3] * x[..., 3:] + (1 - x[..., 3:])) * np.float32(255.999)).astype(np.uint8)
    alpha = array[..., 3:4] / 255
    pil = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    assert np.array_equal(prepare([array])[0], torchvision)
    assert np.array_equal(prepare([array], "pil")[0], pil)
    assert not np.array_equal(torchvision, pil)


def test_errors_are_python_exceptions_of_the_right_class(captioner, matcher, images):
    with pytest.raises(FileNotFoundError, match="no/such.jpg"):
        captioner.caption(["/no/such.jpg"])
    with pytest.raises(ValueError, match=r"images\[1\] \(bytes\): not a recognized image file"):
        captioner.caption([images[0], b"not an image"])
    with pytest.raises(ValueError, match="num_beams must be at least 1, not 0"):
        captioner.caption(images, num_beams=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        captioner.caption(images, num_return_sequences=3)
    with pytest.raises(ValueError, match="a numpy array of float64"):
        captioner.caption(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="shape"):
        captioner.caption(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="an empty list"):
        captioner.caption([])
    with pytest.raises(ValueError, match="duplicate|twice"):
        matcher.classify(images, ["cat", "cat"])
    with pytest.raises(OSError, match="no such folder"):
        blip.Captioner("/no/such/model")
    with pytest.raises(ValueError, match="captioning needs a BlipForConditionalGeneration"):
        blip.Captioner(model("tiny-itm"))
    with pytest.raises(ValueError, match="dtype"):
        blip.Captioner(model("tiny-caption-bin"), dtype="f64")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 0, not -1"):
        captioner.caption(images, max_new_tokens=-1)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        blip.Captioner(model("tiny-caption-bin"), threads=-2)
    with pytest.raises(ValueError, match="labels: a string"):
        matcher.classify(images, "cat")
    with pytest.raises(ValueError, match="over the .*-pixel limit"):
        captioner.caption(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (100_000, 100_000, 3)))
    # numpy numbers are numbers
    assert captioner.caption(images[0], num_beams=np.int64(2))[0]["tokens"]


def test_one_object_is_shared_by_threads(captioner, images):
    expected = [c["tokens"] for c in captioner.caption(images)]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [c["tokens"] for c in captioner.caption(images)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    barrier = threading.Barrier(4)

    def together(i):
        barrier.wait()
        work(i)

    threads = [threading.Thread(target=together, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == expected for r in results.values()) and len(results) == 4


def test_the_gil_is_released_while_computing(images):
    """A Python thread runs during one native call: with a switch interval longer than the
    call, only a released GIL lets it run (the call's return then waits out the interval)."""
    captioner = blip.Captioner(model("tiny-caption-bin"), threads=1)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    ticks, done, started = [0], threading.Event(), threading.Event()

    def tick():
        started.set()
        while not done.is_set():
            ticks[0] += 1

    interval = sys.getswitchinterval()
    ticker = threading.Thread(target=tick)
    ticker.start()
    started.wait()
    try:
        # Longer than the call (a tenth of a second), so a held GIL would never be handed over.
        sys.setswitchinterval(2.0)
        before = ticks[0]
        captioner._native.caption(arrays, None, '{"num_beams": 3}')
        during = ticks[0] - before
    finally:
        sys.setswitchinterval(interval)
        done.set()
        ticker.join()
    assert during > 0


def test_image_size_captions_as_the_cli(images):
    """`image_size` runs at another resolution, as `blip caption --image-size` does."""
    captioner = blip.Captioner(model("tiny-caption-st"), image_size=224)
    ours = [c["caption"] for c in captioner.caption(images)]
    theirs = [r["caption"] for r in cli("caption", "--model", model("tiny-caption-st"), "--image-size", "224", *images)]
    assert ours == theirs
    with pytest.raises(ValueError, match="image_size"):
        blip.Captioner(model("tiny-caption-st"), image_size=100)


def test_gradcam_maps_equal_pytorchs(images):
    """The maps of crates/blip/tests/gradcam_parity.rs (LAVIS's compute_gradcam in PyTorch)."""
    expected = json.loads((FIXTURES / "expected/gradcam.json").read_text())
    matcher = blip.ImageTextMatcher(model(expected["model"]))
    case = next(c for c in expected["cases"] if c["block_num"] == 0 and c["image"] == "astronaut.png")
    image = str(FIXTURES / "images-model" / case["image"])
    cams = matcher.gradcam(image, expected["texts"], layer=0)[0]
    scale = max(max(m) for c in expected["cases"] for m in c["maps"])
    for cam, theirs, tokens in zip(cams, case["maps"], case["token_maps"]):
        assert cam["map"].shape == tuple(case["grid"]) and cam["map"].dtype == np.float32
        assert np.abs(cam["map"].ravel() - np.array(theirs)).max() <= 1e-4 * scale
        assert len(cam["tokens"]) == len(tokens)
    assert [t for t, _ in cams[1]["tokens"]] == ["an", "astronaut"]
    with pytest.raises(ValueError, match="block_num|layer"):
        matcher.gradcam(image, ["a cat"], layer=6)
