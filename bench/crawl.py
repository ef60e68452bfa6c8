#!/usr/bin/env python3
"""Benchmark of the crawl step against the local Open-Meteo server with injected latency.

Measured in one run: 2,000 windows fetched batched and one call per window (each from a cold cache: other
windows), then the batched crawl again on its warm cache (goal: 0 calls). The cache is the warehouse's
(--dsn, default $VPE_WAREHOUSE_DSN, e.g. a local stack's warehouse). Prints a table. Not run in CI.
The local rate limit is off: this measures round trips, not the free tier's quota (which weighs each
location the same, batched or not).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tasks" / "ingestion"
NO_RATE_LIMIT = ["--calls-per-minute", "0", "--calls-per-hour", "0", "--calls-per-day", "0"]


def default_python() -> str:
    """The ingestion env: the executor's build, else the tests' build, else this python."""
    for candidate in (ROOT / ".vpe" / "envs" / "ingestion", ROOT / ".vpe" / "test-envs" / "ingestion"):
        if (candidate / "bin" / "python").exists():
            return str(candidate / "bin" / "python")
    return sys.executable


def write_windows(folder: Path, count: int, seed: int) -> None:
    """count/2 events at scattered places, each with its event day and the day one year earlier."""
    rng = random.Random(seed)
    lines = ["catalog_id,is_event,latitude,longitude,window_date"]
    for event in range(count // 2):
        lat, lon = round(rng.uniform(-55, 65), 4), round(rng.uniform(-180, 180), 4)
        year, month, day = rng.randint(2000, 2023), rng.randint(1, 12), rng.randint(1, 28)
        lines.append(f"b{event},true,{lat},{lon},{year}-{month:02d}-{day:02d}")
        lines.append(f"b{event},false,{lat},{lon},{year - 1}-{month:02d}-{day:02d}")
    folder.mkdir(parents=True)
    (folder / "windows-bench.csv").write_text("\n".join(lines) + "\n")


def stats(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/v1/archive", "/stats"), timeout=10) as response:
        return json.load(response)


def crawl(python: str, url: str, folder: Path, dsn: str, batch_size: int) -> tuple[int, float]:
    """(API calls the server counted, wall seconds) for one crawl run."""
    before = stats(url)["calls"]
    started = time.monotonic()
    subprocess.run([python, str(TASKS / "crawl.py"), "--url", url, "--workspace", str(folder),
                    "--batch-size", str(batch_size), *NO_RATE_LIMIT], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONUNBUFFERED": "1", "VPE_WAREHOUSE_DSN": dsn})
    return stats(url)["calls"] - before, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=2000, help="windows to fetch (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=50, help="server latency per call (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100, help="batched run's windows per call (default: 100)")
    parser.add_argument("--python", default=default_python(), help="python of the ingestion env (default: %(default)s)")
    parser.add_argument("--dsn", default=os.environ.get("VPE_WAREHOUSE_DSN"),
                        help="the warehouse holding the crawl cache (default: $VPE_WAREHOUSE_DSN)")
    args = parser.parse_args()
    if not args.dsn:
        parser.error("the crawl cache is the warehouse's: pass --dsn or set VPE_WAREHOUSE_DSN")

    server = subprocess.Popen([sys.executable, str(TASKS / "open_meteo_server.py"), "--port", "0", "--quiet",
                               "--latency-ms", str(args.latency_ms)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        server.stdout.readline()
        url = re.search(r"http://\S+/v1/archive", server.stdout.readline()).group(0)
        with tempfile.TemporaryDirectory(prefix="vpe-bench-") as tmp:
            work = Path(tmp)
            for seed, name in enumerate(("batched", "single")):
                write_windows(work / name, args.windows, seed)
            print(f"crawl of {args.windows} windows, local server with {args.latency_ms:g} ms latency per call, "
                  f"{args.python}", flush=True)
            rows = [
                (f"batched ({args.batch_size}/call), cold cache",
                 *crawl(args.python, url, work / "batched", args.dsn, args.batch_size)),
                ("one call per window, cold cache", *crawl(args.python, url, work / "single", args.dsn, 1)),
                (f"batched ({args.batch_size}/call), rerun on warm cache",
                 *crawl(args.python, url, work / "batched", args.dsn, args.batch_size)),
            ]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    width = max(len(row[0]) for row in rows)
    print(f"| {'run':<{width}} | API calls | wall time |")
    print(f"|{'-' * (width + 2)}|----------:|----------:|")
    for name, calls, seconds in rows:
        print(f"| {name:<{width}} | {calls:>9} | {seconds:>8.1f}s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
