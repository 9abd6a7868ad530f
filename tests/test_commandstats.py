"""Round trips, counted by the server: one script call per acquire, release or refresh batch.

Each test uses its own redis-server so that nothing else moves the counters; ``CONFIG
RESETSTAT`` zeroes them once the scripts are loaded and the connections made. ``INFO
commandstats`` also counts the commands a script runs inside itself (``zadd``...), so only
the script calls themselves (``evalsha`` and its ``eval`` fallback) are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from celery_hilok import AsyncHiLok, HiLok, LockNotAcquired
from tests._redis import RedisServer

DEEP = "l1/l2/l3/l4/l5/l6/l7/l8"
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


@pytest.fixture
def server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_server_factory()


@pytest.fixture
def stats(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def hl(server: RedisServer, namespace: str) -> Iterator[HiLok]:
    locks = HiLok(f"{server.url}/0", namespace=namespace)
    # Load every script and open the connection before counting.
    lease = locks.acquire("warm/up", "write")
    locks.refresh(lease)
    locks.status("warm/up")
    locks.release(lease)
    try:
        yield locks
    finally:
        locks.close()


def script_calls(client: redis.Redis) -> int:
    """Script calls the server has run since the last ``CONFIG RESETSTAT``."""
    info = client.info("commandstats")
    return sum(int(info.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPT_COMMANDS)


def reset(client: redis.Redis) -> None:
    client.config_resetstat()
    assert script_calls(client) == 0


@pytest.mark.parametrize("mode", ["read", "write", "read-node"])
def test_acquire_and_release_at_depth_8_cost_one_call_each(
    hl: HiLok, stats: redis.Redis, mode: str
) -> None:
    assert len(DEEP.split("/")) == 8
    reset(stats)
    lease = hl.acquire(DEEP, mode)  # type: ignore[arg-type]
    assert script_calls(stats) == 1
    hl.release(lease)
    assert script_calls(stats) == 2
    assert stats.info("commandstats")["cmdstat_evalsha"]["failed_calls"] == 0


def test_context_manager_at_depth_8_costs_two_calls(hl: HiLok, stats: redis.Redis) -> None:
    reset(stats)
    with hl.write(DEEP) as lease:
        assert lease.path == DEEP
    assert script_calls(stats) == 2


def test_refresh_many_of_100_leases_costs_one_call(hl: HiLok, stats: redis.Redis) -> None:
    # Many holders, many trees, mixed depths and modes.
    leases = [hl.acquire(f"tree{i % 7}/n{i}/x/y", "write", ttl=20.0) for i in range(50)]
    leases += hl.acquire_many([(f"other{i}/{DEEP}", "read") for i in range(50)], ttl=20.0)
    assert len(leases) == 100
    reset(stats)
    assert hl.refresh_many(leases) == [True] * 100
    assert script_calls(stats) == 1
    hl.refresh(*leases)
    assert script_calls(stats) == 2


def test_multi_lock_acquire_and_one_holders_release_cost_one_call(
    hl: HiLok, stats: redis.Redis
) -> None:
    reset(stats)
    leases = hl.acquire_many([(f"t{i}/{DEEP}", "write") for i in range(10)])
    assert script_calls(stats) == 1
    hl.release(*leases)
    assert script_calls(stats) == 2


def test_refused_acquire_costs_one_call(hl: HiLok, stats: redis.Redis) -> None:
    holder = hl.acquire(DEEP, "write")
    reset(stats)
    with pytest.raises(LockNotAcquired):
        hl.acquire("l1", "read", block=False)
    assert script_calls(stats) == 1
    hl.release(holder)


async def test_async_acquire_and_release_at_depth_8(
    server: RedisServer, stats: redis.Redis, namespace: str
) -> None:
    async with AsyncHiLok(f"{server.url}/0", namespace=namespace) as ahl:
        await ahl.release(await ahl.acquire("warm/up", "write"))
        reset(stats)
        lease = await ahl.acquire(DEEP, "write")
        assert script_calls(stats) == 1
        await ahl.release(lease)
        assert script_calls(stats) == 2
        async with ahl.read(DEEP):
            pass
        assert script_calls(stats) == 4
