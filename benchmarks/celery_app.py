"""The Celery app of the Celery benchmark: no-op tasks, unlocked and under ``hilok_write``.

Configured from ``HILOK_BENCH_REDIS`` (``redis://127.0.0.1:PORT``): the broker is database 1,
the locks live in database 0. Every finished task increments ``bench:celery:done:<name>``
(from ``task_postrun``, after the lock is released), which is how the benchmark counts.

The locked tasks exist only when ``celery_hilok.HiLokTask`` can be imported; otherwise
:data:`HILOK_TASK_ERROR` says why.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import redis
from celery import Celery, signals

BASE_URL = os.environ.get("HILOK_BENCH_REDIS", "redis://127.0.0.1:6379")
DONE_KEY = "bench:celery:done:"

app = Celery("hilok_bench", broker=f"{BASE_URL}/1")
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    hilok_redis_url=f"{BASE_URL}/0",
    hilok_namespace="bench-celery",
)


def _noop(i: int) -> None:
    """The body of every benchmark task: nothing."""


noop = app.task(name="bench.noop")(_noop)

HILOK_TASK_ERROR: str | None = None
try:
    HiLokTask: Any = importlib.import_module("celery_hilok").HiLokTask
except (ImportError, AttributeError) as exc:
    HILOK_TASK_ERROR = f"`from celery_hilok import HiLokTask` failed: {exc}"
else:
    distinct = app.task(name="bench.distinct", base=HiLokTask, hilok_write="bench/{i}")(_noop)
    hot = app.task(
        name="bench.hot", base=HiLokTask, hilok_write="bench-hot", hilok_on_contention="wait"
    )(_noop)

_counter: dict[int, redis.Redis] = {}


def _count(sender: Any = None, **_: Any) -> None:
    pid = os.getpid()
    client = _counter.get(pid)
    if client is None:
        client = _counter[pid] = redis.Redis.from_url(f"{BASE_URL}/0")
    client.incr(DONE_KEY + str(sender.name))


signals.task_postrun.connect(_count, weak=False)
