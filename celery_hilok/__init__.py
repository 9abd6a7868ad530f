"""celery_hilok: hierarchical, distributed read-write locks on Redis, built into Celery.

The Celery integration (:class:`HiLokTask`, :class:`TaskLocks`, :data:`hilok_lease_lost`)
is imported on first use of one of its names, so that ``import celery_hilok`` does not
import Celery; ``from celery_hilok import HiLokTask`` imports :mod:`celery_hilok.celery`,
which connects its signal receivers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._engine import AcquireOptions
from ._version import __version__
from .aio import AsyncHiLok
from .errors import (
    DuplicateTask,
    HiLokConnectionError,
    HiLokError,
    InvalidArgument,
    LockLost,
    LockNotAcquired,
    LockNotReplicated,
)
from .lease import Holder, Lease, LockStatus, QueuedRequest
from .seed import RedisHiLok, RedisHiLokError, RedisHiLokStatus
from .sync import HiLok

if TYPE_CHECKING:
    from .celery import HiLokTask, TaskLocks, hilok_lease_lost


__all__ = [
    "AcquireOptions",
    "AsyncHiLok",
    "DuplicateTask",
    "HiLok",
    "HiLokConnectionError",
    "HiLokError",
    "HiLokTask",
    "Holder",
    "InvalidArgument",
    "Lease",
    "LockLost",
    "LockNotAcquired",
    "LockNotReplicated",
    "LockStatus",
    "QueuedRequest",
    "RedisHiLok",
    "RedisHiLokError",
    "RedisHiLokStatus",
    "TaskLocks",
    "__version__",
    "hilok_lease_lost",
]

_LAZY = {name: ".celery" for name in ("HiLokTask", "TaskLocks", "hilok_lease_lost")}
"""Names importable from here whose module is imported on first use (it imports Celery)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups no longer come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
