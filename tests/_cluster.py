"""A real Redis Cluster of three masters on 127.0.0.1, for tests (no replicas, no fakes)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time

import redis

from tests._redis import RedisServer, RedisServerError, Service

CLUSTER_ARGS = (
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
)


def _cluster_port() -> int:
    """A free port p with p + 10000 (the cluster bus port) free too, both below 65536."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise RedisServerError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisClusterServers(Service):
    """Three cluster-enabled redis-server processes joined with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(_cluster_port(), CLUSTER_ARGS) for _ in range(masters)]

    @property
    def url(self) -> str:
        """A cluster URL (redis-py's RedisCluster.from_url discovers the other nodes)."""
        return self.nodes[0].url

    def start(self) -> RedisClusterServers:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerError("redis-cli is needed to create a cluster (Debian: redis-tools)")
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while True:
            states = [self._state(n) for n in self.nodes]
            if all(s == "ok" for s in states):
                return self
            if time.monotonic() > deadline:
                raise RedisServerError(f"cluster did not become ready: {states}")
            time.sleep(0.05)

    @staticmethod
    def _state(node: RedisServer) -> str:
        client = redis.Redis(host=node.host, port=node.port)
        try:
            info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        text = info.decode() if isinstance(info, bytes) else str(info)
        for line in text.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=self.nodes[0].host, port=self.nodes[0].port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
