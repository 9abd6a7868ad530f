"""The Celery app of the contention benchmark (issue 13): one task per contention policy.

Configured from ``HILOK_BENCH_REDIS`` (``redis://127.0.0.1:PORT``) like
:mod:`benchmarks.celery_app`: the broker is database 1, the locks and the records live in
database 0. Every other setting is the project's or Celery's default (prefetch, the
``retry`` policy's backoff, ttl, ...): the point is to measure the defaults.

``cc.<policy>.work(path, run, kind, i, sent, seconds)`` takes ``hilok_write`` of ``path``
(a callable spec, since the path has many segments) with ``hilok_on_contention=<policy>``,
sleeps ``seconds`` and records what happened: its body RPUSHes one JSON line
``{"kind", "i", "sent", "start", "end", "pid"}`` to ``bench:cc:rec:<run>`` (``sent`` is the
sender's ``time.monotonic()``, start and end the body's: one system-wide clock on Linux).
Its ``task_postrun`` pushes the end state of every execution to ``bench:cc:end:<run>``,
except a contention retry (state RETRY), which increments ``bench:cc:retries:<run>``:
the benchmark waits until every task it sent has an end state.

A task exists only for the policies that ``celery_hilok.celery.config.POLICIES`` of this
version knows (:data:`KNOWN`), so that the module imports whatever the version.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, signals

from celery_hilok import HiLokTask
from celery_hilok.celery.config import POLICIES

BASE_URL = os.environ.get("HILOK_BENCH_REDIS", "redis://127.0.0.1:6379")
RECORDS = "bench:cc:rec:"
ENDS = "bench:cc:end:"
RETRIES = "bench:cc:retries:"
PREFIX = "cc."

#: the policies with a task here: every policy this version knows
KNOWN: tuple[str, ...] = tuple(POLICIES)

app = Celery("hilok_bench_contention", broker=f"{BASE_URL}/1")
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    hilok_redis_url=f"{BASE_URL}/0",
    hilok_namespace="bench-cc",
)

_clients: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    """One connection per process (the pool's children fork from the main process)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        client = _clients[pid] = redis.Redis.from_url(f"{BASE_URL}/0")
    return client


def task_name(policy: str) -> str:
    return f"{PREFIX}{policy}.work"


def lock_path(path: str, run: str, kind: str, i: int, sent: float, seconds: float) -> str:
    """The lock spec of every task: the ``path`` argument, as it is."""
    return path


def _work(path: str, run: str, kind: str, i: int, sent: float, seconds: float) -> None:
    start = time.monotonic()
    if seconds > 0:
        time.sleep(seconds)
    end = time.monotonic()
    record = {"kind": kind, "i": i, "sent": sent, "start": start, "end": end, "pid": os.getpid()}
    _client().rpush(RECORDS + run, json.dumps(record))


for _policy in KNOWN:
    app.task(
        name=task_name(_policy),
        base=HiLokTask,
        hilok_write=lock_path,
        hilok_on_contention=_policy,
    )(_work)


def _ended(sender: Any = None, kwargs: Any = None, state: Any = None, **_: Any) -> None:
    name = str(getattr(sender, "name", ""))
    if not name.startswith(PREFIX) or not isinstance(kwargs, dict) or "run" not in kwargs:
        return
    run = str(kwargs["run"])
    # a contention retry, or a parked execution (the park policy: sent again later)
    if state == "RETRY" or getattr(sender.request, "_hilok_parked", False):
        _client().incr(RETRIES + run)
    else:
        _client().rpush(ENDS + run, str(state))


signals.task_postrun.connect(_ended, weak=False)
