"""Exceptions raised by celery_hilok.

Every error is a :class:`HiLokError` (a :class:`RuntimeError`) except bad arguments, which
raise :class:`InvalidArgument`, a :class:`ValueError`.

Every error survives a trip through a Celery result backend with its attributes: its
``args`` are exactly the arguments of its constructor, which is how both pickle and
Celery's JSON results (``exc_type``, ``exc_module``, ``exc_message`` = the args) make it
again. ``str()`` of an error is its message alone.
"""

from __future__ import annotations

__all__ = [
    "DuplicateTask",
    "HiLokConnectionError",
    "HiLokError",
    "InvalidArgument",
    "LockLost",
    "LockNotAcquired",
    "LockNotReplicated",
]


class HiLokError(RuntimeError):
    """Base class of every runtime error of celery_hilok."""


class LockNotAcquired(HiLokError):
    """A lock could not be acquired: ``block=False`` met a conflict, or ``timeout`` ran out.

    ``path`` and ``mode`` name the request; ``blocker`` describes who was in the way (its
    mode, path, a short handle prefix and its remaining lease) when known.
    """

    def __init__(
        self, message: str = "", path: str = "", mode: str = "", blocker: str | None = None
    ) -> None:
        super().__init__(message, path, mode, blocker)
        self.path = path
        self.mode = mode
        self.blocker = blocker

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LockNotReplicated(LockNotAcquired):
    """A lock was granted, but fewer replicas than ``wait_replicas`` acknowledged the grant
    within ``wait_timeout`` (Redis ``WAIT``), so it was released again.

    ``replicas`` is how many were asked for, ``acknowledged`` how many answered in time.
    """

    def __init__(
        self,
        message: str = "",
        path: str = "",
        mode: str = "",
        replicas: int = 0,
        acknowledged: int = 0,
    ) -> None:
        super().__init__(message, path, mode)
        self.args = (message, path, mode, replicas, acknowledged)
        self.replicas = replicas
        self.acknowledged = acknowledged


class LockLost(HiLokError):
    """A lease is no longer held: it ran out, or was released elsewhere, before a refresh."""


class HiLokConnectionError(HiLokError):
    """Redis could not be reached or failed mid-operation; the message names the server."""


class DuplicateTask(HiLokError):
    """A unique task (``hilok_unique``) was published while an identical call is queued or
    running, and its ``hilok_unique_on_duplicate`` policy is ``"raise"``.

    ``task`` is the task's name, ``task_id`` the id of the call already queued or running
    (``task.AsyncResult(exc.task_id)`` follows it), ``ttl`` the seconds its claim has left
    before it expires on its own (None if unknown).
    """

    def __init__(
        self, message: str = "", task: str = "", task_id: str = "", ttl: float | None = None
    ) -> None:
        super().__init__(message, task, task_id, ttl)
        self.task = task
        self.task_id = task_id
        self.ttl = ttl

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(HiLokError, ValueError):
    """A bad argument: a malformed path, a non-positive ttl, a negative timeout, a bad mode."""
