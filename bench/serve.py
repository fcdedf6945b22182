"""Throughput and latency of ``p5rec serve`` at 1, 8 and 64 concurrent clients, beside ``recommend_batch``.

    OMP_NUM_THREADS=1 python bench/serve.py --run runs/<run> --out bench/results/serve-cpu.json

Next-item requests (``POST /recommend``, k=10) built from the run's own test records (user and history, as the
sequential test split holds them). ``p5rec serve`` runs in a subprocess (one torch thread, no studio). For each
level C: ``P5Rec.recommend_batch`` in this process on the same requests in batches of C (what the model gives
without HTTP; the server idles meanwhile), then C closed-loop clients in this process (plain asyncio HTTP/1.1,
one kept-alive connection each; a client sends its next request when the previous one is answered),
``--requests`` requests per level after a warm-up. Reports requests/s, client-side latency p50/p99, and the batch
sizes the server reports in ``/health``.

On a 2-core machine client and server share the cores; the numbers are for this machine as it was (the load
average before and after each level is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_requests(run, n: int, k: int = 10) -> list[dict]:
    """``n`` request bodies ``{"user", "history", "k"}`` from the run's sequential test records (cycled)."""
    table = run.prepared().family("sequential")["test"]
    cols = table.select_columns(["user", "history"])[:]
    base = [{"user": u, "history": list(h), "k": k} for u, h in zip(cols["user"], cols["history"]) if h]
    return [base[i % len(base)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    pos = (len(values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def in_process(rec, requests: list[dict], batch: int, k: int) -> dict:
    """``recommend_batch`` over ``requests`` in chunks of ``batch``: requests/s and per-call latency."""
    rec.recommend_batch(requests[:batch], k=k)  # warm-up
    calls = []
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch):
        t = time.perf_counter()
        rec.recommend_batch(requests[start : start + batch], k=k)
        calls.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    return {"batch": batch, "requests": len(requests), "seconds": round(seconds, 3),
            "requests_per_s": round(len(requests) / seconds, 1),
            "call_ms_p50": round(percentile(calls, 0.5) * 1000, 2)}


async def _request(reader, writer, host: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a kept-alive connection (POST with a JSON body, GET without): (status, body)."""
    if body is None:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    else:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    return status, await reader.readexactly(length)


async def load(host: str, port: int, bodies: list[dict | None], concurrency: int, path: str = "/recommend") -> dict:
    """``concurrency`` closed-loop clients, one kept-alive connection each, sending ``bodies`` (shared, in order)
    to ``POST path`` (a None body: ``GET path``); every answer is checked (status 200; for /recommend, ``k`` items).

    Plain asyncio HTTP/1.1 rather than httpx: httpx's AsyncClient tops out near 320 requests/s at 64 connections
    on this machine even for ``GET /health``, so it would measure itself, not the server."""
    latencies: list[float] = []
    errors = 0
    sizes: list[int] = []
    queue = [None if b is None else json.dumps(b).encode() for b in reversed(bodies)]
    want = bodies[0].get("k", 10) if bodies and bodies[0] is not None else None

    async def client():
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                status, answer = await _request(reader, writer, host, path, body)
                latencies.append(time.perf_counter() - t)
                result = json.loads(answer)
                if status != 200 or (want is not None and len(result.get("items", ())) != want):
                    errors += 1
                elif "batch_size" in result:
                    sizes.append(result["batch_size"])
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    seconds = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(bodies), "errors": errors, "seconds": round(seconds, 3),
            "requests_per_s": round(len(bodies) / seconds, 1),
            "latency_ms_p50": round(percentile(latencies, 0.5) * 1000, 2),
            "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
            "mean_batch_size_seen": round(statistics.fmean(sizes), 2) if sizes else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, port: int, window_ms: float, max_batch: int) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    process = subprocess.Popen(
        [sys.executable, "-m", "p5rec.cli", "serve", "--run", str(run_dir), "--port", str(port), "--no-studio",
         "--threads", "1", "--window-ms", str(window_ms), "--max-batch", str(max_batch)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"p5rec serve exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError("p5rec serve did not answer within 180 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory (read only)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve-cpu.json")
    parser.add_argument("--requests", type=int, default=640, help="measured requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="measure every level this many times (median kept)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch

    import p5rec
    from p5rec.serve.inference import P5Rec
    from p5rec.run import Run

    torch.set_num_threads(1)
    run = Run.open(args.run, "cpu")
    rec = P5Rec.from_run(run)
    bodies = build_requests(run, args.requests + max(levels) * 2, args.k)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(args.run), "task": f"POST /recommend, k={args.k}, the run's test users and histories",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": 1,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "note": "shared machine: other jobs were running on it (see load averages)"},
        "server": {"window_ms": args.window_ms, "max_batch": args.max_batch, "threads": 1, "studio": False},
        "p5rec_version": p5rec.__version__ if hasattr(p5rec, "__version__") else None,
        "recommend_batch": [], "serve": [],
    }
    measured = bodies[: args.requests]

    import httpx

    port = free_port()
    server = start_server(args.run, port, args.window_ms, args.max_batch)
    url = f"http://127.0.0.1:{port}"
    try:
        # Each level right after recommend_batch at the same batch size (the server idle meanwhile): on a shared
        # machine the two are compared under the same load.
        for c in [c for _ in range(args.repeat) for c in levels]:
            row = {**in_process(rec, measured, c, args.k), "load_average": round(os.getloadavg()[0], 2)}
            report["recommend_batch"].append(row)
            print("recommend_batch", row, flush=True)
            asyncio.run(load("127.0.0.1", port, bodies[args.requests : args.requests + 2 * c], c))  # warm-up
            before = httpx.get(f"{url}/health", timeout=30).json()["batching"]
            load_before = os.getloadavg()[0]
            row = asyncio.run(load("127.0.0.1", port, measured, c))
            after = httpx.get(f"{url}/health", timeout=30).json()["batching"]
            batches = after["batches"] - before["batches"]
            row.update(server_batches=batches,
                       server_mean_batch_size=round((after["requests"] - before["requests"]) / max(batches, 1), 2),
                       load_average_before=round(load_before, 2), load_average_after=round(os.getloadavg()[0], 2))
            report["serve"].append(row)
            print("serve", row, flush=True)
        # The floor: GET /health (no model, a small JSON answer) at the highest level, what HTTP alone costs here.
        c = max(levels)
        asyncio.run(load("127.0.0.1", port, [None] * (2 * c), c, "/health"))
        report["http_floor"] = {**asyncio.run(load("127.0.0.1", port, [None] * args.requests, c, "/health")),
                                "what": f"GET /health, {c} clients: HTTP and JSON without the model",
                                "load_average": round(os.getloadavg()[0], 2)}
        print("floor", report["http_floor"], flush=True)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    # the median of the repeats, level by level (the machine is shared: single runs vary by up to 2x)
    med = lambda rows, key: round(statistics.median(r[key] for r in rows), 2)  # noqa: E731
    summary = {}
    for c in levels:
        served = [r for r in report["serve"] if r["concurrency"] == c]
        direct = [r for r in report["recommend_batch"] if r["batch"] == c]
        summary[str(c)] = {"serve_requests_per_s": med(served, "requests_per_s"),
                           "serve_latency_ms_p50": med(served, "latency_ms_p50"),
                           "serve_latency_ms_p99": med(served, "latency_ms_p99"),
                           "server_mean_batch_size": med(served, "server_mean_batch_size"),
                           "recommend_batch_requests_per_s": med(direct, "requests_per_s"),
                           "errors": sum(r["errors"] for r in served)}
        summary[str(c)]["serve_vs_recommend_batch"] = round(
            summary[str(c)]["serve_requests_per_s"] / summary[str(c)]["recommend_batch_requests_per_s"], 2)
    report["summary"] = summary
    if "1" in summary and "64" in summary:
        report["speedup_64_vs_1"] = round(summary["64"]["serve_requests_per_s"] / summary["1"]["serve_requests_per_s"], 2)
        report["bar_3x_met"] = report["speedup_64_vs_1"] >= 3
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("recommend_batch", "serve", "machine")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
