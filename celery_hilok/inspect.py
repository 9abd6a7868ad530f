"""Read the whole lock state of a namespace: every live grant and queued request.

Used by the ``celery hilok`` command. This walks the namespace with ``SCAN``, so it is an
administration tool, not something to call on a hot path (use ``HiLok.status`` there).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from ._core import MODE_CODES, Request, make_member, parse_member, related
from ._parked import parked_records
from .lease import Lease
from .paths import decode_canonical, parse_path
from .sync import HiLok

__all__ = [
    "RELEASE_NOTE_TTL",
    "Grant",
    "QueuedGrant",
    "ReleaseNote",
    "Snapshot",
    "TaskInfo",
    "leases_of",
    "note_release",
    "release_note",
    "release_note_key",
    "snapshot",
    "tasks_by_handle",
]

RELEASE_NOTE_TTL: Final = 300.0
"""Seconds a release note lives: far longer than a lease takes to be found lost by its
holder's refresher (a third of its ttl), short enough to leave nothing behind for long."""

# Mark-set suffixes that hold a grant's *own* mark (an "is" member is a grant of its own node
# only for node-only reads; every other "is"/"ix" member is an intention mark from below).
_OWN_SUFFIXES = (":s", ":x", ":is")


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """The Celery task a handle holds (or waits) for, as its worker process publishes it."""

    task_id: str
    task: str
    worker: str
    pid: int
    parked: bool = False  # a parked task (the park policy): no process runs it yet


@dataclass(frozen=True, slots=True)
class Grant:
    """A live grant: its holder, mode, path, remaining lease (seconds) and fencing token."""

    handle: str
    mode: str
    path: str
    ttl: float
    token: int | None = None
    task: TaskInfo | None = None


@dataclass(frozen=True, slots=True)
class QueuedGrant:
    """A request waiting in its tree's queue; lower tickets are served first."""

    handle: str
    mode: str
    path: str
    ticket: int
    ttl: float
    task: TaskInfo | None = None


@dataclass(slots=True)
class Snapshot:
    """Every live grant and queued request of a namespace (or of one path's line)."""

    namespace: str
    grants: list[Grant] = field(default_factory=list)
    waiters: list[QueuedGrant] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "grants": [asdict(g) for g in self.grants],
            "waiters": [asdict(w) for w in self.waiters],
        }


def snapshot(hl: HiLok, path: str | None = None) -> Snapshot:
    """Everything held and queued in ``hl``'s namespace, or on the line of ``path``.

    With ``path``, only grants and requests on one line with it (on it, above or below)
    are returned.
    """
    client = hl.redis
    sep = hl.separator
    prefix = f"{hl.namespace}:{{"
    focus = parse_path(path, sep).canonical if path is not None else None
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    mark_keys: list[tuple[str, str]] = []  # (key, canonical path of its node)
    queue_keys: list[tuple[str, str]] = []  # (q key, qx key)
    for raw in client.scan_iter(match=f"{prefix}*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        close = key.find("}:", len(prefix))
        if close < 0:
            continue
        rest = key[close + 2 :]
        if rest == ":q":
            queue_keys.append((key, key + "x"))
        elif not rest.startswith(":") and rest.endswith(_OWN_SUFFIXES):
            mark_keys.append((key, rest.rsplit(":", 1)[0]))
    snap = Snapshot(hl.namespace)
    grants: list[tuple[str, str, str, float, str]] = []  # handle, mode, canonical, ttl, hkey
    with client.pipeline(transaction=False) as pipe:
        for key, _ in mark_keys:
            pipe.zrangebyscore(key, f"({now_ms}", "+inf", withscores=True)
        replies = pipe.execute()
    for (key, node), members in zip(mark_keys, replies, strict=True):
        tree_prefix = key[: key.find("}:") + 2]
        for member, score in members:
            handle, grant_mode, canonical = parse_member(member)
            if canonical != node or (key.endswith(":is") and grant_mode != "read-node"):
                continue
            if focus is not None and not related(canonical, focus):
                continue
            grants.append((handle, grant_mode, canonical, (score - now_ms) / 1000, tree_prefix))
    # a grant's entry (member -> token|...) is in its holder's hash in the tree, or (a grant a
    # release handed over, not yet renewed) in the tree's table
    with client.pipeline(transaction=False) as pipe:
        for handle, mode, canonical, _, tree_prefix in grants:
            member = make_member(handle, MODE_CODES[mode], canonical)
            pipe.hget(f"{tree_prefix}:hl:{handle}", member)
            pipe.hget(f"{tree_prefix}:h", member)
        entries = pipe.execute()
    for i, (handle, mode, canonical, ttl, _) in enumerate(grants):
        token = entries[2 * i] or entries[2 * i + 1]
        text = decode_canonical(canonical, sep)
        snap.grants.append(Grant(handle, mode, text, round(ttl, 3), _int(token)))
    for q, qx in queue_keys:
        tickets: Any = client.zrange(q, 0, -1, withscores=True)
        for member, ticket in tickets:
            expiry = client.zscore(qx, member)
            if expiry is None or expiry <= now_ms:
                continue
            handle, wait_mode, canonical = parse_member(member)
            if focus is not None and not related(canonical, focus):
                continue
            text = decode_canonical(canonical, sep)
            ttl = round((expiry - now_ms) / 1000, 3)
            snap.waiters.append(QueuedGrant(handle, wait_mode, text, int(ticket), ttl))
    tasks = tasks_by_handle(hl) if snap.grants or snap.waiters else {}
    if tasks:
        snap.grants = [replace(g, task=tasks.get(g.handle)) for g in snap.grants]
        snap.waiters = [replace(w, task=tasks.get(w.handle)) for w in snap.waiters]
    snap.grants.sort(key=lambda g: (parse_path(g.path, sep).segments, g.mode, g.handle))
    snap.waiters.sort(key=lambda w: (w.ticket, w.path))
    return snap


def tasks_by_handle(hl: HiLok) -> dict[str, TaskInfo]:
    """The Celery task of each handle, from the directories worker processes publish
    (``<namespace>:celery:holders:<worker>:<pid>``, see ``celery_hilok.celery``) and the
    records of parked tasks (``<namespace>:celery:parked:<handle>``)."""
    client = hl.redis
    keys = list(client.scan_iter(match=f"{hl.namespace}:celery:holders:*", count=1000))
    documents: list[Any] = []
    if keys:
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            documents = pipe.execute()
    found: dict[str, TaskInfo] = {}
    for raw in documents:
        try:
            doc = json.loads(raw) if raw else None
            if not isinstance(doc, dict):
                continue
            for entry in doc.get("holders") or ():
                found[str(entry["handle"])] = TaskInfo(
                    str(entry["task_id"]), str(entry["task"]), str(doc["worker"]), int(doc["pid"])
                )
        except (ValueError, KeyError, TypeError):  # not ours, or from another version
            continue
    for parked in parked_records(hl):  # no process runs under a parked task's handle
        found[parked.handle] = TaskInfo(parked.task_id, parked.task, parked.worker, 0, parked=True)
    return found


@dataclass(frozen=True, slots=True)
class ReleaseNote:
    """Who released a holder's grants from outside it (``celery hilok release``), so that
    the holder, finding its lease gone, can say why instead of "it ran out"."""

    how: str  # "force" (release --force) or "handle" (release --handle)
    by: str  # user@host (pid) of the command
    at: float  # Unix time of the release
    paths: tuple[str, ...]

    def describe(self) -> str:
        what = "released by force" if self.how == "force" else "released"
        command = f"celery hilok release --{self.how}"
        ago = max(0.0, time.time() - self.at)
        return f"{what} from the command line ({command} by {self.by}, {ago:.0f}s ago)"


def release_note_key(namespace: str, handle: str) -> str:
    """Key of the release note of ``handle``: ``<namespace>:released:<handle>``."""
    return f"{namespace}:released:{handle}"


def note_release(hl: HiLok, handle: str, paths: Iterable[str], how: str) -> None:
    """Leave a note (one ``SET`` with a ttl of :data:`RELEASE_NOTE_TTL`) that ``handle``'s
    grants on ``paths`` are being released from outside, before releasing them."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    document = {
        "how": how,
        "by": f"{user}@{socket.gethostname()} (pid {os.getpid()})",
        "at": time.time(),
        "paths": sorted(set(paths)),
    }
    hl.redis.set(
        release_note_key(hl.namespace, handle), json.dumps(document), ex=int(RELEASE_NOTE_TTL)
    )


def release_note(hl: HiLok, handle: str) -> ReleaseNote | None:
    """The note left by :func:`note_release` for ``handle``, if one is still there."""
    raw = hl.redis.get(release_note_key(hl.namespace, handle))
    if not raw:
        return None
    try:
        doc = json.loads(raw)
        return ReleaseNote(
            str(doc["how"]), str(doc["by"]), float(doc["at"]), tuple(map(str, doc["paths"]))
        )
    except (ValueError, KeyError, TypeError):  # not ours, or from another version
        return None


def leases_of(hl: HiLok, grants: list[Grant]) -> Iterator[Lease]:
    """Leases standing for ``grants`` (to release them by their holders' handles)."""
    for grant in grants:
        request = Request(parse_path(grant.path, hl.separator), grant.mode)  # type: ignore[arg-type]
        yield Lease(request, grant.handle, grant.token or 0, hl.ttl, hl)


def _int(value: object) -> int | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    return int(text.split("|", 1)[0])  # holder entries are "<token>|<expiry ms>"
