"""celery_hilok: hierarchical, distributed read-write locks on Redis, built into Celery."""

from __future__ import annotations

from .aio import AsyncHiLok
from .celery import HiLokTask, TaskLocks, hilok_lease_lost
from .errors import (
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

__version__ = "0.1.0"

__all__ = [
    "AsyncHiLok",
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
