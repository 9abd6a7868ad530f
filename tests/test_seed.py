"""RedisHiLok, the redishilok 1.1.0 drop-in: its API, its meaning, none of its defects.

Every test runs against a real redis-server. Sleeps appear only as workload (a long
operation, a holder that stalls, jitter that widens race windows) or as the passing of time
under test (a ttl running out); synchronisation waits on events, process output or polled
server state.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from celery_hilok import AsyncHiLok, HiLok, RedisHiLok, RedisHiLokError, RedisHiLokStatus

ROOT = Path(__file__).resolve().parent.parent

# -- helpers ----------------------------------------------------------------------------------


def lock_keys(client: redis.Redis, namespace: str) -> list[str]:
    """Every key of the namespace except the trees' fencing-token counters (kept on purpose)."""
    return sorted(k.decode() for k in client.scan_iter(f"{namespace}:*") if not k.endswith(b"::n"))


def named_connections(client: redis.Redis, name: str) -> int:
    """How many connections the server has open under client name ``name``."""
    return sum(1 for c in client.client_list() if c.get("name") == name)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll ``check`` until it holds (for server-side state no event announces)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def gives_up_after(attempt: Awaitable[object]) -> float:
    """Seconds until ``attempt`` raised RedisHiLokError (failing if it succeeded)."""
    start = time.monotonic()
    with pytest.raises(RedisHiLokError):
        await attempt
    return time.monotonic() - start


@pytest.fixture
async def hl(redis_url: str, namespace: str) -> AsyncIterator[RedisHiLok]:
    h = RedisHiLok(redis_url, namespace=namespace)
    yield h
    await h.close()


@pytest.fixture
async def other(redis_url: str, namespace: str) -> AsyncIterator[RedisHiLok]:
    """A second, independent client of the same locks (another process, in effect)."""
    h = RedisHiLok(redis_url, namespace=namespace)
    yield h
    await h.close()


@pytest.fixture
async def engine(redis_url: str, namespace: str) -> AsyncIterator[AsyncHiLok]:
    """The engine under RedisHiLok, to look at queues."""
    e = AsyncHiLok(redis_url, namespace=namespace)
    yield e
    await e.close()


# -- the API ----------------------------------------------------------------------------------


def test_public_names() -> None:
    assert issubclass(RedisHiLokError, RuntimeError)
    status = RedisHiLokStatus(held=True, type="read", owned=False, ttl=10)
    assert (status.held, status.type, status.owned, status.ttl) == (True, "read", False, 10)


def test_constructor_checks_its_arguments(redis_url: str) -> None:
    with pytest.raises(ValueError):
        RedisHiLok(redis_url, ttl=0)
    with pytest.raises(ValueError):
        RedisHiLok(redis_url, separator="")
    with pytest.raises(ValueError):
        RedisHiLok(redis_url, namespace="no spaces")
    with pytest.raises(ValueError):
        RedisHiLok(object())  # type: ignore[arg-type]


async def test_context_managers_yield_the_uuid_and_release(
    hl: RedisHiLok, other: RedisHiLok, redis_client: redis.Redis, namespace: str
) -> None:
    async with hl.write("a/b") as uuid:
        assert isinstance(uuid, str) and uuid
        statuses = await hl.status("a/b", uuid)
        assert [(s.type, s.owned) for s in statuses] == [("read", True), ("write", True)]
        with pytest.raises(RedisHiLokError):
            await other.acquire_write("a/b", block=False)
    async with hl.read("a/b") as uuid:
        assert [s.type for s in await hl.status("a/b", uuid)] == ["read", "read"]
        async with other.read("a/b"):  # readers share
            pass
    assert lock_keys(redis_client, namespace) == []
    await other.release_write("a/b", await other.acquire_write("a/b", block=False))


async def test_acquire_returns_the_uuid_and_release_frees(
    hl: RedisHiLok, other: RedisHiLok, redis_client: redis.Redis, namespace: str
) -> None:
    w = await hl.acquire_write("x/y/z")
    r = await hl.acquire_read("x/q")
    assert w != r
    with pytest.raises(RedisHiLokError):
        await other.acquire_write("x", block=False)
    await hl.release_write("x/y/z", w)
    await other.release_read("x/q", r)  # a uuid works from any instance
    assert lock_keys(redis_client, namespace) == []
    await other.release_write("x", await other.acquire_write("x", block=False))


async def test_status_has_one_entry_per_level_root_first(hl: RedisHiLok, other: RedisHiLok) -> None:
    uuid = await hl.acquire_write("a/b/c")
    mine = await hl.status("a/b/c", uuid)
    assert [s.type for s in mine] == ["read", "read", "write"]
    assert all(s.held and s.owned for s in mine)
    for s in mine:
        assert isinstance(s.type, str) and isinstance(s.ttl, int) and 0 < s.ttl <= hl.ttl
    theirs = await other.status("a/b/c", "0123456789abcdef0123456789abcdef")
    assert [(s.held, s.type, s.owned) for s in theirs] == [(True, "read", False)] * 2 + [
        (True, "write", False)
    ]
    # A sibling: its parent is read-held (by the lock below it), the sibling itself is free.
    parent, sibling = await other.status("a/x", uuid)
    assert (parent.held, parent.type, parent.owned) == (True, "read", True)
    assert sibling == RedisHiLokStatus(False, None, False, None)
    await hl.release_write("a/b/c", uuid)
    assert await hl.status("a/b/c", uuid) == [RedisHiLokStatus(False, None, False, None)] * 3


async def test_status_sees_every_reader_of_a_node(hl: RedisHiLok, other: RedisHiLok) -> None:
    first = await hl.acquire_read("n/m")
    second = await other.acquire_read("n/m/o")
    levels = await hl.status("n/m", first)
    assert [(s.type, s.owned) for s in levels] == [("read", True), ("read", True)]
    by_second = await hl.status("n/m", second)
    assert [(s.type, s.owned) for s in by_second] == [("read", True), ("read", True)]
    stranger = await hl.status("n/m", "0123456789abcdef0123456789abcdef")
    assert [(s.held, s.owned) for s in stranger] == [(True, False), (True, False)]
    await hl.release_read("n/m", first)
    await hl.release_read("n/m/o", second)


def test_status_chain_of_the_sync_engine(redis_url: str, namespace: str) -> None:
    with HiLok(redis_url, namespace=namespace) as engine:
        lease = engine.acquire("p/q/r", "write")
        chain = engine.status_chain("p/q/r")
        assert [s.path for s in chain] == ["p", "p/q", "p/q/r"]
        assert [[h.relation for h in s.holders] for s in chain] == [["below"], ["below"], ["self"]]
        engine.release(lease)
        assert not any(s.held for s in engine.status_chain("p/q/r"))


async def test_given_client_serves_many_tasks_and_is_never_closed(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    client = aredis.Redis.from_url(redis_url, client_name=namespace)
    try:
        h = RedisHiLok(client, namespace=namespace)
        assert h.redis is client
        before = int(redis_client.info("stats")["total_connections_received"])

        async def worker(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(15):
                path = f"acct/{rnd.randrange(4)}"
                if rnd.random() < 0.4:
                    async with h.write(path):
                        await asyncio.sleep(0)
                else:
                    async with h.read(path):
                        await asyncio.sleep(0)
                mine = f"solo/{seed}/x"
                await h.release_write(mine, await h.acquire_write(mine, block=False))

        await asyncio.gather(*(worker(i) for i in range(32)))
        made = int(redis_client.info("stats")["total_connections_received"]) - before
        # about one connection per concurrent task (plus pub/sub), not one per operation
        assert made <= 40
        open_before = named_connections(redis_client, namespace)
        assert open_before >= 2
        await h.close()
        assert await client.ping() is True
        # close() left the caller's pool alone (only its own pub/sub connection may go)
        assert named_connections(redis_client, namespace) >= open_before - 1
        async with h.write("acct/0"):  # and the instance is still usable
            pass
        await h.close()
        assert lock_keys(redis_client, namespace) == []
    finally:
        await client.aclose()


async def test_url_instance_serves_many_tasks(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    async with RedisHiLok(redis_url, namespace=namespace) as h:
        before = int(redis_client.info("stats")["total_connections_received"])

        async def worker(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(15):
                path = f"acct/{rnd.randrange(4)}/{rnd.randrange(2)}"
                async with h.write(path) if rnd.random() < 0.4 else h.read(path):
                    await asyncio.sleep(0)

        await asyncio.gather(*(worker(i) for i in range(32)))
        assert int(redis_client.info("stats")["total_connections_received"]) - before <= 40
    assert lock_keys(redis_client, namespace) == []


def test_url_instance_works_across_asyncio_run(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    h = RedisHiLok(f"{redis_url}?client_name={namespace}", namespace=namespace)

    async def take() -> str:
        async with h.write("x/1"):
            pass
        return await h.acquire_write("x/2")

    uuid = asyncio.run(take())

    async def check_and_release() -> None:
        level = (await h.status("x/2", uuid))[-1]
        assert (level.held, level.type, level.owned) == (True, "write", True)
        await h.release_write("x/2", uuid)

    asyncio.run(check_and_release())  # a handle taken in one run is released in another
    for _ in range(3):
        asyncio.run(take_and_release(h))
    # Every run closed its own connections when its loop shut down: none are left over.
    deadline = time.monotonic() + 10
    while named_connections(redis_client, namespace) != 0:
        assert time.monotonic() < deadline, "connections of finished event loops are still open"
        time.sleep(0.01)
    assert lock_keys(redis_client, namespace) == []


async def take_and_release(h: RedisHiLok) -> None:
    async with h.read("x/1"):
        await h.release_write("x/3", await h.acquire_write("x/3"))


async def test_async_with_and_separator(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    async with RedisHiLok(redis_url, namespace=namespace, separator=":") as h:
        async with h.write("a:b:c") as uuid:
            assert len(await h.status("a:b:c", uuid)) == 3
            assert len(await h.status("a/b/c", uuid)) == 1  # '/' is an ordinary character here
            with pytest.raises(RedisHiLokError):
                await h.acquire_write("a:b", block=False)
            await h.release_read("a/b", await h.acquire_read("a/b", block=False))
    assert lock_keys(redis_client, namespace) == []


@pytest.mark.parametrize("path", ["", "/", "//"])
async def test_an_empty_path_is_a_value_error(hl: RedisHiLok, path: str) -> None:
    uuid = "0123456789abcdef0123456789abcdef"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: hl.acquire_read(path),
        lambda: hl.acquire_write(path),
        lambda: hl.acquire_write(path, uuid=uuid),
        lambda: hl.release_read(path, uuid),
        lambda: hl.release_write(path, uuid),
        lambda: hl.status(path, uuid),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            await call()
    with pytest.raises(ValueError):
        async with hl.read(path):
            pass
    with pytest.raises(ValueError):
        async with hl.write(path):
            pass


# -- the meaning --------------------------------------------------------------------------


async def test_read_is_node_only_and_write_covers_the_subtree(
    hl: RedisHiLok, other: RedisHiLok
) -> None:
    async with hl.read("a"):
        await other.release_write("a/b", await other.acquire_write("a/b", block=False))
        with pytest.raises(RedisHiLokError):
            await other.acquire_write("a", block=False)
        async with other.read("a"):
            pass
    async with hl.read("a/b"):
        with pytest.raises(RedisHiLokError):  # a write above a read
            await other.acquire_write("a", block=False)
        await other.release_write("a/c", await other.acquire_write("a/c", block=False))
    async with hl.write("a"):
        for path in ("a", "a/b", "a/b/c"):
            for call in (other.acquire_read, other.acquire_write):
                with pytest.raises(RedisHiLokError):
                    await call(path, block=False)
        await other.release_write("b", await other.acquire_write("b", block=False))
    async with hl.write("a/b"):
        for call in (other.acquire_read, other.acquire_write):
            with pytest.raises(RedisHiLokError):
                await call("a/b/c", block=False)
        # the parent may still be read (node-only), but not written
        await other.release_read("a", await other.acquire_read("a", block=False))
        with pytest.raises(RedisHiLokError):
            await other.acquire_write("a", block=False)
        await other.release_write("a/c", await other.acquire_write("a/c", block=False))


async def test_block_false_and_timeout_raise(hl: RedisHiLok, other: RedisHiLok) -> None:
    async with hl.write("busy/node"):
        for call in (other.acquire_read, other.acquire_write):
            with pytest.raises(RedisHiLokError, match="busy/node"):
                await call("busy/node", block=False)
            with pytest.raises(RedisHiLokError):
                await call("busy/node/below", timeout=0.05)
            with pytest.raises(RuntimeError):  # what the seed's README catches
                await call("busy/node", timeout=0)
        with pytest.raises(RedisHiLokError):
            async with other.read("busy/node", block=False):
                pass
        with pytest.raises(RedisHiLokError):
            async with other.write("busy/node", timeout=0.05):
                pass
        with pytest.raises(RedisHiLokError):
            await other.acquire_write("busy/node", timeout=-1)  # the seed tried once


async def test_uuid_restores_and_renews(hl: RedisHiLok, other: RedisHiLok) -> None:
    h = RedisHiLok(hl.redis, namespace=hl.namespace, ttl=2000)
    uuid = await h.acquire_write("r/s")
    await asyncio.sleep(1.0)  # time passes: the plain acquire is not refreshed
    left = (await h.status("r/s", uuid))[-1].ttl
    assert left is not None and left <= 1000
    assert await other.acquire_write("r/s", uuid=uuid) == uuid  # from another instance
    renewed = (await h.status("r/s", uuid))[-1].ttl
    assert renewed is not None and renewed > left
    with pytest.raises(RedisHiLokError):  # a write is not restored as a read
        await other.acquire_read("r/s", uuid=uuid)
    with pytest.raises(RedisHiLokError):  # nor is the ancestor's mark a read lock
        await other.acquire_read("r", uuid=uuid)
    async with other.write("r/s", uuid=uuid) as same:  # restore and refresh for the block
        assert same == uuid
    # leaving the block released it, as in the seed
    for call in (other.acquire_write, other.acquire_read):
        with pytest.raises(RedisHiLokError, match="does not hold"):
            await call("r/s", uuid=uuid)
    with pytest.raises(RedisHiLokError):
        async with other.read("r/s", uuid=uuid):
            pass
    with pytest.raises(RedisHiLokError):
        await other.acquire_write("r/s", uuid="not a uuid at all")


async def test_restore_never_revives_an_expired_lock(hl: RedisHiLok) -> None:
    h = RedisHiLok(hl.redis, namespace=hl.namespace, ttl=200)
    uuid = await h.acquire_read("e/f")
    await asyncio.sleep(0.4)  # the ttl runs out; nobody else took the lock meanwhile
    with pytest.raises(RedisHiLokError):
        await h.acquire_read("e/f", uuid=uuid)
    with pytest.raises(RedisHiLokError):
        await h.release_read("e/f", uuid)


async def test_ttl_and_refresh_interval_are_milliseconds(
    redis_url: str, namespace: str, other: RedisHiLok
) -> None:
    async with RedisHiLok(redis_url, namespace=namespace, ttl=1000, refresh_interval=200) as h:
        uuid = await h.acquire_write("m/plain")
        ttl = (await h.status("m/plain", uuid))[-1].ttl
        assert ttl is not None and 0 < ttl <= 1000
        async with h.write("m/kept") as kept:
            await asyncio.sleep(2.5)  # a long operation: well over twice the ttl
            assert (await h.status("m/kept", kept))[-1].owned
            with pytest.raises(RedisHiLokError):
                await other.acquire_write("m/kept", block=False)
        # the plain acquire was never refreshed: it ran out long ago
        await other.release_write("m/plain", await other.acquire_write("m/plain", block=False))


async def test_refresh_interval_longer_than_ttl_is_clamped(
    redis_url: str, namespace: str, other: RedisHiLok
) -> None:
    h = RedisHiLok(redis_url, namespace=namespace, ttl=1000, refresh_interval=60_000)
    async with h.write("slow/op"):
        await asyncio.sleep(2.5)  # the block outlives its ttl more than twice over
        with pytest.raises(RedisHiLokError):
            await other.acquire_write("slow/op", block=False)
    await h.close()


async def test_a_lost_lock_cancels_the_task_inside_the_block(
    redis_url: str, namespace: str, other: RedisHiLok
) -> None:
    h = RedisHiLok(redis_url, namespace=namespace, ttl=300, refresh_interval=100)
    went_on: list[str] = []

    async def body() -> None:
        async with h.write("job/1"):
            time.sleep(0.6)  # noqa: ASYNC251 - the holder stalls its whole loop past the ttl
            await asyncio.Event().wait()  # the next refresh finds the lease gone
            went_on.append("never")

    task = asyncio.create_task(body())
    await asyncio.wait([task])
    assert task.cancelled() and went_on == []
    await other.release_write("job/1", await other.acquire_write("job/1", block=False))

    async def after_the_block() -> str:
        async with h.write("job/2", block=False):
            pass
        await asyncio.sleep(0.5)  # several refresh ticks: nothing cancels the task out here
        return "done"

    assert await asyncio.create_task(after_the_block()) == "done"
    await h.close()


async def test_without_cancel_on_lock_failure_the_loss_is_raised_on_exit(
    redis_url: str, namespace: str
) -> None:
    h = RedisHiLok(
        redis_url, namespace=namespace, ttl=300, refresh_interval=100, cancel_on_lock_failure=False
    )
    with pytest.raises(RedisHiLokError, match="does not hold"):
        async with h.write("job/3"):
            time.sleep(0.6)  # noqa: ASYNC251 - stalls its loop past the ttl
            await asyncio.sleep(0.3)  # the refresh finds it lost, and cancels nothing
    await h.close()


# -- the seed's defects, fixed ----------------------------------------------------------------


@pytest.mark.parametrize("call", ["acquire_read", "acquire_write", "read", "write"])
async def test_a_timeout_is_accurate(hl: RedisHiLok, other: RedisHiLok, call: str) -> None:
    async with hl.write("t/u"):
        if call.startswith("acquire"):
            attempt: Awaitable[object] = getattr(other, call)("t/u/v/w", timeout=1.0)
        else:

            async def in_block() -> None:
                async with getattr(other, call)("t/u/v/w", timeout=1.0):
                    pass

            attempt = in_block()
        took = await gives_up_after(attempt)
    assert 1.0 <= took < 2.5


async def test_a_timeout_counts_once_not_per_level(
    hl: RedisHiLok, other: RedisHiLok, engine: AsyncHiLok
) -> None:
    top = await hl.acquire_write("t")
    middle = asyncio.create_task(other.acquire_write("t/u"))  # first in line after `top`

    async def queued() -> bool:
        return bool((await engine.status("t/u")).waiters)

    await eventually(queued)
    attempt = asyncio.create_task(gives_up_after(other.acquire_write("t/u/v", timeout=1.0)))
    await asyncio.sleep(0.45)  # the first level frees after 0.45 s...
    await hl.release_write("t", top)
    middle_uuid = await middle  # ...and the second stays busy
    took = await attempt
    assert 1.0 <= took < 2.5
    await other.release_write("t/u", middle_uuid)


async def test_a_failed_acquire_leaves_nothing_locked(
    hl: RedisHiLok, other: RedisHiLok, redis_client: redis.Redis, namespace: str
) -> None:
    holder = await hl.acquire_write("p/q")
    for call in (other.acquire_read, other.acquire_write):
        with pytest.raises(RedisHiLokError):
            await call("p/q", block=False)
        with pytest.raises(RedisHiLokError):
            await call("p/q/r", timeout=0.2)
    for cm in (other.read, other.write):
        with pytest.raises(RedisHiLokError):
            async with cm("p/q", block=False):
                pass
    await hl.release_write("p/q", holder)
    assert lock_keys(redis_client, namespace) == []
    await other.release_write("p", await other.acquire_write("p", block=False))


async def test_a_cancelled_acquire_leaves_nothing_locked(
    hl: RedisHiLok, other: RedisHiLok, engine: AsyncHiLok, redis_client: redis.Redis, namespace: str
) -> None:
    holder = await hl.acquire_write("k/b")

    async def in_block() -> None:
        async with other.write("k/b/c"):
            pass

    for attempt in (other.acquire_write("k/b"), other.acquire_read("k/b/c"), in_block()):
        task = asyncio.ensure_future(attempt)

        async def waiting() -> bool:
            return bool((await engine.status("k/b")).waiters)

        await eventually(waiting)
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled()
    await hl.release_write("k/b", holder)
    assert lock_keys(redis_client, namespace) == []
    await other.release_write("k", await other.acquire_write("k", block=False))


async def test_cancellations_at_random_points_leave_nothing_locked(
    hl: RedisHiLok, other: RedisHiLok, redis_client: redis.Redis, namespace: str
) -> None:
    rnd = random.Random(7)
    paths = ["z", "z/a", "z/a/b", "z/a/b/c", "z/d"]

    async def in_block(path: str, write: bool) -> str:
        async with hl.write(path) if write else hl.read(path):
            await asyncio.sleep(rnd.uniform(0, 0.002))
        return ""

    cancelled = 0
    for i in range(200):
        path, write = rnd.choice(paths), rnd.random() < 0.5
        if i % 2:
            attempt: Awaitable[str] = (hl.acquire_write if write else hl.acquire_read)(path)
        else:
            attempt = in_block(path, write)
        task = asyncio.ensure_future(attempt)
        await asyncio.sleep(rnd.uniform(0, 0.003))  # cancel at whatever point it has reached
        task.cancel()
        await asyncio.wait([task])
        if task.cancelled():
            cancelled += 1
        elif task.result():  # a plain acquire that finished first: release it
            await (hl.release_write if write else hl.release_read)(path, task.result())
    assert cancelled > 20
    assert lock_keys(redis_client, namespace) == []
    await other.release_write("z", await other.acquire_write("z", block=False))


async def test_a_foreign_uuid_releases_nothing(
    hl: RedisHiLok, other: RedisHiLok, redis_client: redis.Redis, namespace: str
) -> None:
    uuid = await hl.acquire_write("w/b")
    stranger = await other.acquire_read("elsewhere")
    attempts = [
        other.release_write("w/b", stranger),  # another holder's uuid
        other.release_write("w/b", "0123456789abcdef0123456789abcdef"),  # a made-up one
        other.release_write("w/b", "x"),  # not even a uuid
        other.release_read("w/b", uuid),  # the right uuid, the wrong mode
        other.release_read("w", uuid),  # the ancestor mark is not a read lock
        other.release_write("w", uuid),
    ]
    for attempt in attempts:
        with pytest.raises(RedisHiLokError):
            await attempt
    for path in ("w", "w/b"):
        with pytest.raises(RedisHiLokError):
            await other.acquire_write(path, block=False)
    level = (await hl.status("w/b", uuid))[-1]
    assert (level.held, level.type, level.owned) == (True, "write", True)
    await hl.release_write("w/b", uuid)
    await other.release_read("elsewhere", stranger)
    with pytest.raises(RedisHiLokError):  # released twice: the second one holds nothing
        await hl.release_write("w/b", uuid)
    assert lock_keys(redis_client, namespace) == []


DEAD_READER = """
import asyncio, sys
from celery_hilok import RedisHiLok

async def main():
    h = RedisHiLok(sys.argv[1], namespace=sys.argv[2], ttl=1000, refresh_interval=200)
    async with h.read("c/y") as uuid:
        print(uuid, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_dead_reader_expires_while_other_readers_refresh(
    redis_url: str, namespace: str, hl: RedisHiLok
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DEAD_READER,
        redis_url,
        namespace,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    dead = (await proc.stdout.readline()).decode().strip()
    assert [s.owned for s in await hl.status("c/y", dead)] == [True, True]
    live = RedisHiLok(redis_url, namespace=namespace, ttl=1000, refresh_interval=200)
    stop = asyncio.Event()

    async def cycling_reader() -> None:  # reads c/y 10 % of the time, refreshing as it goes
        while not stop.is_set():
            async with live.read("c/y"):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)

    reader = asyncio.create_task(cycling_reader())
    proc.kill()
    await proc.wait()
    writer = await hl.acquire_write("c", timeout=10)  # the seed never got here
    stop.set()
    reader.cancel()
    await asyncio.wait([reader])
    assert not (await hl.status("c/y", dead))[-1].owned
    await hl.release_write("c", writer)
    await live.close()


async def test_works_on_redis_cluster(namespace: str) -> None:
    from tests._cluster import RedisClusterServers
    from tests._redis import RedisServerError

    cluster = RedisClusterServers()
    try:
        cluster.start()
    except RedisServerError as exc:
        pytest.skip(f"no Redis Cluster: {exc}")
    try:
        client = aredis.RedisCluster.from_url(cluster.url)
        h = RedisHiLok(client, namespace=namespace)
        o = RedisHiLok(client, namespace=namespace)
        for tree in ("a", "b", "tenants", "zz"):  # trees in different slots
            async with h.write(f"{tree}/x/y") as uuid:
                levels = await h.status(f"{tree}/x/y", uuid)
                assert [s.type for s in levels] == ["read", "read", "write"]
                with pytest.raises(RedisHiLokError):
                    await o.acquire_write(tree, block=False)
        holder = await h.acquire_write("a/b")
        waiting = asyncio.create_task(o.acquire_write("a", timeout=10))

        look = AsyncHiLok(client, namespace=namespace)

        async def queued() -> bool:
            return bool((await look.status("a")).waiters)

        await eventually(queued)
        await h.release_write("a/b", holder)  # wakes the waiter
        await o.release_write("a", await waiting)
        for closing in (h, o, look):
            await closing.close()
        await client.aclose()
    finally:
        cluster.stop()


# -- the seed README's examples ---------------------------------------------------------------

EXAMPLES = {
    "usage": ["Read lock acquired on 'a/b'", "Failed to acquire write lock on 'a'"],
    "basic_hierarchical_locking": [
        "Both read locks succeed",
        "Failed to acquire read lock on 'a/b/c' due to write lock on 'a'",
    ],
    "custom_separator": ["Write lock acquired on 'a:b:c'"],
    "long_running_refresh": ["Long operation starts"],
    "manual_handles": [],
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_seed_readme_example_runs(name: str, redis_url: str, redis_client: redis.Redis) -> None:
    env = {**os.environ, "HILOK_REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-W", "default", "-m", f"examples.seed.{name}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == EXAMPLES[name]
    assert done.stderr == ""  # no traceback, no unclosed-resource warning
    # the examples lock tree "a" in the default namespace, and leave nothing there
    assert [k for k in lock_keys(redis_client, "hilok") if k.startswith("hilok:{a}:")] == []


# -- many processes ---------------------------------------------------------------------------

TREE = ("r", "r/a", "r/b", "r/a/x", "r/a/y", "r/b/x", "r/b/y")
ROUNDS = 15


def counter_process(url: str, namespace: str, role: str, node: str) -> None:
    """One process of the counter test (run as ``python -c``)."""
    asyncio.run(_counter_role(url, namespace, role, node))


async def _counter_role(url: str, namespace: str, role: str, node: str) -> None:
    h = RedisHiLok(url, namespace=namespace, ttl=10_000, refresh_interval=1000)
    r = h.redis  # the seed's attribute: this event loop's client
    rnd = random.Random()
    done_key = f"{namespace}-writers-done"

    def counter(path: str) -> str:
        return f"{namespace}-counter:{path}"

    if role == "writer":
        # A write covers the subtree, so it read-modify-writes the counter of every node in
        # it: two writers that ever touch the same counter must be on one line, and only
        # the lock keeps them apart. A lost update leaves that counter short.
        subtree = [p for p in TREE if p == node or p.startswith(node + "/")]
        try:
            for _ in range(ROUNDS):
                async with h.write(node):
                    for path in subtree:
                        value = int(await r.get(counter(path)) or 0)
                        await asyncio.sleep(rnd.uniform(0, 0.002))  # widen the race window
                        await r.set(counter(path), value + 1)
        finally:  # even a failed writer lets the readers finish (its exit code tells)
            await r.incr(done_key)
    else:
        # A (node-only) read keeps out every writer at the node or above it: exactly the
        # writers that change this node's counter. It must not move while read.
        reads = 0
        while reads < 3 or int(await r.get(done_key) or 0) < len(TREE):
            async with h.read(node):
                first = await r.get(counter(node))
                await asyncio.sleep(rnd.uniform(0, 0.002))
                if await r.get(counter(node)) != first:
                    await r.incr(f"{namespace}-violations")
            reads += 1
            await asyncio.sleep(rnd.uniform(0, 0.005))  # leave the CPU to the writers too
    await h.close()


@pytest.mark.slow
def test_processes_read_modify_write_shared_counters_exactly(
    redis_url: str, redis_client: redis.Redis, namespace: str, tmp_path: Path
) -> None:
    code = "import sys; from tests.test_seed import counter_process as p; p(*sys.argv[1:])"
    roles = [(role, node) for node in TREE for role in ("writer", "reader")]
    logs = [tmp_path / f"{role}-{node.replace('/', '.')}.log" for role, node in roles]
    procs = []
    for (role, node), log in zip(roles, logs, strict=True):
        with log.open("wb") as out:
            argv = [sys.executable, "-c", code, redis_url, namespace, role, node]
            procs.append(subprocess.Popen(argv, cwd=ROOT, stderr=out))
    deadline = time.monotonic() + 150
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    except subprocess.TimeoutExpired:
        running = [f"{r} {n}" for (r, n), p in zip(roles, procs, strict=True) if p.poll() is None]
        done = redis_client.get(f"{namespace}-writers-done")
        errors = "".join(log.read_text()[-2000:] for log in logs)
        pytest.fail(f"still running after 150 s: {running}; writers done: {done!r}\n{errors}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (role, node), log, rc in zip(roles, logs, codes, strict=True):
        assert rc == 0, f"{role} {node} exited {rc}:\n{log.read_text()[-3000:]}"
    counters = {p: int(redis_client.get(f"{namespace}-counter:{p}") or 0) for p in TREE}
    # every writer at a node or above it added ROUNDS: depth(p) writers per node
    assert counters == {p: ROUNDS * len(p.split("/")) for p in TREE}
    assert int(redis_client.get(f"{namespace}-violations") or 0) == 0
    assert lock_keys(redis_client, namespace) == []
    redis_client.delete(
        *[f"{namespace}-counter:{p}" for p in TREE],
        f"{namespace}-writers-done",
        f"{namespace}-violations",
    )
