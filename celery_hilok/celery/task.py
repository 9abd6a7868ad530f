"""``HiLokTask``: a Celery task base class that runs its body under hierarchical locks."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, ClassVar, Final

from celery import Task, states
from celery.exceptions import Ignore, Reject, Retry

try:
    from celery.app.task import get_actual_ignore_result
except ImportError:  # older Celery: the task's and the call's ignore_result, by hand
    get_actual_ignore_result = None

from redis.exceptions import RedisError

from .._core import Blocked, Request
from .._engine import WaitCheck
from .._redis import translate
from .._unique import claim_name, unique_key
from ..errors import LockNotAcquired
from ..lease import Lease
from ..sync import HiLok
from ._events import worker_name
from ._runtime import ATTEMPT_HEADER, runtime
from .config import TASK_OPTIONS, check_task_option, setting
from .locks import TaskLocks, begin, explicit_handover, locks_of, option
from .park import (
    EXPIRED_HEADER,
    PARK_KEY,
    PARKED,
    PARKED_AT_HEADER,
    PARKED_ATTR,
    PARKED_KEY,
    QUEUE_TTL,
    expired_error,
    record,
    save,
)
from .park import forget as forget_parked
from .park import take as take_parked
from .spec import LockSpec, Mode, task_signature
from .unique import UniqueSpec, publish_once

__all__ = ["HiLokTask", "keeps"]

log = logging.getLogger("celery_hilok.celery")

SKIPPED: Final = "hilok_skipped"
"""Key that marks the result of a task the ``skip`` policy did not run (see
:func:`skipped_result`)."""
_SPECS: Final = ("hilok_read", "hilok_write", "hilok_unique")
"""Options that are specs, compiled on their own, not values checked by check_task_option."""
_APPLY_ASYNC_POSITIONAL: Final = ("task_id", "producer", "link", "link_error", "shadow")
"""Celery's ``apply_async`` arguments after ``args`` and ``kwargs``, in order."""
HANDOVER_CHECK: Final = 1.0
"""Seconds between two checks of a ``wait`` task for a hand-over in its way (at most: each
refusal checks too). A check asks again in place, keeping the task's place in the queue."""


class HiLokTask(Task):  # type: ignore[misc]
    """A task whose body runs under the locks its ``hilok_read`` / ``hilok_write`` name.

    ::

        @app.task(base=HiLokTask, bind=True, hilok_write="accounts/{account_id}")
        def debit(self, account_id, amount): ...

    Before the body runs (``before_start``), all of the task's locks are acquired in one
    atomic step, as one holder with a handle of its own (fresh for every execution, so a
    duplicate delivery of the same message never shares or frees the running copy's locks).
    They are renewed in the background while the body runs and released on every way out.
    What happens when they are taken is ``hilok_on_contention``'s choice:

    - ``"retry"`` (default): retry the task later with exponential backoff and jitter
      (``hilok_retry_backoff``, ``hilok_retry_backoff_max``, ``hilok_retry_jitter``), at most
      ``hilok_max_retries`` times, counted apart from the task's own ``max_retries``;
    - ``"wait"``: wait for them, up to ``hilok_timeout`` seconds (None: no limit); but
      not for locks a ``hilok_keep`` chain step handed over (the next step's message may
      be queued behind the waiting tasks): then retry, as ``"retry"`` does;
    - ``"fail"``: fail at once with :class:`~celery_hilok.LockNotAcquired`;
    - ``"skip"``: do not run the body; the task ends with a log line naming the path that
      blocked it, and its result (state SUCCESS) is :func:`skipped_result`, a dict with
      ``hilok_skipped: True`` and the blocking lock; the chain it is in stops there.

    ``hilok_keep=True`` hands the locks, when the body succeeds, to the next task of the
    chain.

    ``hilok_unique`` (``True``, a tuple of argument names, a template or a callable) makes
    the task unique: while a call is queued or running, ``apply_async`` of an identical one
    (same task, same chosen arguments) sends nothing and returns the existing call's
    ``AsyncResult`` (``hilok_unique_on_duplicate="return"``), or raises
    :class:`~celery_hilok.DuplicateTask` (``"raise"``). See docs/celery.md for every option
    and setting.
    """

    Request = "celery_hilok.celery.request:HiLokRequest"

    hilok_read: Any = None
    hilok_write: Any = None
    hilok_on_contention: str | None = None
    hilok_timeout: float | None = None
    hilok_ttl: float | None = None
    hilok_refresh_interval: float | None = None
    hilok_keep: bool | None = None
    hilok_keep_ttl: float | None = None
    hilok_retry_backoff: float | None = None
    hilok_retry_backoff_max: float | None = None
    hilok_retry_jitter: bool | None = None
    hilok_max_retries: int | None = None
    hilok_unique: Any = None
    hilok_unique_on_duplicate: str | None = None
    hilok_unique_ttl: float | None = None

    _hilok_spec: ClassVar[LockSpec] = LockSpec("HiLokTask", None)
    _hilok_unique: ClassVar[UniqueSpec] = UniqueSpec("HiLokTask", None, None)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Runs when a task class is made, which is when @app.task registers a function
        # (at decoration, or when the app is finalized for lazily evaluated tasks): a bad
        # option or a template naming an unknown argument fails there, not at run time.
        super().__init_subclass__(**kwargs)
        where = cls.__dict__.get("name") or f"{cls.__module__}.{cls.__qualname__}"
        for name, value in cls.__dict__.items():
            is_option = name.startswith("hilok_") and name not in _SPECS
            if is_option and (name in TASK_OPTIONS or not callable(value)):
                check_task_option(name, value, where)
        signature = task_signature(cls)
        cls._hilok_spec = LockSpec(where, signature, cls.hilok_read, cls.hilok_write)
        cls._hilok_unique = UniqueSpec(where, signature, cls.hilok_unique)

    # -- what the body sees -----------------------------------------------------------

    @property
    def hilok(self) -> TaskLocks:
        """The locks of the running execution: handle, leases, tokens, lost."""
        state = locks_of(self.request)
        return state if state is not None else TaskLocks(self, self.request.id)

    def hilok_locks(self, args: Any, kwargs: Any) -> list[tuple[str, Mode]]:
        """The (path, mode) pairs a call with ``args`` and ``kwargs`` locks."""
        separator = setting(self.app.conf, "hilok_separator")
        return self._hilok_spec.locks(args or (), kwargs or {}, separator)

    def hilok_unique_key(self, args: Any = None, kwargs: Any = None) -> str | None:
        """The Redis key a call with ``args`` and ``kwargs`` claims (``hilok_unique``), or
        None if the task (or its callable spec, for this call) is not unique."""
        digest = self._hilok_unique.digest(args or (), kwargs or {})
        if digest is None:
            return None
        return unique_key(setting(self.app.conf, "hilok_namespace"), claim_name(self.name, digest))

    def hilok_unique_holder(self, args: Any = None, kwargs: Any = None) -> str | None:
        """The task id of the queued-or-running call identical to one with ``args`` and
        ``kwargs``, if any: "is it pending?" without sending anything. One GET; raises
        :class:`~celery_hilok.HiLokConnectionError` when Redis cannot be reached."""
        key = self.hilok_unique_key(args, kwargs)
        if key is None:
            return None
        hl = runtime(self.app).hilok
        try:
            held = hl.redis.get(key)
        except RedisError as exc:
            raise translate(exc, hl.server, f"the unique claim of {self.name}") from exc
        return held.decode() if isinstance(held, bytes) else held

    # -- Celery hooks -----------------------------------------------------------------

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Acquire the task's locks, all at once, before the body runs."""
        state = begin(self, self.request)
        expired = expired_error(_header(self.request, EXPIRED_HEADER))
        if expired is not None:  # parked past its hilok_timeout: sent again to fail here
            state._refused(expired, "fail", 0)
            raise expired
        # What was handed over is held already (and renewed): acquire the rest. A second
        # delivery of a chain step acquires the handed locks too, as a holder of its own.
        handed = {(lease.path, lease.mode) for lease in state.inherited}
        wanted: list[tuple[str, Any]]
        wanted = [lock for lock in self.hilok_locks(args, kwargs) if lock not in handed]
        if state.duplicate_of is not None:
            wanted += [(p, m) for p, m, _ in state.duplicate_of.locks if (p, m) not in wanted]
        if not wanted:
            parked_at = _header(self.request, PARKED_AT_HEADER)
            if isinstance(parked_at, (int, float)) and state.inherited:
                # a parked task sent again holding its locks: they were granted to it now
                for lease in state.inherited:
                    lease.contended = True
                wait = max(0.0, time.time() - parked_at)
                state._acquired(state.inherited, wait, _contention_retries(self.request))
            return
        handle = state._handle_for_acquire(self.request)
        state.announce()  # a waiting task is named in `celery hilok tree` too
        policy = option(self, "hilok_on_contention")
        ttl = float(option(self, "hilok_ttl"))
        hl = state.rt.hilok
        attempt = _contention_retries(self.request)
        started = time.monotonic()
        channel = None
        if policy == "park":
            policy, channel = self._park_channel(state, wanted)
        watch = _HandoverWatch(state) if policy == "wait" and not self.request.is_eager else None
        try:
            if channel is not None:
                leases = self._acquire_or_park(state, wanted, ttl, handle, channel)
            elif watch is not None:
                timeout = option(self, "hilok_timeout")
                leases = hl._acquire_many_checked(
                    wanted, watch.check, timeout=timeout, ttl=ttl, handle=handle
                )
            elif policy == "wait":  # eager: the caller's thread, no pool slot to give back
                timeout = option(self, "hilok_timeout")
                leases = hl.acquire_many(wanted, timeout=timeout, ttl=ttl, handle=handle)
            elif policy == "retry" and self.request.is_eager:
                leases = self._acquire_in_place(hl, wanted, ttl, handle)
            else:
                leases = hl.acquire_many(wanted, block=False, ttl=ttl, handle=handle)
        except LockNotAcquired as exc:
            if policy == "skip":
                state._refused(exc, "skip", attempt)
                log.info("%s[%s] skipped: %s", self.name, task_id, exc)
                self._store_skipped(task_id, exc)
                raise Ignore(str(exc)) from None
            if policy == "retry" and not self.request.is_eager:
                self._retry_on_contention(exc, state)
            if watch is not None and watch.handed:
                # Waiting could stall this worker: the next step of the blocker's chain may
                # sit in this worker's queue, behind tasks like this one in every slot.
                log.info("%s[%s] retries instead of waiting: %s", self.name, task_id, exc)
                self._retry_on_contention(exc, state)
            state._refused(exc, "fail", attempt)
            raise
        state.own = leases
        state._hold(leases)
        state._acquired(leases, time.monotonic() - started, attempt)

    def _park_channel(
        self, state: TaskLocks, wanted: list[tuple[str, Mode]]
    ) -> tuple[str, str | None]:
        """The ``park`` policy where it applies: ("park", the channel of the worker's
        :class:`~celery_hilok.celery.park.Parking`); else the policy it falls back to."""
        request = self.request
        if request.is_eager:
            return "wait", None  # the caller's thread: no pool slot to give back
        if option(self, "hilok_timeout") == 0:
            return "fail", None
        channel = getattr(request, PARK_KEY, None)
        if (
            not isinstance(channel, str)  # not run by a HiLokRequest (a custom Request)
            or state.source is not None  # runs under a handed-over handle: it holds on
            or (state.rt.hilok._cluster and len(_trees(wanted, state.rt.separator)) > 1)
        ):
            return "retry", None
        return "park", channel

    def _acquire_or_park(
        self,
        state: TaskLocks,
        wanted: list[tuple[str, Mode]],
        ttl: float,
        handle: str,
        channel: str,
    ) -> list[Lease]:
        """The ``park`` policy: the locks, or (raising ``Ignore``) the task parked in their
        queue, to be sent again holding them (see :mod:`celery_hilok.celery.park`)."""
        rt, hl = state.rt, state.rt.hilok
        refusal = hl._park(wanted, handle=handle, ttl=ttl, queue_ttl=QUEUE_TTL, channel=channel)
        if not isinstance(refusal, LockNotAcquired):
            return refusal
        timeout = option(self, "hilok_timeout")
        keep_ttl = float(option(self, "hilok_keep_ttl"))
        parked = record(self, handle, wanted, keep_ttl, timeout, worker_name(self.request))
        try:
            position = save(rt, parked)
            # Asked again now that the record is there: a release that came between the
            # first call and the record told a worker of a task it could not find yet.
            again = hl._park(wanted, handle=handle, ttl=ttl, queue_ttl=QUEUE_TTL, channel=channel)
        except BaseException:
            forget_parked(rt, handle)
            rt.release_named(handle, wanted, "its parking failed")
            raise
        if not isinstance(again, LockNotAcquired):
            if take_parked(rt, handle, handle):
                forget_parked(rt, handle)
                return again
            raise Ignore("parked, and granted: a worker sends it again")
        state._refused(again, "park", 0, hilok_position=position)
        log.info(
            "%s[%s] parked (%s waiting ahead of it in its tree): %s",
            self.name,
            self.request.id,
            "?" if position is None else position,
            again,
        )
        self._store_parked(str(self.request.id), again, position)
        setattr(self.request, PARKED_ATTR, True)
        raise Ignore(f"parked: {again}")

    def _store_parked(self, task_id: str, exc: LockNotAcquired, position: int | None) -> None:
        """Store state PARKED (not ready: the task runs when it is sent again)."""
        if _ignores_result(self, self.request):
            return
        meta = {PARKED_KEY: True, **_refusal(exc), "position": position}
        try:
            self.backend.store_result(task_id, meta, PARKED, request=self.request)
        except Exception as error:  # no result backend, or it is down: the log line stays
            log.warning("%s[%s]: could not store its PARKED state: %s", self.name, task_id, error)

    def _store_skipped(self, task_id: str, exc: LockNotAcquired) -> None:
        """Store the ``skip`` policy's result, so that the caller's ``AsyncResult`` is
        ready (SUCCESS, :func:`skipped_result`) instead of PENDING forever: the task ends
        with ``Ignore`` (no callbacks, the chain stops), which stores nothing itself."""
        request = self.request
        if _ignores_result(self, request):
            return
        if request.is_eager and not getattr(self, "store_eager_result", False):
            return  # an eager call's EagerResult is its result (state IGNORED)
        try:
            self.backend.store_result(task_id, skipped_result(exc), states.SUCCESS, request=request)
        except Exception as error:  # no result backend, or it is down: the log line stays
            log.warning("%s[%s]: could not store its skipped result: %s", self.name, task_id, error)

    def _acquire_in_place(
        self, hl: HiLok, wanted: list[tuple[str, Mode]], ttl: float, handle: str
    ) -> list[Lease]:
        """The ``retry`` policy in eager mode: wait the backoff delays in place, then give up.

        An eager retry would run again at once (Celery ignores its countdown there), so the
        same budget and delays are spent waiting here instead.
        """
        max_retries = option(self, "hilok_max_retries")
        attempt, wait = 0, 0.0
        while True:
            try:
                if attempt == 0:
                    return hl.acquire_many(wanted, block=False, ttl=ttl, handle=handle)
                return hl.acquire_many(wanted, timeout=wait, ttl=ttl, handle=handle)
            except LockNotAcquired as exc:
                if max_retries is not None and attempt >= max_retries:
                    raise _gave_up(exc, attempt, max_retries) from exc
                wait = self._backoff(attempt)
                attempt += 1

    def _retry_on_contention(self, exc: LockNotAcquired, state: TaskLocks) -> None:
        """Republish this task for later, counting contention retries on their own."""
        request = self.request
        headers = dict(request.headers or {})
        attempt = _contention_retries(request)
        max_retries = option(self, "hilok_max_retries")
        if max_retries is not None and attempt >= max_retries:
            gave_up = _gave_up(exc, attempt, max_retries)
            state._refused(gave_up, "fail", attempt)
            raise gave_up from exc
        delay = self._backoff(attempt)
        state._refused(exc, "retry", attempt, delay)
        headers[ATTEMPT_HEADER] = attempt + 1
        # The retry keeps the task's own retry count: contention does not use up max_retries.
        sig = self.signature_from_request(
            request, countdown=delay, retries=request.retries, headers=headers
        )
        try:
            sig.apply_async()
        except Exception as publish_error:
            raise Reject(publish_error, requeue=False) from publish_error
        raise Retry(f"locked: {exc}", exc=exc, when=delay, sig=sig)

    def _backoff(self, attempt: int) -> float:
        base = float(option(self, "hilok_retry_backoff"))
        cap = float(option(self, "hilok_retry_backoff_max"))
        delay: float = min(cap, base * 2**attempt)
        if option(self, "hilok_retry_jitter"):
            delay = delay / 2 + random.random() * delay / 2
        return delay

    # -- handles given by the caller ----------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, *more: Any, **options: Any) -> Any:
        """Celery's ``apply_async``; also takes ``hilok_handle=h`` to run under handle h and,
        for a unique task, ``hilok_unique_on_duplicate`` for this call.

        A unique task (``hilok_unique``) sends nothing while an identical call is queued or
        running: it returns that call's ``AsyncResult``, or raises
        :class:`~celery_hilok.DuplicateTask`; a Redis it cannot reach raises
        :class:`~celery_hilok.HiLokConnectionError`.
        """
        explicit_handover(options)
        if not self._hilok_unique:
            options.pop("hilok_unique_on_duplicate", None)
            return super().apply_async(args, kwargs, *more, **options)
        if len(more) > len(_APPLY_ASYNC_POSITIONAL):
            raise TypeError(f"apply_async() takes at most 7 positional arguments ({self.name})")
        options.update(zip(_APPLY_ASYNC_POSITIONAL, more, strict=False))
        return publish_once(self, super().apply_async, args, kwargs, options)

    def apply(self, args: Any = None, kwargs: Any = None, *more: Any, **options: Any) -> Any:
        """Celery's ``apply`` (eager run); also takes ``hilok_handle=h``."""
        explicit_handover(options)
        return super().apply(args, kwargs, *more, **options)


class _HandoverWatch:
    """The ``wait`` policy's check, at each refusal and at least every
    :data:`HANDOVER_CHECK` seconds while the task waits: is the holder in the way a chain
    step's hand-over (its locks in the next step's message, nobody running under them)?"""

    __slots__ = ("check", "handed", "state")

    def __init__(self, state: TaskLocks) -> None:
        self.state = state
        self.handed = False
        self.check = WaitCheck(HANDOVER_CHECK, self._stop)

    def _stop(self, blocked: Blocked) -> str | None:
        if blocked.queued or not self.state.rt.is_handed(blocked.handle):
            return None  # a running holder, or an earlier waiter: they move on by themselves
        self.handed = True
        return (
            "its holder handed it to the next step of a chain, whose message waits in a "
            "queue, maybe behind this task"
        )


def skipped_result(exc: LockNotAcquired) -> dict[str, Any]:
    """The result of a task the ``skip`` policy did not run: ``{"hilok_skipped": True,
    "path", "mode"}`` of the lock it asked for, ``"blocker"`` (who held it, as in
    :attr:`LockNotAcquired.blocker`) and ``"reason"`` (the refusal's message)."""
    return {SKIPPED: True, **_refusal(exc)}


def _refusal(exc: LockNotAcquired) -> dict[str, Any]:
    """What a stored result says of a refusal: the lock asked for, who held it, the
    message."""
    return {"path": exc.path, "mode": exc.mode, "blocker": exc.blocker, "reason": str(exc)}


def _trees(locks: list[tuple[str, Mode]], separator: str) -> set[str]:
    """The trees (first path segments, as the engine keys them) of ``locks``."""
    return {Request.parse(path, mode, separator).path.tree for path, mode in locks}


def _ignores_result(task: Any, request: Any) -> bool:
    """Does this call store no result (``ignore_result`` of the task or of the call)?"""
    if get_actual_ignore_result is not None:
        return bool(get_actual_ignore_result(task, request))
    return bool(task.ignore_result or getattr(request, "ignore_result", False))


def keeps(task: Any) -> bool:
    """Does ``task`` hand its locks to the next step? Only a HiLokTask with hilok_keep."""
    return isinstance(task, HiLokTask) and bool(option(task, "hilok_keep"))


def _header(request: Any, name: str) -> Any:
    """A message header of ``request``, or the request attribute Celery made of it."""
    headers = request.headers or {}
    value = headers.get(name) if isinstance(headers, dict) else None
    return getattr(request, name, None) if value is None else value


def _contention_retries(request: Any) -> int:
    """How many contention retries of this task came before this execution."""
    return int(_header(request, ATTEMPT_HEADER) or 0)


def _gave_up(exc: LockNotAcquired, attempts: int, max_retries: int) -> LockNotAcquired:
    return LockNotAcquired(
        f"{exc} (gave up after {attempts} contention retries, hilok_max_retries={max_retries})",
        path=exc.path,
        mode=exc.mode,
        blocker=exc.blocker,
    )
