"""Background tasks of the asyncio API end: at ``asyncio.run()`` exit for a client that was
never closed (even when redis-py loses the cancellation), and by themselves once nothing
waits and nothing is kept, so that short-lived clients leave no task behind.

The exit cases run ``tests/_shutdown_child.py`` as subprocesses, many times each: a hang
is a run that does not exit within its timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis

from celery_hilok import AsyncHiLok, RedisHiLok
from celery_hilok.aio import WAKER_LINGER

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 20.0  # seconds for one child run: generous, only to tell a hang from a run
AT_ONCE = 2  # children run side by side


def run_children(redis_url: str, namespace: str, scenario: str, runs: int) -> list[str]:
    """Run the child ``runs`` times; a description of every run that did not exit cleanly."""
    failures: list[str] = []
    command = [sys.executable, "-m", "tests._shutdown_child", redis_url, namespace, scenario]
    for start in range(0, runs, AT_ONCE):
        children = [
            subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(min(AT_ONCE, runs - start))
        ]
        for child in children:
            try:
                out, err = child.communicate(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                failures.append("hung at exit")
                continue
            if child.returncode != 0 or "exited" not in out:
                failures.append(f"exit code {child.returncode}: {err[-500:]}")
    return failures


@pytest.mark.parametrize(
    ("scenario", "runs"),
    [
        pytest.param("seed", 30, id="issue-12-reproduction"),
        pytest.param("seed-each", 10, id="an-instance-per-block"),
        pytest.param("lost-waker", 10, id="waker-loses-the-cancellation"),
        pytest.param("lost-refresher", 10, id="refresher-loses-the-cancellation"),
    ],
)
def test_an_unclosed_client_does_not_hang_asyncio_run_at_exit(
    redis_url: str, redis_client: redis.Redis, namespace: str, scenario: str, runs: int
) -> None:
    failures = run_children(redis_url, namespace, scenario, runs)
    assert failures == [], f"{len(failures)} of {runs} runs failed: {failures[:3]}"


def hilok_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("hilok-")}


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds; fail (rather than hang) after 15 seconds."""
    deadline = time.monotonic() + 15
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.001)


async def all_end(tasks: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Wait for ``tasks`` to end by themselves (never cancelled here); those still running."""
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=WAKER_LINGER + 15)
    return pending


async def contended_acquire(locks: AsyncHiLok, path: str) -> set[asyncio.Task[object]]:
    """One acquire that has to wait (the holder lets go once it is queued), kept alive like
    a ``with`` block's, then both released; the background tasks running meanwhile."""
    holder = await locks.acquire(path, "write")
    waiter = asyncio.ensure_future(locks.acquire(path, "write", timeout=30))

    async def queued() -> bool:
        return bool((await locks.status(path)).waiters)

    await until(queued, "the waiter to queue")
    await locks.release(holder)
    lease = await waiter
    assert lease.contended
    locks.keep_alive(lease)
    running = hilok_tasks()
    await locks.release(lease)
    return running


INSTANCES = 200


async def test_short_lived_async_clients_leave_no_task(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    seen: set[asyncio.Task[object]] = set()
    try:
        for i in range(INSTANCES):
            seen |= await contended_acquire(AsyncHiLok(client, namespace=namespace), f"t{i}/a")
        assert {t.get_name() for t in seen} == {"hilok-waker", "hilok-refresher"}
        assert await all_end(hilok_tasks()) == set()
        # and their pub/sub connections are gone with them
        assert redis_client.pubsub_channels(f"{namespace}:*") == []
    finally:
        await client.aclose()


async def test_short_lived_seed_clients_leave_no_task(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    observer = AsyncHiLok(client, namespace=namespace)  # (status only: starts no task)
    seen: set[asyncio.Task[object]] = set()
    try:
        for i in range(INSTANCES):
            locks = RedisHiLok(client, namespace=namespace)
            path = f"s{i}/a"

            async def second(locks: RedisHiLok = locks, path: str = path) -> None:
                async with locks.write(path):
                    await asyncio.sleep(0)

            async def queued(path: str = path) -> bool:
                return bool((await observer.status(path)).waiters)

            # two blocks, the second of which waits for the first (once it is queued, the
            # first lets go): each instance's waker has to start
            async with locks.write(path):
                waiting = asyncio.ensure_future(second())
                await until(queued, "the second block to queue")
            await waiting
            seen |= hilok_tasks()
        assert {t.get_name() for t in seen} == {"hilok-waker", "hilok-refresher"}
        assert await all_end(hilok_tasks()) == set()
        assert redis_client.pubsub_channels(f"{namespace}:*") == []
    finally:
        await observer.close()
        await client.aclose()


async def test_the_waker_starts_again_for_the_next_waiter(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    locks = AsyncHiLok(redis_url, namespace=namespace)
    try:
        for _ in range(2):
            await contended_acquire(locks, "again/a")
            assert await all_end(hilok_tasks()) == set()
        # A third waiter is subscribed while it waits, and woken by the release.
        holder = await locks.acquire("again/a", "write")
        waiter = asyncio.ensure_future(locks.acquire("again/a", "write", timeout=30))
        channel = locks._channel  # the client's own

        async def subscribed() -> bool:
            return bool(redis_client.pubsub_numsub(channel) == [(channel.encode(), 1)])

        await until(subscribed, "the waiter's subscription")
        await locks.release(holder)
        await locks.release(await waiter)
    finally:
        await locks.close()
