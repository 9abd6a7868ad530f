"""The worker's main-process side of a ``HiLokTask``: its handle, and releases after a crash.

Celery makes one :class:`HiLokRequest` per delivered message, in the worker's main process,
before the task runs in a pool process. It gives that execution a fresh holder handle (the
pool process acquires with it), so that when the pool process is killed (SIGKILL, OOM,
hard time limit) the main process knows exactly which holder to release: the task's lock
spec is evaluated again from the message's arguments, and only that holder's grants are
released (owner-checked, so a duplicate delivery running elsewhere keeps its locks).

A task with its own ``Request`` class must derive it from :class:`HiLokRequest`.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.worker.request import Request

from .._core import new_handle
from ._events import EVENT_TYPE, EVENTS_FLAG, HANDLE_PREFIX, WORKER_KEY
from ._runtime import EXEC_HEADER, HEADER, Handover, runtime
from .task import HiLokTask

__all__ = ["HiLokRequest", "release_in_main_process"]

log = logging.getLogger("celery_hilok.celery")

# What a pool process that died mid-task reports to the main process. (A terminated task,
# revoke(terminate=True), is released by the task_revoked receiver instead.)
_LOST = (WorkerLostError, TimeLimitExceeded, SystemExit, KeyboardInterrupt)
RELEASED = "hilok_released"


class HiLokRequest(Request):  # type: ignore[misc]
    """A worker request that gives its execution a handle and cleans up after a crash."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Always a new one: a retried or redelivered message may carry an old one along.
        self._request_dict[EXEC_HEADER] = new_handle()
        # Tell the process that runs the task whether to send task-hilok events.
        self._request_dict[EVENTS_FLAG] = self._sends_task_events()
        # The worker's node name (the threads pool's request.hostname is the machine's).
        self._request_dict[WORKER_KEY] = self._hostname

    def _sends_task_events(self) -> bool:
        """Does the worker send task events now (``-E``, or enabled by a control command)?"""
        eventer = self._eventer
        if not (eventer and eventer.enabled and self.task.send_events):
            return False
        groups = getattr(eventer, "groups", None)
        return not groups or "task" in groups

    def on_timeout(self, soft: bool, timeout: float) -> None:
        try:
            super().on_timeout(soft, timeout)
        finally:
            if not soft:
                self._release(f"hard time limit ({timeout}s) exceeded")

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # unwrap billiard's ExceptionWithTraceback
        try:
            return super().on_failure(
                exc_info, send_failed_event=send_failed_event, return_ok=return_ok
            )
        finally:
            if isinstance(exc, _LOST) and not self._completed_before_loss():
                self._release(f"worker process lost ({type(exc).__name__})")

    def _release(self, why: str) -> None:
        # Billiard reports a hard time limit twice (as a failure and as a timeout).
        if not self._request_dict.get(RELEASED):
            self._request_dict[RELEASED] = True
            released = release_in_main_process(self.task, self, why)
            if released is not None:
                handle, locks = released
                held = [
                    {"path": path, "mode": mode, "token": None, "handle": handle[:HANDLE_PREFIX]}
                    for path, mode in locks
                ]
                self.send_event(EVENT_TYPE, hilok="released", hilok_locks=held, hilok_why=why)

    def _completed_before_loss(self) -> bool:
        """Did the task succeed (and so release or hand over its locks) before dying?"""
        stored = getattr(self, "_success_was_stored", None)
        if stored is None:
            return False
        try:
            return bool(stored())
        except Exception:
            return False


def release_in_main_process(
    task: Any, request: Any, why: str
) -> tuple[str, list[tuple[str, str]]] | None:
    """Release what one execution of ``task`` may hold; quietly.

    ``request`` is the worker's :class:`Request` or its ``Context`` (as ``task_revoked``
    gives it). Released are the task's lock spec and the locks handed to it, held by its
    handle: the handed-over one, else the fresh one its :class:`HiLokRequest` made.
    Returns that handle and the (path, mode) pairs released, if any.
    """

    def value(key: str) -> Any:
        data = getattr(request, "request_dict", None)
        if isinstance(data, dict):
            return data.get(key)
        return getattr(request, key, None)

    handover = Handover.decode(value(HEADER))
    execution = value(EXEC_HEADER)
    try:
        rt = runtime(task.app)
    except Exception as exc:
        log.warning("%s[%s]: cannot release its locks: %s", task.name, value("id"), exc)
        return None
    own: list[tuple[str, str]] = []
    if isinstance(task, HiLokTask):
        try:
            own = list(task.hilok_locks(value("args"), value("kwargs")))
        except Exception as exc:
            log.warning("%s[%s]: cannot compute its locks: %s", task.name, value("id"), exc)
    handle, locks, chain_over = execution, own, False
    if handover is not None:
        handed = [(path, mode) for path, mode, _ in handover.locks]
        ran_as_duplicate = False
        if handover.claim:
            claim = rt.claim_of(handover.handle, str(value("id")))
            ran_as_duplicate = claim is not None and claim not in ("free", f"taken:{execution}")
        if ran_as_duplicate:  # it acquired the handed locks as a holder of its own
            locks = own + handed
        else:
            handle, locks, chain_over = handover.handle, handed + own, handover.claim
    released = None
    if isinstance(handle, str) and locks:
        rt.release_named(handle, locks, f"{task.name}[{value('id')}]: {why}")
        released = (handle, locks)
    if chain_over and handover is not None:
        rt.forget(handover.handle)
    return released
