"""Redis going away while locks are held: kept leases are reported lost once a whole ttl
passed without a renewal, instead of the holder going on believing it holds them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from celery_hilok import AsyncHiLok, HiLok, HiLokConnectionError, Lease
from tests._redis import RedisServer


def test_kept_lease_is_lost_when_redis_stays_away_for_a_ttl(
    redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()
    hl = HiLok(server.url + "/0", namespace=namespace, ttl=0.6)
    try:
        lease = hl.acquire("o/p", "write")
        lost = threading.Event()
        lease.on_lost(lambda _: lost.set())
        hl.keep_alive(lease)
        server.stop()
        assert lost.wait(30), "the refresher never reported the lease lost"
        assert lease.lost
        with pytest.raises(HiLokConnectionError) as info:
            hl.acquire("o/q", "write", block=False)
        assert f"127.0.0.1:{server.port}" in str(info.value)
    finally:
        hl.close()


def test_async_kept_lease_is_lost_when_redis_stays_away_for_a_ttl(
    redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()

    async def main() -> Lease:
        ahl = AsyncHiLok(server.url + "/0", namespace=namespace, ttl=0.6)
        try:
            lease = await ahl.acquire("o/p", "read")
            lost = asyncio.Event()
            lease.on_lost(lambda _: lost.set())
            ahl.keep_alive(lease)
            server.stop()
            await asyncio.wait_for(lost.wait(), 30)
            return lease
        finally:
            await ahl.close()

    assert asyncio.run(main()).lost
