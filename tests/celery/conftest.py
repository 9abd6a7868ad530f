"""Fixtures of the Celery tests: the configured app, an in-process worker, worker processes.

Two kinds of real worker, each consuming its own queue so they never take each other's
messages: an in-process worker (threads pool, started once per session) for the fast
cases, and ``celery worker -P prefork`` subprocesses for what needs real pool processes
(killing one, hard time limits, terminate, warm shutdown).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_hilok import HiLok
from celery_hilok.celery.park import stop_parking
from tests.celery import app as test_app

ROOT = Path(__file__).resolve().parents[2]
WORKER_START_TIMEOUT = 60.0
WORKER_STOP_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def hilok_config(celery_config: dict[str, Any]) -> dict[str, Any]:
    """The test app's configuration: the session's databases, its own namespace and queue."""
    config = {
        **celery_config,
        "hilok_namespace": f"c{uuid.uuid4().hex[:10]}",
        "task_default_queue": f"inproc-{uuid.uuid4().hex[:8]}",
    }
    test_app.app.conf.update(config)
    return config


@pytest.fixture(scope="session")
def app(hilok_config: dict[str, Any]) -> Iterator[Celery]:
    yield test_app.app
    gc.collect()  # AsyncResults unsubscribe from the result backend while it still exists


@pytest.fixture(scope="session")
def inproc_worker(app: Celery) -> Iterator[Any]:
    """A real worker in this process (threads pool, 6 threads) on the app's default queue."""
    with start_worker(
        app,
        pool="threads",
        concurrency=6,
        perform_ping_check=False,
        shutdown_timeout=30.0,
        loglevel="INFO",
    ) as worker:
        try:
            yield worker
        finally:
            stop_parking()  # the worker's parking thread (start_worker sends no shutdown)


@pytest.fixture
def run() -> str:
    """A unique id for one test: the root of its lock tree and the prefix of its records."""
    return f"r{uuid.uuid4().hex[:10]}"


@pytest.fixture
def lab(hilok_config: dict[str, Any]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(hilok_config["hilok_redis_url"], decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def hl(hilok_config: dict[str, Any]) -> Iterator[HiLok]:
    """An outside client on the same namespace as the tasks."""
    client = HiLok(hilok_config["hilok_redis_url"], namespace=hilok_config["hilok_namespace"])
    try:
        yield client
    finally:
        client.close()


class WorkerProcess:
    """``celery -A tests.celery.app worker -P prefork`` as a subprocess, on its own queue."""

    def __init__(
        self,
        config: dict[str, Any],
        concurrency: int = 2,
        *extra: str,
        pool: str = "prefork",
        queue: str | None = None,
    ) -> None:
        self.pool = pool
        self.queue = queue or f"proc-{uuid.uuid4().hex[:8]}"
        self.ready_key = f"lab:ready:{self.queue}:{uuid.uuid4().hex[:8]}"
        self.config = {**config, "task_default_queue": self.queue}
        self.concurrency = concurrency
        self.extra = extra
        self.log_path = Path(tempfile.mkstemp(prefix="hilok-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, lab: redis.Redis) -> WorkerProcess:
        env = {
            **os.environ,
            test_app.CONFIG_ENV: json.dumps(self.config),
            test_app.READY_ENV: self.ready_key,
            "PYTHONUNBUFFERED": "1",
        }
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery.app",
            "worker",
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "-Q",
            self.queue,
            "-n",
            f"{self.queue}@%h",
            "-l",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            *self.extra,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not lab.get(self.ready_key):
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited at startup:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready in {WORKER_START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    @property
    def node(self) -> str:
        """The worker's node name (``-n <queue>@%h``), e.g. for control commands."""
        return f"{self.queue}@{socket.gethostname()}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def warm_shutdown(self) -> None:
        """SIGTERM: stop taking tasks, let the running ones finish, exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = WORKER_STOP_TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the pool processes too, whatever happened
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=10)
        self.log_path.unlink(missing_ok=True)


@pytest.fixture
def worker_factory(
    hilok_config: dict[str, Any], lab: redis.Redis
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def factory(
        concurrency: int = 2, *extra: str, pool: str = "prefork", queue: str | None = None
    ) -> WorkerProcess:
        worker = WorkerProcess(hilok_config, concurrency, *extra, pool=pool, queue=queue)
        started.append(worker)
        return worker.start(lab)

    try:
        yield factory
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="module")
def prefork_worker(hilok_config: dict[str, Any]) -> Iterator[WorkerProcess]:
    """One prefork worker (2 pool processes) shared by a module's tests."""
    client = redis.Redis.from_url(hilok_config["hilok_redis_url"], decode_responses=True)
    worker = WorkerProcess(hilok_config, 2)
    try:
        yield worker.start(client)
    finally:
        worker.stop()
        client.close()


def pytest_configure(config: pytest.Config) -> None:
    # Celery's Redis result backend calls a method redis-py 5+ deprecates.
    config.addinivalue_line("filterwarnings", "ignore:Call to deprecated setex:DeprecationWarning")


def run_keep_chain(queue: str, lab: redis.Redis, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run a three-step ``hilok_keep`` chain on the worker of ``queue`` and check that one
    holder, with one grant (one token), ran every step; returns the steps' start records."""
    from celery import chain

    from tests.celery.app import events, tasks

    run = f"r{uuid.uuid4().hex[:8]}"
    steps = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "step 1"),
        tasks.keep_step.s(run, "t1", "a1", "step 2"),
        tasks.last_step.s(run, "t1", "a1", "step 3"),
    )
    assert steps.apply_async(queue=queue).get(timeout=timeout) == "step 3"
    starts = [e for e in events(lab, run) if e["kind"] == "start"]
    assert [e["name"] for e in starts] == ["step 1", "step 2", "step 3"]
    assert len({e["handle"] for e in starts}) == 1  # one holder from first step to last
    assert len({str(e["tokens"]) for e in starts}) == 1  # the same grant, so the same token
    return starts
