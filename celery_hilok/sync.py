"""The synchronous driver: :class:`HiLok`, on a redis-py ``Redis`` or ``RedisCluster`` client.

Every decision is in :mod:`._engine`; this module performs its effects with blocking calls
and runs the background work (wake-ups, refresh) in threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import redis
import redis.sentinel
from redis.exceptions import ResponseError

from . import _engine
from ._core import Mode
from ._redis import client_kind, waker_log_level
from .errors import LockNotAcquired
from .lease import Lease, LockStatus

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["HiLok"]

log = logging.getLogger("celery_hilok")

REFRESHER_IDLE = 5.0
"""Seconds the refresher thread sleeps while no lease is kept (a lease added meanwhile wakes
it only if it is due sooner)."""

SyncClient = redis.Redis | redis.RedisCluster


class _Waker:
    """One pub/sub connection per ``HiLok`` (per process) and a thread reading it: it feeds
    every message to the :class:`_engine.WakeTable`, which wakes the waiters concerned."""

    def __init__(self, owner: HiLok) -> None:
        self._owner = owner
        self.table = _engine.WakeTable(threading.Event)
        self._lock = threading.Lock()
        # One thread subscribes at a time: redis-py's PubSub opens its connection on first
        # use without a lock, so racing threads would each open one, and all but the one the
        # thread reads would be orphaned with their subscriptions.
        self._subscribing = threading.Lock()
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = threading.Event()

    def ensure(self) -> None:
        """Start the thread (again, in a forked child) if it is not running."""
        with self._lock:
            pid = os.getpid()
            if self._thread is not None and self._pid == pid and self._thread.is_alive():
                return
            self._pid = pid
            self.table.reset()
            self._pubsub = self._owner.redis.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="hilok-waker", daemon=True)
            self._thread.start()

    def subscribe(self, channels: list[str]) -> None:
        with self._subscribing:
            self._pubsub.subscribe(*channels)

    def _run(self) -> None:
        pubsub = self._pubsub
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                message = pubsub.get_message(timeout=1.0)
                backoff = 0.05
            except Exception as exc:  # any failure of the connection, or close() racing us
                if self._stopping.is_set():
                    return
                log.log(waker_log_level(exc), "waker connection failed: %s", exc)
                self.table.wake_all()
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if message is not None:
                self.table.deliver(message)

    def stop(self) -> None:
        self._stopping.set()
        thread, pubsub = self._thread, self._pubsub
        if pubsub is not None:
            # Closing the connection ends the thread's pending read at once.
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout=2.0)
        self._thread = None


class _Refresher:
    """One thread per ``HiLok`` (per process) running the ticks of its
    :class:`_engine.RefreshSchedule`."""

    def __init__(self, owner: HiLok) -> None:
        self._owner = owner
        self.schedule = _engine.RefreshSchedule()
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = threading.Event()
        self._in_flight = threading.Lock()  # held while a tick's refresh call runs

    def add(self, lease: Lease) -> None:
        wake = self.schedule.add(lease, time.monotonic())
        thread = self._thread
        if thread is None or self._pid != os.getpid() or not thread.is_alive():
            self._start()
        if wake:
            self._changed.set()

    def _start(self) -> None:
        """Start the thread, unless another caller just did (or it runs already)."""
        with self._lock:
            pid = os.getpid()
            if self._thread is None or self._pid != pid or not self._thread.is_alive():
                if self._pid != pid:
                    self._in_flight = threading.Lock()  # a fork may have copied it held
                self._pid = pid
                self._stopping.clear()
                self._thread = threading.Thread(
                    target=self._run, name="hilok-refresher", daemon=True
                )
                self._thread.start()

    def discard(self, lease: Lease) -> None:
        self.schedule.discard(lease)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._changed.clear()
            _, delay = self.schedule.wait(time.monotonic(), REFRESHER_IDLE)
            if delay > 0:
                self._changed.wait(delay)
                continue
            leases = self.schedule.take(time.monotonic())
            with self._in_flight:
                self._owner._drive(self._owner._tick(leases))

    def settle(self) -> None:
        """Wait until a refresh call in flight, if any, has finished."""
        if self._pid == os.getpid() and threading.current_thread() is not self._thread:
            with self._in_flight:
                pass

    def stop(self) -> None:
        self._stopping.set()
        self._changed.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout=2.0)
        self._thread = None


class HiLok(_engine.Client[SyncClient]):
    """Hierarchical read-write locks on Redis, synchronous API.

    ``redis`` is a URL (``redis://``, ``rediss://``, ``unix://``, ``sentinel://``; add
    ``?cluster=true`` for Redis Cluster) or an existing ``redis.Redis`` /
    ``redis.RedisCluster`` client (which is not closed by :meth:`close`). ``ttl`` is the
    default lease in seconds. One instance is safe to share between threads.

    ``wait_replicas=n`` (opt-in, not on Redis Cluster) makes every acquire wait, in the same
    round trip, until ``n`` replicas have acknowledged the grant (Redis ``WAIT``, at most
    ``wait_timeout`` seconds); a grant acknowledged by fewer is released again and the
    acquire raises :class:`LockNotReplicated`. Refreshes and releases are not waited for.
    This narrows, but does not close, the window in which a failover loses a lease.
    """

    def acquire(self, path: str, mode: Mode, **options: Unpack[_engine.AcquireOptions]) -> Lease:
        """Acquire ``mode`` (``"read"`` or ``"write"``) on ``path`` and return the lease.

        Options: ``block=True``, ``timeout=None``, ``ttl=None``, ``handle=None``. Blocks
        until granted unless ``block=False`` (one try) or ``timeout`` seconds pass; both
        raise :class:`LockNotAcquired`. ``ttl`` overrides the default lease. ``handle``
        acquires for an existing holder (re-entrant; renews a grant it already has). The
        lease is not refreshed automatically: use :meth:`refresh`, :meth:`keep_alive` or
        the context managers. Raises :class:`InvalidArgument` for bad arguments,
        :class:`HiLokConnectionError` when Redis fails, and with ``wait_replicas``
        :class:`LockNotReplicated` (a :class:`LockNotAcquired`) when too few replicas
        acknowledged the grant.
        """
        return self._drive(self._acquire([(path, mode)], options))[0]

    def acquire_many(
        self, locks: Iterable[tuple[str, Mode]], **options: Unpack[_engine.AcquireOptions]
    ) -> list[Lease]:
        """Acquire several locks for one holder atomically: all of them or none.

        ``locks`` is an iterable of (path, mode) pairs, at most 256 distinct ones
        (:class:`InvalidArgument` beyond: one atomic acquire is one script call, which Redis
        runs alone). Same options and errors as :meth:`acquire`; the leases share one
        handle, in the order asked (a repeated pair gives one lease).
        """
        return self._drive(self._acquire(locks, options))

    def _acquire_many_checked(
        self,
        locks: Iterable[tuple[str, Mode]],
        check: _engine.WaitCheck,
        **options: Unpack[_engine.AcquireOptions],
    ) -> list[Lease]:
        """:meth:`acquire_many` whose wait ``check`` may stop (the Celery integration's
        ``wait`` policy: see :class:`~celery_hilok._engine.WaitCheck`)."""
        return self._drive(self._acquire(locks, options, check))

    def _park(
        self, locks: Iterable[tuple[str, Mode]], **options: Unpack[_engine.EnqueueOptions]
    ) -> list[Lease] | LockNotAcquired:
        """One try that, refused, leaves the request in the queue (the Celery
        integration's ``park`` policy: see :meth:`~celery_hilok._engine.Client._enqueue`)."""
        return self._drive(self._enqueue(locks, options))

    def read(
        self, path: str, **options: Unpack[_engine.AcquireOptions]
    ) -> AbstractContextManager[Lease]:
        """Hold a read lock on ``path`` (and its subtree) for the ``with`` block.

        Same options as :meth:`acquire`. The lease is refreshed in the background while the
        block runs and released when it ends; leaving the block raises :class:`LockLost` if
        the lease was lost meanwhile.
        """
        return _Hold(self, path, "read", options)

    def write(
        self, path: str, **options: Unpack[_engine.AcquireOptions]
    ) -> AbstractContextManager[Lease]:
        """Hold a write lock on ``path`` (and its subtree) for the ``with`` block.

        Same as :meth:`read`, but exclusive.
        """
        return _Hold(self, path, "write", options)

    def refresh(self, *leases: Lease, ttl: float | None = None) -> None:
        """Extend the leases (by their own ttl, or ``ttl``) in one round trip.

        Raises :class:`LockLost` naming every lease that is no longer held.
        """
        self._drive(self._refresh(leases, ttl))

    def refresh_many(self, leases: Sequence[Lease], *, ttl: float | None = None) -> list[bool]:
        """Extend many leases, of any holders, in one round trip; True for each still held."""
        return self._drive(self._refresh_many(leases, ttl))

    def stop_keep_alive(self, *leases: Lease) -> None:
        """Stop refreshing leases given to :meth:`keep_alive`, without releasing them.

        They stay held until their lease runs out, unless someone refreshes or releases
        them (e.g. another process that was given the handle). Returns once no refresh of
        them is in flight, so a refresh that follows (say, to a longer ttl) is the last.
        """
        for lease in leases:
            self._refresher.discard(lease)
        self._refresher.settle()

    def release(self, *leases: Lease) -> None:
        """Release the leases in one round trip. Idempotent per lease.

        Raises :class:`LockLost` if a lease was no longer held (its lease ran out, or it was
        released through another copy of the lease, e.g. in another process).
        """
        self._drive(self._release(leases))

    def status(self, path: str) -> LockStatus:
        """Who holds what on ``path``, under it and above it (with ttls), and who waits."""
        result: LockStatus = self._drive(self._status(path, chain=False))
        return result

    def status_chain(self, path: str) -> list[LockStatus]:
        """:meth:`status` of ``path`` and of each of its ancestors, root first.

        All levels are read in one atomic round trip, so they describe one moment.
        Raises :class:`InvalidArgument` for a bad path.
        """
        result: list[LockStatus] = self._drive(self._status(path, chain=True))
        return result

    def close(self) -> None:
        """Stop the background threads and close the client if this instance created it."""
        self._refresher.stop()
        self._waker.stop()
        if self._owns_client:
            self.redis.close()

    def __enter__(self) -> HiLok:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the driver ---------------------------------------------------------------------------

    _kind = client_kind(asyncio=False)
    _waker_class = _Waker
    _refresher_class = _Refresher

    def _drive(self, flow: _engine.Flow[_engine.T]) -> _engine.T:
        """Run ``flow`` to its end in this thread, performing each effect it yields."""
        run = _engine.Run(flow)
        while run.effect is not None:
            try:
                value = self._perform(run.effect)
            except BaseException as exc:
                run.throw(exc)
            else:
                run.send(value)
        return run.result

    def _perform(self, effect: _engine.Effect) -> Any:
        if isinstance(effect, _engine.Execute):
            commands = effect.commands
            if len(commands) > 1:
                with self.redis.pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    return pipe.execute(raise_on_error=False)
            try:
                return [self.redis.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
            except ResponseError as exc:  # the command's own error: a reply
                return [exc]
        if isinstance(effect, _engine.Sleep):
            return effect.event.wait(effect.seconds)
        return self._waker.subscribe(effect.channels)


class _Hold(AbstractContextManager[Lease]):
    """The ``with`` block of :meth:`HiLok.read` and :meth:`HiLok.write`."""

    __slots__ = ("_hl", "_lease", "_request")

    def __init__(self, hl: HiLok, path: str, mode: Mode, options: _engine.AcquireOptions) -> None:
        self._hl = hl
        self._request = (path, mode, options)
        self._lease: Lease | None = None

    def __enter__(self) -> Lease:
        self._lease = self._hl._drive(self._hl._enter(*self._request))
        return self._lease

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        assert self._lease is not None
        self._hl._drive(self._hl._leave(self._lease, exc_type is not None))
