"""The documented Ray Data pipeline on a local Ray instance: binary files → captions →
embeddings → Parquet, every caption and embedding equal to the `blip` program's."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import ray
from PIL import Image

from blip.ray import BlipCaptioner, BlipEmbedder
from conftest import IMAGES, cli, model


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_pipeline_writes_the_clis_captions_and_embeddings(local_ray, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in IMAGES:
        (folder / path.name).write_bytes(path.read_bytes())

    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    ds = ds.map_batches(BlipCaptioner, fn_constructor_kwargs={"model": model("tiny-caption-bin"), "threads": 1,
                                                              "num_beams": 2},
                        concurrency=1, batch_size=2, num_cpus=0.5)
    ds = ds.map_batches(BlipEmbedder, fn_constructor_kwargs={"model": model("tiny-itm"), "threads": 1},
                        concurrency=1, batch_size=2, num_cpus=0.5)
    ds.drop_columns(["bytes"]).write_parquet(str(tmp_path / "out"))

    table = pq.read_table(str(tmp_path / "out")).to_pydict()
    rows = {p.rsplit("/", 1)[-1]: i for i, p in enumerate(table["path"])}
    assert sorted(rows) == sorted(p.name for p in IMAGES)

    captions = cli("caption", "--model", model("tiny-caption-bin"), "--num-beams", "2", *map(str, IMAGES))
    embeddings = cli("embed", "--model", model("tiny-itm"), "--image", *map(str, IMAGES))
    for path, caption, embedding in zip(IMAGES, captions, embeddings):
        row = rows[path.name]
        assert table["caption"][row] == caption["caption"]
        assert abs(table["caption_score"][row] - caption["score"]) < 1e-6
        got = np.asarray(table["embedding"][row], dtype=np.float32).ravel()
        assert np.abs(got - np.asarray(embedding["embedding"], dtype=np.float32)).max() < 1e-6


def test_pandas_batches_and_equal_sized_read_images(local_ray, tmp_path):
    """Arrays of one size arrive stacked in one 4-D array; pandas batches as a DataFrame."""
    paths = []
    for path in IMAGES:
        square = tmp_path / (path.stem + ".png")
        Image.open(path).convert("RGB").crop((0, 0, 120, 120)).save(square)
        paths.append(square)
    expected = {p.name: c["caption"] for p, c in zip(paths, cli("caption", "--model", model("tiny-caption-bin"),
                                                                 *map(str, paths)))}
    ds = ray.data.read_images([str(p) for p in paths], mode="RGB", include_paths=True)
    out = ds.map_batches(BlipCaptioner, fn_constructor_kwargs={"model": model("tiny-caption-bin"), "threads": 1},
                         concurrency=1, batch_size=3, num_cpus=0.5).take_all()
    assert {r["path"].rsplit("/", 1)[-1]: r["caption"] for r in out} == expected

    embeddings = cli("embed", "--model", model("tiny-itm"), "--image", *map(str, paths))
    ds = ray.data.read_binary_files([str(p) for p in paths], include_paths=True)
    out = ds.map_batches(BlipEmbedder, fn_constructor_kwargs={"model": model("tiny-itm"), "threads": 1},
                         concurrency=1, batch_size=2, num_cpus=0.5, batch_format="pandas").take_all()
    got = {r["path"].rsplit("/", 1)[-1]: np.asarray(r["embedding"], dtype=np.float32) for r in out}
    for path, e in zip(paths, embeddings):
        assert np.abs(got[path.name] - np.asarray(e["embedding"], dtype=np.float32)).max() < 1e-6


def test_read_images_arrays_work_too(local_ray):
    ds = ray.data.read_images([str(p) for p in IMAGES], mode="RGB", include_paths=True)
    out = ds.map_batches(BlipCaptioner, fn_constructor_kwargs={"model": model("tiny-caption-bin"), "threads": 1},
                         concurrency=1, batch_size=3, num_cpus=0.5).take_all()
    expected = {p.name: c["caption"] for p, c in
                zip(IMAGES, cli("caption", "--model", model("tiny-caption-bin"), *map(str, IMAGES)))}
    assert {r["path"].rsplit("/", 1)[-1]: r["caption"] for r in out} == expected
