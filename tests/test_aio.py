"""The lock engine through the asyncio driver, :class:`AsyncHiLok`, on a real redis-server."""

from __future__ import annotations

import asyncio
import pickle
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aredis

from celery_hilok import (
    AsyncHiLok,
    HiLokConnectionError,
    InvalidArgument,
    Lease,
    LockLost,
    LockNotAcquired,
    QueuedRequest,
)
from celery_hilok._core import Mode
from tests._redis import RedisServer, free_port

# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
async def ahl(redis_url: str, namespace: str) -> AsyncIterator[AsyncHiLok]:
    locks = AsyncHiLok(redis_url, namespace=namespace, ttl=10.0)
    try:
        yield locks
    finally:
        await locks.close()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, limit: float = 10.0
) -> None:
    """Poll ``predicate`` until it holds; fail (rather than hang) after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_for_waiter(ahl: AsyncHiLok, path: str, mode: Mode) -> QueuedRequest:
    """Wait until a ``mode`` request on ``path`` is queued; return its queue entry."""
    found: list[QueuedRequest] = []

    async def queued() -> bool:
        status = await ahl.status(path)
        found[:] = [w for w in status.waiters if w.mode == mode and w.path == path]
        return bool(found)

    await wait_until(queued, f"a queued {mode} request on {path!r}")
    return found[0]


async def handles(ahl: AsyncHiLok, path: str) -> set[str]:
    return {h.handle for h in (await ahl.status(path)).holders}


async def assert_only(ahl: AsyncHiLok, path: str, *leases: Lease) -> None:
    """Exactly ``leases`` hold anything on the line of ``path``, and nobody waits there."""
    status = await ahl.status(path)
    assert {h.handle for h in status.holders} == {lease.handle for lease in leases}
    assert status.waiters == []


# -- acquire and release --------------------------------------------------------------------


async def test_acquire_release(ahl: AsyncHiLok) -> None:
    lease = await ahl.acquire("/a//b/", "write")
    assert (lease.path, lease.mode, lease.ttl) == ("a/b", "write", 10.0)
    assert lease.token > 0
    await assert_only(ahl, "a", lease)
    await ahl.release(lease)
    assert lease.released
    await ahl.release(lease)  # idempotent
    await assert_only(ahl, "a")
    other = await ahl.acquire("a", "write", block=False)
    await other.release()  # the names of contract section 3, for both APIs
    assert other.released
    await other.release()
    await other.release_async()  # the older name still works
    await assert_only(ahl, "a")


async def test_block_false_refusal(ahl: AsyncHiLok) -> None:
    holder = await ahl.acquire("a/b", "read")
    with pytest.raises(LockNotAcquired) as info:
        await ahl.acquire("a", "write", block=False)
    assert info.value.path == "a" and info.value.mode == "write"
    assert f"read lock on 'a/b' held by {holder.handle[:6]}" in str(info.value)
    assert "block=False" in str(info.value)
    # Compatible requests pass.
    await ahl.release(await ahl.acquire("a", "read", block=False))
    await ahl.release(await ahl.acquire("a/c", "write", block=False))
    await ahl.release(holder)
    await assert_only(ahl, "a")


async def test_timeout(ahl: AsyncHiLok) -> None:
    holder = await ahl.acquire("t/x", "write")
    start = time.monotonic()
    with pytest.raises(LockNotAcquired) as info:
        await ahl.acquire("t", "read", timeout=0.3)
    assert time.monotonic() - start >= 0.3
    assert "within 0.3s" in str(info.value)
    await assert_only(ahl, "t", holder)
    await ahl.release(holder)


async def test_bad_arguments(ahl: AsyncHiLok) -> None:
    with pytest.raises(InvalidArgument):
        await ahl.acquire("", "read")
    with pytest.raises(InvalidArgument):
        await ahl.acquire("a", "lock")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await ahl.acquire("a", "read", timeout=-0.1)
    with pytest.raises(InvalidArgument):
        await ahl.acquire("a", "read", ttl=0)
    await assert_only(ahl, "a")


async def test_acquire_many_is_all_or_nothing(ahl: AsyncHiLok) -> None:
    blocker = await ahl.acquire("b/x", "write")
    with pytest.raises(LockNotAcquired):
        await ahl.acquire_many([("a", "write"), ("b", "read")], block=False)
    await assert_only(ahl, "a")
    await ahl.release(blocker)
    leases = await ahl.acquire_many([("a", "write"), ("b", "read")])
    assert leases[0].handle == leases[1].handle
    await ahl.release(*leases)
    await assert_only(ahl, "a")
    await assert_only(ahl, "b")


async def test_handle_is_reentrant_and_renews(ahl: AsyncHiLok) -> None:
    read = await ahl.acquire("r/a", "read", ttl=1.0)
    write = await ahl.acquire("r/a", "write", handle=read.handle, block=False)
    renewed = await ahl.acquire("r/a", "read", handle=read.handle, ttl=5.0, block=False)
    assert renewed.token == read.token
    await ahl.release(write, renewed)
    await assert_only(ahl, "r")


# -- waiting --------------------------------------------------------------------------------


async def test_waiter_is_woken_by_release(ahl: AsyncHiLok) -> None:
    holder = await ahl.acquire("w/a/b", "read")
    waiter = asyncio.create_task(ahl.acquire("w/a", "write", timeout=20))
    entry = await wait_for_waiter(ahl, "w/a", "write")
    assert not waiter.done()
    await ahl.release(holder)
    lease = await waiter
    assert lease.handle == entry.handle
    await assert_only(ahl, "w", lease)
    await ahl.release(lease)


async def test_waiters_on_another_instance_are_woken(
    ahl: AsyncHiLok, redis_url: str, namespace: str
) -> None:
    async with AsyncHiLok(redis_url, namespace=namespace) as other:
        holder = await ahl.acquire("w2", "write")
        waiters = [asyncio.create_task(other.acquire("w2", "read", timeout=20)) for _ in range(3)]
        await wait_until(
            lambda: _count_waiters(other, "w2", 3), "three queued readers on another instance"
        )
        await ahl.release(holder)
        leases = await asyncio.gather(*waiters)
        await other.release(*leases)
        await assert_only(ahl, "w2")


async def _count_waiters(ahl: AsyncHiLok, path: str, count: int) -> bool:
    return len((await ahl.status(path)).waiters) == count


# -- leases and context managers ------------------------------------------------------------


async def test_context_managers(ahl: AsyncHiLok) -> None:
    async with ahl.write("c/a", timeout=1.0) as lease:
        assert (lease.path, lease.mode) == ("c/a", "write")
        await assert_only(ahl, "c", lease)
    assert lease.released
    async with ahl.read("c", block=False, ttl=2.0) as lease:
        assert lease.ttl == 2.0
        with pytest.raises(LockNotAcquired):
            await ahl.acquire("c/a", "write", block=False)
    await assert_only(ahl, "c")
    with pytest.raises(KeyError):
        async with ahl.write("c/b") as lease:
            raise KeyError("boom")
    assert lease.released
    await assert_only(ahl, "c")


async def test_context_manager_refreshes_in_the_background(ahl: AsyncHiLok) -> None:
    ttl = 0.5
    async with ahl.write("c/r", ttl=ttl) as lease:
        start = time.monotonic()
        while time.monotonic() - start < 3 * ttl:  # outlive the ttl several times over
            assert await handles(ahl, "c/r") == {lease.handle}
            await asyncio.sleep(0.05)
    assert not lease.lost
    await assert_only(ahl, "c")


async def test_context_manager_raises_lock_lost_on_exit(ahl: AsyncHiLok) -> None:
    lost = asyncio.Event()
    with pytest.raises(LockLost):
        async with ahl.write("c/l", ttl=0.3) as lease:
            lease.on_lost(lambda _: lost.set())
            await ahl.release(pickle.loads(pickle.dumps(lease)))  # released "elsewhere"
            await asyncio.wait_for(lost.wait(), 10)
            assert lease.lost
    await assert_only(ahl, "c")


async def test_keep_alive_and_refresh(ahl: AsyncHiLok) -> None:
    kept = await ahl.acquire("k/a", "read", ttl=0.3)
    left = await ahl.acquire("k/b", "read", ttl=0.3)
    ahl.keep_alive(kept)
    await wait_until(
        lambda: _lacks(ahl, "k", left.handle), "the unrefreshed lease to run out", limit=10
    )
    await asyncio.sleep(0.4)  # longer than the ttl: only the background refresh keeps it
    assert await handles(ahl, "k") == {kept.handle}
    with pytest.raises(LockLost):
        await ahl.refresh(left)
    assert left.lost
    await ahl.refresh(kept, ttl=5.0)
    assert kept.ttl == 5.0
    assert await ahl.refresh_many([kept, left]) == [True, False]
    await ahl.release(kept)
    assert await ahl.refresh_many([kept]) == [False]


async def _lacks(ahl: AsyncHiLok, path: str, handle: str) -> bool:
    return handle not in await handles(ahl, path)


async def test_release_during_a_background_refresh_is_not_a_loss(ahl: AsyncHiLok) -> None:
    # The refresher renews 50 other leases every millisecond, so releases land on ticks in
    # flight: such a tick finds the lease gone, but it was released, not lost.
    others = await ahl.acquire_many([(f"c/other/{i}/x/y", "read") for i in range(50)])
    for lease in others:
        ahl.keep_alive(lease, interval=0.001)
    rng = random.Random(5)
    reported: list[Lease] = []
    leases = []
    for i in range(100):
        lease = await ahl.acquire(f"c/busy/{i}", "write")
        lease.on_lost(reported.append)
        ahl.keep_alive(lease, interval=0.001)
        await asyncio.sleep(rng.uniform(0, 0.003))
        await ahl.release(lease)  # a live lease: must not raise
        leases.append(lease)
    await ahl.close()  # ends the refresher, whatever tick it was in
    assert reported == []
    assert not any(lease.lost for lease in leases + others)


# -- cancellation ---------------------------------------------------------------------------

ROUNDS = 50


async def _settle(task: asyncio.Task[Lease], ahl: AsyncHiLok) -> bool:
    """Await a cancelled acquire; release the lease if it won the race. True if cancelled."""
    try:
        lease = await task
    except (asyncio.CancelledError, asyncio.TimeoutError):
        return True
    await ahl.release(lease)
    return False


@pytest.mark.parametrize("contended", [True, False], ids=["waiting", "uncontended"])
async def test_cancelled_acquire_leaves_nothing(ahl: AsyncHiLok, contended: bool) -> None:
    rng = random.Random(1234 + contended)
    holder = await ahl.acquire("x/a", "write") if contended else None
    cancelled = 0
    for _ in range(ROUNDS):
        task = asyncio.create_task(ahl.acquire("x", "write"))
        # Land the cancellation anywhere: before the call, mid-call, while queued and asleep.
        if contended:
            await asyncio.sleep(rng.uniform(0, 0.02))
        else:
            await asyncio.sleep(rng.choice([0, 0, 0.0002, 0.0005, 0.001, 0.002]))
        task.cancel()
        if await _settle(task, ahl):
            cancelled += 1
        else:
            assert not contended, "granted although the lock was held"
        if holder is None:
            await assert_only(ahl, "x")
        else:
            await assert_only(ahl, "x", holder)
    assert cancelled > 0
    if holder is not None:
        await ahl.release(holder)
    # The instance still works, wake-ups included.
    await _still_works(ahl)


async def test_cancelled_acquire_with_a_handle_undoes_only_its_own_grants(
    ahl: AsyncHiLok,
) -> None:
    """An existing holder's cancelled acquire releases what that call granted, nothing else:
    the holder's older grant, and a grant the call merely renewed, stay."""
    rng = random.Random(99)
    older = await ahl.acquire("y/base", "write")
    renewed = await ahl.acquire("y/renewed", "read", handle=older.handle)
    cancelled = 0
    for i in range(ROUNDS):
        path = f"y/new{i}"
        task = asyncio.create_task(
            ahl.acquire_many([(path, "write"), ("y/renewed", "read")], handle=older.handle)
        )
        await asyncio.sleep(rng.choice([0, 0, 0.0002, 0.0005, 0.001, 0.002]))
        task.cancel()
        try:
            leases = await task
        except asyncio.CancelledError:
            cancelled += 1
            assert not (await ahl.status(path)).held, "a cancelled acquire left its grant"
        else:
            await ahl.release(leases[0])  # won the race: give the new one back
        held = {(h.path, h.mode) for h in (await ahl.status("y")).holders}
        assert held == {("y/base", "write"), ("y/renewed", "read")}
    assert cancelled > 0
    await ahl.release(older, renewed)


@pytest.mark.parametrize("contended", [True, False], ids=["waiting", "uncontended"])
async def test_wait_for_cut_acquire_leaves_nothing(ahl: AsyncHiLok, contended: bool) -> None:
    rng = random.Random(99 + contended)
    holder = await ahl.acquire("y/a/b", "read") if contended else None
    for _ in range(ROUNDS):
        limit = rng.uniform(0.001, 0.02) if contended else rng.uniform(0.0001, 0.002)
        try:
            lease = await asyncio.wait_for(ahl.acquire("y/a", "write"), limit)
        except asyncio.TimeoutError:
            pass
        else:
            assert not contended, "granted although the lock was held"
            await ahl.release(lease)
        if holder is None:
            await assert_only(ahl, "y")
        else:
            await assert_only(ahl, "y", holder)
    if holder is not None:
        await ahl.release(holder)
    await _still_works(ahl)


if sys.version_info >= (3, 11):  # asyncio.timeout is new in Python 3.11

    @pytest.mark.parametrize("contended", [True, False], ids=["waiting", "uncontended"])
    async def test_asyncio_timeout_cut_acquire_leaves_nothing(
        ahl: AsyncHiLok, contended: bool
    ) -> None:
        rng = random.Random(7 + contended)
        holder = await ahl.acquire("z/a", "read") if contended else None
        for _ in range(ROUNDS):
            limit = rng.uniform(0.001, 0.02) if contended else rng.uniform(0.0001, 0.002)
            try:
                async with asyncio.timeout(limit):
                    lease = await ahl.acquire("z", "write")
            except TimeoutError:
                pass
            else:
                assert not contended, "granted although the lock was held"
                await ahl.release(lease)
            if holder is None:
                await assert_only(ahl, "z")
            else:
                await assert_only(ahl, "z", holder)
        if holder is not None:
            await ahl.release(holder)
        await _still_works(ahl)


async def _still_works(ahl: AsyncHiLok) -> None:
    """A blocked acquire is woken by a release, after whatever cancellations came before."""
    holder = await ahl.acquire("after/a", "write")
    waiter = asyncio.create_task(ahl.acquire("after", "write", timeout=20))
    await wait_for_waiter(ahl, "after", "write")
    await ahl.release(holder)
    await ahl.release(await waiter)
    await assert_only(ahl, "after")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="needs Task.cancelling()")
@pytest.mark.parametrize("operation", ["status", "refresh", "acquire-release"])
async def test_cancelling_a_task_busy_with_calls_ends_it(ahl: AsyncHiLok, operation: str) -> None:
    # redis-py can swallow a cancellation that lands in the middle of a call; AsyncHiLok must
    # not, or a cancelled task would go on running.
    rng = random.Random(operation)
    lease = await ahl.acquire("busy/a", "read")
    stop = False

    async def busy() -> None:
        while not stop:
            if operation == "status":
                await ahl.status("busy/a/b/c")
            elif operation == "refresh":
                await ahl.refresh(lease)
            else:
                await ahl.release(await ahl.acquire("busy/b", "write"))

    try:
        for _ in range(ROUNDS):
            task = asyncio.create_task(busy())
            await asyncio.sleep(rng.uniform(0, 0.005))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=5)
            assert done, "the cancellation was swallowed: the task went on"
            assert task.cancelled()
    finally:
        stop = True
    await ahl.release(lease)
    await assert_only(ahl, "busy")


async def test_a_release_cancelled_in_flight_is_still_carried_out(ahl: AsyncHiLok) -> None:
    for _ in range(ROUNDS):
        lease = await ahl.acquire("rc/a", "write")
        task = asyncio.create_task(ahl.release(lease))
        await asyncio.sleep(0)  # the release has started: its call is on its way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lease.released
        await assert_only(ahl, "rc")


async def test_cancelled_context_manager_body_releases(ahl: AsyncHiLok) -> None:
    entered = asyncio.Event()

    async def hold() -> None:
        async with ahl.write("cm/a"):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_only(ahl, "cm")


# -- concurrency ----------------------------------------------------------------------------


async def test_one_instance_shared_by_32_tasks(ahl: AsyncHiLok) -> None:
    async def work(i: int) -> int:
        async with ahl.write(f"tenants/{i}/job") as lease:
            await asyncio.sleep(0.01)
            assert await handles(ahl, f"tenants/{i}") == {lease.handle}
            return lease.token

    tokens = await asyncio.gather(*(work(i) for i in range(32)))
    assert len(set(tokens)) == 32
    await assert_only(ahl, "tenants")


async def test_32_tasks_contending_for_one_lock_take_turns(ahl: AsyncHiLok) -> None:
    inside = 0
    most = 0
    done = 0

    async def work() -> None:
        nonlocal inside, most, done
        async with ahl.write("hot/spot", timeout=30):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1
            done += 1

    await asyncio.gather(*(work() for _ in range(32)))
    assert (done, most) == (32, 1)
    await assert_only(ahl, "hot")


async def test_one_pubsub_connection_whichever_tasks_wait(
    redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()  # only this test's clients subscribe there
    admin = server.client()
    trees = [f"tree{i}" for i in range(16)]
    async with (
        AsyncHiLok(f"{server.url}/0", namespace=namespace) as holder_side,
        AsyncHiLok(f"{server.url}/0", namespace=namespace) as ahl,
    ):
        held = await holder_side.acquire_many([(tree, "write") for tree in trees])
        waiters = [asyncio.create_task(ahl.acquire(tree, "write", timeout=30)) for tree in trees]

        def subscriptions() -> list[int]:
            counts = (int(client.get("sub", 0)) for client in admin.client_list())
            return [count for count in counts if count]

        async def all_subscribed() -> bool:
            return sum(subscriptions()) >= len(trees)

        try:
            await wait_until(all_subscribed, "every tree's subscription")
            assert subscriptions() == [len(trees)], "waiters subscribed on several connections"
        finally:
            await holder_side.release(*held)
        await ahl.release(*await asyncio.gather(*waiters))
    admin.close()


# -- Redis failures and clients -------------------------------------------------------------


async def test_unreachable_redis(namespace: str) -> None:
    port = free_port()
    async with AsyncHiLok(f"redis://127.0.0.1:{port}/0", namespace=namespace) as ahl:
        with pytest.raises(HiLokConnectionError) as info:
            await ahl.acquire("a", "write")
        assert not isinstance(info.value, LockNotAcquired)
        assert f"127.0.0.1:{port}" in str(info.value)
        with pytest.raises(HiLokConnectionError):
            await ahl.status("a")


async def test_server_killed_mid_wait(
    redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()
    async with AsyncHiLok(f"{server.url}/0", namespace=namespace) as ahl:
        holder = await ahl.acquire("d/a", "write")
        waiter = asyncio.create_task(ahl.acquire("d", "write"))  # no timeout: must not hang
        await wait_for_waiter(ahl, "d", "write")
        server.kill()
        with pytest.raises(HiLokConnectionError) as info:
            await asyncio.wait_for(waiter, 60)
        assert f"127.0.0.1:{server.port}" in str(info.value)
        with pytest.raises(HiLokConnectionError):
            await ahl.release(holder)


async def test_existing_client_is_not_closed(redis_url: str, namespace: str) -> None:
    client = aredis.Redis.from_url(redis_url)
    try:
        ahl = AsyncHiLok(client, namespace=namespace)
        await ahl.release(await ahl.acquire("q", "write"))
        await ahl.close()
        assert await client.ping()
    finally:
        await client.aclose()
