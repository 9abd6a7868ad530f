"""Signals sent by the Celery integration.

``hilok_lease_lost``
    Sent (from the worker process's refresher thread) when a lease a running task holds
    could not be renewed: it ran out, e.g. because Redis was unreachable for longer than the
    ttl. Arguments: ``sender`` (the task), ``task_id``, ``lease`` (the lost
    :class:`~celery_hilok.Lease`) and ``locks`` (the task's ``self.hilok``). The task sees
    it as ``self.hilok.lost`` and can stop at its next step (``self.hilok.check()``).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["hilok_lease_lost"]

hilok_lease_lost = Signal(name="hilok_lease_lost", providing_args={"task_id", "lease", "locks"})
