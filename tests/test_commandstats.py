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
from typing import Any

import pytest
import redis

from celery_hilok import AsyncHiLok, HiLok, Lease, LockNotAcquired
from celery_hilok._core import MAX_CALL_KEYS
from tests._redis import HOST, RedisServer

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
    assert stats.info("commandstats")["cmdstat_fcall"]["failed_calls"] == 0  # as functions


def test_context_manager_at_depth_8_costs_two_calls(hl: HiLok, stats: redis.Redis) -> None:
    reset(stats)
    with hl.write(DEEP) as lease:
        assert lease.path == DEEP
    assert script_calls(stats) == 2


def inner_commands(client: redis.Redis) -> dict[str, int]:
    """Commands scripts ran inside themselves since the last ``CONFIG RESETSTAT``."""
    info = client.info("commandstats")
    out = {}
    for key, value in info.items():
        name = key.removeprefix("cmdstat_")
        if name not in SCRIPT_COMMANDS and name not in ("config|resetstat", "info"):
            out[name] = int(value["calls"])
    return out


@pytest.mark.parametrize(("depth", "budget"), [(1, 12), (3, 18), (8, 33)])
def test_an_uncontended_pair_runs_few_commands_inside_its_scripts(
    hl: HiLok, stats: redis.Redis, depth: int, budget: int
) -> None:
    """Two calls, and inside them 2 TIME, one EXISTS probe each, the token's one SET, the
    holder's entry (HSET and PEXPIRE of its hash; HMGET and HDEL), and per level one ZADD,
    one PEXPIRE and one ZREM (issue 14; no sweep: every set the acquire writes is one it
    just made): a command more here is a regression of the uncontended path."""
    path = "/".join(f"n{i}" for i in range(depth))
    reset(stats)
    pairs = 10
    for _ in range(pairs):
        hl.release(hl.acquire(path, "write"))
    commands = inner_commands(stats)
    assert script_calls(stats) == 2 * pairs
    assert sum(commands.values()) == budget * pairs, commands
    assert "get" not in commands  # the token counter: one SET ... GET


def test_refresh_many_of_a_few_leases_costs_one_call(hl: HiLok, stats: redis.Redis) -> None:
    # Several holders, trees, depths and modes: 6 x 5 + 6 x 10 keys and 2 a tree (12
    # trees), under MAX_CALL_KEYS.
    leases = [hl.acquire(f"tree{i % 6}/n{i}/x/y", "write", ttl=20.0) for i in range(6)]
    leases += hl.acquire_many([(f"other{i}/{DEEP}", "read") for i in range(6)], ttl=20.0)
    assert len(leases) == 12
    reset(stats)
    assert hl.refresh_many(leases) == [True] * 12
    assert script_calls(stats) == 1
    hl.refresh(*leases)
    assert script_calls(stats) == 2


class CountingConnection(redis.Connection):
    """A connection that counts what it writes to its socket: one write per round trip
    (a pipeline goes out in one)."""

    writes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


@pytest.fixture
def counted(
    server: RedisServer, namespace: str
) -> Iterator[tuple[HiLok, type[CountingConnection]]]:
    connection_class = type("Counting", (CountingConnection,), {"writes": 0})
    pool = redis.ConnectionPool(host=HOST, port=server.port, connection_class=connection_class)
    client = redis.Redis(connection_pool=pool)
    locks = HiLok(client, namespace=namespace)
    lease = locks.acquire("warm/up", "write")  # load every script before counting
    locks.refresh(lease)
    locks.release(lease)
    try:
        yield locks, connection_class
    finally:
        locks.close()
        pool.disconnect()


def expiries(stats: redis.Redis, hl: HiLok, leases: list[Lease]) -> list[float]:
    """Server-side expiry (ms) of each lease's leaf mark, read from Redis."""
    pipe = stats.pipeline(transaction=False)
    for lease in leases:
        path = lease.request.path
        leaf = hl._protocol.keys.node_keys(path.tree, path.canonical)[3]  # a write: x
        pipe.zscore(leaf, f"{lease.handle}|X|{path.canonical}")
    return [float(score) for score in pipe.execute()]


def test_refresh_of_1000_deep_leases_is_cut_into_small_calls_in_one_round_trip(
    counted: tuple[HiLok, type[CountingConnection]], stats: redis.Redis
) -> None:
    hl, connection = counted
    leases: list[Lease] = []
    for h in range(4):  # four holders, ten trees, depth 8: 9 keys a grant (+ 2 per tree)
        paths = [f"t{i % 10}/l2/l3/l4/l5/l6/l7/h{h}n{i}" for i in range(250)]
        leases += hl.acquire_many([(p, "write") for p in paths], ttl=20.0)
    items = [(lease.handle, lease.request, 60.0) for lease in leases]
    batches = hl._protocol.refresh_batches(items, False)
    assert all(len(call.keys) <= MAX_CALL_KEYS for _, call in batches)
    # as few as the limit allows: 9,000 grant keys, and each call's trees' two keys
    assert -(-9000 // MAX_CALL_KEYS) <= len(batches) <= -(-1000 // ((MAX_CALL_KEYS - 20) // 9))
    before = expiries(stats, hl, leases)
    reset(stats)
    writes = connection.writes
    assert hl.refresh_many(leases, ttl=60.0) == [True] * 1000
    assert connection.writes - writes == 1  # one round trip
    assert script_calls(stats) == len(batches)  # some 60 calls
    after = expiries(stats, hl, leases)
    assert all(a > b + 30_000 for a, b in zip(after, before, strict=True))  # all renewed
    # The background refresher's ticks: one round trip each, of the same calls.
    # (renewed just now, for a first tick after the keep_alive loop: each tick renews all)
    assert hl.refresh_many(leases, ttl=60.0) == [True] * 1000
    reset(stats)
    writes = connection.writes
    for lease in leases:
        hl.keep_alive(lease, interval=1.0)
    start = leases[-1].renewed_at
    deadline = time.monotonic() + 30
    while not all(lease.renewed_at > start for lease in leases):
        assert time.monotonic() < deadline, "the refresher did not renew every lease"
        time.sleep(0.01)
    hl.stop_keep_alive(*leases)
    ticks = connection.writes - writes
    assert ticks >= 1 and script_calls(stats) == ticks * len(batches)
    hl.release(*leases)


def test_release_of_one_holders_many_leases_is_cut_into_small_calls_in_one_round_trip(
    counted: tuple[HiLok, type[CountingConnection]], stats: redis.Redis
) -> None:
    hl, connection = counted
    leases = hl.acquire_many([(f"r/l2/l3/l4/l5/l6/l7/n{i}", "write") for i in range(250)])
    batches = hl._protocol.release_batches([(x.handle, x.request) for x in leases], False)
    # budgeted by the keys a release writes: per grant its index and one mark per level
    # (it reads the other sets of each node too, to hand the locks on)
    written = [len(call.keys) - 6 - 7 * sum(int(d) for d in call.args[7::4]) for _, call in batches]
    assert all(n <= MAX_CALL_KEYS for n in written), written
    assert len(batches) > 1
    reset(stats)
    writes = connection.writes
    hl.release(*leases)
    assert connection.writes - writes == 1
    assert script_calls(stats) == len(batches)
    assert all(lease.released and not lease.lost for lease in leases)
    assert hl.status("r").holders == []


def test_multi_lock_acquire_and_one_holders_release_cost_one_call(
    hl: HiLok, stats: redis.Redis
) -> None:
    reset(stats)
    leases = hl.acquire_many([(f"t{i}/{DEEP}", "write") for i in range(6)])  # in budget
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
