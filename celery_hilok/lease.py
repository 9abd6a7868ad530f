"""What a caller holds (:class:`Lease`) and what ``status`` reports (:class:`LockStatus`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._core import Mode, NodeMarks, Request, Waiter, related
from .paths import LockPath, decode_canonical, parse_path

__all__ = ["Holder", "Lease", "LockStatus", "QueuedRequest"]


class Lease:
    """One granted lock: a holder (``handle``) holding ``mode`` on ``path``.

    ``token`` is the fencing token of the grant: a later conflicting grant always carries a
    larger one, so a store that refuses writes with a token older than the newest it has seen
    is safe even when a paused holder outlives its lease. ``lost`` becomes true when a
    background refresh finds the lease gone.

    ``granted_at`` is when this process saw the grant (``time.monotonic()``), ``waited`` the
    seconds its acquire took from start to grant and ``contended`` whether that acquire met
    a conflict; all three are None for a lease rebuilt by name (unpickled, or from a Celery
    message), whose grant happened elsewhere.

    A lease can be pickled and sent to another process, where ``HiLok.refresh`` and
    ``HiLok.release`` accept it (the handle is the holder's only credential: keep it secret).

    ``namespace`` is the key namespace of the client that granted it (kept when pickled): a
    client of another namespace refuses to release, refresh or keep it alive
    (:class:`InvalidArgument`), since there the grant does not exist. A lease built by name
    without a namespace (``namespace=None``) is accepted by any client.
    """

    __slots__ = (
        "_on_lost",
        "_owner",
        "_request",
        "contended",
        "granted_at",
        "handle",
        "lost",
        "namespace",
        "refresh_interval",
        "released",
        "renewed_at",
        "term",
        "token",
        "ttl",
        "waited",
    )

    def __init__(
        self,
        request: Request,
        handle: str,
        token: int,
        ttl: float,
        owner: _Client | None = None,
        namespace: str | None = None,
    ) -> None:
        self._request = request
        self.handle = handle
        self.token = token
        self.ttl = ttl
        self._owner = owner
        if namespace is None and owner is not None:
            namespace = owner.namespace
        self.namespace = namespace
        self.released = False
        self.lost = False
        self.refresh_interval: float | None = None
        # When the lease was last known to run for ``ttl`` more seconds (local monotonic
        # clock, measured before the call that granted or renewed it, so never late).
        self.renewed_at = time.monotonic()
        # How long from ``renewed_at`` it is known to last: its ttl, except for a lock a
        # release handed over and the holder took from the release's message (the short
        # hand-off lease, until the refresher first renews it).
        self.term = ttl
        self._on_lost: list[Callable[[Lease], Any]] = []
        # Set by the driver that made the grant (see the class docstring).
        self.granted_at: float | None = None
        self.waited: float | None = None
        self.contended: bool | None = None

    @property
    def path(self) -> str:
        """The normalised path, as users write it."""
        return self._request.path.text

    @property
    def mode(self) -> Mode:
        return self._request.mode

    @property
    def request(self) -> Request:
        return self._request

    def release(self) -> Any:
        """Release this lease, as ``hl.release(lease)`` does; idempotent.

        For a lease of a :class:`~celery_hilok.HiLok` it returns once released; for one of an
        :class:`~celery_hilok.AsyncHiLok` it returns the awaitable: ``await lease.release()``.
        A lease rebuilt by name (unpickled, or from a Celery message) has no client: use
        ``hl.release(lease)``.
        """
        if self._owner is None:
            raise TypeError(
                f"{self!r} was rebuilt by name and has no lock client: use hl.release(lease)"
            )
        return self._owner.release(self)

    async def release_async(self) -> None:
        """``await lease.release()`` for a lease of an :class:`~celery_hilok.AsyncHiLok`."""
        await self.release()

    def on_lost(self, callback: Callable[[Lease], Any]) -> None:
        """Call ``callback(lease)`` (from the refresher) if a background refresh finds it lost."""
        self._on_lost.append(callback)

    def __reduce__(self) -> tuple[Any, ...]:
        p = self._request.path
        args = (p.text, p.separator, self.mode, self.handle, self.token, self.ttl, self.namespace)
        return (_restore, args)

    def __repr__(self) -> str:
        state = " released" if self.released else " lost" if self.lost else ""
        return (
            f"<Lease {self.mode} {self.path!r} token={self.token} "
            f"handle={self.handle[:6]}...{state}>"
        )


class _Client(Protocol):
    """What a lease needs of the client that granted it (``HiLok`` or ``AsyncHiLok``)."""

    namespace: str

    def release(self, *leases: Lease) -> Any: ...


def _restore(
    path: str,
    separator: str,
    mode: Mode,
    handle: str,
    token: int,
    ttl: float,
    namespace: str | None = None,  # absent from leases pickled by 0.1.0 before it
) -> Lease:
    return Lease(Request(parse_path(path, separator), mode), handle, token, ttl, None, namespace)


@dataclass(frozen=True, slots=True)
class Holder:
    """A live grant seen by ``status``.

    ``relation`` says where it sits relative to the path asked about: ``"self"`` (on the path),
    ``"below"`` (on a descendant) or ``"above"`` (on an ancestor, so it covers the path).
    """

    handle: str
    mode: Mode
    path: str
    ttl: float
    relation: str


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting in the tree's queue (``ticket`` orders them, first come first)."""

    handle: str
    mode: Mode
    path: str
    ticket: int
    ttl: float


@dataclass(frozen=True, slots=True)
class LockStatus:
    """Who holds what on a path, under it and above it, and who waits for it."""

    path: str
    holders: list[Holder] = field(default_factory=list)
    waiters: list[QueuedRequest] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return bool(self.holders)

    @classmethod
    def build(cls, path: LockPath, nodes: list[NodeMarks], queue: list[Waiter]) -> LockStatus:
        sep = path.separator
        holders: dict[tuple[str, str, str], Holder] = {}

        def add(handle: str, mode: Mode, canonical: str, ttl: float, relation: str) -> None:
            text = decode_canonical(canonical, sep)
            holders.setdefault((handle, mode, canonical), Holder(handle, mode, text, ttl, relation))

        for node in nodes:
            own = node.path == path.canonical
            # grants on this node: reads, writes, and node-only reads (their mark is an IS)
            for mark in node.shared + node.exclusive + node.intent_shared:
                if mark.path == node.path:
                    add(
                        mark.handle,
                        mark.mode,
                        mark.path,
                        mark.remaining,
                        "self" if own else "above",
                    )
            if own:
                for mark in node.intent_shared + node.intent_exclusive:
                    if mark.path != node.path:
                        add(mark.handle, mark.mode, mark.path, mark.remaining, "below")
        waiters = [
            QueuedRequest(w.handle, w.mode, decode_canonical(w.path, sep), w.ticket, w.remaining)
            for w in queue
            if related(w.path, path.canonical)
        ]
        return cls(path.text, list(holders.values()), waiters)

    @classmethod
    def build_chain(
        cls, path: LockPath, nodes: list[NodeMarks], queue: list[Waiter]
    ) -> list[LockStatus]:
        """The status of every level of ``path``, root first, from one ``status`` reply.

        Entry ``i`` is exactly what :meth:`build` gives for the ancestor with ``i + 1``
        segments: the status script reports each chain node's marks, and the marks of an
        ancestor's own node already account for everything under it.
        """
        sep = path.separator
        return [
            cls.build(parse_path(sep.join(path.segments[: i + 1]), sep), nodes[: i + 1], queue)
            for i in range(path.depth)
        ]
