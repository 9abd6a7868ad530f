"""The asyncio driver: :class:`AsyncHiLok`, on ``redis.asyncio`` clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError

from . import metrics as _metrics
from ._core import (
    CLUSTER_WAIT,
    Acquisition,
    Call,
    Mode,
    Protocol,
    Request,
    by_tree,
    check_timeout,
    check_ttl,
    check_wait_replicas,
    normalise_requests,
    wakes,
)
from ._redis import (
    DEFAULT_CLIENT_OPTIONS,
    MAX_CONNECTIONS,
    RETRIES,
    SENTINEL_SCHEME,
    check_url,
    describe_server,
    eviction_warning,
    fast_packing,
    sentinel_client,
    split_cluster_url,
    translate,
    waker_log_level,
)
from .errors import HiLokError, InvalidArgument, LockLost, LockNotAcquired
from .lease import Lease, LockStatus
from .paths import parse_path, validate_namespace

__all__ = ["AsyncHiLok"]

log = logging.getLogger("celery_hilok")

AsyncClient = aredis.Redis | aredis.RedisCluster


class AsyncHiLok:
    """Hierarchical read-write locks on Redis, asyncio API (same names as :class:`HiLok`).

    ``redis`` is a URL or a ``redis.asyncio.Redis`` / ``RedisCluster`` client. One instance
    serves the tasks of one event loop; its background tasks (wake-ups, refresh) live on the
    loop that first needs them. ``wait_replicas`` and ``wait_timeout``: see
    :class:`~celery_hilok.HiLok`.
    """

    def __init__(
        self,
        redis: str | AsyncClient,
        *,
        namespace: str = "hilok",
        separator: str = "/",
        ttl: float = 30.0,
        redis_options: dict[str, Any] | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        if not isinstance(separator, str) or not separator:
            raise InvalidArgument(f"separator must be a non-empty str, got {separator!r}")
        self.separator = separator
        self.ttl = check_ttl(ttl)
        self.wait_replicas, self.wait_timeout = check_wait_replicas(wait_replicas, wait_timeout)
        self._protocol = Protocol(namespace, separator)
        self._owns_client = isinstance(redis, str)
        self.redis: AsyncClient = _make_client(redis, redis_options)
        self.server = describe_server(self.redis)
        self._cluster = isinstance(self.redis, aredis.RedisCluster)
        if self._cluster and self.wait_replicas:
            raise InvalidArgument(CLUSTER_WAIT)
        self._eviction_checked = self._cluster  # CONFIG GET would ask one node of many
        self._waker = _Waker(self)
        self._refresher = _Refresher(self)

    # -- acquiring ------------------------------------------------------------------------

    async def acquire(
        self,
        path: str,
        mode: Mode,
        *,
        block: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        handle: str | None = None,
    ) -> Lease:
        """Acquire ``mode`` on ``path``; see :meth:`celery_hilok.HiLok.acquire`.

        Cancelling the call leaves nothing behind: a grant made by a call whose reply was
        cut off is released (for a fresh holder), and the queue entry is withdrawn.
        """
        leases = await self.acquire_many(
            [(path, mode)], block=block, timeout=timeout, ttl=ttl, handle=handle
        )
        return leases[0]

    async def acquire_many(
        self,
        locks: Iterable[tuple[str, Mode]],
        *,
        block: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        handle: str | None = None,
    ) -> list[Lease]:
        """Acquire several locks for one holder atomically; see :meth:`HiLok.acquire_many`."""
        requests = normalise_requests(locks, self.separator)
        lease_ttl = self.ttl if ttl is None else check_ttl(ttl)
        limit = check_timeout(timeout)
        if not self._cluster or len({r.path.tree for r in requests}) == 1:
            return await self._acquire_group(requests, handle, lease_ttl, block, limit)
        # A cluster runs one script per slot: see HiLok.acquire_many.
        start = time.monotonic()
        leases: list[Lease] = []
        try:
            for group in by_tree(requests):
                left = None if limit is None else max(0.0, limit - (time.monotonic() - start))
                leases += await self._acquire_group(group, handle, lease_ttl, block, left)
                handle = leases[0].handle
        except BaseException:
            await _shielded(self._release_quietly(leases))
            raise
        order = {req: i for i, req in enumerate(requests)}
        return sorted(leases, key=lambda lease: order[lease.request])

    async def _acquire_group(
        self,
        requests: list[Request],
        handle: str | None,
        ttl: float,
        block: bool,
        timeout: float | None,
    ) -> list[Lease]:
        """One atomic acquire of ``requests`` (one script per try), waiting as needed."""
        if not self._eviction_checked:
            await self._check_eviction()
        started = time.monotonic()
        attempt = Acquisition(
            self._protocol,
            requests,
            handle=handle,
            ttl=ttl,
            block=block,
            timeout=timeout,
            now=started,
        )
        cancel_count = _cancel_counter()
        cancelling = cancel_count()
        waiter: _Wait | None = None
        try:
            while True:
                if waiter is not None:
                    waiter.event.clear()
                sent = time.monotonic()
                reply, acks = await self._run_acquire(attempt.call)
                # Some redis-py versions swallow a cancellation that lands mid-call; the
                # task still counts it, so honour it here rather than hand out a lease.
                if cancel_count() > cancelling:
                    raise asyncio.CancelledError
                step = attempt.step(reply, time.monotonic())
                if isinstance(step, list):
                    if acks < self.wait_replicas:
                        raise attempt.not_replicated(acks, self.wait_replicas, self.wait_timeout)
                    leases = [
                        Lease(r, attempt.handle, token, ttl, self)
                        for r, token in zip(requests, step, strict=True)
                    ]
                    granted = time.monotonic()
                    for lease in leases:
                        lease.renewed_at = sent
                        lease.granted_at, lease.waited = granted, granted - started
                        lease.contended = waiter is not None
                    if _metrics._observers:
                        _metrics.acquired(leases)
                    return leases
                if waiter is None:
                    waiter = await self._waker.register(attempt)
                else:
                    try:
                        await asyncio.wait_for(waiter.event.wait(), step.seconds)
                    except asyncio.TimeoutError:
                        pass
        except BaseException as exc:
            if _metrics._observers and isinstance(exc, LockNotAcquired):
                _metrics.refused(requests, started, attempt.block, exc)
            cleanup = attempt.cleanup(exc)
            if cleanup is not None:
                await _shielded(self._run_quietly(cleanup, "clean up after a failed acquire"))
            raise
        finally:
            if waiter is not None:
                self._waker.unregister(waiter)

    async def _check_eviction(self) -> None:
        """Warn once if Redis may evict lock keys; see :meth:`HiLok._check_eviction`."""
        self._eviction_checked = True
        try:
            config = await self.redis.config_get("maxmemory-policy")
        except RedisError:
            return
        if isinstance(config, dict) and config:
            warning = eviction_warning(next(iter(config.values())), self.server)
            if warning:
                log.warning("%s", warning)

    async def _run_quietly(self, call: Call, what: str) -> None:
        try:
            await self._run(call)
        except HiLokError as exc:
            log.warning("could not %s (%s); anything left expires within its ttl", what, exc)

    def read(
        self,
        path: str,
        *,
        block: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        handle: str | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold a read lock for the ``async with`` block; see :meth:`HiLok.read`."""
        return _Hold(self, path, "read", block, timeout, ttl, handle)

    def write(
        self,
        path: str,
        *,
        block: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        handle: str | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold a write lock for the ``async with`` block; see :meth:`HiLok.write`."""
        return _Hold(self, path, "write", block, timeout, ttl, handle)

    # -- holding ----------------------------------------------------------------------------

    async def refresh(self, *leases: Lease, ttl: float | None = None) -> None:
        """Extend the leases in one round trip; raises :class:`LockLost` for lost ones."""
        alive = await self.refresh_many(leases, ttl=ttl)
        lost = [lease for lease, ok in zip(leases, alive, strict=True) if not ok]
        if lost:
            raise LockLost("lease lost (expired or released): " + ", ".join(map(repr, lost)))

    async def refresh_many(
        self, leases: Sequence[Lease], *, ttl: float | None = None
    ) -> list[bool]:
        """Extend many leases, of any holders, in one round trip; True for each still held."""
        alive = await self._renew(leases, ttl)
        for lease, ok in zip(leases, alive, strict=True):
            if not ok:
                lease._found_lost("refresh")
        return alive

    async def _renew(self, leases: Sequence[Lease], ttl: float | None) -> list[bool]:
        """:meth:`refresh_many` without marking the leases found lost."""
        if not leases:
            return []
        new_ttl = None if ttl is None else check_ttl(ttl)
        items = [(lease.handle, lease.request, new_ttl or lease.ttl) for lease in leases]
        sent = time.monotonic()
        codes = await self._run_batches(
            self._protocol.refresh_batches(items, self._cluster), len(items)
        )
        for lease, code in zip(leases, codes, strict=True):
            if code:
                lease.renewed_at = sent
                if new_ttl is not None:
                    lease.ttl = new_ttl
        return [bool(c) for c in codes]

    def keep_alive(self, lease: Lease, *, interval: float | None = None) -> None:
        """Refresh ``lease`` from a background task until it is released."""
        if interval is not None:
            lease.refresh_interval = check_ttl(interval, "interval")
        self._refresher.add(lease)

    async def release(self, *leases: Lease) -> None:
        """Release the leases; idempotent per lease. Raises :class:`LockLost` as
        :meth:`HiLok.release` does. A release is carried out even if the calling task is
        cancelled while it runs; the cancellation is raised once it is done."""
        todo = [lease for lease in leases if not lease.released]
        for lease in todo:
            self._refresher.discard(lease)
        if not todo:
            return
        items = [(lease.handle, lease.request) for lease in todo]
        batches = self._protocol.release_batches(items, self._cluster)
        # A release, once asked for, is carried out even if the caller is cancelled
        # meanwhile (else a cancellation landing before the call went out would leave the
        # locks held until their ttl); the cancellation is raised when it is done.
        call = asyncio.ensure_future(self._run_batches(batches, len(todo)))
        try:
            codes = await asyncio.shield(call)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await call  # done already, or finishing now
                for lease in todo:
                    lease.released = True
            raise
        lost: list[Lease] = []
        for lease, code in zip(todo, codes, strict=True):
            lease.released = True
            if code != 1:
                lease._found_lost("release")
                lost.append(lease)
        if _metrics._observers:
            _metrics.released(todo, codes)
        if lost:
            raise LockLost(
                "released a lease that was no longer held (it ran out or was released "
                "elsewhere): " + ", ".join(map(repr, lost))
            )

    async def _release_quietly(self, leases: Sequence[Lease]) -> None:
        try:
            await self.release(*leases)
        except HiLokError as exc:
            log.warning("releasing %s: %s", ", ".join(map(repr, leases)), exc)

    # -- looking --------------------------------------------------------------------------

    async def status(self, path: str) -> LockStatus:
        """Who holds what on ``path``, under it and above it, and who waits."""
        lock_path = parse_path(path, self.separator)
        reply = await self._run(self._protocol.status(lock_path))
        nodes, queue = self._protocol.decode_status(lock_path, reply)
        return LockStatus.build(lock_path, nodes, queue)

    async def status_chain(self, path: str) -> list[LockStatus]:
        """:meth:`status` of ``path`` and of each of its ancestors, root first.

        All levels are read in one atomic round trip, so they describe one moment.
        Raises :class:`InvalidArgument` for a bad path.
        """
        lock_path = parse_path(path, self.separator)
        reply = await self._run(self._protocol.status(lock_path))
        nodes, queue = self._protocol.decode_status(lock_path, reply)
        return LockStatus.build_chain(lock_path, nodes, queue)

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, call: Call) -> Any:
        client = self.redis
        cancel_count = _cancel_counter()
        cancelling = cancel_count()
        keys, args = call.keys, call.args
        try:
            try:
                reply = await client.evalsha(call.script.sha, len(keys), *keys, *args)
            except NoScriptError:
                reply = await client.eval(call.script.source, len(keys), *keys, *args)
        except RedisError as exc:
            if cancel_count() > cancelling:
                raise asyncio.CancelledError from exc
            raise translate(exc, self.server, call.script.name) from exc
        # redis-py may swallow a cancellation that lands mid-call, though the task still
        # counts it: honour it, or a cancelled task would carry on.
        if cancel_count() > cancelling:
            raise asyncio.CancelledError
        return reply

    async def _run_acquire(self, call: Call) -> tuple[Any, int]:
        """Run an acquire call, followed by ``WAIT`` with ``wait_replicas``; see
        :meth:`HiLok._run_acquire`."""
        if not self.wait_replicas:
            return await self._run(call), 0
        wait_ms = max(1, round(self.wait_timeout * 1000))
        command, script = "EVALSHA", call.script.sha
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.execute_command(command, script, len(call.keys), *call.keys, *call.args)
                    pipe.execute_command("WAIT", self.wait_replicas, wait_ms)
                    reply, acks = await pipe.execute(raise_on_error=False)
            except RedisError as exc:
                raise translate(exc, self.server, call.script.name) from exc
            if isinstance(reply, NoScriptError) and command == "EVALSHA":
                command, script = "EVAL", call.script.source
                continue
            for result in (reply, acks):
                if isinstance(result, RedisError):
                    raise translate(result, self.server, call.script.name) from result
            return reply, int(acks)

    async def _run_batches(self, batches: list[tuple[list[int], Call]], count: int) -> list[int]:
        """Send the batches in one round trip; the per-item reply codes, in item order."""
        codes = [0] * count
        replies = await self._run_many([call for _, call in batches])
        for (part, _), reply in zip(batches, replies, strict=True):
            for i, code in zip(part, self._protocol.decode_codes(reply), strict=True):
                codes[i] = code
        return codes

    async def _run_many(self, calls: list[Call]) -> list[Any]:
        """Send several calls in one pipeline (not a transaction: each script is atomic)."""
        if len(calls) == 1:
            return [await self._run(calls[0])]
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.execute_command(
                        "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
                    )
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise translate(exc, self.server, calls[0].script.name) from exc
        for i, (call, reply) in enumerate(zip(calls, replies, strict=True)):
            if isinstance(reply, NoScriptError):
                replies[i] = await self._run(call)
            elif isinstance(reply, RedisError):
                raise translate(reply, self.server, call.script.name) from reply
        return replies

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

    def __repr__(self) -> str:
        return f"<AsyncHiLok {self.server} namespace={self.namespace!r}>"


def _make_client(target: str | AsyncClient, options: dict[str, Any] | None) -> AsyncClient:
    if isinstance(target, str) and target.startswith(SENTINEL_SCHEME):
        client: Any = sentinel_client(target, options or {}, aredis.sentinel.Sentinel)
        return client  # type: ignore[no-any-return]
    if isinstance(target, str):
        kwargs = {"max_connections": MAX_CONNECTIONS, **DEFAULT_CLIENT_OPTIONS, **(options or {})}
        url, cluster = split_cluster_url(target)
        check_url(url)
        if cluster:
            return aredis.RedisCluster.from_url(
                url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES), **kwargs
            )
        pool = aredis.ConnectionPool.from_url(url, **kwargs)
        if pool.connection_kwargs.get("encoding", "utf-8") == "utf-8":
            pool.connection_class = fast_packing(pool.connection_class)
        built = aredis.Redis(
            connection_pool=pool, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES)
        )
        built.auto_close_connection_pool = True  # as redis.asyncio.Redis.from_pool does
        return built
    if isinstance(target, (aredis.Redis, aredis.RedisCluster)):
        return target
    raise InvalidArgument(
        f"expected a Redis URL or a redis.asyncio.Redis / RedisCluster client, got {target!r}"
    )


def _cancel_counter() -> Callable[[], int]:
    """How many cancellations the current task has pending (always 0 before Python 3.11)."""
    task = asyncio.current_task()
    counter = getattr(task, "cancelling", None)
    if counter is None:
        return lambda: 0
    return counter  # type: ignore[no-any-return]


async def _shielded(coro: Any) -> None:
    """Run cleanup to the end even if the caller is being cancelled."""
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
        self,
        hl: AsyncHiLok,
        path: str,
        mode: Mode,
        block: bool,
        timeout: float | None,
        ttl: float | None,
        handle: str | None,
    ) -> None:
        self._hl = hl
        self._request = (path, mode, block, timeout, ttl, handle)
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        path, mode, block, timeout, ttl, handle = self._request
        hl = self._hl
        lease = await hl.acquire(path, mode, block=block, timeout=timeout, ttl=ttl, handle=handle)
        hl.keep_alive(lease)
        self._lease = lease
        return lease

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        lease = self._lease
        assert lease is not None
        hl = self._hl
        if exc_type is not None:
            await _shielded(hl._release_quietly([lease]))  # the block's error is what matters
            return
        try:
            await hl.release(lease)
        except asyncio.CancelledError:
            await _shielded(hl._release_quietly([lease]))  # idempotent: finishes the job
            raise


# -- wake-ups -------------------------------------------------------------------------------


class _Wait:
    __slots__ = ("attempt", "channels", "event")

    def __init__(self, channels: set[str], attempt: Acquisition) -> None:
        self.channels = channels
        self.attempt = attempt
        self.event = asyncio.Event()


class _Waker:
    """One pub/sub connection per ``AsyncHiLok``; see the sync twin in :mod:`.sync`."""

    def __init__(self, owner: AsyncHiLok) -> None:
        self._owner = owner
        self._waits: dict[str, set[_Wait]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._subscribing: asyncio.Lock | None = None
        self._node_client: Any = None  # see _new_pubsub

    async def register(self, attempt: Acquisition) -> _Wait:
        keys = self._owner._protocol.keys
        channels = {keys.channel(r.path.tree) for r in attempt.requests}
        wait = _Wait(channels, attempt)
        self._ensure_task()
        to_subscribe = []
        for channel in channels:
            if channel not in self._confirmed:
                self._confirmed[channel] = asyncio.Event()
                to_subscribe.append(channel)
            self._waits.setdefault(channel, set()).add(wait)
        events = [self._confirmed[c] for c in channels]
        if to_subscribe:
            try:
                # One task at a time: redis-py's PubSub opens its connection on first use,
                # and racing tasks would each open one (redis-py 6.x does), all but one
                # orphaned with their subscriptions.
                assert self._subscribing is not None
                async with self._subscribing:
                    await self._pubsub.subscribe(*to_subscribe)
            except BaseException as exc:
                # Let the next waiter subscribe again (this one failed or was cancelled).
                for channel in to_subscribe:
                    event = self._confirmed.pop(channel, None)
                    if event is not None:
                        event.set()
                if not isinstance(exc, RedisError):
                    raise
                log.log(
                    waker_log_level(exc),
                    "subscribe failed (%s); waiting falls back to lease caps",
                    exc,
                )
                return wait
        for event in events:
            try:
                await asyncio.wait_for(event.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        return wait

    def unregister(self, wait: _Wait) -> None:
        for channel in wait.channels:
            waits = self._waits.get(channel)
            if waits is not None:
                waits.discard(wait)
                if not waits:
                    del self._waits[channel]

    def _ensure_task(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._confirmed.clear()
        self._subscribing = asyncio.Lock()
        self._pubsub = self._new_pubsub()
        self._task = loop.create_task(self._run(self._pubsub), name="hilok-waker")

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
                self._wake_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if message is None:
                continue
            kind = _text(message["type"])
            channel = _text(message["channel"])
            if kind == "subscribe":
                event = self._confirmed.get(channel)
                if event is not None:
                    event.set()
            elif kind == "message":
                data = _text(message["data"])
                for wait in list(self._waits.get(channel, ())):
                    if wakes(data, wait.attempt):
                        wait.event.set()

    def _wake_all(self) -> None:
        for event in self._confirmed.values():
            event.set()
        for waits in self._waits.values():
            for wait in waits:
                wait.event.set()

    async def stop(self) -> None:
        task, pubsub = self._task, self._pubsub
        self._task = None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, RuntimeError):
                pass
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (RedisError, RuntimeError):
                pass
        node_client, self._node_client = self._node_client, None
        if node_client is not None:
            try:
                await node_client.aclose()
            except (RedisError, RuntimeError):
                pass


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- background refresh ----------------------------------------------------------------------


class _Refresher:
    """One task per ``AsyncHiLok`` renewing every kept lease in one call a tick."""

    def __init__(self, owner: AsyncHiLok) -> None:
        self._owner = owner
        self._leases: dict[int, Lease] = {}
        self._due = float("inf")
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None

    def add(self, lease: Lease) -> None:
        self._leases[id(lease)] = lease
        due = time.monotonic() + _interval(lease)
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._changed = asyncio.Event()
            self._task = loop.create_task(self._run(self._changed), name="hilok-refresher")
            self._due = float("inf")
        if due < self._due:  # only wake the task when the next tick must come sooner
            self._due = due
            assert self._changed is not None
            self._changed.set()

    def discard(self, lease: Lease) -> None:
        self._leases.pop(id(lease), None)

    async def _run(self, changed: asyncio.Event) -> None:
        # Until stop() drops this task: redis-py may swallow the cancellation it sends.
        while self._task is asyncio.current_task():
            changed.clear()
            if not self._leases:
                self._due = float("inf")
                await changed.wait()
                continue
            delay = self._due - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(changed.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            leases = list(self._leases.values())
            self._due = time.monotonic() + min(_interval(lease) for lease in leases)
            await self.tick(leases)

    async def tick(self, leases: list[Lease]) -> None:
        try:
            alive = await self._owner._renew(leases, None)
        except HiLokError as exc:
            log.warning("could not refresh %d lease(s): %s", len(leases), exc)
            # A lease not renewed for its whole ttl has run out (see the sync twin).
            now = time.monotonic()
            alive = [now - lease.renewed_at < lease.ttl for lease in leases]
        for lease, ok in zip(leases, alive, strict=True):
            # A lease released while this tick was in flight is not lost.
            if not ok and self._leases.get(id(lease)) is lease:
                self.discard(lease)
                log.warning("lease lost: %r", lease)
                try:
                    lease._mark_lost()
                except Exception:
                    log.exception("on_lost callback of %r failed", lease)

    async def stop(self) -> None:
        task = self._task
        self._task = None
        if self._changed is not None:
            self._changed.set()
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, RuntimeError):
                pass


def _interval(lease: Lease) -> float:
    """How often a kept lease is renewed: its own interval, at most a third of its ttl."""
    third = lease.ttl / 3
    return third if lease.refresh_interval is None else min(lease.refresh_interval, third)
