"""The asyncio driver: :class:`AsyncHiLok`, on ``redis.asyncio`` clients.

Every decision is in :mod:`._engine`; this module performs its effects with awaited calls,
runs the background work (wake-ups, refresh) as tasks, and owns what only asyncio has:
cancellation, which must never leave a lock behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

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
T = TypeVar("T")


WAKER_LINGER = 0.25
"""Seconds the waker task stays after the last waiter left (so that a lock handed from one
waiter to the next keeps its subscriptions) before it ends and gives its connection back to
the pool; the next waiter starts a new one."""


class _Background(asyncio.Task[None]):
    """A background task that remembers being asked to stop.

    redis-py may swallow a cancellation that lands inside one of its calls, and before
    Python 3.11 a task cannot tell that it was cancelled once the ``CancelledError`` is
    gone. So the request is recorded here, by whoever cancels the task (``close()``, or
    ``asyncio.run()`` cancelling every task at its end), and the task's loop checks it on
    every turn: a cancellation always ends the task, swallowed or not.
    """

    stopping = False
    retired = False  # ended by its owner because it is no longer needed (see _Waker)

    def cancel(self, msg: Any = None) -> bool:
        self.stopping = True
        return super().cancel(msg)


def _start(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], name: str
) -> _Background:
    return _Background(coro, loop=loop, name=name)


def _stopping(task: asyncio.Task[None] | None) -> bool:
    """Must the running background task end: dropped by its owner (``task`` is not the
    current task any more), or cancelled, even if the cancellation was swallowed?"""
    current = asyncio.current_task()
    return task is not current or getattr(current, "stopping", False)


class _Waker:
    """One pub/sub connection per ``AsyncHiLok`` and a task on its loop reading it, feeding
    every message to the :class:`_engine.WakeTable`. The task runs while anyone waits, and
    :data:`WAKER_LINGER` seconds more; the next waiter starts it again."""

    def __init__(self, owner: AsyncHiLok) -> None:
        self._owner = owner
        self.table = _engine.WakeTable(asyncio.Event)
        self.table.on_idle = self._idle
        self._pubsub: Any = None
        self._task: _Background | None = None
        self._subscribing: asyncio.Lock | None = None
        self._node_client: Any = None  # see _new_pubsub
        self._retiring: asyncio.TimerHandle | None = None

    def ensure(self) -> None:
        """Start the task on the running loop if it is not running there."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self.table.reset()
        self._subscribing = asyncio.Lock()
        self._node_client = None
        self._pubsub = self._new_pubsub()
        self._task = _start(loop, self._run(self._pubsub, self._node_client), "hilok-waker")

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

    def _idle(self) -> None:
        """The last waiter left: end the task in :data:`WAKER_LINGER` seconds, unless
        someone waits again by then."""
        task = self._task
        if task is None or task.done():
            return
        if self._retiring is not None:
            self._retiring.cancel()
        self._retiring = task.get_loop().call_later(WAKER_LINGER, self._retire, task)

    def _retire(self, task: _Background) -> None:
        self._retiring = None
        if task is self._task and not task.done() and self.table.idle():
            # Dropped first, so that the next waiter starts a new task and connection
            # rather than use this closing one.
            self._task = None
            task.retired = True
            task.cancel()

    async def _run(self, pubsub: Any, node_client: Any) -> None:
        backoff = 0.05
        try:
            while not _stopping(self._task):
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
        finally:
            if getattr(asyncio.current_task(), "retired", False):
                # no longer needed (not stopped by close() or by the loop's end, which
                # close the connection themselves or drop it): give the connection back
                await _close(pubsub, node_client)

    async def stop(self) -> None:
        task, pubsub, node_client = self._task, self._pubsub, self._node_client
        self._task = None
        self._node_client = None
        if self._retiring is not None:
            self._retiring.cancel()
            self._retiring = None
        await _cancelled(task)
        await _close(pubsub, node_client)


async def _close(*connections: Any) -> None:
    for closing in connections:
        if closing is not None:
            try:
                await closing.aclose()
            except (RedisError, RuntimeError):
                pass


def _done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for its end."""
    if task is not None and not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, RuntimeError):
            pass


class _Refresher:
    """One task per ``AsyncHiLok`` running the ticks of its :class:`_engine.RefreshSchedule`,
    while any lease is kept and :data:`WAKER_LINGER` seconds more (the next :meth:`add`
    starts it again)."""

    def __init__(self, owner: AsyncHiLok) -> None:
        self._owner = owner
        self.schedule = _engine.RefreshSchedule()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # what the task sleeps on
        self._tick: asyncio.Future[None] | None = None  # the tick in flight

    def add(self, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = _start(loop, self._run(loop), "hilok-refresher")
        if self.schedule.add(lease, time.monotonic()):  # the next tick must come sooner
            self._wake_up()

    def discard(self, lease: Lease) -> None:
        self.schedule.discard(lease)  # the task ends by itself once idle

    def _wake_up(self) -> None:
        if self._wake is not None:
            _done(self._wake)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        idle = False
        while not _stopping(self._task):
            kept, delay = self.schedule.wait(time.monotonic(), WAKER_LINGER)
            if not kept:
                if idle:  # nothing kept for a whole linger: end (add() starts a new task)
                    self._task = None
                    return
                idle = True
            else:
                idle = False
            if delay > 0:
                self._wake = wake = loop.create_future()
                timer = loop.call_later(delay, _done, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    self._wake = None
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
        self._wake_up()
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

    The background tasks run only while needed: the wake-up task (and its pub/sub
    connection, taken from the client's pool) while a call waits, the refresh task while a
    lease is kept alive, each a quarter of a second more. So short-lived instances
    leave no task behind, and an instance that is never closed does not keep
    ``asyncio.run()`` from ending: its tasks end when cancelled, even when redis-py loses
    the cancellation. :meth:`close` is still the clean way out.
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
            self._refresher.discard(lease)
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
        carried out (sent again, in a task of its own that no cancellation reaches, if the
        cancellation cut it short: a shielded effect may run twice) and its result goes to
        the flow, and the cancellation is thrown in at the flow's next unshielded effect, or
        raised when it ends (winning over its result or its error). A cancellation that the
        task counts but that never reached us (some redis-py versions swallow one that lands
        mid-call, or turn it into a connection error; ``asyncio.wait_for`` may too) is
        thrown in after the effect it landed in, or a cancelled task would carry on, perhaps
        holding a lease it was never given.
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
                    value = await self._perform(effect)
                except BaseException as exc:
                    error = exc
                cancelled = counter() > seen
                if cancelled:
                    seen = counter()
                if shield and (cancelled or isinstance(error, asyncio.CancelledError)):
                    if held is None:
                        cut = isinstance(error, asyncio.CancelledError)
                        held = error if cut else asyncio.CancelledError()
                    if error is not None:  # cut short by the cancellation: carry it out
                        error = None
                        try:
                            value, _ = await _carried_out(self._perform(effect))
                        except BaseException as exc:
                            error = exc
                elif cancelled and not isinstance(error, asyncio.CancelledError):
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


async def _carried_out(coro: Awaitable[T]) -> tuple[T, asyncio.CancelledError | None]:
    """Run ``coro`` to its end in a task of its own, whatever cancellations the calling task
    gets meanwhile; its result, and the first cancellation that came (for the caller to
    raise once it is done)."""
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError as exc:
            if task.done():  # the task itself was cancelled: that is its outcome
                return task.result(), cancelled
            cancelled = cancelled or exc


async def _shielded(coro: Awaitable[Any]) -> None:
    """Run ``coro`` to the end even if the caller is being cancelled (the cancellation is
    raised when it is done)."""
    _, cancelled = await _carried_out(coro)
    if cancelled is not None:
        raise cancelled


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
