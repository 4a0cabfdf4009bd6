"""The package against the `blip` program: the same tokens and, within 1e-6, the same scores,
for images given as paths, bytes, PIL images and numpy arrays; errors of the right class; one
object shared by threads."""

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blip
from conftest import IMAGES, cli, model


def as_kinds(path: Path):
    """The same image as a path, a PathLike, bytes, a PIL image and a numpy array."""
    return {
        "path": str(path),
        "pathlike": path,
        "bytes": path.read_bytes(),
        "pil": Image.open(path),
        "numpy": np.asarray(Image.open(path).convert("RGB")),
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


@pytest.mark.parametrize("kind", ["path", "pathlike", "bytes", "pil", "numpy"])
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

    answers = ["a cat", "a rocket", "two", "yes"]
    (tmp_path / "answers.txt").write_text("\n".join(answers))
    expected = cli("vqa", "--model", model("tiny-vqa"), "--question", question, "--answers",
                   str(tmp_path / "answers.txt"), "--top", "3", *images)
    got = answerer.rank(images, question, answers, top=3)
    for g, e in zip(got, expected):
        assert [a["answer"] for a in g] == [a["answer"] for a in e["answers"]]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(g, e["answers"]))


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


def test_pil_images_are_converted_as_transformers_converts_them(captioner):
    """RGBA over white, palette and gray through RGB: the same pixels as the numpy route."""
    rgba = Image.open(IMAGES[0]).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composited = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    assert captioner.caption(rgba)[0]["tokens"] == captioner.caption(composited)[0]["tokens"]
    gray = Image.open(IMAGES[1]).convert("L")
    assert captioner.caption(gray)[0]["tokens"] == captioner.caption(np.asarray(gray))[0]["tokens"]


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


def test_one_object_is_shared_by_threads(captioner, images):
    expected = [c["tokens"] for c in captioner.caption(images)]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [c["tokens"] for c in captioner.caption(images)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == expected for r in results.values()) and len(results) == 4


def test_the_gil_is_released_while_computing(images):
    """A Python thread keeps running while another computes (tiny model: many short calls)."""
    captioner = blip.Captioner(model("tiny-caption-bin"), threads=1)
    ticks, done = [0], threading.Event()

    def tick():
        while not done.is_set():
            ticks[0] += 1

    ticker = threading.Thread(target=tick)
    ticker.start()
    before = ticks[0]
    for _ in range(5):
        captioner.caption(images, num_beams=3)
    done.set()
    ticker.join()
    assert ticks[0] > before
