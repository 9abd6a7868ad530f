"""The synchronous driver: :class:`HiLok`, on a redis-py ``Redis`` or ``RedisCluster`` client."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import redis
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster as _RedisCluster
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

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
    sentinel_client,
    split_cluster_url,
    translate,
    waker_log_level,
)
from .errors import HiLokError, InvalidArgument, LockLost, LockNotAcquired
from .lease import Lease, LockStatus
from .paths import parse_path, validate_namespace

__all__ = ["HiLok"]

log = logging.getLogger("celery_hilok")

SyncClient = redis.Redis | redis.RedisCluster


class HiLok:
    """Hierarchical read-write locks on Redis, synchronous API.

    ``redis`` is a URL (``redis://``, ``rediss://``, ``unix://``) or an existing
    ``redis.Redis`` / ``redis.RedisCluster`` client (which is not closed by :meth:`close`).
    ``ttl`` is the default lease in seconds. One instance is safe to share between threads.

    ``wait_replicas=n`` (opt-in, not on Redis Cluster) makes every acquire wait, in the same
    round trip, until ``n`` replicas have acknowledged the grant (Redis ``WAIT``, at most
    ``wait_timeout`` seconds); a grant acknowledged by fewer is released again and the
    acquire raises :class:`LockNotReplicated`. Refreshes and releases are not waited for.
    This narrows, but does not close, the window in which a failover loses a lease.
    """

    def __init__(
        self,
        redis: str | SyncClient,
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
        self.redis: SyncClient = _make_client(redis, redis_options)
        self.server = describe_server(self.redis)
        self._cluster = isinstance(self.redis, _RedisCluster)
        if self._cluster and self.wait_replicas:
            raise InvalidArgument(CLUSTER_WAIT)
        self._eviction_checked = self._cluster  # CONFIG GET would ask one node of many
        self._waker = _Waker(self)
        self._refresher = _Refresher(self)

    # -- acquiring ------------------------------------------------------------------------

    def acquire(
        self,
        path: str,
        mode: Mode,
        *,
        block: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        handle: str | None = None,
    ) -> Lease:
        """Acquire ``mode`` (``"read"`` or ``"write"``) on ``path`` and return the lease.

        Blocks until granted unless ``block=False`` (one try) or ``timeout`` seconds pass;
        both raise :class:`LockNotAcquired`. ``ttl`` overrides the default lease. ``handle``
        acquires for an existing holder (re-entrant; renews a grant it already has). The lease
        is not refreshed automatically: use :meth:`refresh`, :meth:`keep_alive` or the
        context managers. Raises :class:`InvalidArgument` for bad arguments,
        :class:`HiLokConnectionError` when Redis fails, and with ``wait_replicas``
        :class:`LockNotReplicated` (a :class:`LockNotAcquired`) when too few replicas
        acknowledged the grant.
        """
        return self.acquire_many(
            [(path, mode)], block=block, timeout=timeout, ttl=ttl, handle=handle
        )[0]

    def acquire_many(
        self,
        locks: Iterable[tuple[str, Mode]],
        *,
        block: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        handle: str | None = None,
    ) -> list[Lease]:
        """Acquire several locks for one holder atomically: all of them or none.

        Same arguments and errors as :meth:`acquire`; the leases share one handle.
        """
        requests = normalise_requests(locks, self.separator)
        lease_ttl = self.ttl if ttl is None else check_ttl(ttl)
        limit = check_timeout(timeout)
        if not self._cluster or len({r.path.tree for r in requests}) == 1:
            return self._acquire_group(requests, handle, lease_ttl, block, limit)
        # A cluster runs one script per slot: take the trees one by one, in sorted order,
        # and give back what was taken if a later tree cannot be had.
        start = time.monotonic()
        leases: list[Lease] = []
        try:
            for group in by_tree(requests):
                left = None if limit is None else max(0.0, limit - (time.monotonic() - start))
                leases += self._acquire_group(group, handle, lease_ttl, block, left)
                handle = leases[0].handle
        except BaseException:
            self._release_quietly(leases)
            raise
        order = {req: i for i, req in enumerate(requests)}
        return sorted(leases, key=lambda lease: order[lease.request])

    def _acquire_group(
        self,
        requests: list[Request],
        handle: str | None,
        ttl: float,
        block: bool,
        timeout: float | None,
    ) -> list[Lease]:
        """One atomic acquire of ``requests`` (one script per try), waiting as needed."""
        if not self._eviction_checked:
            self._check_eviction()
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
        waiter: _Wait | None = None
        try:
            while True:
                if waiter is not None:
                    waiter.event.clear()
                sent = time.monotonic()
                reply, acks = self._run_acquire(attempt.call)
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
                    waiter = self._waker.register(attempt)
                else:
                    waiter.event.wait(step.seconds)
        except BaseException as exc:
            if _metrics._observers and isinstance(exc, LockNotAcquired):
                _metrics.refused(requests, started, attempt.block, exc)
            cleanup = attempt.cleanup(exc)
            if cleanup is not None:
                self._run_quietly(cleanup, "clean up after a failed acquire")
            raise
        finally:
            if waiter is not None:
                self._waker.unregister(waiter)

    def _check_eviction(self) -> None:
        """Warn once if Redis may evict lock keys (skipped where CONFIG GET is refused)."""
        self._eviction_checked = True
        try:
            config = self.redis.config_get("maxmemory-policy")
        except RedisError:  # an ACL without CONFIG, a managed Redis, a cluster: skip it
            return
        if isinstance(config, dict) and config:
            warning = eviction_warning(next(iter(config.values())), self.server)
            if warning:
                log.warning("%s", warning)

    def _run_quietly(self, call: Call, what: str) -> None:
        try:
            self._run(call)
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
    ) -> AbstractContextManager[Lease]:
        """Hold a read lock on ``path`` (and its subtree) for the ``with`` block.

        The lease is refreshed in the background while the block runs and released when it
        ends; leaving the block raises :class:`LockLost` if the lease was lost meanwhile.
        """
        return _Hold(self, path, "read", block, timeout, ttl, handle)

    def write(
        self,
        path: str,
        *,
        block: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        handle: str | None = None,
    ) -> AbstractContextManager[Lease]:
        """Hold a write lock on ``path`` (and its subtree) for the ``with`` block.

        Same as :meth:`read`, but exclusive.
        """
        return _Hold(self, path, "write", block, timeout, ttl, handle)

    # -- holding ----------------------------------------------------------------------------

    def refresh(self, *leases: Lease, ttl: float | None = None) -> None:
        """Extend the leases (by their own ttl, or ``ttl``) in one round trip.

        Raises :class:`LockLost` naming every lease that is no longer held.
        """
        alive = self.refresh_many(leases, ttl=ttl)
        lost = [lease for lease, ok in zip(leases, alive, strict=True) if not ok]
        if lost:
            raise LockLost("lease lost (expired or released): " + ", ".join(map(repr, lost)))

    def refresh_many(self, leases: Sequence[Lease], *, ttl: float | None = None) -> list[bool]:
        """Extend many leases, of any holders, in one round trip; True for each still held."""
        alive = self._renew(leases, ttl)
        for lease, ok in zip(leases, alive, strict=True):
            if not ok:
                lease._found_lost("refresh")
        return alive

    def _renew(self, leases: Sequence[Lease], ttl: float | None) -> list[bool]:
        """:meth:`refresh_many` without marking the leases found lost."""
        if not leases:
            return []
        new_ttl = None if ttl is None else check_ttl(ttl)
        items = [(lease.handle, lease.request, new_ttl or lease.ttl) for lease in leases]
        sent = time.monotonic()
        codes = self._run_batches(self._protocol.refresh_batches(items, self._cluster), len(items))
        for lease, code in zip(leases, codes, strict=True):
            if code:
                lease.renewed_at = sent
                if new_ttl is not None:
                    lease.ttl = new_ttl
        return [bool(c) for c in codes]

    def keep_alive(self, lease: Lease, *, interval: float | None = None) -> None:
        """Refresh ``lease`` from a background thread until it is released.

        One thread per ``HiLok`` renews every kept lease in one round trip per tick (a third
        of the shortest ttl). A lease found lost gets ``lease.lost = True`` and its
        ``on_lost`` callbacks are called.
        """
        if interval is not None:
            lease.refresh_interval = check_ttl(interval, "interval")
        self._refresher.add(lease)

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
        todo = [lease for lease in leases if not lease.released]
        for lease in todo:
            self._refresher.discard(lease)
        if not todo:
            return
        items = [(lease.handle, lease.request) for lease in todo]
        batches = self._protocol.release_batches(items, self._cluster)
        codes = self._run_batches(batches, len(todo))
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

    def _release_quietly(self, leases: Sequence[Lease]) -> None:
        try:
            self.release(*leases)
        except HiLokError as exc:
            log.warning("releasing %s: %s", ", ".join(map(repr, leases)), exc)

    # -- looking --------------------------------------------------------------------------

    def status(self, path: str) -> LockStatus:
        """Who holds what on ``path``, under it and above it (with ttls), and who waits."""
        lock_path = parse_path(path, self.separator)
        reply = self._run(self._protocol.status(lock_path))
        nodes, queue = self._protocol.decode_status(lock_path, reply)
        return LockStatus.build(lock_path, nodes, queue)

    def status_chain(self, path: str) -> list[LockStatus]:
        """:meth:`status` of ``path`` and of each of its ancestors, root first.

        All levels are read in one atomic round trip, so they describe one moment.
        Raises :class:`InvalidArgument` for a bad path.
        """
        lock_path = parse_path(path, self.separator)
        reply = self._run(self._protocol.status(lock_path))
        nodes, queue = self._protocol.decode_status(lock_path, reply)
        return LockStatus.build_chain(lock_path, nodes, queue)

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, call: Call) -> Any:
        client = self.redis
        try:
            try:
                return client.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            except NoScriptError:
                return client.eval(call.script.source, len(call.keys), *call.keys, *call.args)
        except RedisError as exc:
            raise translate(exc, self.server, call.script.name) from exc

    def _run_acquire(self, call: Call) -> tuple[Any, int]:
        """Run an acquire call; with ``wait_replicas``, follow it with ``WAIT`` in one
        pipeline, so that both share a connection (WAIT counts that connection's writes;
        it cannot run inside the script). Returns the reply and the replicas that
        acknowledged (0 without ``wait_replicas``)."""
        if not self.wait_replicas:
            return self._run(call), 0
        wait_ms = max(1, round(self.wait_timeout * 1000))
        command, script = "EVALSHA", call.script.sha
        while True:
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.execute_command(command, script, len(call.keys), *call.keys, *call.args)
                    pipe.execute_command("WAIT", self.wait_replicas, wait_ms)
                    reply, acks = pipe.execute(raise_on_error=False)
            except RedisError as exc:
                raise translate(exc, self.server, call.script.name) from exc
            if isinstance(reply, NoScriptError) and command == "EVALSHA":
                command, script = "EVAL", call.script.source
                continue
            for result in (reply, acks):
                if isinstance(result, RedisError):
                    raise translate(result, self.server, call.script.name) from result
            return reply, int(acks)

    def _run_batches(self, batches: list[tuple[list[int], Call]], count: int) -> list[int]:
        """Send the batches in one round trip; the per-item reply codes, in item order."""
        codes = [0] * count
        replies = self._run_many([call for _, call in batches])
        for (part, _), reply in zip(batches, replies, strict=True):
            for i, code in zip(part, self._protocol.decode_codes(reply), strict=True):
                codes[i] = code
        return codes

    def _run_many(self, calls: list[Call]) -> list[Any]:
        """Send several calls in one pipeline (not a transaction: each script is atomic)."""
        if len(calls) == 1:
            return [self._run(calls[0])]
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.execute_command(
                        "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
                    )
                replies: list[Any] = pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise translate(exc, self.server, calls[0].script.name) from exc
        for i, (call, reply) in enumerate(zip(calls, replies, strict=True)):
            if isinstance(reply, NoScriptError):
                replies[i] = self._run(call)
            elif isinstance(reply, RedisError):
                raise translate(reply, self.server, call.script.name) from reply
        return replies

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

    def __repr__(self) -> str:
        return f"<HiLok {self.server} namespace={self.namespace!r}>"


def _make_client(target: str | SyncClient, options: dict[str, Any] | None) -> SyncClient:
    if isinstance(target, str) and target.startswith(SENTINEL_SCHEME):
        client: Any = sentinel_client(target, options or {}, redis.sentinel.Sentinel)
        return client  # type: ignore[no-any-return]
    if isinstance(target, str):
        kwargs = {"max_connections": MAX_CONNECTIONS, **DEFAULT_CLIENT_OPTIONS, **(options or {})}
        url, cluster = split_cluster_url(target)
        check_url(url)
        if cluster:
            return redis.RedisCluster.from_url(
                url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES), **kwargs
            )
        pool = redis.ConnectionPool.from_url(url, **kwargs)
        built = redis.Redis(
            connection_pool=pool, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES)
        )
        built.auto_close_connection_pool = True  # as redis.Redis.from_pool does
        return built
    if isinstance(target, (redis.Redis, redis.RedisCluster)):
        return target
    raise InvalidArgument(
        f"expected a Redis URL or a redis.Redis / redis.RedisCluster client, got {target!r}"
    )


class _Hold(AbstractContextManager[Lease]):
    """The ``with`` block of :meth:`HiLok.read` and :meth:`HiLok.write`."""

    __slots__ = ("_hl", "_lease", "_request")

    def __init__(
        self,
        hl: HiLok,
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

    def __enter__(self) -> Lease:
        path, mode, block, timeout, ttl, handle = self._request
        lease = self._hl.acquire(path, mode, block=block, timeout=timeout, ttl=ttl, handle=handle)
        self._hl.keep_alive(lease)
        self._lease = lease
        return lease

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        lease = self._lease
        assert lease is not None
        if exc_type is not None:
            self._hl._release_quietly([lease])  # the block's own error is what matters
        else:
            self._hl.release(lease)


# -- wake-ups -------------------------------------------------------------------------------


class _Wait:
    """One blocked acquire waiting for a release on its trees."""

    __slots__ = ("attempt", "channels", "event")

    def __init__(self, channels: set[str], attempt: Acquisition) -> None:
        self.channels = channels
        self.attempt = attempt
        self.event = threading.Event()


class _Waker:
    """One pub/sub connection per ``HiLok`` that wakes blocked acquires on releases.

    Releases publish the released path on the tree's channel when someone waits; a waiter is
    woken when that path is on one line with one of its own (only those can unblock it).
    """

    def __init__(self, owner: HiLok) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._waits: dict[str, set[_Wait]] = {}
        self._confirmed: dict[str, threading.Event] = {}
        self._subscribing = threading.Lock()
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = threading.Event()

    def register(self, attempt: Acquisition) -> _Wait:
        keys = self._owner._protocol.keys
        channels = {keys.channel(r.path.tree) for r in attempt.requests}
        wait = _Wait(channels, attempt)
        to_subscribe: list[str] = []
        with self._lock:
            self._ensure_thread()
            for channel in channels:
                if channel not in self._confirmed:
                    self._confirmed[channel] = threading.Event()
                    to_subscribe.append(channel)
                self._waits.setdefault(channel, set()).add(wait)
            events = [self._confirmed[c] for c in channels]
        if to_subscribe:
            try:
                # One thread at a time: redis-py's PubSub opens its connection on first use
                # without a lock, so racing threads would each open one, and all but the one
                # the waker reads would be orphaned with their subscriptions.
                with self._subscribing:
                    self._pubsub.subscribe(*to_subscribe)
            except RedisError as exc:
                log.log(
                    waker_log_level(exc),
                    "subscribe failed (%s); waiting falls back to lease caps",
                    exc,
                )
                self._forget(to_subscribe)
                return wait
        for event in events:
            # Without confirmation the waiter still works, capped by leases and KEEPALIVE.
            event.wait(5.0)
        return wait

    def _forget(self, channels: list[str]) -> None:
        """Let the next waiter subscribe to ``channels`` again (a subscribe failed)."""
        with self._lock:
            for channel in channels:
                event = self._confirmed.pop(channel, None)
                if event is not None:
                    event.set()

    def unregister(self, wait: _Wait) -> None:
        with self._lock:
            for channel in wait.channels:
                waits = self._waits.get(channel)
                if waits is not None:
                    waits.discard(wait)
                    if not waits:
                        del self._waits[channel]

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._thread is not None and self._pid == pid and self._thread.is_alive():
            return
        self._pid = pid
        self._confirmed.clear()
        self._pubsub = self._owner.redis.pubsub()  # type: ignore[no-untyped-call]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="hilok-waker", daemon=True)
        self._thread.start()

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
                self._wake_all()
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if message is None:
                continue
            kind = _text(message["type"])
            channel = _text(message["channel"])
            if kind == "subscribe":
                with self._lock:
                    event = self._confirmed.get(channel)
                if event is not None:
                    event.set()
            elif kind == "message":
                data = _text(message["data"])
                with self._lock:
                    waits = list(self._waits.get(channel, ()))
                for wait in waits:
                    if wakes(data, wait.attempt):
                        wait.event.set()

    def _wake_all(self) -> None:
        with self._lock:
            waits = [w for ws in self._waits.values() for w in ws]
            for event in self._confirmed.values():
                event.set()
        for wait in waits:
            wait.event.set()

    def stop(self) -> None:
        self._stopping.set()
        thread, pubsub = self._thread, self._pubsub
        if pubsub is not None:
            # Closing the connection ends the thread's pending read at once.
            try:
                pubsub.close()
            except (RedisError, OSError):
                pass
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout=2.0)
        self._thread = None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- background refresh ----------------------------------------------------------------------


class _Refresher:
    """One thread per ``HiLok`` (per process) renewing every kept lease in one call a tick.

    A tick is due when the earliest kept lease needs renewing; it renews them all at once.
    """

    def __init__(self, owner: HiLok) -> None:
        self._owner = owner
        self._cond = threading.Condition()
        self._leases: dict[int, Lease] = {}
        self._due = float("inf")
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = threading.Event()
        self._in_flight = threading.Lock()  # held while a tick's refresh call runs

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._leases[id(lease)] = lease
            due = time.monotonic() + _interval(lease)
            wake = due < self._due  # only when the next tick must come sooner
            if wake:
                self._due = due
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
            if wake:
                self._cond.notify()

    def discard(self, lease: Lease) -> None:
        with self._cond:
            self._leases.pop(id(lease), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping.is_set():
                    if not self._leases:
                        self._due = float("inf")
                        self._cond.wait()
                        continue
                    delay = self._due - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._stopping.is_set():
                    return
                leases = list(self._leases.values())
                self._due = time.monotonic() + min(_interval(lease) for lease in leases)
            self.tick(leases)

    def settle(self) -> None:
        """Wait until a refresh call in flight, if any, has finished."""
        if self._pid == os.getpid() and threading.current_thread() is not self._thread:
            with self._in_flight:
                pass

    def tick(self, leases: list[Lease]) -> None:
        try:
            with self._in_flight:
                alive = self._owner._renew(leases, None)
        except HiLokError as exc:
            log.warning("could not refresh %d lease(s): %s", len(leases), exc)
            # Whatever Redis says when it is back, a lease not renewed for its whole ttl
            # has run out: say so now rather than let its holder go on unprotected.
            now = time.monotonic()
            alive = [now - lease.renewed_at < lease.ttl for lease in leases]
        for lease, ok in zip(leases, alive, strict=True):
            if not ok:
                with self._cond:
                    # Released (or handed over) while this tick was in flight: not lost.
                    if self._leases.get(id(lease)) is not lease:
                        continue
                    del self._leases[id(lease)]
                log.warning("lease lost: %r", lease)
                try:
                    lease._mark_lost()
                except Exception:
                    log.exception("on_lost callback of %r failed", lease)

    def stop(self) -> None:
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout=2.0)
        self._thread = None


def _interval(lease: Lease) -> float:
    """How often a kept lease is renewed: its own interval, at most a third of its ttl."""
    third = lease.ttl / 3
    return third if lease.refresh_interval is None else min(lease.refresh_interval, third)
