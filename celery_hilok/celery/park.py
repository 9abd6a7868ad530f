"""The ``park`` contention policy: a refused task waits in the lock's queue, not in a pool slot.

A task whose locks are taken (``hilok_on_contention="park"``, the default) joins the lock's
FIFO queue, leaves a *parked record* in Redis (its message: task, id, arguments, options)
and ends at once with ``Ignore``: its pool slot is free for other work. When its turn
comes, the release that frees the lock grants it to the parked request there and then
(the engine's direct hand-off) and says so on the channel of a worker's :class:`Parking`,
a thread in every worker's main process. That one asks for the lock under the parked
handle (which renews the grant for ``hilok_keep_ttl``), takes the record (one worker
only) and sends the task again, same id, same ``AsyncResult``, with the granted locks in
its message headers the way a ``hilok_keep`` chain hands locks to its next step: nothing
can come in between, and the resent task starts already holding them.

Nothing is lost with no worker alive: records stay in Redis, and a worker's
:class:`Parking` looks at them all when it starts and every :data:`SCAN_EVERY` seconds
(one worker at a time): it asks again for each (which keeps its place in the queue and
points the wake-up at a live worker), drops a revoked one (its queue place goes to the
next in line; the result becomes REVOKED), and fails one whose ``hilok_timeout`` passed
(the task is sent again to fail in a worker with :class:`~celery_hilok.LockNotAcquired`,
so its errbacks and events happen as for any failure).

The keys and the record are in :mod:`celery_hilok._parked`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Final

from kombu import serialization
from redis.exceptions import RedisError

from .._core import Mode, Request, make_member, told
from .._parked import Parked, index_key, parked_records, record_key, scan_key, taken_key
from .._unique import parse_claim_name
from ..errors import LockNotAcquired
from ..lease import Lease
from ._runtime import HEADER, PARKED_ATTR, Handover, Runtime, runtime
from .unique import UNIQUE_HEADER, release_claim

__all__ = [
    "EXPIRED_HEADER",
    "PARKED",
    "PARKED_ATTR",
    "PARKED_KEY",
    "PARK_KEY",
    "Parked",
    "Parking",
    "expired_error",
    "forget",
    "parking",
    "record",
    "save",
    "stop_parking",
    "take",
]

log = logging.getLogger("celery_hilok.celery")

PARKED: Final = "PARKED"
"""The result state of a parked task (stored unless it ignores results): not ready yet."""
PARKED_KEY: Final = "hilok_parked"
"""Key that marks the meta of a PARKED result (path, mode, blocker, position, reason)."""
PARK_KEY: Final = "hilok_park"
"""Request key with the wake-up channel of the worker's :class:`Parking`, set in the main
process (:class:`~celery_hilok.celery.HiLokRequest`): where a parked task is told."""
PARKED_AT_HEADER: Final = "hilok_parked_at"
"""Message header of a parked task sent again holding its locks: when it parked (Unix
time), for the wait its ``acquired`` event and signal report."""
EXPIRED_HEADER: Final = "hilok_park_expired"
"""Message header of a parked task sent again to fail: its ``hilok_timeout`` passed."""
QUEUE_TTL: Final = 60.0
"""Seconds a parked request stays in the queue unless asked for again (the scan does, every
:data:`ASK_EVERY` seconds while a worker runs)."""
ASK_EVERY: Final = 15.0
SCAN_EVERY: Final = 2.0
"""Seconds between two looks at every parked record (by one worker of the namespace)."""
RECORD_TTL: Final = 7 * 86400.0
"""Longest life of a parked record nobody looks at (every scan that asks renews it)."""
TAKE_TTL: Final = 30.0
"""Seconds a worker has to send a parked task it took before another may."""


def message(parked: Parked) -> tuple[Any, Any, dict[str, Any]]:
    """The task's (args, kwargs, options), as :func:`record` serialized them."""
    payload = base64.b64decode(parked.body)
    args, kwargs, options = serialization.loads(  # type: ignore[no-untyped-call]
        payload, parked.content_type, parked.encoding, accept={parked.content_type}
    )
    return args, kwargs, dict(options)


def record(
    task: Any,
    handle: str,
    locks: Sequence[tuple[str, Mode]],
    keep_ttl: float,
    timeout: float | None,
    worker: str | None,
) -> Parked:
    """The parked record of the running ``task`` (its request: sent again as it came)."""
    request = task.request
    sig = task.signature_from_request(request)
    options = {k: v for k, v in dict(sig.options).items() if k != "headers"}
    headers = dict(request.headers or {})
    for name in (HEADER, PARKED_AT_HEADER, EXPIRED_HEADER):
        headers.pop(name, None)
    options["headers"] = headers
    content_type, encoding, data = serialization.dumps(  # type: ignore[no-untyped-call]
        [list(sig.args or ()), dict(sig.kwargs or {}), options], serializer=task.serializer
    )
    raw = data if isinstance(data, bytes) else data.encode(encoding or "utf-8")
    now = time.time()
    return Parked(
        handle=handle,
        task_id=str(request.id),
        task=str(task.name),
        locks=list(locks),
        keep_ttl=keep_ttl,
        deadline=None if timeout is None else now + timeout,
        parked_at=now,
        worker=worker or socket.gethostname(),
        content_type=content_type,
        encoding=encoding,
        body=base64.b64encode(raw).decode(),
    )


def save(rt: Runtime, parked: Parked) -> int | None:
    """Write ``parked`` (record and index); its position in its first lock's tree queue
    (waiters ahead of it, all paths of the tree counted), if it is queued there."""
    ns, handle = rt.namespace, parked.handle
    path, mode = parked.locks[0]
    req = Request.parse(path, mode, rt.separator)
    queue = rt.hilok._protocol.keys.tree_keys(req.path.tree)[1]  # the tree's wait queue
    member = make_member(handle, req.code, req.path.canonical)
    with rt.hilok.redis.pipeline(transaction=False) as pipe:
        pipe.set(record_key(ns, handle), parked.encode(), px=int(RECORD_TTL * 1000))
        pipe.zadd(index_key(ns), {handle: parked.parked_at})
        pipe.zrank(queue, member)
        rank = pipe.execute()[2]
    return rank if isinstance(rank, int) else None


def take(rt: Runtime, handle: str, who: str) -> bool:
    """Become the one that sends parked task ``handle`` (for :data:`TAKE_TTL`)."""
    ok = rt.hilok.redis.set(taken_key(rt.namespace, handle), who, nx=True, px=int(TAKE_TTL * 1000))
    return bool(ok)


def forget(rt: Runtime, handle: str) -> None:
    """The parked task ``handle`` runs (or was dropped): its record goes. The mark of who
    took it stays until it runs out (:data:`TAKE_TTL`), so that a worker that read the
    record just before cannot take it and send the task a second time."""
    ns = rt.namespace
    with rt.hilok.redis.pipeline(transaction=False) as pipe:
        pipe.delete(record_key(ns, handle))
        pipe.zrem(index_key(ns), handle)
        pipe.execute()


class Parking:
    """The main-process side of the ``park`` policy in one worker: a thread that hears of
    grants to parked tasks on its channel and sends them again, and that looks at every
    parked record now and then (see the module's text)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.rt = runtime(app)
        self.pid = os.getpid()
        keys = self.rt.hilok._protocol.keys
        self.channel = keys.channel("park-" + secrets.token_urlsafe(12))
        self._scan_key = scan_key(self.rt.namespace)
        self._asked: dict[str, float] = {}  # handle -> when this worker last asked for it
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pubsub: Any = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="hilok-parking", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        pubsub = self._pubsub
        if pubsub is not None:
            try:  # ends the thread's pending read at once
                pubsub.close()
            except Exception:  # the thread closing it too (redis-py's PubSub is not thread-safe)
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        try:  # another worker may scan at once
            redis = self.rt.hilok.redis
            if _text(redis.get(self._scan_key)) == self.channel:
                redis.delete(self._scan_key)
        except RedisError:
            pass

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backoff, failing = 0.05, False
        next_scan = 0.0
        pubsub: Any = None
        while not self._stopping.is_set():
            try:
                if pubsub is None:
                    pubsub = self.rt.hilok.redis.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
                    self._pubsub = pubsub
                    pubsub.subscribe(self.channel)
                wait = max(0.0, min(SCAN_EVERY, next_scan - time.monotonic()))
                message = pubsub.get_message(timeout=wait)
                backoff, failing = 0.05, False
                if message is not None:
                    kind = _text(message.get("type"))
                    if kind == "subscribe":
                        next_scan = 0.0  # (re)subscribed: look for what was missed meanwhile
                    elif kind == "message":
                        for handle in told(_text(message.get("data"))):
                            self._resume(handle)
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + SCAN_EVERY
                    self._scan()
            except Exception as exc:  # Redis down, a record that does not load...: go on
                if self._stopping.is_set():
                    break
                # once per outage (a warning), then quietly until Redis answers again
                level = logging.DEBUG if failing else logging.WARNING
                failing = isinstance(exc, (RedisError, OSError))
                log.log(level, "parked tasks: %s", exc, exc_info=not failing)
                if isinstance(exc, (RedisError, OSError)) and pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
                    pubsub = None
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass

    def _leads(self) -> bool:
        """Is this worker the one that scans now (one at a time: the others' scans would
        only repeat it)?"""
        redis, ms = self.rt.hilok.redis, int(SCAN_EVERY * 3000)
        if redis.set(self._scan_key, self.channel, nx=True, px=ms):
            return True
        if _text(redis.get(self._scan_key)) == self.channel:
            redis.pexpire(self._scan_key, ms)
            return True
        return False

    def _scan(self) -> None:
        """Look at every parked record: every worker drops the ones it heard were revoked
        (a revoke reaches every worker) and fails the ones whose time is up; the one
        worker that leads also asks again for the others, keeping their queue places."""
        records = list(parked_records(self.rt.hilok))
        if not records:
            self._asked.clear()
            return  # nothing parked: no scan, no leader
        lead = self._leads()
        now = time.monotonic()
        for parked in records:
            if self._settled(parked) or not lead:
                continue
            if now - self._asked.get(parked.handle, float("-inf")) >= ASK_EVERY:
                self._ask(parked)
        seen = {parked.handle for parked in records}
        for handle in list(self._asked):
            if handle not in seen:
                del self._asked[handle]

    def _resume(self, handle: str) -> None:
        """A release told ``handle`` (granted it the lock, or to ask again)."""
        parked = Parked.decode(self.rt.hilok.redis.get(record_key(self.rt.namespace, handle)))
        if parked is None or self._settled(parked):
            return  # not parked (any more), or taken by the one sending it
        self._ask(parked)

    def _settled(self, parked: Parked) -> bool:
        """Drop ``parked`` if it was revoked, fail it if its time is up; True if done so."""
        if _revoked(parked.task_id):
            self._drop(parked)
            return True
        if parked.deadline is not None and time.time() >= parked.deadline:
            refusal = self._ask(parked, final=True)
            if refusal is not None:
                self._expire(parked, refusal)
            return True
        return False

    def _ask(self, parked: Parked, final: bool = False) -> LockNotAcquired | None:
        """Ask for ``parked``'s locks again (it keeps its place); granted, send it."""
        self._asked[parked.handle] = time.monotonic()
        outcome = self.rt.hilok._park(
            parked.locks,
            handle=parked.handle,
            ttl=parked.keep_ttl,
            queue_ttl=QUEUE_TTL,
            channel=self.channel,
            withdraw_on_error=False,
        )
        if isinstance(outcome, LockNotAcquired):
            if not final:
                key = record_key(self.rt.namespace, parked.handle)
                self.rt.hilok.redis.pexpire(key, int(RECORD_TTL * 1000))
            return outcome
        self._send(parked, outcome)
        return None

    def _send(self, parked: Parked, leases: Sequence[Lease], expired: str | None = None) -> None:
        """Send ``parked`` again, holding ``leases`` (or to fail, ``expired``)."""
        if not take(self.rt, parked.handle, self.channel):
            return  # another worker (or the task itself) is on it
        try:
            args, kwargs, options = message(parked)
            headers = dict(options.get("headers") or {})
            if leases:
                handover = Handover(
                    parked.handle, [(x.path, x.mode, x.token) for x in leases], claim=True
                )
                self.rt.mark_handed(parked.handle, parked.keep_ttl, offer_to=parked.task_id)
                headers[HEADER] = handover.encode()
                headers[PARKED_AT_HEADER] = parked.parked_at
            if expired is not None:
                headers[EXPIRED_HEADER] = expired
            options["headers"] = headers
            self.app.tasks[parked.task].apply_async(args, kwargs, **options)
        except BaseException:
            self.rt.hilok.redis.delete(taken_key(self.rt.namespace, parked.handle))
            raise
        forget(self.rt, parked.handle)
        self._asked.pop(parked.handle, None)
        log.debug("sent parked task %s[%s] again", parked.task, parked.task_id)

    def _drop(self, parked: Parked) -> None:
        """``parked`` was revoked: its place in the queue goes to the next in line."""
        if not take(self.rt, parked.handle, self.channel):
            return
        self.rt.release_named(
            parked.handle, parked.locks, f"{parked.task}[{parked.task_id}] revoked while parked"
        )
        task = self.app.tasks.get(parked.task)
        try:
            if task is not None and not task.ignore_result:
                task.backend.mark_as_revoked(parked.task_id, "revoked while parked")
        except Exception as exc:
            log.warning("%s[%s]: could not store REVOKED: %s", parked.task, parked.task_id, exc)
        _, _, options = message(parked)
        name = (options.get("headers") or {}).get(UNIQUE_HEADER)
        if parse_claim_name(name) is not None:
            release_claim(self.rt, str(name), parked.task_id, "revoked while parked")
        forget(self.rt, parked.handle)

    def _expire(self, parked: Parked, refusal: LockNotAcquired) -> None:
        """``parked``'s ``hilok_timeout`` passed: withdraw it, and send it to fail."""
        self.rt.release_named(parked.handle, parked.locks, "its hilok_timeout passed while parked")
        waited = time.time() - parked.parked_at
        expired = json.dumps(
            {
                "message": f"{refusal} (gave up after {waited:.1f}s parked: hilok_timeout)",
                "path": refusal.path,
                "mode": refusal.mode,
                "blocker": refusal.blocker,
            }
        )
        self._send(parked, [], expired)


def expired_error(value: object) -> LockNotAcquired | None:
    """The error a parked task sent again to fail (:data:`EXPIRED_HEADER`) raises."""
    if not isinstance(value, str):
        return None
    try:
        data = json.loads(value)
        return LockNotAcquired(
            str(data["message"]),
            path=data.get("path"),
            mode=data.get("mode"),
            blocker=data.get("blocker"),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _revoked(task_id: str) -> bool:
    """Was ``task_id`` revoked (as this worker heard: Celery broadcasts revokes)?"""
    try:
        from celery.worker import state as worker_state
    except ImportError:  # pragma: no cover
        return False
    return task_id in worker_state.revoked


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_parkings: weakref.WeakKeyDictionary[Any, Parking] = weakref.WeakKeyDictionary()
_parkings_lock = threading.Lock()


def parking(app: Any) -> Parking:
    """The running :class:`Parking` of ``app`` in this process, started on first use."""
    pid = os.getpid()
    with _parkings_lock:
        park = _parkings.get(app)
        if park is None or park.pid != pid:
            park = Parking(app)
            _parkings[app] = park
    park.start()
    return park


def stop_parking() -> None:
    with _parkings_lock:
        owned = [p for p in _parkings.values() if p.pid == os.getpid()]
        _parkings.clear()
    for park in owned:
        park.stop()
