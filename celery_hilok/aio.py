"""The asyncio driver: :class:`AsyncHiLok`, on ``redis.asyncio`` clients.

Every decision is in :mod:`._engine`; this module performs its effects with awaited calls,
runs the background work (wake-ups, refresh) as tasks, and owns what only asyncio has:
cancellation, which must never leave a lock behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import redis.asyncio as aredis
from redis.exceptions import RedisError, ResponseError

from . import _engine
from ._core import Mode
from ._redis import client_kind, waker_log_level
from .lease import Lease, LockStatus

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncHiLok"]

log = logging.getLogger("celery_hilok")

AsyncClient = aredis.Redis | aredis.RedisCluster


class _Waker:
    """One pub/sub connection per ``AsyncHiLok`` and a task on its loop reading it, feeding
    every message to the :class:`_engine.WakeTable`."""

    def __init__(self, owner: AsyncHiLok) -> None:
        self._owner = owner
        self.table = _engine.WakeTable(asyncio.Event)
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._subscribing: asyncio.Lock | None = None
        self._node_client: Any = None  # see _new_pubsub

    def ensure(self) -> None:
        """Start the task on the running loop if it is not running there."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self.table.reset()
        self._subscribing = asyncio.Lock()
        self._pubsub = self._new_pubsub()
        self._task = loop.create_task(self._run(self._pubsub), name="hilok-waker")

    async def subscribe(self, channels: list[str]) -> None:
        # One task at a time: redis-py's PubSub opens its connection on first use, and
        # racing tasks would each open one (redis-py 6.x does), all but one orphaned with
        # their subscriptions.
        assert self._subscribing is not None
        async with self._subscribing:
            await self._pubsub.subscribe(*channels)

    def _new_pubsub(self) -> Any:
        client: Any = self._owner.redis
        if hasattr(client, "pubsub"):
            return client.pubsub()
        # redis-py before 7 has no pub/sub on the asyncio RedisCluster. A PUBLISH on a
        # cluster reaches every node, so listening on one node hears every release.
        node = client.get_default_node() or client.get_nodes()[0]
        pool = aredis.ConnectionPool(
            connection_class=node.connection_class, **node.connection_kwargs
        )
        self._node_client = aredis.Redis(connection_pool=pool)
        return self._node_client.pubsub()

    async def _run(self, pubsub: Any) -> None:
        backoff = 0.05
        # Until stop() drops this task: redis-py may swallow the cancellation it sends.
        while self._task is asyncio.current_task():
            try:
                if not pubsub.subscribed:
                    await asyncio.sleep(0.01)
                    continue
                message = await pubsub.get_message(timeout=1.0)
                backoff = 0.05
            except (RedisError, OSError) as exc:
                log.log(waker_log_level(exc), "waker connection failed: %s", exc)
                self.table.wake_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if message is not None:
                self.table.deliver(message)

    async def stop(self) -> None:
        task, pubsub = self._task, self._pubsub
        self._task = None
        await _cancelled(task)
        for closing in (pubsub, self._node_client):
            if closing is not None:
                try:
                    await closing.aclose()
                except (RedisError, RuntimeError):
                    pass
        self._node_client = None


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for its end."""
    if task is not None and not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, RuntimeError):
            pass


class _Refresher:
    """One task per ``AsyncHiLok`` running the ticks of its :class:`_engine.RefreshSchedule`."""

    def __init__(self, owner: AsyncHiLok) -> None:
        self._owner = owner
        self.schedule = _engine.RefreshSchedule()
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._tick: asyncio.Future[None] | None = None  # the tick in flight

    def add(self, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._changed = asyncio.Event()
            self._task = loop.create_task(self._run(self._changed), name="hilok-refresher")
        if self.schedule.add(lease, time.monotonic()):  # the next tick must come sooner
            assert self._changed is not None
            self._changed.set()

    async def _run(self, changed: asyncio.Event) -> None:
        # Until stop() drops this task: redis-py may swallow the cancellation it sends.
        while self._task is asyncio.current_task():
            changed.clear()
            delay = self.schedule.delay(time.monotonic())
            if delay is None or delay > 0:
                try:
                    await asyncio.wait_for(changed.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            leases = self.schedule.take(time.monotonic())
            self._tick = asyncio.ensure_future(self._owner._drive(self._owner._tick(leases)))
            await self._tick

    async def settle(self) -> None:
        """Wait until a refresh call in flight, if any, has finished."""
        tick = self._tick
        if tick is not None and not tick.done() and self._task is not asyncio.current_task():
            await asyncio.wait([tick])

    async def stop(self) -> None:
        task = self._task
        self._task = None
        if self._changed is not None:
            self._changed.set()
        await _cancelled(task)


class AsyncHiLok(_engine.Client[AsyncClient]):
    """Hierarchical read-write locks on Redis, asyncio API (same names as :class:`HiLok`).

    ``redis`` is a URL or a ``redis.asyncio.Redis`` / ``RedisCluster`` client. One instance
    serves the tasks of one event loop; its background tasks (wake-ups, refresh) live on the
    loop that first needs them. ``wait_replicas`` and ``wait_timeout``: see
    :class:`~celery_hilok.HiLok`.

    Cancelling a call leaves nothing behind: an acquire whose reply was cut off releases
    what that call granted and withdraws its queue entry, and a release, once started, is
    carried out (the cancellation is raised when it is done).
    """

    async def acquire(
        self, path: str, mode: Mode, **options: Unpack[_engine.AcquireOptions]
    ) -> Lease:
        """Acquire ``mode`` on ``path``; see :meth:`celery_hilok.HiLok.acquire`."""
        leases = await self._drive(self._acquire([(path, mode)], options))
        return leases[0]

    async def acquire_many(
        self, locks: Iterable[tuple[str, Mode]], **options: Unpack[_engine.AcquireOptions]
    ) -> list[Lease]:
        """Acquire several locks for one holder atomically; see :meth:`HiLok.acquire_many`."""
        return await self._drive(self._acquire(locks, options))

    def read(
        self, path: str, **options: Unpack[_engine.AcquireOptions]
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold a read lock for the ``async with`` block; see :meth:`HiLok.read`."""
        return _Hold(self, path, "read", options)

    def write(
        self, path: str, **options: Unpack[_engine.AcquireOptions]
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold a write lock for the ``async with`` block; see :meth:`HiLok.write`."""
        return _Hold(self, path, "write", options)

    async def refresh(self, *leases: Lease, ttl: float | None = None) -> None:
        """Extend the leases in one round trip; raises :class:`LockLost` for lost ones."""
        await self._drive(self._refresh(leases, ttl))

    async def refresh_many(
        self, leases: Sequence[Lease], *, ttl: float | None = None
    ) -> list[bool]:
        """Extend many leases, of any holders, in one round trip; True for each still held."""
        return await self._drive(self._refresh_many(leases, ttl))

    async def stop_keep_alive(self, *leases: Lease) -> None:
        """Stop refreshing leases given to :meth:`keep_alive`, without releasing them; see
        :meth:`HiLok.stop_keep_alive`."""
        for lease in leases:
            self._refresher.schedule.discard(lease)
        await self._refresher.settle()

    async def release(self, *leases: Lease) -> None:
        """Release the leases; idempotent per lease. Raises :class:`LockLost` as
        :meth:`HiLok.release` does. A release is carried out even if the calling task is
        cancelled while it runs; the cancellation is raised once it is done."""
        await self._drive(self._release(leases))

    async def status(self, path: str) -> LockStatus:
        """Who holds what on ``path``, under it and above it, and who waits."""
        result: LockStatus = await self._drive(self._status(path, chain=False))
        return result

    async def status_chain(self, path: str) -> list[LockStatus]:
        """:meth:`status` of ``path`` and of each of its ancestors, root first; see
        :meth:`HiLok.status_chain`."""
        result: list[LockStatus] = await self._drive(self._status(path, chain=True))
        return result

    async def close(self) -> None:
        """Stop the background tasks and close the client if this instance created it."""
        await self._refresher.stop()
        await self._waker.stop()
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncHiLok:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the driver ---------------------------------------------------------------------------

    _kind = client_kind(asyncio=True)
    _waker_class = _Waker
    _refresher_class = _Refresher

    async def _drive(self, flow: _engine.Flow[_engine.T]) -> _engine.T:
        """Run ``flow`` to its end, performing each effect it yields.

        A cancellation that arrives during a shielded effect is held back: the effect is
        carried out and its result goes to the flow, and the cancellation is thrown in at
        the flow's next unshielded effect, or raised when it ends (winning over its result
        or its error). A cancellation that the task counts but that never reached us (some
        redis-py versions swallow one that lands mid-call, or turn it into a connection
        error; ``asyncio.wait_for`` may too) is thrown in after the effect it landed in, or
        a cancelled task would carry on, perhaps holding a lease it was never given.
        """
        counter = _cancel_counter()
        seen = counter()
        held: BaseException | None = None
        run = _engine.Run(flow)
        try:
            while (effect := run.effect) is not None:
                shield = isinstance(effect, _engine.Execute) and effect.shield
                if held is not None and not shield:
                    run.throw(held)
                    held = None
                    continue
                value: Any = None
                error: BaseException | None = None
                try:
                    if shield:
                        task = asyncio.ensure_future(self._perform(effect))
                        try:
                            value = await asyncio.shield(task)
                        except asyncio.CancelledError as cancelled:
                            held = cancelled
                            value = await task
                    else:
                        value = await self._perform(effect)
                except BaseException as exc:
                    error = exc
                if counter() > seen:
                    seen = counter()
                    if shield:
                        held = held or asyncio.CancelledError()
                    elif not isinstance(error, asyncio.CancelledError):
                        swallowed = asyncio.CancelledError()
                        swallowed.__cause__ = error
                        error = swallowed
                if error is None:
                    run.send(value)
                else:
                    run.throw(error)
            return run.result
        finally:
            if held is not None:
                raise held

    async def _perform(self, effect: _engine.Effect) -> Any:
        if isinstance(effect, _engine.Execute):
            return await self._execute(effect.commands)
        if isinstance(effect, _engine.Sleep):
            try:
                return await asyncio.wait_for(effect.event.wait(), effect.seconds)
            except asyncio.TimeoutError:
                return False
        return await self._waker.subscribe(effect.channels)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if len(commands) > 1:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
                return replies
        try:
            return [await self.redis.execute_command(*commands[0])]
        except ResponseError as exc:  # the command's own error: a reply
            return [exc]


def _cancel_counter() -> Callable[[], int]:
    """How many cancellations the current task has pending (always 0 before Python 3.11)."""
    task = asyncio.current_task()
    counter = getattr(task, "cancelling", None)
    if counter is None:
        return lambda: 0
    return counter  # type: ignore[no-any-return]


async def _shielded(coro: Awaitable[Any]) -> None:
    """Run ``coro`` to the end even if the caller is being cancelled (the cancellation is
    raised when it is done)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class _Hold(AbstractAsyncContextManager[Lease]):
    """The ``async with`` block of :meth:`AsyncHiLok.read` and :meth:`AsyncHiLok.write`."""

    __slots__ = ("_hl", "_lease", "_request")

    def __init__(
        self, hl: AsyncHiLok, path: str, mode: Mode, options: _engine.AcquireOptions
    ) -> None:
        self._hl = hl
        self._request = (path, mode, options)
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._hl._drive(self._hl._enter(*self._request))
        return self._lease

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        assert self._lease is not None
        await self._hl._drive(self._hl._leave(self._lease, exc_type is not None))
