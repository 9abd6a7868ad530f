"""One lock client per process and app, shared by every task thread and by the refresher.

A worker process (prefork child, or the main process for threads/solo/gevent) holds one
:class:`~celery_hilok.HiLok` per Celery app: its background thread renews every lease the
process holds in one round trip per tick. It is made after fork (``worker_process_init``
for prefork children) or on first use, and made again when the process id changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Final

from redis.exceptions import NoScriptError, RedisError

from .._core import Request
from ..errors import HiLokError, LockLost
from ..lease import Lease
from ..sync import HiLok
from ._events import install_metrics
from .config import redis_url, setting

__all__ = ["DIRECTORY_PREFIX", "HEADER", "Directory", "Handover", "Runtime", "runtime"]

log = logging.getLogger("celery_hilok.celery")

HEADER: Final = "hilok"
"""Message header carrying a handle (and what it holds) to the task that runs under it."""
EXEC_HEADER: Final = "hilok_exec"
"""Request key with the fresh handle the worker's main process made for one execution."""
ATTEMPT_HEADER: Final = "hilok_attempt"
"""Message header counting the contention retries of a task so far."""
PARKED_ATTR: Final = "_hilok_parked"
"""Attribute of a task request that parked (``park`` policy): the call goes on, sent again
later, so what it claimed for the call (``hilok_unique``) stays."""
CLAIM_TTL: Final = 86400.0
"""Seconds the hand-over claims of a handle are remembered after their last use."""

# Take the hand-over offered to one task id, for one execution, unless another took it.
# KEYS[1] the handle's claims hash; ARGV[1] task id, ARGV[2] "taken:<execution>", ARGV[3]
# ttl ms. Reply: the field's value before ("free" when this call took it; nil if unknown).
_TAKE_CLAIM = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
if before == 'free' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return before
"""


class Runtime:
    """The lock client of one app in one process, with the app's settings."""

    def __init__(self, app: Any) -> None:
        conf = app.conf
        self.pid = os.getpid()
        self.separator: str = setting(conf, "hilok_separator")
        self.namespace: str = setting(conf, "hilok_namespace")
        self.hilok = HiLok(
            redis_url(conf),
            namespace=self.namespace,
            separator=self.separator,
            ttl=float(setting(conf, "hilok_ttl")),
            redis_options=dict(conf.get("hilok_redis_options") or {}),
            wait_replicas=setting(conf, "hilok_wait_replicas"),
            wait_timeout=setting(conf, "hilok_wait_timeout"),
        )
        self._take_sha = hashlib.sha1(_TAKE_CLAIM.encode()).hexdigest()
        self.directory = Directory(self.hilok, self.namespace)
        install_metrics(conf)  # hilok_metrics: once per process, before any lock is taken

    # -- hand-over claims ------------------------------------------------------------
    #
    # A handle handed to the next task travels in its message, and a message can be
    # delivered twice (a visibility timeout, a lost worker with acks_late). So that the
    # second delivery never runs as the same holder, the sender offers the hand-over to
    # that task id ("free") and the first execution to start takes it ("taken:<exec>").

    def _claims(self, handle: str) -> str:
        return f"{self.namespace}:celery:claims:{handle}"

    def offer(self, handle: str, task_id: str) -> None:
        key = self._claims(handle)
        with self.hilok.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, task_id, "free")
            pipe.pexpire(key, int(CLAIM_TTL * 1000))
            pipe.execute()

    def take(self, handle: str, task_id: str, execution: str) -> str | None:
        """Take the hand-over to ``task_id``; returns what the claim was before."""
        key, args = self._claims(handle), (task_id, f"taken:{execution}", int(CLAIM_TTL * 1000))
        redis = self.hilok.redis
        try:
            before = redis.evalsha(self._take_sha, 1, key, *args)
        except NoScriptError:  # by source, as the engine does: no SCRIPT LOAD in the ACL
            before = redis.eval(_TAKE_CLAIM, 1, key, *args)
        if isinstance(before, bytes):
            before = before.decode()
        return before if isinstance(before, str) else None

    def claim_of(self, handle: str, task_id: str) -> str | None:
        value = self.hilok.redis.hget(self._claims(handle), task_id)
        return value.decode() if isinstance(value, bytes) else value

    def forget(self, handle: str) -> None:
        """The chain of ``handle`` is over: drop its claims (else they expire in a day)."""
        try:
            self.hilok.redis.delete(self._claims(handle))
        except RedisError as exc:
            log.warning("could not drop the hand-over claims of %s...: %s", handle[:6], exc)

    # -- hand-over marks --------------------------------------------------------------
    #
    # While a chain step's locks wait in a message (for the next step, or for the step's own
    # retry), no process runs under their handle, and the message may sit in a worker's
    # queue behind tasks that wait for those very locks in every pool slot. The mark says
    # "in a message" for as long as the kept leases last (hilok_keep_ttl), so that a
    # ``wait`` task in the way can give its slot back rather than stall the worker.

    def _handed(self, handle: str) -> str:
        return f"{self.namespace}:celery:handed:{handle}"

    def mark_handed(self, handle: str, ttl: float, offer_to: str | None = None) -> None:
        """``handle``'s locks go into a message for ``ttl`` seconds, offered to task id
        ``offer_to`` if given (see :meth:`offer`); one round trip for both."""
        with self.hilok.redis.pipeline(transaction=False) as pipe:
            if offer_to is not None:
                claims = self._claims(handle)
                pipe.hset(claims, offer_to, "free")
                pipe.pexpire(claims, int(CLAIM_TTL * 1000))
            pipe.set(self._handed(handle), "1", px=max(1, int(ttl * 1000)))
            pipe.execute()

    def unmark_handed(self, handle: str) -> None:
        """A task runs under ``handle`` again (it took the hand-over over); quietly."""
        try:
            self.hilok.redis.delete(self._handed(handle))
        except RedisError as exc:  # the mark runs out with the kept leases
            log.debug("could not drop the hand-over mark of %s...: %s", handle[:6], exc)

    def is_handed(self, handle: str) -> bool:
        """Are ``handle``'s locks in a message, with nobody running under them? False when
        Redis cannot say (the caller then waits, as it would without the mark)."""
        try:
            return bool(self.hilok.redis.exists(self._handed(handle)))
        except RedisError as exc:
            log.debug("could not read the hand-over mark of %s...: %s", handle[:6], exc)
            return False

    def lease(self, path: str, mode: str, handle: str, token: int, ttl: float) -> Lease:
        """A lease object for a grant known by name (e.g. from a message header)."""
        return Lease(Request.parse(path, mode, self.separator), handle, token, ttl, self.hilok)

    def release_quietly(self, leases: Sequence[Lease], why: str) -> None:
        """Release ``leases``; log instead of raising (what is left runs out by its ttl)."""
        if not leases:
            return
        try:
            self.hilok.release(*leases)
        except LockLost as exc:
            # Some were already gone (released elsewhere, or ran out): nothing left to do.
            log.debug("releasing %s (%s): %s", leases, why, exc)
        except HiLokError as exc:
            log.warning(
                "could not release %s (%s): %s; they run out by their ttl", leases, why, exc
            )

    def release_named(self, handle: str, locks: Iterable[tuple[str, str]], why: str) -> None:
        """Release what ``handle`` holds of ``locks``, owner-checked; quietly."""
        leases = [self.lease(path, mode, handle, 0, self.hilok.ttl) for path, mode in locks]
        if leases:
            log.info("releasing %d lock(s) of %s...: %s", len(leases), handle[:6], why)
        self.release_quietly(leases, why)

    def close(self) -> None:
        if self.pid == os.getpid():
            self.directory.close()
            self.hilok.close()


DIRECTORY_PREFIX: Final = "celery:holders:"
"""Key of a worker process's directory, after the namespace and ``:``: the prefix, then
``<worker hostname>:<pid>``."""


class Directory:
    """Which task each handle of this process holds its locks for, published for the
    ``celery hilok`` command (``task id``, ``task name``, ``worker``, ``pid``).

    One key per process holds a JSON document of its current holders. A background thread
    writes it soon after a change (at most a few times a second) and every
    :attr:`INTERVAL` seconds while anything is held, with a lifetime of three intervals,
    so a dead process's entry vanishes on its own; no Redis call is on a task's path.
    """

    INTERVAL: Final = 2.0
    SETTLE: Final = 0.1  # seconds between two writes, so a burst of changes is one write

    def __init__(self, hilok: HiLok, namespace: str) -> None:
        self._hilok = hilok
        self._namespace = namespace
        self._holders: dict[str, dict[str, Any]] = {}  # task id -> holder entry
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker = socket.gethostname()

    def key(self) -> str:
        return f"{self._namespace}:{DIRECTORY_PREFIX}{self._worker}:{os.getpid()}"

    def add(self, task_id: str | None, handle: str | None, task: str, worker: str | None) -> None:
        if not task_id or not handle:
            return
        entry = {"handle": handle, "task_id": task_id, "task": task}
        with self._lock:
            if self._holders.get(task_id) == entry and (not worker or worker == self._worker):
                return  # published already (a task announces itself before and after acquiring)
            if worker:
                self._worker = worker
            self._holders[task_id] = entry
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(
                    target=self._run, name="hilok-directory", daemon=True
                )
                self._thread.start()
        self._changed.set()

    def remove(self, task_id: str | None) -> None:
        with self._lock:
            gone = task_id is not None and self._holders.pop(task_id, None) is not None
        if gone:
            self._changed.set()

    def _run(self) -> None:
        published = False
        while not self._stopping.is_set():
            self._changed.wait(self.INTERVAL)
            self._changed.clear()
            with self._lock:
                holders = list(self._holders.values())
                key = self.key()
                worker = self._worker
            try:
                if holders:
                    document = {"worker": worker, "pid": os.getpid(), "holders": holders}
                    px = int(self.INTERVAL * 3000)
                    self._hilok.redis.set(key, json.dumps(document), px=px)
                    published = True
                elif published:
                    self._hilok.redis.delete(key)
                    published = False
            except RedisError as exc:
                log.debug("could not publish the holder directory: %s", exc)
            self._stopping.wait(self.SETTLE)

    def close(self) -> None:
        self._stopping.set()
        self._changed.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._lock:
            holders, self._holders = self._holders, {}
        if holders:
            try:
                self._hilok.redis.delete(self.key())
            except RedisError:
                pass


_runtimes: weakref.WeakKeyDictionary[Any, Runtime] = weakref.WeakKeyDictionary()
_runtimes_lock = threading.Lock()


def runtime(app: Any) -> Runtime:
    """The :class:`Runtime` of ``app`` in this process, made on first use (and after fork)."""
    pid = os.getpid()
    rt = _runtimes.get(app)
    if rt is not None and rt.pid == pid:
        return rt
    with _runtimes_lock:
        rt = _runtimes.get(app)
        if rt is None or rt.pid != pid:
            # A runtime inherited through fork is dropped, not closed: its threads do not
            # exist here and redis-py's pool resets itself in a new process.
            rt = Runtime(app)
            _runtimes[app] = rt
        return rt


def close_runtimes() -> None:
    """Close this process's runtimes (their refresher and wake-up threads)."""
    with _runtimes_lock:
        owned = [(app, rt) for app, rt in _runtimes.items() if rt.pid == os.getpid()]
        for app, _ in owned:
            del _runtimes[app]
    for _, rt in owned:
        try:
            rt.close()
        except Exception:  # pragma: no cover - best effort at process exit
            log.debug("closing %r failed", rt, exc_info=True)


class Handover:
    """A handle given to a task through its message: ``{"handle": h, "locks": [...]}``.

    ``locks`` lists what the handle holds that the task becomes responsible for (the locks
    of the previous chain step); a handle given with ``sig.set(hilok_handle=h)`` lists none.
    """

    __slots__ = ("claim", "handle", "locks")

    def __init__(
        self, handle: str, locks: Sequence[tuple[str, str, int]] = (), claim: bool = False
    ) -> None:
        self.handle = handle
        self.locks = list(locks)
        self.claim = claim  # offered to one task id: see Runtime.offer

    def encode(self) -> dict[str, Any]:
        value: dict[str, Any] = {"handle": self.handle, "locks": [list(x) for x in self.locks]}
        if self.claim:
            value["claim"] = True
        return value

    @classmethod
    def decode(cls, value: object) -> Handover | None:
        if not isinstance(value, dict):
            return None
        handle = value.get("handle")
        if not isinstance(handle, str):
            return None
        locks: list[tuple[str, str, int]] = []
        for item in value.get("locks") or ():
            if isinstance(item, (list, tuple)) and len(item) >= 2:
                token = item[2] if len(item) > 2 and isinstance(item[2], int) else 0
                locks.append((str(item[0]), str(item[1]), token))
        return cls(handle, locks, bool(value.get("claim")))

    @classmethod
    def of_request(cls, request: Any) -> Handover | None:
        """The hand-over a task request (``task.request``, a Context) carries, if any."""
        headers = getattr(request, "headers", None) or {}
        value = headers.get(HEADER) if isinstance(headers, dict) else None
        if value is None:
            value = getattr(request, HEADER, None)
        return cls.decode(value)

    def __repr__(self) -> str:
        return f"<Handover {self.handle[:6]}... {len(self.locks)} lock(s)>"
