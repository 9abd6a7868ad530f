"""A process that uses the asyncio API and never closes it, run by tests/test_shutdown.py.

``python -m tests._shutdown_child URL NAMESPACE SCENARIO`` must exit by itself: whatever
background task a lock client started has to end when ``asyncio.run()`` cancels it at exit.

Scenarios:

``seed``             the reproduction of issue 12: one ``RedisHiLok`` on a shared client, two
                     ``async with write("app/a")`` blocks gathered (one of them waits, so the
                     waker task runs), then ``client.aclose()``; nothing is closed.
``seed-each``        the same with one ``RedisHiLok`` per block.
``lost-waker``       ``seed`` on a client whose pub/sub connection loses every cancellation
                     that lands in ``get_message`` (swallowed, and on Python 3.11+ taken
                     back with ``uncancel()``, as if it had never come): the waker task
                     must end anyway.
``lost-refresher``   an ``AsyncHiLok`` keeping a lease alive, whose refresh call loses the
                     cancellation that lands in it: the refresher task must end anyway.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any, cast

import redis.asyncio as aredis

from celery_hilok import AsyncHiLok, RedisHiLok
from celery_hilok._core import REFRESH


def _lose_cancellation() -> None:
    """The current task forgets that it was ever cancelled (as far as it can tell)."""
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)
    while uncancel is not None and uncancel() > 0:
        pass


class LosingPubSub(aredis.Redis):
    """A client whose pub/sub ``get_message`` loses cancellations."""

    def pubsub(self, **kwargs: Any) -> Any:
        pubsub = super().pubsub(**kwargs)
        real = pubsub.get_message

        async def get_message(*args: Any, **kw: Any) -> Any:
            try:
                return await real(*args, **kw)
            except asyncio.CancelledError:
                _lose_cancellation()
                return None

        pubsub.get_message = get_message  # type: ignore[method-assign]
        return pubsub


class LosingRefresh(aredis.Redis):
    """A client whose refresh script calls stall until cancelled, lose the cancellation,
    then go through."""

    stalled: asyncio.Event | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[:2] in (("FCALL", REFRESH.function), ("EVALSHA", REFRESH.sha)):
            assert self.stalled is not None
            self.stalled.set()
            try:
                await asyncio.get_running_loop().create_future()  # until cancelled
            except asyncio.CancelledError:
                _lose_cancellation()
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


async def seed(url: str, namespace: str, each: bool, client_class: type[aredis.Redis]) -> None:
    client = client_class.from_url(url)
    shared = RedisHiLok(client, namespace=namespace)

    async def block() -> None:
        locks = RedisHiLok(client, namespace=namespace) if each else shared
        async with locks.write("app/a"):
            await asyncio.sleep(0)

    await asyncio.gather(block(), block())
    await client.aclose()


async def refresher(url: str, namespace: str) -> None:
    client = cast(LosingRefresh, LosingRefresh.from_url(url))
    client.stalled = asyncio.Event()
    locks = AsyncHiLok(client, namespace=namespace)
    # its own path: the lease of an earlier run is still held (nothing released it)
    lease = await locks.acquire(f"app/{uuid.uuid4().hex}", "write", ttl=10)
    locks.keep_alive(lease, interval=0.001)
    await client.stalled.wait()  # a refresh is in flight: exit now, without closing


def main() -> None:
    url, namespace, scenario = sys.argv[1:4]
    if scenario == "seed":
        asyncio.run(seed(url, namespace, False, aredis.Redis))
    elif scenario == "seed-each":
        asyncio.run(seed(url, namespace, True, aredis.Redis))
    elif scenario == "lost-waker":
        asyncio.run(seed(url, namespace, False, LosingPubSub))
    elif scenario == "lost-refresher":
        asyncio.run(refresher(url, namespace))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print("exited", flush=True)


if __name__ == "__main__":
    main()
