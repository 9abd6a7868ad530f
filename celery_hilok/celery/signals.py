"""Signals sent by the Celery integration, in the worker process that runs the task.

They are always sent: a Celery signal with no receiver costs a dictionary look-up. Every
one has ``sender`` (the task), ``task_id`` and ``locks`` (the task's ``self.hilok``).

``hilok_lock_acquired``
    The task's own locks were granted, before its body runs. ``leases`` (the new
    :class:`~celery_hilok.Lease` objects), ``wait`` (seconds the acquire took, from its
    start to the grant) and ``contended`` (it met a conflict and waited, ``"wait"`` policy).

``hilok_lock_refused``
    The task's locks were taken by someone else. ``error`` (the
    :class:`~celery_hilok.LockNotAcquired`, whose ``path``, ``mode`` and ``blocker`` say
    what blocked it) and ``action``: what the task does about it: ``"retry"`` (with
    ``countdown``, the delay in seconds; also a ``"wait"`` task blocked by locks in a chain's
    hand-over), ``"skip"``, or ``"fail"`` (the ``"fail"`` policy, a ``"wait"`` that timed
    out, or a ``"retry"`` out of ``hilok_max_retries``).

``hilok_lock_released``
    The task gave up locks: ``leases``, ``why`` (the task's final state, e.g. ``"SUCCESS"``,
    or ``"retry"``) and ``hold`` (seconds since the grant of the longest held of them
    that this process granted; None if none was).

``hilok_lease_lost``
    Sent (from the worker process's refresher thread) when a lease a running task holds
    could not be renewed: it ran out, e.g. because Redis was unreachable for longer than the
    ttl, or someone released it with ``celery hilok release``. Arguments: ``sender`` (the
    task), ``task_id``, ``lease`` (the lost :class:`~celery_hilok.Lease`), ``why`` (e.g.
    "its lease ran out before it was refreshed", or "released by force from the command
    line (...)") and ``locks`` (the task's ``self.hilok``). The task sees
    it as ``self.hilok.lost`` and can stop at its next step (``self.hilok.check()``).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["hilok_lease_lost", "hilok_lock_acquired", "hilok_lock_refused", "hilok_lock_released"]

hilok_lease_lost = Signal(
    name="hilok_lease_lost", providing_args={"task_id", "lease", "why", "locks"}
)
hilok_lock_acquired = Signal(
    name="hilok_lock_acquired",
    providing_args={"task_id", "leases", "wait", "contended", "locks"},
)
hilok_lock_refused = Signal(
    name="hilok_lock_refused",
    providing_args={"task_id", "error", "action", "countdown", "locks"},
)
hilok_lock_released = Signal(
    name="hilok_lock_released", providing_args={"task_id", "leases", "why", "hold", "locks"}
)
