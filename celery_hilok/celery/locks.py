"""What one execution of a task holds (``self.hilok``), from its start to its way out.

One :class:`TaskLocks` lives on each task request (``task.request``, which Celery keeps per
thread), so that concurrent executions of one task in one process never share lock state.
It is made when the task starts, holds the leases handed to it (``inherited``) and the ones
its own lock spec acquired (``own``), and is finished by exactly one way out: released,
handed to the next step of a chain, or handed to the task's own retry.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

from celery.utils.dispatch import Signal

from .._core import check_handle, new_handle
from ..errors import LockLost, LockNotAcquired
from ..inspect import release_note
from ..lease import Lease
from ._events import EVENTS_FLAG, lock_fields, send_task_event, worker_name
from ._runtime import HEADER, Handover, Runtime, runtime
from .config import setting
from .signals import (
    hilok_lease_lost,
    hilok_lock_acquired,
    hilok_lock_refused,
    hilok_lock_released,
)

__all__ = ["TaskLocks", "locks_of"]

log = logging.getLogger("celery_hilok.celery")

RAN_OUT: Final = "its lease ran out before it was refreshed"
STATE_ATTR: Final = "_hilok_locks"
"""Attribute of the task request (a Celery ``Context``) that holds its :class:`TaskLocks`."""


def option(task: Any, name: str) -> Any:
    """A task option: the task's own value, else the app's ``hilok_*`` setting, else default."""
    value = getattr(task, name, None)
    return setting(task.app.conf, name) if value is None else value


class TaskLocks:
    """The locks of one task execution, available in the body as ``self.hilok``.

    ``handle`` is the holder handle the task runs as (None while it holds nothing and was
    given no handle); ``leases`` every lease it holds (``inherited`` ones, handed over by
    the previous step of a chain, then ``own`` ones, acquired for its own lock spec);
    ``tokens`` the fencing token of each locked path; ``lost`` whether the refresher found
    any of them gone.
    """

    __slots__ = (
        "_claimed",
        "_events_from",
        "_finished",
        "_handed_over",
        "_lost_why",
        "_rt",
        "_task",
        "duplicate_of",
        "handle",
        "inherited",
        "next_step",
        "own",
        "source",
        "task_id",
    )

    def __init__(self, task: Any = None, task_id: str | None = None) -> None:
        self._task = task
        self.task_id = task_id
        self.handle: str | None = None
        self.source: str | None = None  # None (fresh), "handover" (chain, sig.set)
        self.inherited: list[Lease] = []
        self.own: list[Lease] = []
        self._rt: Runtime | None = None
        self._finished = False
        self._handed_over = False
        self._claimed = False  # this execution took a hand-over offered to its task id
        # A second delivery of a message whose hand-over an earlier delivery took: it runs
        # as a holder of its own and must acquire the handed locks like any other task.
        self.duplicate_of: Handover | None = None
        # The worker's hostname when it sends task events (task-hilok), else None.
        self._events_from: str | None = None
        # (task id, name) of the next step of the chain, as the message had it at the start
        # (Celery 5.5 pops it off request.chain before publishing it, later versions not).
        self.next_step: tuple[str | None, str | None] | None = None
        # Why each lost lease (by id) was lost, as found when the refresher reported it.
        self._lost_why: dict[int, str] = {}

    @property
    def leases(self) -> list[Lease]:
        return [*self.inherited, *self.own]

    @property
    def tokens(self) -> dict[str, int]:
        """Fencing token of each locked path (pass them to stores that check them)."""
        return {lease.path: lease.token for lease in self.leases}

    @property
    def lost(self) -> bool:
        """True once a background refresh found one of the leases gone."""
        return any(lease.lost for lease in self.leases)

    def check(self) -> None:
        """Raise :class:`~celery_hilok.LockLost` if a lease was lost (a step boundary check)."""
        lost = [lease for lease in self.leases if lease.lost]
        if not lost:
            return
        whys = [self._lost_why.get(id(lease), RAN_OUT) for lease in lost]
        if set(whys) == {RAN_OUT}:
            raise LockLost(
                f"lock lost while the task ran ({RAN_OUT}): "
                + ", ".join(f"{lease.mode} {lease.path!r}" for lease in lost)
            )
        raise LockLost(
            "lock lost while the task ran: "
            + ", ".join(
                f"{lease.mode} {lease.path!r} ({why})"
                for lease, why in zip(lost, whys, strict=True)
            )
        )

    def __repr__(self) -> str:
        held = ", ".join(f"{lease.mode} {lease.path!r}" for lease in self.leases) or "nothing"
        who = f"{self.handle[:6]}..." if self.handle else "no handle"
        return f"<TaskLocks {who}: {held}{' LOST' if self.lost else ''}>"

    # -- internals --------------------------------------------------------------------

    @property
    def rt(self) -> Runtime:
        if self._rt is None:
            self._rt = runtime(self._task.app)
        return self._rt

    def _hold(self, leases: Sequence[Lease]) -> None:
        """Keep ``leases`` alive from the process's refresher until released or handed over."""
        interval = option(self._task, "hilok_refresh_interval")
        for lease in leases:
            lease.on_lost(self._on_lost)
            self.rt.hilok.keep_alive(lease, interval=interval)
        if leases:
            self.announce()

    def announce(self) -> None:
        """Publish which task this handle holds (or waits) for: see ``celery hilok tree``."""
        worker = worker_name(getattr(self._task, "request", None))
        self.rt.directory.add(self.task_id, self.handle, getattr(self._task, "name", ""), worker)

    # -- what the monitors see: signals and task-hilok events ---------------------------

    def _event(self, state: str, **fields: Any) -> None:
        if self._events_from is not None:
            send_task_event(self._task.app, self.task_id, self._events_from, hilok=state, **fields)

    def _tell(self, signal: Signal, sent: dict[str, Any], state: str, **fields: Any) -> None:
        """Send ``signal`` (from the task, with its id, ``sent`` and ``locks=self``), then the
        task-hilok event ``state`` with ``fields``."""
        signal.send(sender=self._task, task_id=self.task_id, **sent, locks=self)
        self._event(state, **fields)

    def _acquired(self, leases: Sequence[Lease], wait: float, attempt: int) -> None:
        contended = any(lease.contended for lease in leases)
        self._tell(
            hilok_lock_acquired,
            {"leases": list(leases), "wait": wait, "contended": contended},
            "acquired",
            hilok_locks=lock_fields(leases),
            hilok_wait=round(wait, 6),
            hilok_contended=contended,
            hilok_retries=attempt,
        )

    def _refused(
        self,
        error: LockNotAcquired,
        action: str,
        attempt: int,
        countdown: float | None = None,
        **fields: Any,
    ) -> None:
        """Tell of a refusal (signal and event) and what the task does: ``action``, with
        ``fields`` for the event (a parked task's ``hilok_position``)."""
        self._tell(
            hilok_lock_refused,
            {"error": error, "action": action, "countdown": countdown},
            "contended",
            hilok_action=action,
            hilok_path=error.path,
            hilok_mode=error.mode,
            hilok_blocker=error.blocker,
            hilok_countdown=countdown,
            hilok_retries=attempt,
            **fields,
        )

    def _released(self, leases: Sequence[Lease], why: str) -> None:
        now = time.monotonic()
        known = [now - lease.granted_at for lease in leases if lease.granted_at is not None]
        hold = max(known) if known else None
        self._tell(
            hilok_lock_released,
            {"leases": list(leases), "why": why, "hold": hold},
            "released",
            hilok_locks=lock_fields(leases),
            hilok_hold=None if hold is None else round(hold, 6),
            hilok_why=why,
        )

    def _on_lost(self, lease: Lease) -> None:
        task = self._task
        why = self._why_lost(lease)
        self._lost_why[id(lease)] = why
        log.warning(
            "%s[%s]: lost its %s lock on %r (%s)",
            getattr(task, "name", task),
            self.task_id,
            lease.mode,
            lease.path,
            why,
        )
        self._tell(
            hilok_lease_lost,
            {"lease": lease, "why": why},
            "lost",
            hilok_locks=lock_fields([lease]),
            hilok_why=why,
        )

    def _why_lost(self, lease: Lease) -> str:
        """Why ``lease`` is gone: released from the command line (it left a note), or it ran
        out. One GET, only when a lease is found lost (in the refresher thread)."""
        try:
            note = release_note(self.rt.hilok, lease.handle)
        except Exception as exc:
            log.debug("could not read the release note of %s...: %s", lease.handle[:6], exc)
            return RAN_OUT
        if note is None or lease.path not in note.paths:
            return RAN_OUT
        return note.describe()

    def _adopt(self, handover: Handover, request: Any) -> None:
        """Run as ``handover.handle`` and take over the locks it lists, renewed at once.

        Raises :class:`LockLost` when one of them already ran out: the guarantee that
        nobody came in between the previous step and this one no longer holds.
        """
        check_handle(handover.handle)
        if handover.claim and self.task_id:
            execution = getattr(request, "hilok_exec", None) or new_handle()
            before = self.rt.take(handover.handle, self.task_id, execution)
            if before is not None and before != "free":
                log.warning(
                    "%s[%s]: another delivery of this message already runs under the handle "
                    "it was handed; this one runs as a holder of its own",
                    self._task.name,
                    self.task_id,
                )
                self.duplicate_of = handover
                return
            self._claimed = before == "free"
        self.handle = handover.handle
        self.source = "handover"
        if not handover.locks:
            return
        ttl = float(option(self._task, "hilok_ttl"))
        leases = [self.rt.lease(p, m, handover.handle, t, ttl) for p, m, t in handover.locks]
        alive = self.rt.hilok.refresh_many(leases, ttl=ttl)
        self.rt.unmark_handed(handover.handle)  # someone runs under them again
        self.inherited = [lease for lease, ok in zip(leases, alive, strict=True) if ok]
        self._hold(self.inherited)
        gone = [lease for lease, ok in zip(leases, alive, strict=True) if not ok]
        if gone:
            keep_ttl = option(self._task, "hilok_keep_ttl")
            raise LockLost(
                "the lock(s) handed over by the previous step ran out before this task "
                f"started (hilok_keep_ttl={keep_ttl}s): "
                + ", ".join(f"{lease.mode} {lease.path!r}" for lease in gone)
            )

    def _handle_for_acquire(self, request: Any) -> str:
        """The handle to acquire the task's own locks with (fixed from then on)."""
        if self.handle is None:
            given = getattr(request, "hilok_exec", None)
            self.handle = given if isinstance(given, str) else new_handle()
        return self.handle

    def _pass_on(self, leases: Sequence[Lease]) -> list[Lease]:
        """Stop refreshing ``leases`` here and give them ``hilok_keep_ttl`` to be picked up."""
        if not leases:
            return []
        keep_ttl = float(option(self._task, "hilok_keep_ttl"))
        self.rt.hilok.stop_keep_alive(*leases)
        alive = self.rt.hilok.refresh_many(leases, ttl=keep_ttl)
        kept = [lease for lease, ok in zip(leases, alive, strict=True) if ok]
        if len(kept) < len(leases):
            log.warning(
                "%s[%s]: lock(s) lost before they could be handed over: %s",
                self._task.name,
                self.task_id,
                [lease for lease in leases if lease not in kept],
            )
        return kept

    def _handover(self, leases: Sequence[Lease]) -> Handover:
        assert self.handle is not None
        return Handover(self.handle, [(lease.path, lease.mode, lease.token) for lease in leases])

    def hand_to_next(self, headers: dict[str, Any]) -> None:
        """Give every lock to the next step of the chain, through its message headers."""
        if self._finished or self._handed_over or self.handle is None:
            return
        kept = self._pass_on(self.leases)
        handover = self._handover(kept)
        next_id = headers.get("id")
        offer_to = next_id if isinstance(next_id, str) else None
        self._mark_handed(kept, offer_to)
        handover.claim = offer_to is not None
        headers[HEADER] = handover.encode()
        self._handed_over = True
        log.debug("%s[%s]: handed %s to the next step", self._task.name, self.task_id, kept)
        self._event("handed_over", hilok_locks=lock_fields(kept))

    def hand_to_retry(self, headers: dict[str, Any] | None) -> None:
        """The task is being retried: release its own locks, keep the handed-over ones.

        What the task acquired for its own spec it gives up (the retry acquires again);
        what was handed to it stays with the chain and goes with the retry message.
        """
        if self._finished or self._handed_over:
            return
        own, self.own = self.own, []
        if own:
            self.rt.release_quietly(own, "retry")
            self._released(own, "retry")
        if self.source is None:
            if headers is not None:
                headers.pop(HEADER, None)
            self._handed_over = True
            return
        kept = self._pass_on(self.inherited)
        handover = self._handover(kept)
        # offered to the retried execution (the same task id) to take
        offer_to = self.task_id if self._claimed and self.task_id else None
        if headers is not None:
            self._mark_handed(kept, offer_to)
        elif offer_to is not None:
            self.rt.offer(handover.handle, offer_to)
        handover.claim = offer_to is not None
        if headers is not None:
            headers[HEADER] = handover.encode()
        self._handed_over = True

    def _mark_handed(self, kept: Sequence[Lease], offer_to: str | None) -> None:
        """``kept`` go into a message: mark the handle as handed over for as long as they
        last (``wait`` tasks blocked by it give their pool slot back), and offer the
        hand-over to task id ``offer_to``; one round trip."""
        assert self.handle is not None
        if kept:
            keep_ttl = float(option(self._task, "hilok_keep_ttl"))
            self.rt.mark_handed(self.handle, keep_ttl, offer_to)
        elif offer_to is not None:
            self.rt.offer(self.handle, offer_to)

    def finish(self, state: str | None, *, keep: bool) -> None:
        """The task's way out (``task_postrun``): release, unless handed over already.

        ``keep``: whether the task, if it succeeded, hands its locks to the next step of its
        chain (a ``HiLokTask`` with ``hilok_keep``: :func:`~celery_hilok.celery.task.keeps`).
        """
        if self._finished:
            return
        try:
            if self._handed_over:
                return
            if state == "RETRY":
                self.hand_to_retry(None)
                return
            if state == "SUCCESS" and keep and self.handle is not None and _eager_stash(self):
                return
            leases = self.leases
            if leases:
                self.rt.release_quietly(leases, f"task ended {state or 'abruptly'}")
                self._released(leases, state or "abruptly")
            if self._claimed and self.handle is not None:
                self.rt.forget(self.handle)  # the end of the chain
        finally:
            self._finished = True
            if self._rt is not None:
                self._rt.directory.remove(self.task_id)


def locks_of(request: Any) -> TaskLocks | None:
    """The :class:`TaskLocks` of a task request, if the task runs with any."""
    state = getattr(request, STATE_ATTR, None)
    return state if isinstance(state, TaskLocks) else None


def begin(task: Any, request: Any) -> TaskLocks:
    """The :class:`TaskLocks` of the running request, made (and handed locks adopted) once."""
    state = locks_of(request)
    if state is not None:
        return state
    state = TaskLocks(task, getattr(request, "id", None))
    state.next_step = next_step_id(request)
    setattr(request, STATE_ATTR, state)
    if getattr(request, EVENTS_FLAG, False):
        state._events_from = worker_name(request) or ""
    handover = Handover.of_request(request)
    if handover is None and getattr(request, "is_eager", False):
        handover = _eager_take()
    if handover is not None:
        state._adopt(handover, request)
    return state


def next_step_id(request: Any) -> tuple[str | None, str | None] | None:
    """(task id, task name) of the next step of the request's chain, if it is one task."""
    chain = getattr(request, "chain", None)
    if not chain:
        return None
    step = chain[-1]
    if not isinstance(step, dict) or step.get("subtask_type"):
        return None  # a group, chord or nested chain: no single task to hand over to
    options = step.get("options") or {}
    return options.get("task_id"), step.get("task")


# -- eager mode ---------------------------------------------------------------------------
#
# In eager mode (task_always_eager) a chain runs its steps one after another inside
# celery.canvas._chain.apply, without messages, so the hand-over cannot travel in headers.
# The step that keeps its locks leaves them in a per-thread slot tagged with that
# _chain.apply frame and the index of the next step; the next step of the same chain run
# takes them from there. Anything else (a task outside a chain, the last step) releases.


@dataclass
class _Pending:
    frame: FrameType
    next_index: int
    handover: Handover
    rt: Runtime
    leases: list[Lease]


_eager = threading.local()


def _chain_position() -> tuple[FrameType, int, int] | None:
    """(frame, index of the running step, number of steps) of the enclosing eager chain."""
    from celery.canvas import _chain

    code = _chain.apply.__code__
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            # _chain.apply loops ``for ... task in ...`` over the chain's steps (by index in
            # Celery 5.6+): find the running step among ``self.tasks`` by identity.
            local = frame.f_locals
            chain, step = local.get("self"), local.get("task")
            steps = list(getattr(chain, "tasks", None) or ())
            for index, candidate in enumerate(steps):
                if candidate is step:
                    return frame, index, len(steps)
            return None
        frame = frame.f_back
    return None


def _eager_stash(state: TaskLocks) -> bool:
    """Keep ``state``'s locks for the next step of the eager chain; False if there is none."""
    if not getattr(state._task.request, "is_eager", False):
        return False
    position = _chain_position()
    if position is None or position[1] + 1 >= position[2]:
        return False
    stale: _Pending | None = getattr(_eager, "pending", None)
    if stale is not None:
        stale.rt.release_quietly(stale.leases, "never picked up by an eager chain step")
    kept = state._pass_on(state.leases)
    _eager.pending = _Pending(position[0], position[1] + 1, state._handover(kept), state.rt, kept)
    state._handed_over = True
    return True


def _eager_take() -> Handover | None:
    pending: _Pending | None = getattr(_eager, "pending", None)
    if pending is None:
        return None
    position = _chain_position()
    if position is None or position[0] is not pending.frame or position[1] != pending.next_index:
        return None
    _eager.pending = None
    return pending.handover


def explicit_handover(options: dict[str, Any]) -> None:
    """Turn the ``hilok_handle`` option of ``apply_async`` / ``apply`` into the header."""
    handle = options.pop("hilok_handle", None)
    if handle is None:
        return
    check_handle(handle)
    headers = dict(options.get("headers") or {})
    headers[HEADER] = Handover(handle).encode()
    options["headers"] = headers
