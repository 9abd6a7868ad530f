"""Seed compatibility: :class:`RedisHiLok`, a drop-in replacement for redishilok 1.1.0.

``from celery_hilok import RedisHiLok`` gives the API of the seed library (times in
milliseconds, handles called ``uuid``, ``RedisHiLokError`` for every refusal), on top of
:class:`~celery_hilok.AsyncHiLok`. There is no second copy of the lock logic here, only a
translation:

============================  ====================================================
seed call                     engine call
============================  ====================================================
``read(path)``                ``acquire(path, "read-node")``: node-only shared
``write(path)``               ``acquire(path, "write")``: the subtree, exclusive
``uuid=`` (restore)           ``refresh_many`` of that handle's grant; never revives
``release_*(path, uuid)``     ``release`` of that handle's grant, checked in Redis
``status(path, uuid)``        ``status_chain(path)``, one entry per level
context managers              ``keep_alive`` + ``Lease.on_lost`` cancelling the task
============================  ====================================================

Redis clients: a URL gets one engine (and client) per event loop, created on first use
and closed when that loop shuts down, so one ``RedisHiLok`` serves repeated
``asyncio.run`` calls; a client passed in is shared by every call and never closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict, cast

from ._core import Mode, Request, check_handle
from .aio import AsyncClient, AsyncHiLok, _shielded
from .errors import HiLokError, InvalidArgument, LockLost
from .lease import Lease, LockStatus
from .paths import parse_path

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RedisHiLok", "RedisHiLokError", "RedisHiLokStatus"]

log = logging.getLogger("celery_hilok")

SeedMode = Literal["read", "write"]

_ENGINE_MODES: Final[dict[SeedMode, Mode]] = {"read": "read-node", "write": "write"}
"""The seed's read covers only its node: the engine's ``read-node`` (section 1 of the
contract); its write covers the subtree, exactly like the engine's ``write``."""


class SeedOptions(TypedDict, total=False):
    """The keyword arguments of the seed's four lock calls (``acquire_read``,
    ``acquire_write``, ``read``, ``write``): ``block=True``, ``timeout=None`` (seconds, as in
    the seed), ``uuid=None`` (restore the lock that uuid holds)."""

    block: bool
    timeout: float | None
    uuid: str | None


_SEED_OPTIONS: Final = frozenset(SeedOptions.__annotations__)


class RedisHiLokError(RuntimeError):
    """A seed-API lock operation failed: not acquired (``block=False``, ``timeout``), a
    ``uuid`` that no longer holds its lock, or Redis failing. The engine error it stands
    for, if any, is its ``__cause__``."""


@dataclasses.dataclass
class RedisHiLokStatus:
    """One level of :meth:`RedisHiLok.status`.

    ``held``: someone holds the node; ``type``: ``"write"`` (a write on the node) or
    ``"read"`` (a read on the node, or any lock below it), else None; ``owned``: the uuid
    asked about is among those holders; ``ttl``: milliseconds left on that uuid's lease when
    owned, else on the longest of the holders' leases; None when not held.
    """

    held: bool
    type: str | None
    owned: bool
    ttl: int | None


class RedisHiLok:
    """Hierarchical read-write locks with the API of redishilok 1.1.0.

    ``redis`` is a URL or a ``redis.asyncio.Redis`` (or ``RedisCluster``) client; a client
    passed in is never closed or disconnected here. ``ttl`` is the lease of every lock and
    ``refresh_interval`` how often the context managers renew it, both in milliseconds; the
    refresh runs at least three times per ``ttl`` whatever ``refresh_interval`` says, and
    ``refresh_interval <= 0`` turns it off (as in the seed). With
    ``cancel_on_lock_failure``, a context manager whose lock is lost cancels the task that
    entered it. ``namespace`` (not in the seed) prefixes every Redis key.

    Raises ``ValueError`` for a non-positive ``ttl``, an empty ``separator`` or a bad
    ``namespace``.
    """

    def __init__(
        self,
        redis: str | AsyncClient,
        *,
        ttl: int = 5000,
        refresh_interval: float = 2000,
        separator: str = "/",
        cancel_on_lock_failure: bool = True,
        namespace: str = "hilok",
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 1:
            raise InvalidArgument(f"ttl must be a number of milliseconds >= 1, got {ttl!r}")
        if isinstance(refresh_interval, bool) or not isinstance(refresh_interval, (int, float)):
            raise InvalidArgument(
                f"refresh_interval must be a number of milliseconds, got {refresh_interval!r}"
            )
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.separator = separator
        self.cancel_on_lock_failure = cancel_on_lock_failure
        self.namespace = namespace
        self._url = redis if isinstance(redis, str) else None
        self._lock = threading.Lock()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopEngine] = {}
        # With a client, one engine serves every call. With a URL, an engine not yet bound
        # to a loop: built now so that bad arguments fail here, claimed by the first loop.
        self._spare: AsyncHiLok | None = self._new_engine(redis)
        self._shared = None if self._url is not None else self._spare

    def _new_engine(self, redis: str | AsyncClient) -> AsyncHiLok:
        return AsyncHiLok(
            redis, namespace=self.namespace, separator=self.separator, ttl=self.ttl / 1000
        )

    @property
    def redis(self) -> AsyncClient:
        """The Redis client: the one passed in, or the current event loop's one for a URL."""
        return self._engine().redis

    # -- locking ------------------------------------------------------------------------

    async def acquire_read(self, path: str, **options: Unpack[SeedOptions]) -> str:
        """Acquire a read lock on ``path`` (the node only) and return its uuid.

        The lock is not refreshed: it runs out after ``ttl`` ms unless renewed by calling
        again with ``uuid=``, which only renews a lock that uuid still holds. Raises
        :class:`RedisHiLokError` when the lock is not granted at once (``block=False``) or
        within ``timeout`` seconds, or when ``uuid`` does not hold it; ``ValueError`` for an
        empty path.
        """
        _, lease = await self._acquire(path, "read", options)
        return lease.handle

    async def acquire_write(self, path: str, **options: Unpack[SeedOptions]) -> str:
        """Acquire a write lock on ``path`` and its subtree; see :meth:`acquire_read`."""
        _, lease = await self._acquire(path, "write", options)
        return lease.handle

    async def release_read(self, path: str, uuid: str) -> None:
        """Release the read lock ``uuid`` holds on ``path``.

        Raises :class:`RedisHiLokError`, and frees nothing, if ``uuid`` does not hold a read
        lock on ``path`` (it ran out, was released already, or is a write lock).
        """
        await self._release_uuid(path, "read", uuid)

    async def release_write(self, path: str, uuid: str) -> None:
        """Release the write lock ``uuid`` holds on ``path``; see :meth:`release_read`."""
        await self._release_uuid(path, "write", uuid)

    @asynccontextmanager
    async def read(self, path: str, **options: Unpack[SeedOptions]) -> AsyncIterator[str]:
        """Hold a read lock on ``path`` for the block, refreshed in the background; yields
        its uuid.

        With ``uuid=``, holds (and finally releases) the lock that uuid already holds.
        Raises as :meth:`acquire_read` does on entry. On a normal exit, raises
        :class:`RedisHiLokError` if the lock was lost meanwhile; with
        ``cancel_on_lock_failure`` a loss seen by the refresh cancels the task at once.
        """
        async with self._hold(path, "read", options) as handle:
            yield handle

    @asynccontextmanager
    async def write(self, path: str, **options: Unpack[SeedOptions]) -> AsyncIterator[str]:
        """Hold a write lock on ``path`` and its subtree for the block; see :meth:`read`."""
        async with self._hold(path, "write", options) as handle:
            yield handle

    async def status(self, path: str, uuid: str) -> list[RedisHiLokStatus]:
        """One :class:`RedisHiLokStatus` per level of ``path``, root first, as seen by
        ``uuid``; all levels are read in one atomic round trip.

        Raises ``ValueError`` for an empty path and :class:`RedisHiLokError` if Redis fails.
        """
        engine = self._engine()
        try:
            levels = await engine.status_chain(path)
        except InvalidArgument:
            raise
        except HiLokError as exc:
            raise RedisHiLokError(str(exc)) from exc
        return [_seed_status(level, uuid) for level in levels]

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop background work and close the clients this instance created.

        A client passed in is left open. The instance stays usable: a later call opens
        what it needs again.
        """
        if self._shared is not None:
            await self._shared.close()
            return
        with self._lock:
            entries = list(self._loops.items())
            self._loops.clear()
        current = asyncio.get_running_loop()
        for loop, entry in entries:
            if loop is current:
                await entry.close()
            elif not loop.is_closed():
                asyncio.run_coroutine_threadsafe(entry.close(), loop)
            # A closed loop's sockets cannot be closed politely any more; they go with it.

    async def __aenter__(self) -> RedisHiLok:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        target = self._url if self._url is not None else repr(self._engine().redis)
        return f"<RedisHiLok {target} namespace={self.namespace!r}>"

    # -- internals ------------------------------------------------------------------------

    def _engine(self) -> AsyncHiLok:
        """The engine for the running event loop (or the shared one, for a given client)."""
        if self._shared is not None:
            return self._shared
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside any loop: the spare, for whichever loop comes first
            with self._lock:
                if self._spare is None:
                    self._spare = self._new_engine(cast(str, self._url))
                return self._spare
        with self._lock:
            entry = self._loops.get(loop)
            if entry is not None:
                return entry.engine
            # Forget loops that were closed without shutting down their async generators.
            for stale in [old for old in self._loops if old.is_closed()]:
                del self._loops[stale]
            engine = self._spare or self._new_engine(cast(str, self._url))
            self._spare = None
            entry = self._loops[loop] = _LoopEngine(engine)
        entry.close_with(loop, self._forget)
        return engine

    def _forget(self, loop: asyncio.AbstractEventLoop, entry: _LoopEngine) -> None:
        with self._lock:
            if self._loops.get(loop) is entry:
                del self._loops[loop]

    async def _acquire(
        self, path: str, mode: SeedMode, options: SeedOptions
    ) -> tuple[AsyncHiLok, Lease]:
        unknown = set(options) - _SEED_OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        block, timeout, uuid = (
            options.get("block", True),
            options.get("timeout"),
            options.get("uuid"),
        )
        engine = self._engine()
        if uuid:  # restore: renew what that uuid holds, never grant anything new
            lease = self._lease_of(engine, path, mode, uuid)
            try:
                (held,) = await engine.refresh_many([lease])
            except HiLokError as exc:
                raise RedisHiLokError(str(exc)) from exc
            if not held:
                raise RedisHiLokError(f"cannot restore {_not_held(lease, mode)}")
            return engine, lease
        if timeout is not None and timeout < 0:
            timeout = 0.0  # the seed tried once
        try:
            lease = await engine.acquire(
                path,
                _ENGINE_MODES[mode],
                block=block,
                timeout=timeout,
                ttl=self.ttl / 1000,
            )
        except InvalidArgument:
            raise
        except HiLokError as exc:
            raise RedisHiLokError(str(exc)) from exc
        return engine, lease

    def _lease_of(self, engine: AsyncHiLok, path: str, mode: SeedMode, uuid: object) -> Lease:
        """A lease naming the grant ``uuid`` would hold; raises ValueError for a bad path."""
        request = Request(parse_path(path, engine.separator), _ENGINE_MODES[mode])
        try:
            handle = check_handle(uuid)
        except InvalidArgument:
            # Not a handle this library ever issued, so it holds nothing.
            raise RedisHiLokError(
                f"the {mode} lock on {request.path.text!r} is not held by that uuid "
                "(it is not a uuid this library hands out)"
            ) from None
        return Lease(request, handle, 0, self.ttl / 1000, engine)

    async def _release_uuid(self, path: str, mode: SeedMode, uuid: str) -> None:
        if not uuid:
            raise InvalidArgument("uuid is required to release a lock")
        engine = self._engine()
        await self._release(engine, self._lease_of(engine, path, mode, uuid), mode)

    async def _release(self, engine: AsyncHiLok, lease: Lease, mode: SeedMode) -> None:
        # The seed's release is checked: freeing nothing is an error there (the engine's
        # own release of a grant released already is not), so read the release codes.
        try:
            codes = await engine._drive(engine._release([lease]))
        except LockLost as exc:
            raise RedisHiLokError(f"cannot release {_not_held(lease, mode)}") from exc
        except HiLokError as exc:
            raise RedisHiLokError(str(exc)) from exc
        if codes and codes[0] != 1:
            raise RedisHiLokError(f"cannot release {_not_held(lease, mode)}")

    @asynccontextmanager
    async def _hold(self, path: str, mode: SeedMode, options: SeedOptions) -> AsyncIterator[str]:
        engine, lease = await self._acquire(path, mode, options)
        task = asyncio.current_task()
        inside = True
        try:
            if self.cancel_on_lock_failure and task is not None:

                def cancel(lost: Lease) -> None:
                    # Only a task still inside this block: after it, the task does other work.
                    if inside and not task.done():
                        task.cancel(f"celery_hilok: lost the {mode} lock on {lost.path!r}")

                lease.on_lost(cancel)
            if self.refresh_interval > 0:
                # The engine refreshes at least three times per ttl whatever this says.
                interval = min(self.refresh_interval, self.ttl) / 1000
                engine.keep_alive(lease, interval=max(interval, 0.001))
            yield lease.handle
        except BaseException:
            inside = False
            await _shielded(self._release_quietly(engine, lease, mode))
            raise
        inside = False
        await _shielded(self._release(engine, lease, mode))

    async def _release_quietly(self, engine: AsyncHiLok, lease: Lease, mode: SeedMode) -> None:
        try:
            await self._release(engine, lease, mode)
        except RedisHiLokError as exc:
            log.warning("leaving a %s block on %r: %s", mode, lease.path, exc)


def _not_held(lease: Lease, mode: SeedMode) -> str:
    return (
        f"the {mode} lock on {lease.path!r}: uuid {lease.handle[:6]}... does not hold it "
        "(it ran out, was released, or is held in the other mode)"
    )


def _seed_status(level: LockStatus, uuid: str) -> RedisHiLokStatus:
    """The seed's view of one node: a write on it, else a read on it or anything below."""
    writers = [h for h in level.holders if h.relation == "self" and h.mode == "write"]
    readers = [
        h
        for h in level.holders
        if h.relation == "below" or (h.relation == "self" and h.mode != "write")
    ]
    for kind, holders in (("write", writers), ("read", readers)):
        if holders:
            own = [h for h in holders if h.handle == uuid]
            ttl = max(h.ttl for h in own or holders)
            return RedisHiLokStatus(True, kind, bool(own), round(ttl * 1000))
    return RedisHiLokStatus(False, None, False, None)


class _LoopEngine:
    """The engine of one event loop, closed when that loop shuts down."""

    __slots__ = ("_closed", "_closer", "engine")

    def __init__(self, engine: AsyncHiLok) -> None:
        self.engine = engine
        self._closed = False
        self._closer: object = None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.engine.close()

    def close_with(
        self,
        loop: asyncio.AbstractEventLoop,
        forget: Callable[[asyncio.AbstractEventLoop, _LoopEngine], None],
    ) -> None:
        """Close the engine when ``loop`` shuts down (``asyncio.run`` ending, for one).

        asyncio has no loop-closing hook, but every loop that shuts down properly closes the
        async generators started on it (``loop.shutdown_asyncgens()``), while it still runs.
        So start one here, up to its first ``yield``, and let its ``finally`` do the closing.
        The loop keeps only a weak reference: the entry keeps the generator alive.
        """
        entry = self

        async def closer() -> AsyncIterator[None]:
            try:
                yield
            finally:
                forget(loop, entry)
                await entry.close()

        agen = closer()
        # Starting it registers it with the running loop; it reaches `yield` with no await,
        # so one synchronous step is enough (no task, nothing to be cancelled first).
        first = cast(Coroutine[Any, Any, None], agen.__anext__())
        try:
            first.send(None)
        except StopIteration:
            pass
        self._closer = agen
