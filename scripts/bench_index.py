#!/usr/bin/env python3
"""Image collections, measured (not run by CI; results in BENCHMARKS.md):

1. Indexing throughput: `blip index` against `blip embed` on the same folder of photos, same
   full-size retrieval checkpoint, per image (model loading taken out by running each on a few
   images and on all of them and dividing the difference).
2. Search latency on synthetic collections of 10k, 100k and 1M random unit 256-d embeddings
   (crates/blip-index/examples/bench_search.rs): open + first query, then p50/p95 of warm
   queries, and the database's size per image; beside it the same search the way Python users
   do it today: numpy `E @ q` + argpartition, and FAISS `IndexFlatIP`, over the same embeddings
   read from the same database, same queries, all threads.

Run from the repository root in the pinned environment plus FAISS:
    .venv/bin/pip install -r scripts/requirements-bench-index.txt
    .venv/bin/python scripts/bench_index.py --itm-model DIR [--sizes 10000,100000,1000000]
DIR is a full-size BlipForImageTextRetrieval checkpoint (random weights serve: speed does not
depend on them); the databases go to --work (1M embeddings take 1.4 GB).
"""

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import IMAGES, REPO, machine  # noqa: E402


def timed(cmd):
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - started


def photo_folder(work, count):
    """`count` photos from scikit-image's data, cycled, each under its own name."""
    folder = work / f"photos-{count}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = Path(skimage.__file__).parent / "data"
    for i in range(count):
        name = IMAGES[i % len(IMAGES)]
        shutil.copy(data / name, folder / f"{i:04d}-{name}")
    return folder


def indexing(work, model, count, batch, rounds=3):
    """Seconds per image of `blip embed` and `blip index`, each the best of `rounds`, the two
    commands taking turns (the machine's speed drifts)."""
    blip = str(REPO / "target/release/blip")
    commands = {
        "embed": lambda folder, n: [blip, "embed", "--model", model, "--image", str(folder), "--out",
                                    str(work / f"embed-{n}.safetensors"), "--batch-size", str(batch)],
        "index": lambda folder, n: [blip, "index", "--db", str(work / f"index-{n}.db"), "--model", model,
                                    str(folder), "--batch-size", str(batch)],
    }
    folders = {n: photo_folder(work, n) for n in (batch, count)}
    best = {}
    for _ in range(rounds):
        for name, command in commands.items():
            for n, folder in folders.items():
                for leftover in work.glob(f"index-{n}.db*"):
                    leftover.unlink()
                t = timed(command(folder, n))
                best[name, n] = min(best.get((name, n), t), t)
    return {name: (best[name, count] - best[name, batch]) / (count - batch) for name in commands}


def python_search(db, queries):
    """numpy and FAISS over the embeddings of `db`, as a Python user would load them."""
    conn = sqlite3.connect(db)
    started = time.perf_counter()
    rows = conn.execute("SELECT embedding FROM images WHERE embedding IS NOT NULL ORDER BY id").fetchall()
    embeddings = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    load = time.perf_counter() - started
    results = {"load_s": load}

    def percentiles(search):
        times = []
        for q in queries:
            started = time.perf_counter()
            search(q)
            times.append(time.perf_counter() - started)
        times.sort()
        return times[len(times) // 2] * 1e3, times[int(round((len(times) - 1) * 0.95))] * 1e3

    def numpy_top10(q):
        scores = embeddings @ q
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])]

    results["numpy_p50_ms"], results["numpy_p95_ms"] = percentiles(numpy_top10)
    try:
        import faiss
        flat = faiss.IndexFlatIP(embeddings.shape[1])
        flat.add(embeddings)
        results["faiss_p50_ms"], results["faiss_p95_ms"] = percentiles(lambda q: flat.search(q[None, :], 10))
    except ImportError:
        pass
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--itm-model", required=True)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "blip-bench-index"))
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-p", "blip-cli", "-p", "blip-index", "--example", "bench_search"],
                   cwd=REPO, check=True)

    result = {"machine": machine(), "indexing_s_per_image": indexing(work, args.itm_model, args.images,
                                                                      args.batch_size), "search": []}
    rng = np.random.default_rng(42)
    for n in [int(s) for s in args.sizes.split(",")]:
        db = work / f"synthetic-{n}.db"
        out = subprocess.run([str(REPO / "target/release/examples/bench_search"), str(db), str(n), str(args.queries)],
                             check=True, capture_output=True, text=True)
        ours = json.loads(out.stdout)
        queries = rng.standard_normal((args.queries, 256)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        ours.update(python_search(db, queries))
        result["search"].append(ours)
        print(json.dumps(ours), file=sys.stderr)

    print(json.dumps(result, indent=1))
    idx = result["indexing_s_per_image"]
    print(f"\n{result['machine']}")
    print(f"indexing: blip index {1 / idx['index']:.2f} images/s, blip embed {1 / idx['embed']:.2f} images/s "
          f"({idx['index'] / idx['embed']:.2f}× the time per image)")
    print("| embeddings | ours p50 (p95) | numpy p50 | FAISS flat p50 | ours / numpy | ours / FAISS "
          "| open + first query | numpy load from SQLite | bytes per image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in result["search"]:
        faiss_p50 = s.get("faiss_p50_ms")
        print(f"| {s['n']:,} | {s['p50_ms']:.1f} ms ({s['p95_ms']:.1f}) | {s['numpy_p50_ms']:.1f} ms | "
              f"{faiss_p50:.1f} ms | {s['p50_ms'] / s['numpy_p50_ms']:.2f}× | {s['p50_ms'] / faiss_p50:.2f}× | "
              f"{s['open_and_first_s']:.2f} s | {s['load_s']:.2f} s | {s['bytes_per_image']} |")


if __name__ == "__main__":
    main()
