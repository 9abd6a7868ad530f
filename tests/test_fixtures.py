"""The test fixtures themselves: a real Redis answers, restarts lose all data."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests._redis import RedisServer, find_redis_server

needs_binary = pytest.mark.skipif(
    find_redis_server() is None, reason="needs a local redis-server binary"
)


def test_redis_client_pings(redis_client: redis.Redis, redis_url: str) -> None:
    assert redis_url.endswith("/0")
    assert redis_client.ping() is True
    assert redis_client.connection_pool.connection_kwargs["db"] == 0


def test_namespace_is_unique(redis_client: redis.Redis, namespace: str) -> None:
    assert re.fullmatch(r"t[0-9a-f]{12}", namespace)
    key = f"{namespace}:probe"
    assert redis_client.set(key, "1", nx=True, px=10_000)
    assert redis_client.get(key) == b"1"
    redis_client.delete(key)


def test_celery_config_uses_separate_databases(
    celery_config: dict[str, Any], redis_server: str
) -> None:
    assert celery_config == {
        "broker_url": f"{redis_server}/1",
        "result_backend": f"{redis_server}/2",
        "hilok_redis_url": f"{redis_server}/3",
    }


@needs_binary
def test_restart_keeps_port_and_loses_data() -> None:
    with RedisServer() as server:
        port, url = server.port, server.url
        assert url == f"redis://127.0.0.1:{port}"
        client = redis.Redis.from_url(url)
        try:
            client.set("survives", "no")
            assert client.get("survives") == b"no"
            old_pid = server.pid

            server.restart()

            assert server.running
            assert server.port == port
            assert server.pid != old_pid
            # The old connection died with the old process; redis-py reconnects.
            assert client.ping() is True
            assert client.get("survives") is None
            assert client.dbsize() == 0
        finally:
            client.close()
    assert not server.running


@needs_binary
def test_kill_then_start(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory(extra_args=("--maxmemory", "64mb"))
    client = server.client(socket_timeout=2, retry=Retry(NoBackoff(), 0))
    try:
        assert client.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
        server.kill()
        assert not server.running
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        server.start()
        assert client.ping() is True
    finally:
        client.close()
