"""Real redis-server processes for tests (no fakes, no mocks).

`RedisServer` starts a throw-away, non-persistent redis-server on 127.0.0.1, and can
stop, kill (crash) and restart it on the same port, for fault-injection tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


_S = TypeVar("_S", bound="Service")


class Service:
    """A test service used as a context manager: started on entering the ``with`` block,
    stopped on leaving it, whatever happened inside."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisServerError(RuntimeError):
    """A redis-server process could not be started."""


def find_redis_server() -> str | None:
    """Path of the redis-server binary: $HILOK_REDIS_SERVER, else the one on PATH."""
    explicit = os.environ.get("HILOK_REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer(Service):
    """A redis-server subprocess on 127.0.0.1 without persistence.

    The port is fixed when the object is made, so `restart()` comes back on the same
    URL and clients can reconnect. Each start uses a fresh working directory, so no
    data survives a stop/restart. Use as a context manager, or call start()/stop().
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        *,
        binary: str | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self._auto_port = port is None
        self.port: int = free_port() if port is None else port
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.binary = binary
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._ever_started = False

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>` (no database number)."""
        return f"redis://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self._dir / "redis.log" if self._dir is not None else None

    def log(self) -> str:
        """What the current (or last failed) server process printed."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(encoding="utf-8", errors="replace")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"

    # ------------------------------------------------------------------- lifecycle

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Returns self."""
        if self.running:
            raise RedisServerError(f"{self!r} is already running")
        binary = self.binary or find_redis_server()
        if binary is None:
            raise RedisServerError(
                "no redis-server binary found: install one (apt install redis-server), "
                "set HILOK_REDIS_SERVER=/path/to/redis-server, or run `python3 dev.py setup`"
            )
        attempts = 3 if (self._auto_port and not self._ever_started) else 1
        for attempt in range(attempts):
            try:
                self._spawn(binary)
                self._wait_ready()
            except RedisServerError as exc:
                log = self.log()
                self._terminate()
                self._cleanup_dir()
                # The free port we picked may have been taken meanwhile: pick another.
                if "Address already in use" in log and attempt + 1 < attempts:
                    self.port = free_port()
                    continue
                raise RedisServerError(f"{exc}\n--- redis-server log ---\n{log}") from None
            self._ever_started = True
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Shut the server down (SIGTERM, then SIGKILL) and delete its data."""
        self._terminate()
        self._cleanup_dir()

    def kill(self) -> None:
        """Crash the server with SIGKILL (no shutdown), then delete its data."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=STOP_TIMEOUT)
        self._proc = None
        self._cleanup_dir()

    def restart(self) -> RedisServer:
        """Stop and start again on the same port; all data is gone afterwards."""
        self.stop()
        return self.start()

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server; the caller closes it."""
        return redis.Redis(host=HOST, port=self.port, db=db, **kwargs)

    def __del__(self) -> None:
        # Last resort so a forgotten server does not outlive the test run.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    # ------------------------------------------------------------------- internals

    def _spawn(self, binary: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="hilok-redis-"))
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self._dir),
            *self.extra_args,
        ]
        with open(self._dir / "redis.log", "wb") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        client = redis.Redis(
            host=HOST,
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),  # we poll ourselves; no hidden backoff
        )
        try:
            while time.monotonic() < deadline:
                code = self._proc.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server on port {self.port} exited with code {code} at startup"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError as exc:  # not listening / still loading
                    last_error = exc
                time.sleep(0.05)
        finally:
            client.close()
        raise RedisServerError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{self.startup_timeout:.0f}s (last error: {last_error!r})"
        )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def _cleanup_dir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
