"""Celery overhead: no-op tasks through a real prefork worker with the Redis broker.

For each variant (no lock; ``hilok_write`` on a distinct path per task; one hot path for
all tasks) the tasks are queued first, then a fresh worker is started on their queue, and
the throughput is taken between the worker's first ``skip`` completions and the last one
(so the worker's start-up is not counted). See :mod:`benchmarks.celery_app`.
"""

from __future__ import annotations

import importlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import redis

ROOT = Path(__file__).resolve().parent.parent

#: variant -> task name in :mod:`benchmarks.celery_app`
VARIANTS = {
    "unlocked": "bench.noop",
    "distinct": "bench.distinct",
    "hot": "bench.hot",
}


def load_app(base_url: str, name: str = "benchmarks.celery_app") -> ModuleType:
    """The benchmark app module ``name``, configured for the server at ``base_url``."""
    os.environ["HILOK_BENCH_REDIS"] = base_url
    module = importlib.import_module(name)
    if base_url != module.BASE_URL:  # imported earlier with another server
        module = importlib.reload(module)
    return module


def start_worker(
    base_url: str, queue: str, concurrency: int, log: IO[bytes], app: str = "benchmarks.celery_app"
) -> subprocess.Popen[bytes]:
    """``celery -A <app> worker -P prefork -c <concurrency>`` on ``queue``, in a process
    group of its own (its pool goes with it if it is killed); output to ``log``."""
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "-Q",
        queue,
        "-n",
        f"{queue}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "warning",
    ]
    env = {**os.environ, "HILOK_BENCH_REDIS": base_url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (warm shutdown), then SIGKILL to its process group after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this worker leads (its pool)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def tail(log: IO[bytes], size: int = 4000) -> str:
    """The last ``size`` characters a worker wrote to ``log``."""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-size:]


def _count_until(
    counter: redis.Redis,
    key: str,
    tasks: int,
    skip: int,
    worker: subprocess.Popen[bytes],
    log: IO[bytes],
    variant: str,
    timeout: float,
) -> tuple[tuple[float, int], int, float]:
    """Poll the done counter: (time and count when it passed ``skip``), count, time at end."""
    first: tuple[float, int] | None = None
    deadline = time.perf_counter() + timeout
    while True:
        done = int(counter.get(key) or 0)
        now = time.perf_counter()
        if first is None and done >= skip:
            first = (now, done)
        if done >= tasks:
            assert first is not None
            return first, done, now
        if worker.poll() is not None:
            raise RuntimeError(
                f"the {variant} worker exited with {worker.returncode}:\n{tail(log)}"
            )
        if now > deadline:
            raise RuntimeError(
                f"{variant}: {done}/{tasks} tasks done in {timeout}s; worker log:\n{tail(log)}"
            )
        time.sleep(0.002)


def run_variant(
    module: ModuleType,
    base_url: str,
    variant: str,
    tasks: int,
    skip: int,
    concurrency: int,
    timeout: float,
) -> dict[str, Any]:
    name = VARIANTS[variant]
    task = module.app.tasks[name]
    queue = f"bench.{variant}.{os.getpid()}.{time.monotonic_ns()}"
    counter = redis.Redis.from_url(f"{base_url}/0")
    key = module.DONE_KEY + name
    try:
        counter.delete(key)
        for i in range(tasks):
            task.apply_async(kwargs={"i": i}, queue=queue)
        before = _commandstats(counter)
        with tempfile.TemporaryFile() as log:
            worker = start_worker(base_url, queue, concurrency, log)
            try:
                first, done, now = _count_until(
                    counter, key, tasks, skip, worker, log, variant, timeout
                )
                after = _commandstats(counter)
            finally:
                stop_worker(worker)
    finally:
        counter.close()
    seconds = now - first[0]
    counted = done - first[1]
    per_task = {
        name: round((after[name] - before.get(name, 0)) / tasks, 2)
        for name in sorted(after, key=lambda n: before.get(n, 0) - after[n])
        # GET and INFO are this benchmark polling the counter
        if name not in ("get", "info") and after[name] > before.get(name, 0)
    }
    return {
        "variant": variant,
        "tasks": tasks,
        "counted": counted,
        "seconds": seconds,
        "rate": counted / seconds if seconds > 0 else 0.0,
        # Redis commands per task, worker start-up included (INFO commandstats counts the
        # commands run inside scripts too: evalsha is the number of script calls).
        "commands_per_task": per_task,
    }


def _commandstats(client: redis.Redis) -> dict[str, int]:
    info: dict[str, Any] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(entry["calls"])
        for name, entry in info.items()
        if isinstance(entry, dict)
    }


def run(
    base_url: str,
    *,
    tasks: int,
    skip: int,
    rounds: int,
    concurrency: int = 2,
    say: Any = print,
) -> dict[str, Any]:
    """Throughput of each variant (median of ``rounds``); locked ones skipped if need be."""
    module = load_app(base_url)
    variants = ["unlocked"]
    skipped = module.HILOK_TASK_ERROR
    if skipped is None:
        variants += ["distinct", "hot"]
    else:
        say(f"celery: locked variants skipped: {skipped}")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            result = run_variant(
                module, base_url, variant, tasks, skip, concurrency, timeout=60 + tasks / 20
            )
            say(f"celery {variant}: {result['rate']:.0f} tasks/s")
            runs[variant].append(result)
    rates = {v: statistics.median(r["rate"] for r in rs) for v, rs in runs.items()}
    return {
        "concurrency": concurrency,
        "pool": "prefork",
        "tasks_per_run": tasks,
        "skipped": skipped,
        "rates": rates,
        "runs": runs,
    }
