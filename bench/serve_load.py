"""Benchmark: `lgur serve` under concurrent clients, micro-batching off vs on, in one run (not a test).

    .venv/bin/python bench/serve_load.py [--recipe lgur_small_synth] [--requests 2000] [--clients 32]
                                         [--index X.lgidx --checkpoint M.safetensors] [--batch-max 32]

Without --index: a random-init model of --recipe (random weights cost the same as trained ones) and an index
of a small synthetic gallery are built in a temporary folder. For each setting, `lgur serve` runs in its own
process on a free loopback port: first `--batch-max 1` (micro-batching disabled: every request encodes its
query alone, as before), then --batch-max (default search.serve_batch_max) with search.serve_batch_window_ms,
first with `--batch-workers 1` (one batch at a time, on every thread), then `--batch-workers 0` (one batch
per core at once, each on one thread).
Each gets --warmup requests, then --requests POST /api/search (k=10, synthetic captions of varied length)
from --clients concurrent keep-alive connections (a minimal asyncio HTTP/1.1 client), every response checked (200, k hits).
Printed per setting: requests/s, p50/p99/max latency, the mean size of the server's last 100 batches, and
the load average before and after (the machine may be shared with other jobs: compare the rows of one
run, not figures from different runs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import lgur  # noqa: F401  (first: sets lgur's OpenMP policy before torch loads, as `lgur serve` runs)


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def build(recipe: str, tmp: Path) -> tuple[Path, Path]:
    """A random-init `recipe` model and an index of a 96-image synthetic gallery, under `tmp`."""
    import torch

    from lgur.checkpoint import save_model
    from lgur.config import load_config
    from lgur.data.synth import generate
    from lgur.models import build_model
    from lgur.search.index import build_index

    cfg = load_config(recipe)
    torch.manual_seed(0)
    checkpoint = tmp / "model.safetensors"
    save_model(build_model(cfg, 0, pretrained=False), cfg, checkpoint, 0)
    generate(tmp / "synth", num_ids=24, seed=0, images_per_id=4, workers=1, progress=False)
    index = tmp / "gallery.lgidx"
    build_index(checkpoint, tmp / "synth" / "imgs", index, num_workers=0, progress=False)
    return index, checkpoint


def queries(n: int) -> list[str]:
    import numpy as np

    from lgur.data.synth import describe, sample_identity

    rng = np.random.default_rng(0)
    return [describe(sample_identity(rng), rng) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, checkpoint: Path | None, batch_max: int | None, port: int,
                 extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lgur", "serve", "--index", str(index), "--device", "cpu", "--port", str(port)]
    cmd += ["--checkpoint", str(checkpoint)] if checkpoint else []
    cmd += ["--batch-max", str(batch_max)] if batch_max else []
    cmd += extra
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lgur serve exited ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/api/info", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"lgur serve did not answer within {timeout:.0f} s")


async def post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: dict) -> tuple[int, dict]:
    """One POST on a kept-alive HTTP/1.1 connection -> (status, parsed JSON). A minimal client on purpose: the
    load generator shares the server's cores, and httpx spent ~6 ms of CPU per request here, a fifth of what
    the server spends on a query; this one spends well under 1 ms."""
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    length = int(next(v for k, v in fields.items() if k.strip().lower() == "content-length"))
    return status, json.loads(await reader.readexactly(length))


async def hammer(url: str, texts: list[str], requests: int, clients: int, k: int) -> tuple[float, list[float]]:
    """`requests` searches from `clients` concurrent keep-alive connections -> (wall seconds, latencies)."""
    latencies: list[float] = []
    next_i = 0
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)

    async def client() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_i < requests:
                i, next_i = next_i, next_i + 1
                t = time.perf_counter()
                status, answer = await post_json(reader, writer, "/api/search", {"query": texts[i % len(texts)], "k": k})
                latencies.append(time.perf_counter() - t)
                if status != 200 or len(answer["results"]) != k:
                    raise SystemExit(f"bad answer {status}: {str(answer)[:300]}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - t0, latencies


def run(label: str, index: Path, checkpoint: Path | None, batch_max: int | None, texts: list[str],
        args: argparse.Namespace, extra: list[str] = ()) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(index, checkpoint, batch_max, port, list(extra))
    try:
        wait_ready(proc, url)
        asyncio.run(hammer(url, texts, args.warmup, args.clients, args.k))
        before = load()
        wall, lat = asyncio.run(hammer(url, texts, args.requests, args.clients, args.k))
        after = load()
        mean_batch = httpx.get(url + "/api/info", timeout=30).json().get("batch_recent_mean") or 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    q = statistics.quantiles(lat, n=100, method="inclusive")
    rps = len(lat) / wall
    print(f"| {label:<34} | {rps:8.1f} | {q[49] * 1e3:8.0f} | {q[98] * 1e3:8.0f} | {max(lat) * 1e3:8.0f} | "
          f"{mean_batch:10.1f} | {before} -> {after}", flush=True)
    return rps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="lgur_small_synth", help="model recipe for the built index (no --index)")
    ap.add_argument("--index", type=Path, help="an existing index (default: build one)")
    ap.add_argument("--checkpoint", type=Path, help="its model (default: the one recorded in the index)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch-max", type=int, help="the 'after' setting (default: search.serve_batch_max)")
    args = ap.parse_args()
    if not 1 <= args.clients <= 512 or not 1 <= args.requests <= 100_000:
        raise SystemExit("--clients must be in 1..512 and --requests in 1..100000")

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        index, checkpoint = (args.index, args.checkpoint) if args.index else build(args.recipe, Path(tmp))
        texts = queries(500)
        from lgur.config import defaults

        after = args.batch_max or int(defaults().search.serve_batch_max)
        what = args.index or f"random-init {args.recipe}, 96-image synthetic gallery"
        print(f"lgur serve, {what}: {args.requests} requests (k={args.k}) from {args.clients} clients, "
              f"{os.cpu_count()} CPUs")
        print("| setting                            | req/s    | p50 ms   | p99 ms   | max ms   | mean batch | load")
        print("|------------------------------------|----------|----------|----------|----------|------------|-----")
        base = run("batching off (max 1)", index, checkpoint, 1, texts, args)
        new = run(f"micro-batching (max {after}), 1 worker", index, checkpoint, after, texts, args,
                  ["--batch-workers", "1"])
        par = run(f"  ... a worker per core", index, checkpoint, after, texts, args, ["--batch-workers", "0"])
        print(f"throughput vs batching off: micro-batching {new / base:.2f}x, with a worker per core {par / base:.2f}x")


if __name__ == "__main__":
    main()
