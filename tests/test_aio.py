"""What only the asyncio driver, :class:`AsyncHiLok`, has, on a real redis-server:
``await lease.release()``, cancellation (``task.cancel()``, ``asyncio.wait_for``,
``asyncio.timeout``, a release cancelled in flight) and the tasks of one loop sharing one
instance. Every other case runs against both drivers in ``tests/test_engine.py``."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from celery_hilok import AsyncHiLok, Lease, QueuedRequest
from celery_hilok._core import Mode

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


# -- await lease.release() ------------------------------------------------------------------


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
