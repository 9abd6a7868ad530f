"""Celery integration: :class:`HiLokTask`, a task base that runs its body under locks.

Importing this package connects the signal receivers that hand handles between chain
steps and release locks on every way out of a task. ``import celery_hilok`` alone does
not import it (nor Celery); using one of the names it gives the root package
(``from celery_hilok import HiLokTask``) does. See docs/celery.md for the guide.
"""

from __future__ import annotations

from . import _hooks
from .locks import TaskLocks
from .request import HiLokRequest
from .signals import hilok_lease_lost, hilok_lock_acquired, hilok_lock_refused, hilok_lock_released
from .task import HiLokTask

__all__ = [
    "HiLokRequest",
    "HiLokTask",
    "TaskLocks",
    "hilok_lease_lost",
    "hilok_lock_acquired",
    "hilok_lock_refused",
    "hilok_lock_released",
]

_hooks.connect()
