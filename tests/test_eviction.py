"""A Redis whose maxmemory-policy can evict lock keys is reported once, at first use."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from celery_hilok import AsyncHiLok, HiLok
from tests._redis import RedisServer


def test_evicting_policy_is_warned_once(
    redis_server_factory: Callable[..., RedisServer],
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = redis_server_factory(extra_args=("--maxmemory-policy", "allkeys-lru"))
    hl = HiLok(server.url + "/0", namespace=namespace)
    try:
        with caplog.at_level(logging.WARNING, logger="celery_hilok"):
            hl.release(hl.acquire("e/1", "write"))
            hl.release(hl.acquire("e/2", "write"))
    finally:
        hl.close()
    warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warnings) == 1
    assert "'allkeys-lru'" in warnings[0] and f"127.0.0.1:{server.port}" in warnings[0]


def test_async_evicting_policy_is_warned(
    redis_server_factory: Callable[..., RedisServer],
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = redis_server_factory(extra_args=("--maxmemory-policy", "volatile-ttl"))

    async def main() -> None:
        ahl = AsyncHiLok(server.url + "/0", namespace=namespace)
        try:
            await ahl.release(await ahl.acquire("e", "read"))
        finally:
            await ahl.close()

    with caplog.at_level(logging.WARNING, logger="celery_hilok"):
        asyncio.run(main())
    assert any("'volatile-ttl'" in r.getMessage() for r in caplog.records)


def test_noeviction_and_refused_config_are_silent(
    redis_server_factory: Callable[..., RedisServer],
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet = redis_server_factory()  # the default policy is noeviction
    locked_down = redis_server_factory(extra_args=("--rename-command", "CONFIG", ""))
    with caplog.at_level(logging.WARNING, logger="celery_hilok"):
        for server in (quiet, locked_down):
            hl = HiLok(server.url + "/0", namespace=namespace)
            try:
                hl.release(hl.acquire("q", "write"))
            finally:
                hl.close()
    assert not [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
