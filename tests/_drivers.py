"""Both drivers behind one synchronous API, so that one suite of cases runs against each.

A case gets a :class:`Locks`: for ``"sync"`` a :class:`~celery_hilok.HiLok` itself, for
``"asyncio"`` an :class:`AsyncBridge` over an :class:`~celery_hilok.AsyncHiLok`.

The bridge is not a mock: the real ``AsyncHiLok`` talks to the real Redis, on an event loop
running in a background thread (:class:`LoopThread`). Only the call site moves: each
coroutine method is sent to that loop with ``asyncio.run_coroutine_threadsafe`` and the test
thread waits for its result (or its exception, re-raised as it is). Calls made from several
test threads at once become concurrent tasks on that one loop, which is how the tasks of a
program share one ``AsyncHiLok``; so the concurrency cases keep their meaning.

What the two APIs cannot share: ``lease.release()`` returns None for a ``HiLok`` lease and
an awaitable for an ``AsyncHiLok`` one (CONTRACT section 3): :func:`release_lease` calls it
and waits as each needs. Clients of the driver's own kind (a ``redis.Redis`` or a
``redis.asyncio.Redis``) come from :meth:`Driver.client`.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import redis
import redis.asyncio as aredis

from celery_hilok import AsyncHiLok, HiLok, Lease, LockStatus
from celery_hilok._core import Call, Mode
from celery_hilok._core import Protocol as Calls
from celery_hilok._engine import AcquireOptions, Flow

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DRIVERS", "AsyncBridge", "Driver", "Locks", "LoopThread", "release_lease"]

T = TypeVar("T")

DRIVERS = ("sync", "asyncio")
"""The names of the drivers, as the cases' parameters."""


class Locks(Protocol):
    """The synchronous API of :class:`~celery_hilok.HiLok`, which both drivers offer here
    (with the internals the white-box cases use: ``_protocol``, ``_send``, ``_drive``)."""

    @property
    def namespace(self) -> str: ...
    @property
    def separator(self) -> str: ...
    @property
    def ttl(self) -> float: ...
    @property
    def server(self) -> str: ...
    @property
    def redis(self) -> Any: ...  # a client of the driver's kind
    @property
    def _protocol(self) -> Calls: ...
    @property
    def _channel(self) -> str: ...
    @property
    def _functions(self) -> bool: ...

    def acquire(self, path: str, mode: Mode, **options: Unpack[AcquireOptions]) -> Lease: ...
    def acquire_many(
        self, locks: Iterable[tuple[str, Mode]], **options: Unpack[AcquireOptions]
    ) -> list[Lease]: ...
    def read(
        self, path: str, **options: Unpack[AcquireOptions]
    ) -> AbstractContextManager[Lease]: ...
    def write(
        self, path: str, **options: Unpack[AcquireOptions]
    ) -> AbstractContextManager[Lease]: ...
    def refresh(self, *leases: Lease, ttl: float | None = None) -> None: ...
    def refresh_many(self, leases: Sequence[Lease], *, ttl: float | None = None) -> list[bool]: ...
    def keep_alive(self, lease: Lease, *, interval: float | None = None) -> None: ...
    def stop_keep_alive(self, *leases: Lease) -> None: ...
    def release(self, *leases: Lease) -> None: ...
    def status(self, path: str) -> LockStatus: ...
    def status_chain(self, path: str) -> list[LockStatus]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Locks: ...
    def __exit__(self, *exc: object) -> None: ...
    def _send(
        self, calls: Sequence[Call], *, shield: bool = False, wait: bool = False
    ) -> Flow[Any]: ...
    def _drive(self, flow: Flow[T]) -> T: ...


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


class LoopThread:
    """An asyncio event loop running in a daemon thread, and a way to run awaitables on it
    from other threads. An exception a background task leaves unretrieved on the loop (a
    bug: nobody would ever see it) is kept and raised by :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._unhandled)
        self.unhandled: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._main, name="test-asyncio-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.unhandled.append(context)
        loop.default_exception_handler(context)

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` as a task on the loop; wait for its result, or raise its error."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called on the loop's own thread: it would hang")
        coro: Coroutine[Any, Any, T] = _await(awaitable)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it and join its thread."""
        if not self._thread.is_alive():
            return

        async def cancel_the_rest() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the event loop thread did not end"
        if self.unhandled:
            raise AssertionError(f"errors left unhandled on the event loop: {self.unhandled}")


class AsyncBridge:
    """The synchronous API over one :class:`~celery_hilok.AsyncHiLok` (``self.locks``),
    each call carried out on ``loop`` (see the module docstring)."""

    def __init__(self, loop: LoopThread, locks: AsyncHiLok) -> None:
        self._loop = loop
        self.locks = locks

    def __repr__(self) -> str:
        return f"<AsyncBridge {self.locks!r}>"

    # -- attributes, passed through -------------------------------------------------------

    @property
    def _channel(self) -> str:
        return self.locks._channel

    @property
    def _functions(self) -> bool:
        return self.locks._functions

    @property
    def namespace(self) -> str:
        return self.locks.namespace

    @property
    def separator(self) -> str:
        return self.locks.separator

    @property
    def ttl(self) -> float:
        return self.locks.ttl

    @property
    def server(self) -> str:
        return self.locks.server

    @property
    def redis(self) -> aredis.Redis | aredis.RedisCluster:
        return self.locks.redis

    @property
    def _protocol(self) -> Calls:
        return self.locks._protocol

    # -- coroutine methods, run on the loop -----------------------------------------------

    def acquire(self, path: str, mode: Mode, **options: Unpack[AcquireOptions]) -> Lease:
        return self._loop.run(self.locks.acquire(path, mode, **options))

    def acquire_many(
        self, locks: Iterable[tuple[str, Mode]], **options: Unpack[AcquireOptions]
    ) -> list[Lease]:
        return self._loop.run(self.locks.acquire_many(locks, **options))

    def refresh(self, *leases: Lease, ttl: float | None = None) -> None:
        self._loop.run(self.locks.refresh(*leases, ttl=ttl))

    def refresh_many(self, leases: Sequence[Lease], *, ttl: float | None = None) -> list[bool]:
        return self._loop.run(self.locks.refresh_many(leases, ttl=ttl))

    def stop_keep_alive(self, *leases: Lease) -> None:
        self._loop.run(self.locks.stop_keep_alive(*leases))

    def release(self, *leases: Lease) -> None:
        self._loop.run(self.locks.release(*leases))

    def status(self, path: str) -> LockStatus:
        return self._loop.run(self.locks.status(path))

    def status_chain(self, path: str) -> list[LockStatus]:
        return self._loop.run(self.locks.status_chain(path))

    def close(self) -> None:
        self._loop.run(self.locks.close())

    def __enter__(self) -> AsyncBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plain methods that need the running loop ---------------------------------------

    def keep_alive(self, lease: Lease, *, interval: float | None = None) -> None:
        async def on_the_loop() -> None:  # its refresher task starts on the running loop
            self.locks.keep_alive(lease, interval=interval)

        self._loop.run(on_the_loop())

    def read(self, path: str, **options: Unpack[AcquireOptions]) -> AbstractContextManager[Lease]:
        return _Blocking(self._loop, self.locks.read(path, **options))

    def write(self, path: str, **options: Unpack[AcquireOptions]) -> AbstractContextManager[Lease]:
        return _Blocking(self._loop, self.locks.write(path, **options))

    def release_lease(self, lease: Lease) -> None:
        """``await lease.release()``, on the loop."""

        async def on_the_loop() -> None:
            pending = lease.release()
            assert inspect.isawaitable(pending), f"lease.release() returned {pending!r}"
            await pending

        self._loop.run(on_the_loop())

    # -- internals, for the white-box cases -------------------------------------------------

    def _send(
        self, calls: Sequence[Call], *, shield: bool = False, wait: bool = False
    ) -> Flow[Any]:
        return self.locks._send(calls, shield=shield, wait=wait)  # a flow: no I/O yet

    def _drive(self, flow: Flow[T]) -> T:
        return self._loop.run(self.locks._drive(flow))


class _Blocking(AbstractContextManager[Lease]):
    """A ``with`` block around an ``async with`` one, entered and left on the loop."""

    def __init__(self, loop: LoopThread, hold: AbstractAsyncContextManager[Lease]) -> None:
        self._loop = loop
        self._hold = hold

    def __enter__(self) -> Lease:
        return self._loop.run(self._hold.__aenter__())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self._loop.run(self._hold.__aexit__(exc_type, exc, tb))


def release_lease(hl: Locks, lease: Lease) -> None:
    """Call ``lease.release()`` itself and wait until it is done, whichever driver granted
    the lease: for a ``HiLok`` one it returns None once released; for an ``AsyncHiLok`` one
    it returns an awaitable, awaited on the bridge's loop."""
    if isinstance(hl, AsyncBridge):
        hl.release_lease(lease)
    else:
        assert lease.release() is None


async def _new_async_hilok(target: Any, options: dict[str, Any]) -> AsyncHiLok:
    return AsyncHiLok(target, **options)


async def _new_async_client(url: str) -> aredis.Redis:
    return aredis.Redis.from_url(url)


class Driver:
    """Opens lock clients of one driver, ``"sync"`` or ``"asyncio"`` (the asyncio ones all on
    one :class:`LoopThread`), and closes them all, and then the loop, on :meth:`close`."""

    def __init__(self, name: str) -> None:
        if name not in DRIVERS:
            raise ValueError(f"unknown driver {name!r}")
        self.name = name
        self.loop = LoopThread() if name == "asyncio" else None
        self._opened: list[Locks] = []
        self._clients: list[Any] = []

    def __repr__(self) -> str:
        return f"<Driver {self.name}>"

    def open(self, target: Any, **options: Any) -> Locks:
        """``HiLok(target, **options)``, or an ``AsyncHiLok`` made on the loop and bridged."""
        locks: Locks
        if self.loop is None:
            locks = HiLok(target, **options)
        else:
            locks = AsyncBridge(self.loop, self.loop.run(_new_async_hilok(target, options)))
        self._opened.append(locks)
        return locks

    def client(self, url: str) -> Any:
        """A client of this driver's kind on ``url`` (closed by :meth:`close`)."""
        client: Any
        if self.loop is None:
            client = redis.Redis.from_url(url)
        else:
            client = self.loop.run(_new_async_client(url))
        self._clients.append(client)
        return client

    def ping(self, client: Any) -> bool:
        """``client.ping()``, for a client from :meth:`client`."""
        answer = client.ping() if self.loop is None else self.loop.run(client.ping())
        return bool(answer)

    def close(self) -> None:
        try:
            for locks in reversed(self._opened):
                locks.close()
            for client in self._clients:
                if self.loop is None:
                    client.close()
                else:
                    self.loop.run(client.aclose())
        finally:
            if self.loop is not None:
                self.loop.stop()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
