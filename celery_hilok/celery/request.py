"""The worker's main-process side of a ``HiLokTask``: its handle, and releases after a crash.

Celery makes one :class:`HiLokRequest` per delivered message, in the worker's main process,
before the task runs in a pool process. It gives that execution a fresh holder handle (the
pool process acquires with it), so that when the pool process is killed (SIGKILL, OOM,
hard time limit) the main process knows exactly which holder to release: the task's lock
spec is evaluated again from the message's arguments, and only that holder's grants are
released (owner-checked, so a duplicate delivery running elsewhere keeps its locks).

The main process releases for a pool process only once that process is gone (a lost or
terminated process is reported after it exited) or its task has returned (then the pool
process itself released, or handed the locks on): a pool process that is still running
might still be running the body. So ``revoke(terminate=True)`` releases when billiard
reports the terminated process gone, and never for a signal the process survives (Celery's
graceful ``signal="SIGUSR1"``: the body gets ``SoftTimeLimitExceeded``, runs its cleanup
under its locks, and the pool process releases them when it returns). A hard time limit is
reported before the process is killed: its release waits for the process to exit.

The same releases give back a unique task's claim (``hilok_unique``, named in its message),
except when Celery sends the call again after losing its process (``task_retry_on_worker_lost``,
or ``acks_late`` with ``task_reject_on_worker_lost``): the call is queued again, and its
claim stays with it.

A task with its own ``Request`` class must derive it from :class:`HiLokRequest`.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.worker.request import Request
from kombu.asynchronous import get_event_loop

from .._core import new_handle
from ._events import EVENT_TYPE, EVENTS_FLAG, HANDLE_PREFIX, WORKER_KEY
from ._runtime import EXEC_HEADER, HEADER, Handover, runtime
from .park import PARK_KEY, parking
from .task import HiLokTask
from .unique import release_for_request

__all__ = ["HiLokRequest", "release_in_main_process", "when_gone"]

log = logging.getLogger("celery_hilok.celery")

# What a pool process that died mid-task reports to the main process (billiard reports
# these once the process exited; SystemExit / KeyboardInterrupt after the task returned).
_LOST = (WorkerLostError, SystemExit, KeyboardInterrupt)
RELEASED = "hilok_released"
GONE_TIMEOUT = 60.0
"""Seconds the main process waits for a pool process past its hard time limit to exit
before it gives up releasing for it (billiard kills it within a fraction of a second)."""


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
        # Where a release tells this worker of a grant to the task, should it park.
        try:
            self._request_dict[PARK_KEY] = parking(self.task.app).channel
        except Exception as exc:  # no lock client here: the park policy falls back to retry
            log.warning("%s: cannot park tasks in this worker: %s", self.task.name, exc)

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
                self._release_once_gone(
                    f"hard time limit ({timeout}s) exceeded", self._runs_again(timed_out=True)
                )

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
            if isinstance(exc, TimeLimitExceeded):
                # Reported before billiard kills the process (SIGTERM, then SIGKILL): the
                # body, or its finally blocks, may still run. Release once it exited.
                self._release_once_gone(
                    "worker process lost (TimeLimitExceeded)", self._runs_again(timed_out=True)
                )
            elif isinstance(exc, Terminated) and not self._completed_before_loss():
                # revoke(terminate=True) or a cancel: billiard reports the job Terminated
                # once the process it ran in exited.
                self._release("terminated (revoked); its process exited", keep_claim=False)
            elif isinstance(exc, _LOST) and not self._completed_before_loss():
                self._release(
                    f"worker process lost ({type(exc).__name__})",
                    keep_claim=self._runs_again(timed_out=False),
                )

    def _runs_again(self, *, timed_out: bool) -> bool:
        """Does Celery send this call again after its pool process died (a retry after a
        lost worker, or a requeue with ``acks_late``)? Then its unique claim stays: the
        call is still queued. Mirrors ``Request.on_failure``'s decision."""
        task = self.task
        exceeded = False
        if not timed_out and getattr(task, "retry_on_worker_lost", False):
            max_retries = task.max_retries
            retries = int(self._request_dict.get("retries") or 0)
            if max_retries is None or retries < max_retries:
                return True
            exceeded = True
        if not task.acks_late:
            return False
        if timed_out:
            acks = getattr(task, "acks_on_timeout", None)
            if acks is None:
                acks = getattr(task, "acks_on_failure_or_timeout", True)
            return not acks
        return bool(task.reject_on_worker_lost) and not exceeded

    def _release(self, why: str, *, keep_claim: bool) -> None:
        # Billiard reports a hard time limit twice (as a failure and as a timeout).
        if not self._request_dict.get(RELEASED):
            self._request_dict[RELEASED] = True
            self._release_now(why, keep_claim=keep_claim)

    def _release_now(self, why: str, *, keep_claim: bool) -> None:
        if not keep_claim:
            release_for_request(self.task, self, why)
        released = release_in_main_process(self.task, self, why)
        if released is not None:
            handle, locks = released
            held = [
                {"path": path, "mode": mode, "token": None, "handle": handle[:HANDLE_PREFIX]}
                for path, mode in locks
            ]
            self.send_event(EVENT_TYPE, hilok="released", hilok_locks=held, hilok_why=why)

    def _release_once_gone(self, why: str, keep_claim: bool) -> None:
        """Release (once) when the pool process that ran the task has exited."""
        if self._request_dict.get(RELEASED):
            return
        self._request_dict[RELEASED] = True
        pid = self.worker_pid
        if not isinstance(pid, int) or pid == os.getpid():
            # No pool process of its own (never started, or solo).
            self._release_now(why, keep_claim=keep_claim)
            return

        def release() -> None:
            if not self._completed_before_loss():
                self._release_now(why, keep_claim=keep_claim)

        when_gone(pid, release, f"{self.task.name}[{self.id}]")

    def _completed_before_loss(self) -> bool:
        """Did the task succeed (and so release or hand over its locks) before dying?"""
        stored = getattr(self, "_success_was_stored", None)
        if stored is None:
            return False
        try:
            return bool(stored())
        except Exception:
            return False


def when_gone(pid: int, then: Callable[[], None], what: str) -> None:
    """Call ``then`` once process ``pid`` (a pool process of this worker) has exited.

    Event driven where Linux gives a pidfd (readable once the process exited, zombie or
    reaped): in the worker's event loop when called from it, else in a thread. Elsewhere a
    thread polls for the pid. Gives up, with a warning, after :data:`GONE_TIMEOUT`: the
    locks then run out by their ttl once nobody refreshes them.
    """

    def run() -> None:
        try:
            then()
        except Exception:  # never into the worker's event loop
            log.exception("%s: releasing after process %d exited failed", what, pid)

    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        run()  # gone already
        return
    except (AttributeError, OSError):
        fd = None  # no pidfd here (not Linux, or Linux < 5.3)
    hub: Any = get_event_loop()  # kombu's Hub (untyped): the worker's event loop
    in_loop = hub is not None and getattr(hub, "_loop_thread", None) == threading.get_ident()
    if fd is not None and in_loop:

        def on_exit() -> None:
            hub.remove_reader(fd)
            os.close(fd)
            run()

        hub.add_reader(fd, on_exit)
        return

    def wait() -> None:
        if _wait_exit(pid, fd):
            run()
        else:
            log.warning(
                "%s: process %d did not exit within %ss; its locks are left to run out "
                "by their ttl",
                what,
                pid,
                GONE_TIMEOUT,
            )

    threading.Thread(target=wait, name="hilok-release-when-gone", daemon=True).start()


def _wait_exit(pid: int, fd: int | None) -> bool:
    if fd is not None:
        try:
            ready, _, _ = select.select([fd], [], [], GONE_TIMEOUT)
            return bool(ready)
        finally:
            os.close(fd)
    deadline = time.monotonic() + GONE_TIMEOUT
    delay = 0.01
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return True  # the pid belongs to another user's process now: ours is gone
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)  # no exit notification without a pidfd: poll, bounded
        delay = min(delay * 2, 0.2)


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
    if handover is not None and handover.locks and handle == handover.handle:
        rt.unmark_handed(handle)  # revoked in the queue: nobody will take them over
    if chain_over and handover is not None:
        rt.forget(handover.handle)
    return released
