"""Receivers of Celery's signals: the hand-over of handles and the ways out of a task.

Connected once, when :mod:`celery_hilok.celery` is imported. Where each one runs:

- ``before_task_publish`` (the publishing process: the caller, or the pool process of the
  task whose chain step or retry is being sent): turns ``hilok_handle=h`` into the message
  header, hands a keeping task's locks to the next step of its chain, and gives a
  retrying task's handed-over locks to its retry.
- ``task_prerun`` / ``task_postrun`` (the process that runs the task): a task that is not
  a ``HiLokTask`` but was handed locks (a chain step) adopts them, and every task that
  holds locks gives them up on its way out (success, failure, retry, Reject, Ignore,
  a terminated or timed-out pool process that still runs its postrun), and gives back
  the claim of a unique task unless the call goes on (a retry, a requeued Reject).
- ``task_revoked`` (the worker's main process): releases the locks handed to a chain
  step that was revoked while it waited in the queue, and a unique task's claim. A task
  terminated while it runs is not released here (its pool process may still be running
  the body): its :class:`~celery_hilok.celery.HiLokRequest` releases once the process is
  gone, and a process that survives the signal releases when the task returns.
- ``worker_process_init`` / ``worker_process_shutdown`` (each prefork pool process): makes
  the process's lock client after fork, and closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import signals
from celery._state import get_current_app, get_current_task

from ._runtime import ATTEMPT_HEADER, HEADER, Handover, close_runtimes, runtime
from .locks import STATE_ATTR, begin, locks_of
from .park import parking, stop_parking
from .request import release_in_main_process
from .task import HiLokTask, keeps
from .unique import release_after_run, release_for_request

log = logging.getLogger("celery_hilok.celery")


def on_before_publish(
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    if headers is None:
        return
    if properties and "hilok_handle" in properties:
        # sig.set(hilok_handle=h) on a task that is not a HiLokTask reaches here as a
        # message property: make it the header every task reads.
        headers[HEADER] = Handover(str(properties.pop("hilok_handle"))).encode()
    task = get_current_task()
    if task is None:
        return
    request = task.request
    state = locks_of(request)
    if state is None:
        return
    message_id = headers.get("id")
    if message_id is not None and message_id == request.id:
        # The running task is being retried (self.retry, or a contention retry).
        if not _is_contention_retry(headers, request):
            headers.pop(ATTEMPT_HEADER, None)
        state.hand_to_retry(headers)
        return
    if headers.get("parent_id") != request.id or not keeps(task):
        return
    step = state.next_step
    if step is None:
        return
    step_id, step_name = step
    if (step_id is not None and step_id == message_id) or (
        step_id is None and step_name == headers.get("task")
    ):
        state.hand_to_next(headers)


def _is_contention_retry(headers: dict[str, Any], request: Any) -> bool:
    before = (request.headers or {}).get(ATTEMPT_HEADER) or 0
    return bool(headers.get(ATTEMPT_HEADER, 0) != before)


def on_prerun(task: Any = None, **_: Any) -> None:
    if task is None or isinstance(task, HiLokTask):
        return  # a HiLokTask does this in before_start, where it may still refuse to run
    request = task.request
    if Handover.of_request(request) is None and not getattr(request, "is_eager", False):
        return
    try:
        state = begin(task, request)
    except Exception as exc:
        log.error("%s[%s]: could not take over its handed locks: %s", task.name, request.id, exc)
        return
    if state.handle is None:
        delattr(request, STATE_ATTR)  # eager, nothing handed over: nothing to track


def on_postrun(task: Any = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    if task is None:
        return
    held = locks_of(task.request)
    if held is not None:
        held.finish(state, keep=keeps(task))
    release_after_run(task, task.request, state, retval)


def on_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    if request is None or sender is None or terminated:
        # Terminated while it runs: the signal was just sent, and the pool process may still
        # run the body (SIGTERM runs its finally blocks; SIGUSR1, Celery's graceful cancel,
        # is a SoftTimeLimitExceeded the body may catch and clean up after). A HiLokTask's
        # HiLokRequest releases once billiard reports the process gone; a process that
        # survives the signal releases itself when the task returns (task_postrun).
        return
    # Revoked (or expired) before it ran: nobody runs under what was handed to it, and the
    # call is over; release both now.
    if Handover.of_request(request) is not None:
        release_in_main_process(sender, request, "revoked before it ran")
    release_for_request(sender, request, "revoked before it ran")


def _start(app: Any, start: Callable[[Any], object], failed: str) -> None:
    """``start(app)`` if the app has a ``HiLokTask``; a failure is logged (``failed``)."""
    try:
        if any(isinstance(t, HiLokTask) for t in app.tasks.values()):
            start(app)
    except Exception as exc:
        log.warning("celery_hilok: %s: %s", failed, exc)


def on_process_init(**_: Any) -> None:
    _start(get_current_app(), runtime, "no lock client in this worker process yet")


def on_process_shutdown(**_: Any) -> None:
    close_runtimes()


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Start the worker's parking (main process), which sends parked tasks again when their
    locks are granted: at once, so that tasks parked while no worker ran are sent."""
    app = getattr(sender, "app", None) or get_current_app()
    _start(app, parking, "parked tasks are not sent from this worker")


def on_worker_shutdown(**_: Any) -> None:
    stop_parking()


def connect() -> None:
    """Connect the receivers (idempotent: each has a dispatch_uid)."""
    pairs = [
        (signals.before_task_publish, on_before_publish),
        (signals.task_prerun, on_prerun),
        (signals.task_postrun, on_postrun),
        (signals.task_revoked, on_revoked),
        (signals.worker_process_init, on_process_init),
        (signals.worker_process_shutdown, on_process_shutdown),
        (signals.worker_ready, on_worker_ready),
        (signals.worker_shutdown, on_worker_shutdown),
    ]
    for sig, receiver in pairs:
        sig.connect(receiver, weak=False, dispatch_uid=f"celery_hilok.{receiver.__name__}")
