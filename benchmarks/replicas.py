"""The cost of ``wait_replicas``: acquire+release with and without WAIT for one replica.

    python -m benchmarks.replicas              # 5 interleaved rounds of 2 s per cell
    python -m benchmarks.replicas --quick      # smoke mode

Starts its own master and one local replica (``replicaof``) on 127.0.0.1 and stops them at
the end. Each cell is ``hl.acquire(path, "write")`` then ``hl.release(lease)`` in a loop, on
its own tree (uncontended), with ``wait_replicas=0`` and ``wait_replicas=1`` side by side,
interleaved round by round so that machine noise hits both alike. Reported per cell:
pairs per second, the rate ratio (median of the per-round ratios wait_replicas=1 / 0),
and the median and 99th percentile latency of the acquire alone (the only call WAIT is
added to). Progress goes to stderr, a Markdown table to stdout, everything to
``--output`` (JSON) if given.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from benchmarks.run import machine
from celery_hilok import AsyncHiLok, HiLok
from tests._sentinel import ReplicaSet

WAITS = (0, 1)
#: (label, driver, concurrent clients sharing one instance)
CELLS = (("HiLok, 1 thread", "sync", 1), ("AsyncHiLok, 1 task", "async", 1))
CELLS_32 = (("AsyncHiLok, 32 tasks", "async", 32), ("HiLok, 32 threads", "sync", 32))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(count: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return {
        "rate": count / seconds,
        "acquire_median_ms": statistics.median(latencies) * 1000 if latencies else None,
        "acquire_p99_ms": p99 * 1000,
        "pairs": count,
    }


def sync_cell(url: str, wait: int, clients: int, duration: float, warmup: float) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    with HiLok(url, namespace="benchrepl", wait_replicas=wait) as hl:
        stop = threading.Event()
        measuring = threading.Event()
        counts = [0] * clients
        latencies: list[list[float]] = [[] for _ in range(clients)]

        def work(i: int) -> None:
            path = f"r{tag}{i}/a/b"
            mine = latencies[i]
            while not stop.is_set():
                start = time.perf_counter()
                lease = hl.acquire(path, "write")
                acquired = time.perf_counter()
                hl.release(lease)
                if measuring.is_set():
                    counts[i] += 1
                    mine.append(acquired - start)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(warmup)  # a benchmark's warm-up, not synchronisation
        measuring.set()
        began = time.perf_counter()
        time.sleep(duration)
        measuring.clear()
        elapsed = time.perf_counter() - began
        stop.set()
        for thread in threads:
            thread.join()
    return _summary(sum(counts), elapsed, [x for ls in latencies for x in ls])


def async_cell(url: str, wait: int, clients: int, duration: float, warmup: float) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        tag = uuid.uuid4().hex[:8]
        async with AsyncHiLok(url, namespace="benchrepl", wait_replicas=wait) as hl:
            state = {"measuring": False, "stop": False}
            counts = [0] * clients
            latencies: list[float] = []

            async def work(i: int) -> None:
                path = f"r{tag}{i}/a/b"
                while not state["stop"]:
                    start = time.perf_counter()
                    lease = await hl.acquire(path, "write")
                    acquired = time.perf_counter()
                    await hl.release(lease)
                    if state["measuring"]:
                        counts[i] += 1
                        latencies.append(acquired - start)

            tasks = [asyncio.create_task(work(i)) for i in range(clients)]
            await asyncio.sleep(warmup)
            state["measuring"] = True
            began = time.perf_counter()
            await asyncio.sleep(duration)
            state["measuring"] = False
            elapsed = time.perf_counter() - began
            state["stop"] = True
            await asyncio.gather(*tasks)
            return _summary(sum(counts), elapsed, latencies)

    return asyncio.run(main())


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {"sync": sync_cell, "async": async_cell}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("rate", "acquire_median_ms", "acquire_p99_ms"):
        out[key] = statistics.median(r[key] for r in runs)
    out["rounds"] = [round(r["rate"], 1) for r in runs]
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| clients | wait_replicas=0 /s | wait_replicas=1 /s | rate ratio | acquire median ms "
        "(0 / 1) | acquire p99 ms (0 / 1) |",
        "|---|---|---|---|---|---|",
    ]
    for label, cell in results["cells"].items():
        a, b = cell["0"], cell["1"]
        lines.append(
            f"| {label} | {a['rate']:.0f} | {b['rate']:.0f} | {cell['ratio']:.2f}x | "
            f"{a['acquire_median_ms']:.3f} / {b['acquire_median_ms']:.3f} | "
            f"{a['acquire_p99_ms']:.3f} / {b['acquire_p99_ms']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny durations")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell")
    parser.add_argument("--no-32", action="store_true", help="only the one-client cells")
    parser.add_argument("--output", type=Path, default=None, help="write every number here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (0.2 if args.quick else 2.0)
    warmup = 0.05 if args.quick else 0.3
    cells = CELLS if args.no_32 else CELLS + CELLS_32
    started = time.time()
    with ReplicaSet(replicas=1) as servers:
        url = f"{servers.master.url}/0"
        probe = redis.Redis.from_url(url)
        meta = machine(probe)
        probe.close()
        meta["command"] = "python -m benchmarks.replicas " + " ".join(argv or sys.argv[1:])
        meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        meta["rounds"], meta["duration"] = rounds, duration
        meta["loadavg_start"] = list(os.getloadavg())
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in range(rounds):
            for label, driver, clients in cells:
                for wait in WAITS:
                    say(f"round {r + 1}/{rounds}: {label}, wait_replicas={wait}")
                    result = RUNNERS[driver](url, wait, clients, duration, warmup)
                    runs.setdefault(label, {}).setdefault(str(wait), []).append(result)
        meta["loadavg_end"] = list(os.getloadavg())
        meta["seconds"] = round(time.time() - started, 1)
    cells_out: dict[str, Any] = {}
    for label, by_wait in runs.items():
        cell: dict[str, Any] = {w: median_of(rs) for w, rs in by_wait.items()}
        # Each round measured both side by side: the median of the per-round ratios is
        # steadier on a busy machine than the ratio of the medians.
        pairs = zip(by_wait["0"], by_wait["1"], strict=True)
        cell["ratio"] = statistics.median(b["rate"] / a["rate"] for a, b in pairs)
        cells_out[label] = cell
    results = {"meta": meta, "cells": cells_out}
    print(table(results))
    print(
        f"\n{meta['nproc']} CPUs ({meta['cpu']}), {meta['os']}, Python {meta['python']}, "
        f"redis-server {meta['redis_server']} (master and replica on 127.0.0.1), "
        f"redis-py {meta['redis_py']}; median of {rounds} interleaved round(s) of "
        f"{duration} s; load average {meta['loadavg_start'][0]:.2f} at start, "
        f"{meta['loadavg_end'][0]:.2f} at end; {meta['date']}"
    )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
