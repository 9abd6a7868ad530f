"""Shared pytest fixtures: a real redis-server for the session, clients, namespaces.

Set HILOK_REDIS_URL=redis://host:port to run against an existing server instead of
starting one (tests write to databases 0-3 there, isolated by unique key namespaces).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from hypothesis import settings

from tests._redis import RedisServer, RedisServerError, find_redis_server

# Celery's own fixtures (celery_app, celery_worker, ...). The pytest-celery plugin,
# also registered under the name "celery", is disabled by `-p no:celery` in pyproject.
pytest_plugins = ("celery.contrib.pytest",)

# Tests talk to a real server: timings vary too much for Hypothesis' deadlines.
settings.register_profile("hilok", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hilok"))


def _server_base_url(url: str) -> str:
    """`scheme://[auth@]host:port` of HILOK_REDIS_URL: any db path is dropped."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.netloc:
        pytest.fail(f"HILOK_REDIS_URL must look like redis://host:port, got {url!r}", pytrace=False)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """Base URL `redis://127.0.0.1:<port>` of the session's Redis server (no db number).

    Started here as a non-persistent redis-server subprocess on a free port, or taken
    from HILOK_REDIS_URL when that is set.
    """
    external = os.environ.get("HILOK_REDIS_URL")
    if external:
        yield _server_base_url(external)
        return
    server = RedisServer()
    try:
        server.start()
    except RedisServerError as exc:
        pytest.fail(f"could not start redis-server for the tests: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """URL of database 0 on the session's server."""
    return f"{redis_server}/0"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A redis-py client on database 0, closed after the test."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def namespace() -> str:
    """A unique key namespace, e.g. `t1a2b3c4d5e6f`; tests isolate by it, never FLUSHDB."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start extra private redis-servers (for restarts and crashes); all stopped at teardown.

    `redis_server_factory(port=None, extra_args=(), **kwargs)` returns a started
    RedisServer. Skips the test when HILOK_REDIS_URL is set and no local binary exists.
    """
    if find_redis_server() is None:
        if os.environ.get("HILOK_REDIS_URL"):
            pytest.skip("needs a local redis-server binary (HILOK_REDIS_URL is set)")
        pytest.fail("no redis-server binary found (run `python3 dev.py setup`)", pytrace=False)
    servers: list[RedisServer] = []

    def factory(*args: Any, **kwargs: Any) -> RedisServer:
        server = RedisServer(*args, **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def celery_config(redis_server: str) -> dict[str, Any]:
    """Celery settings (overrides celery.contrib.pytest's fixture of the same name)."""
    return {
        "broker_url": f"{redis_server}/1",
        "result_backend": f"{redis_server}/2",
        "hilok_redis_url": f"{redis_server}/3",
    }
