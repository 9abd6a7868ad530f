"""Round trips, counted by the server: one script call per acquire, release or refresh batch.

Each test uses its own redis-server so that nothing else moves the counters; ``CONFIG
RESETSTAT`` zeroes them once the scripts are loaded and the connections made. ``INFO
commandstats`` also counts the commands a script runs inside itself (``zadd``...), so only
the script calls themselves (``evalsha`` and its ``eval`` fallback) are counted.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

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


@pytest.mark.parametrize("engine", ["sync", "async"])
def test_a_hand_off_between_queued_writers_wakes_only_the_next(
    server: RedisServer, stats: redis.Redis, namespace: str, engine: str
) -> None:
    # Eight writers queue on one hot lock, in order; then the holder lets go and each, once
    # granted, lets go at once. Every release wakes only the writer at the queue's front, so
    # the hand-offs cost one acquire and one release each. (Waking every waiter would cost
    # 8 + 7 + ... + 1 = 36 acquires. A waiter's own timer, at most every KEEPALIVE seconds,
    # may add one more try each, hence the slack.)
    n = 8
    granted: list[int] = []

    def run_sync() -> None:
        with HiLok(f"{server.url}/0", namespace=namespace, ttl=30.0) as locks:
            holder = locks.acquire("hot", "write")
            with ThreadPoolExecutor(n) as pool:

                def writer(i: int) -> None:
                    lease = locks.acquire("hot", "write", timeout=30)
                    granted.append(i)
                    locks.release(lease)

                futures = []
                for i in range(n):
                    futures.append(pool.submit(writer, i))
                    queued(functools.partial(waiting, locks, i + 1))
                reset(stats)
                locks.release(holder)
                for future in futures:
                    future.result(timeout=30)

    async def run_async() -> None:
        async with AsyncHiLok(f"{server.url}/0", namespace=namespace, ttl=30.0) as locks:
            holder = await locks.acquire("hot", "write")

            async def writer(i: int) -> None:
                lease = await locks.acquire("hot", "write", timeout=30)
                granted.append(i)
                await locks.release(lease)

            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(writer(i)))
                for _ in range(2000):  # poll the queue until the writer is in (10 s at most)
                    if len((await locks.status("hot")).waiters) == i + 1:
                        break
                    await asyncio.sleep(0.005)
                else:
                    raise AssertionError("the writer did not queue")
            reset(stats)
            await locks.release(holder)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)

    if engine == "sync":
        run_sync()
    else:
        asyncio.run(run_async())
    assert granted == list(range(n))  # first come, first served
    calls = script_calls(stats)
    assert 2 * n + 1 <= calls <= 2 * n + 1 + n, calls


def waiting(locks: HiLok, count: int) -> bool:
    return len(locks.status("hot").waiters) == count


def queued(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "the writer did not queue"
        time.sleep(0.005)


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
