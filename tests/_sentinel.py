"""Replicated Redis for tests: a master with replicas, and Redis Sentinel on top.

Real redis-server processes on 127.0.0.1 only (no fakes). `ReplicaSet` is a master plus
`replicaof` replicas; `SentinelGroup` adds three sentinels monitoring the master as ``m``
(quorum 2) and can fail the master over, by ``SENTINEL FAILOVER`` or by killing it.
Everything is stopped on exit, also when a test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests._redis import (
    HOST,
    STARTUP_TIMEOUT,
    STOP_TIMEOUT,
    RedisServer,
    RedisServerError,
    Service,
    find_redis_server,
    free_port,
)

MASTER_NAME = "m"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000
#: No 5 s pause before a full sync (Redis 7's default, waiting for more replicas to come);
#: on replicas too, for when they are promoted.
NO_SYNC_DELAY = ("--repl-diskless-sync-delay", "0")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except redis.RedisError as exc:  # a server still starting, or gone for now
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(0.02)


def quick_client(port: int) -> redis.Redis:
    """A client that never retries and never waits long: for probing servers in tests."""
    return redis.Redis(
        host=HOST,
        port=port,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


def info(port: int, section: str) -> dict[str, Any]:
    client = quick_client(port)
    try:
        return client.info(section)
    finally:
        client.close()


class ReplicaSet(Service):
    """A master and ``replicas`` replicas of it, each a non-persistent redis-server."""

    def __init__(self, replicas: int = 1) -> None:
        self.master = RedisServer(extra_args=NO_SYNC_DELAY)
        self.replicas: list[RedisServer] = []
        self._count = replicas

    def start(self) -> ReplicaSet:
        try:
            self.master.start()
            for _ in range(self._count):
                replica = RedisServer(
                    extra_args=(*NO_SYNC_DELAY, "--replicaof", HOST, str(self.master.port))
                )
                self.replicas.append(replica)
                replica.start()
            self.wait_synced()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_synced(self, timeout: float = 15.0) -> None:
        """Wait until every replica's link to the master is up."""

        def synced() -> bool:
            links = [info(r.port, "replication").get("master_link_status") for r in self.replicas]
            connected = info(self.master.port, "replication").get("connected_slaves")
            return all(link == "up" for link in links) and connected == len(self.replicas)

        wait_for(synced, timeout, "the replicas to sync")

    @contextmanager
    def paused(self, replica: RedisServer) -> Iterator[None]:
        """Freeze ``replica`` (SIGSTOP) for the block: it stays connected but acks nothing."""
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(replica.pid, signal.SIGCONT)

    def servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    def stop(self) -> None:
        for server in self.servers():
            if server.pid is not None:
                try:  # a frozen server would not see the SIGTERM that stop() sends
                    os.kill(server.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            server.stop()


class SentinelServer:
    """One ``redis-server <conf> --sentinel`` process monitoring a master as ``m``."""

    def __init__(self, master_port: int, quorum: int = 2) -> None:
        self.port = free_port()
        self.myid = secrets.token_hex(20)
        self.master_port = master_port
        self.quorum = quorum
        #: Lines naming the other sentinels and the replicas, so that the group is ready at
        #: once (discovering them through the master takes sentinels several seconds).
        self.known: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    def start(self) -> SentinelServer:
        binary = find_redis_server()
        if binary is None:
            raise RedisServerError("no redis-server binary found")
        self._dir = Path(tempfile.mkdtemp(prefix="hilok-sentinel-"))
        conf = self._dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {HOST}\n"
            "daemonize no\n"
            f"dir {self._dir}\n"
            "sentinel resolve-hostnames no\n"
            f"sentinel monitor {MASTER_NAME} {HOST} {self.master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            f"sentinel myid {self.myid}\n" + "".join(f"{line}\n" for line in self.known),
            encoding="utf-8",
        )
        with open(self._dir / "sentinel.log", "wb") as log:
            self._proc = subprocess.Popen(
                [binary, str(conf), "--sentinel"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        try:
            wait_for(self._ping, STARTUP_TIMEOUT, f"sentinel on port {self.port}")
        except AssertionError as exc:
            text = self.log()
            self.stop()
            raise RedisServerError(f"{exc}\n--- sentinel log ---\n{text}") from None
        return self

    def _ping(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RedisServerError(f"sentinel exited with code {self._proc.returncode}")
        client = self.client()
        try:
            return bool(client.ping())
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return quick_client(self.port)

    def log(self) -> str:
        if self._dir is None or not (self._dir / "sentinel.log").exists():
            return ""
        return (self._dir / "sentinel.log").read_text(encoding="utf-8", errors="replace")

    def master_port_now(self) -> int | None:
        """The port of the master as this sentinel sees it."""
        client = self.client()
        try:
            addr = sentinel_command(client, "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        finally:
            client.close()
        return int(addr[1]) if isinstance(addr, (tuple, list)) else None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


class SentinelGroup(Service):
    """A master, one replica and three sentinels (quorum 2), all on 127.0.0.1."""

    def __init__(self, sentinels: int = 3) -> None:
        self.data = ReplicaSet(replicas=1)
        self.sentinels: list[SentinelServer] = []
        self._count = sentinels

    @property
    def url(self) -> str:
        """The kombu-style URL of the group: every sentinel, and the master's name."""
        hosts = ";".join(f"sentinel://{HOST}:{s.port}" for s in self.sentinels)
        return f"{hosts}?master_name={MASTER_NAME}"

    def start(self, *, ready_for_failover: bool = True) -> SentinelGroup:
        try:
            self.data.start()
            self.sentinels = [SentinelServer(self.data.master.port) for _ in range(self._count)]
            for sentinel in self.sentinels:
                sentinel.known = [
                    f"sentinel known-sentinel {MASTER_NAME} {HOST} {s.port} {s.myid}"
                    for s in self.sentinels
                    if s is not sentinel
                ] + [
                    f"sentinel known-replica {MASTER_NAME} {HOST} {r.port}"
                    for r in self.data.replicas
                ]
                sentinel.start()
            if ready_for_failover:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until every sentinel knows the replica and the other sentinels (both are
        needed to fail over: a replica to promote, and a quorum to agree)."""
        others = self._count - 1

        def ready() -> bool:
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    state = _pairs(sentinel_command(client, "MASTER", MASTER_NAME))
                finally:
                    client.close()
                if int(state["num-other-sentinels"]) < others or int(state["num-slaves"]) < 1:
                    return False
                replicas = self.sentinel_replicas(sentinel)
                if not any("disconnected" not in r["flags"] for r in replicas):
                    return False
            return True

        wait_for(ready, timeout, "the sentinels to know each other and the replica")

    @staticmethod
    def sentinel_replicas(sentinel: SentinelServer) -> list[dict[str, Any]]:
        client = sentinel.client()
        try:
            replicas = [_pairs(r) for r in sentinel_command(client, "REPLICAS", MASTER_NAME)]
        finally:
            client.close()
        return replicas

    def master_port(self) -> int:
        ports = {s.master_port_now() for s in self.sentinels}
        assert len(ports) == 1, f"sentinels disagree on the master: {ports}"
        port = ports.pop()
        assert port is not None
        return port

    def server_on(self, port: int) -> RedisServer:
        for server in self.data.servers():
            if server.port == port:
                return server
        raise AssertionError(f"no server of the group on port {port}")

    @contextmanager
    def switch_watch(self) -> Iterator[Callable[[float], int]]:
        """Subscribe to ``+switch-master`` on a sentinel; the block gets ``wait(timeout)``,
        which returns the new master's port once the switch is announced (and every
        sentinel reports it, and that server says it is a master)."""
        sub = self.sentinels[0].client()
        pubsub = sub.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
        pubsub.subscribe("+switch-master")
        wait_for(
            lambda: (m := pubsub.get_message(timeout=0.1)) and m["type"] == "subscribe",
            5.0,
            "the +switch-master subscription",
        )

        def wait(timeout: float) -> int:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no +switch-master within {timeout}s")
                message = pubsub.get_message(timeout=min(left, 1.0))
                if message and message["type"] == "message":
                    # "<name> <old ip> <old port> <new ip> <new port>"
                    new_port = int(str(message["data"]).split()[4])
                    break
            wait_for(
                lambda: all(s.master_port_now() == new_port for s in self.sentinels),
                max(1.0, deadline - time.monotonic()),
                "every sentinel to report the new master",
            )
            wait_for(
                lambda: info(new_port, "replication")["role"] == "master",
                max(1.0, deadline - time.monotonic()),
                "the promoted replica to be a master",
            )
            return new_port

        try:
            yield wait
        finally:
            pubsub.close()
            sub.close()

    def failover(self) -> None:
        """A managed failover: ask a sentinel to promote the replica now."""
        client = self.sentinels[0].client()
        try:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def crash_master(self) -> int:
        """Kill the current master (SIGKILL, as a crash); returns its port."""
        port = self.master_port()
        self.server_on(port).kill()
        return port

    def logs(self) -> str:
        return "\n".join(f"--- sentinel {s.port} ---\n{s.log()[-3000:]}" for s in self.sentinels)

    def stop(self) -> None:
        # Sentinels first, so that stopping the data servers does not start a failover.
        for sentinel in self.sentinels:
            sentinel.stop()
        self.data.stop()


def sentinel_command(client: redis.Redis, *args: str) -> Any:
    """``SENTINEL <args>``, its raw reply decoded (redis-py's sentinel_* helpers parse their
    replies with callbacks that break on some releases, e.g. 6.4's sentinel_master)."""
    reply = client.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]
    return _decode(reply)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {_decode(k): _decode(v) for k, v in value.items()}
    return value


def _pairs(reply: Any) -> dict[str, Any]:
    """A sentinel's description of a server: a flat [key, value, ...] list, or (some
    redis-py releases parse it) a dict already."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))
