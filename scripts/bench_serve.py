#!/usr/bin/env python3
"""Load benchmark of `blip serve` beside the server a Python user would write (FastAPI +
transformers, scripts/bench_serve_fastapi.py), on a full-size random blip-image-captioning-base
checkpoint; writes the "blip serve" section of BENCHMARKS.md.

    .venv/bin/pip install -r scripts/requirements-bench-serve.txt   # once, beside requirements.txt
    .venv/bin/python scripts/bench_serve.py [--work DIR]

In one run on this machine:
  - the CLI's reference: `blip caption` on the same photos with `--batch-size 1` and 8 (wall time
    less the model's load time, best of 2), s/image, and the library's `generate` alone
    (examples/bench.rs, decoded and preprocessed images) beside it;
  - each server at concurrency 1, 4, 16, 64 (clients each sending their next request when the
    last is answered, keep-alive connections; the 8 scikit-image photos in turn, as JSON with a
    base64 image and min = max = 20 new tokens, greedy): images/s, p50 and p99 latency;
  - overload: 1,000 requests at concurrency 256 against `blip serve --max-queue 64`: how many got
    200, 429 or anything else, and the server's peak RSS beside its RSS once loaded.
CI does not run it.
"""

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import skimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import IMAGES, NEW_TOKENS, REPO, machine  # noqa: E402

CONCURRENCY = [1, 4, 16, 64]
ROUTE = "/models/model"


def requests_for(concurrency, python):
    """Requests per level: a few rounds of every client (fewer for the slower Python server)."""
    rounds = 2 if python else 3
    return max(8, concurrency * rounds) if concurrency < 64 else concurrency * (1 if python else 2)


def payloads():
    paths = [Path(skimage.__file__).parent / "data" / n for n in IMAGES]
    params = {"min_new_tokens": NEW_TOKENS, "max_new_tokens": NEW_TOKENS}
    return [json.dumps({"inputs": base64.b64encode(p.read_bytes()).decode(), "parameters": params}).encode()
            for p in paths]


def post(conn, body):
    conn.request("POST", ROUTE, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def load(port, concurrency, total, bodies, timeout=600):
    """`total` requests from `concurrency` clients: (wall seconds, latencies, statuses)."""
    latencies, statuses = [], []
    lock = threading.Lock()
    counter = iter(range(total))

    def client(_):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                status = post(conn, bodies[i % len(bodies)])
            except (OSError, http.client.HTTPException) as err:
                status = f"error: {err}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses.append(status)
        conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return time.perf_counter() - start, latencies, statuses


def cli_seconds_per_image(model_dir, paths, batch_size, load_s, dtype="f32"):
    """`blip caption` s/image, its load time taken out: the best of 2 runs."""
    cmd = [str(REPO / "target/release/blip"), "caption", "--dtype", dtype, "--model", str(model_dir), "--min-new-tokens",
           str(NEW_TOKENS), "--max-new-tokens", str(NEW_TOKENS), "--batch-size", str(batch_size), *paths]
    best = None
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - start
        best = wall if best is None else min(best, wall)
    return (best - load_s) / len(paths)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def wait_ready(port, process, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def rss_mb(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_blip(model_dir, extra=()):
    port = free_port()
    process = subprocess.Popen([str(REPO / "target/release/blip"), "serve", "--port", str(port), "--model",
                                str(model_dir), *extra], stderr=subprocess.DEVNULL)
    wait_ready(port, process)
    return port, process


def start_fastapi(model_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "scripts/bench_serve_fastapi.py"), str(model_dir),
                                str(port)], stderr=subprocess.DEVNULL)
    wait_ready(port, process)
    return port, process


def run_levels(port, bodies, python):
    results = {}
    load(port, 1, 2, bodies)  # warm-up
    for c in CONCURRENCY:
        wall, latencies, statuses = load(port, c, requests_for(c, python), bodies)
        bad = [s for s in statuses if s != 200]
        if bad:
            raise SystemExit(f"concurrency {c}: {len(bad)} requests failed: {bad[:3]}")
        results[c] = {"images_per_s": len(latencies) / wall, "p50": percentile(latencies, 50),
                      "p99": percentile(latencies, 99), "requests": len(latencies)}
        print(f"{'python' if python else 'blip'} c={c}: {results[c]}", file=sys.stderr)
    return results


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "blip-bench"))
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                    help="the dtype of blip serve, blip caption and the reference (the Python server stays f32)")
    ap.add_argument("--no-python", action="store_true",
                    help="blip serve's levels beside the CLI only, printed (no overload run, no Python server, "
                         "BENCHMARKS.md untouched)")
    args = ap.parse_args()
    work = Path(args.work)
    model_dir = work / "model"
    if not (model_dir / "pytorch_model.bin").exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_model_fixtures.py"), "--full", str(work)], check=True)
    subprocess.run(["cargo", "build", "--release", "--example", "bench", "--bin", "blip", "--features",
                    "blip/openblas"], cwd=REPO, check=True)
    bodies = payloads()
    paths = [str(Path(skimage.__file__).parent / "data" / n) for n in IMAGES]

    reference = json.loads(subprocess.run([str(REPO / "target/release/examples/bench"), str(model_dir), args.dtype, *paths],
                                          capture_output=True, text=True, check=True).stdout)
    reference["cli_b1"] = cli_seconds_per_image(model_dir, paths, 1, reference["load_s"], args.dtype)
    reference["cli_b8"] = cli_seconds_per_image(model_dir, paths * 2, 8, reference["load_s"], args.dtype)
    print(f"reference: {reference}", file=sys.stderr)

    # Waits at concurrency 64 pass the default 60 s request timeout on a 2-core machine.
    port, process = start_blip(model_dir, ["--dtype", args.dtype, "--request-timeout", "600s"])
    ours = run_levels(port, bodies, python=False)
    stop(process)
    if args.no_python:
        b1, b8 = reference["cli_b1"], reference["cli_b8"]
        print(f"{machine()}; {args.dtype}; CLI {b1:.3f} s/image at batch 1, {b8:.3f} at batch 8")
        for c, o in ours.items():
            print(f"concurrency {c}: {o['images_per_s']:.2f} images/s ({o['images_per_s'] * b8:.2f}x the CLI's batch 8), "
                  f"p50 {o['p50']:.3f} s ({o['p50'] / b1:.2f}x its batch 1), p99 {o['p99']:.3f} s")
        return

    port, process = start_blip(model_dir, ["--dtype", args.dtype, "--max-queue", "64"])
    load(port, 1, 1, bodies)
    loaded_rss = rss_mb(process.pid)
    wall, _, statuses = load(port, 256, 1000, bodies)
    peak_rss = rss_mb(process.pid, "VmHWM")
    alive = process.poll() is None
    stop(process)
    others = [s for s in statuses if s not in (200, 429)]
    overload = {"wall": wall, "ok": statuses.count(200), "refused": statuses.count(429),
                "other": len(others), "others": sorted({str(s) for s in others}), "loaded_rss": loaded_rss,
                "peak_rss": peak_rss, "alive": alive}
    print(f"overload: {overload}", file=sys.stderr)

    port, process = start_fastapi(model_dir)
    python = run_levels(port, bodies, python=True)
    stop(process)

    write(reference, ours, python, overload, args.dtype)


def write(reference, ours, python, overload, dtype="f32"):
    b1, b8 = reference["cli_b1"], reference["cli_b8"]
    lines = [
        "## `blip serve` under load",
        "",
        f"Machine: {machine()}. Full-size random blip-image-captioning-base ({dtype}; the Python server f32), 20 new tokens"
        if dtype != "f32" else
        f"Machine: {machine()}. Full-size random blip-image-captioning-base (f32), 20 new tokens",
        "(min = max), greedy; the 8 scikit-image photos in turn as JSON with a base64 image; clients",
        "send their next request when the last is answered (`.venv/bin/python scripts/bench_serve.py`, one run).",
        "The Python server is FastAPI + transformers 5.24 (`scripts/bench_serve_fastapi.py`), generation",
        "in FastAPI's thread pool, as a Python user would write it.",
        "",
        f"The CLI's reference, `blip caption` on the same photos (decoding and resizing included, the",
        f"model's load time taken out): {b1:.3f} s/image with `--batch-size 1`, {b8:.3f} s/image with",
        f"`--batch-size 8` ({1 / b8:.2f} images/s). The library's `generate` alone on preprocessed images:",
        f"{reference['generate_b1_s']:.3f} s/image at batch 1, {reference['generate_b8_s_per_image']:.3f} at batch 8.",
        "",
        "| concurrency | blip serve images/s | p50 (s) | p99 (s) | Python images/s | p50 (s) | p99 (s) | blip / Python throughput |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in CONCURRENCY:
        o, p = ours[c], python[c]
        lines.append(f"| {c} | {o['images_per_s']:.2f} | {o['p50']:.2f} | {o['p99']:.2f} | {p['images_per_s']:.2f} | "
                     f"{p['p50']:.2f} | {p['p99']:.2f} | {o['images_per_s'] / p['images_per_s']:.2f}× |")
    lines += [
        "",
        "Against the issue's targets:",
        "",
        f"- concurrency 16: {ours[16]['images_per_s'] * b8:.2f}× the CLI's batch-8 throughput (target ≥ 0.9×), "
        f"{ours[16]['images_per_s'] / python[16]['images_per_s']:.2f}× the Python server's (target ≥ 3×);",
        f"- concurrency 1: latency p50 {ours[1]['p50'] / b1:.2f}× the CLI's single-image time (target ≤ 1.15×);",
        f"- overload, 1,000 requests at concurrency 256 against `--max-queue 64`: {overload['ok']} answered 200, "
        f"{overload['refused']} 429, {overload['other']} other ({', '.join(overload['others']) or 'none'}) in "
        f"{overload['wall']:.0f} s; RSS once loaded {overload['loaded_rss']:.0f} MB, peak {overload['peak_rss']:.0f} MB "
        f"(+{overload['peak_rss'] - overload['loaded_rss']:.0f} MB; target ≤ +300 MB)"
        f"{'' if overload['alive'] else '; the server DIED'}.",
        "",
    ]
    path = REPO / "BENCHMARKS.md"
    text = path.read_text()
    start = text.find("## `blip serve` under load")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + "\n".join(lines) + "\n" + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    path.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
