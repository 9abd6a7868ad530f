"""The Redis side of parked tasks: key names, the record, the listing.

A task parked by the ``park`` contention policy (see ``celery_hilok.celery.park``) leaves a
record that any worker can send it again from. This module knows only keys and records,
neither Celery nor kombu, so that the ``celery hilok`` command can name parked tasks
without them. Keys, under namespace ``ns``::

    ns:celery:parked                  sorted set: parked handles, by when they parked
    ns:celery:parked:<handle>         string: the record (JSON of :class:`Parked`)
    ns:celery:parked-taken:<handle>   string: who is sending it (for a while)
    ns:celery:parked-scan             string: which worker scans the records now
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ._core import Mode, check_mode
from .errors import HiLokError

__all__ = ["Parked", "index_key", "parked_records", "record_key", "scan_key", "taken_key"]


def index_key(namespace: str) -> str:
    return f"{namespace}:celery:parked"


def record_key(namespace: str, handle: str) -> str:
    return f"{namespace}:celery:parked:{handle}"


def taken_key(namespace: str, handle: str) -> str:
    return f"{namespace}:celery:parked-taken:{handle}"


def scan_key(namespace: str) -> str:
    return f"{namespace}:celery:parked-scan"


@dataclass(frozen=True, slots=True)
class Parked:
    """A parked task: what it waits for and the message to send again."""

    handle: str
    task_id: str
    task: str
    locks: list[tuple[str, Mode]]
    keep_ttl: float  # lease of the grant while the resent message waits in the queue
    deadline: float | None  # Unix time its hilok_timeout ends (None: waits as long as it takes)
    parked_at: float  # Unix time
    worker: str
    content_type: str
    encoding: str
    body: str  # base64 of the serialized [args, kwargs, options]

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: object) -> Parked | None:
        if not isinstance(raw, (str, bytes)):
            return None
        try:
            data = json.loads(raw)
            data["locks"] = [(str(p), check_mode(m)) for p, m in data["locks"]]
            return cls(**data)
        except (ValueError, KeyError, TypeError, HiLokError):
            return None  # not ours, or from another version


def parked_records(hl: Any) -> Iterator[Parked]:
    """Every parked record of ``hl``'s namespace (a ``HiLok``); index entries whose record
    is gone are dropped on the way."""
    ns, client = hl.namespace, hl.redis
    handles = [_text(h) for h in client.zrange(index_key(ns), 0, -1)]
    gone: list[str] = []
    for start in range(0, len(handles), 500):
        chunk = handles[start : start + 500]
        with client.pipeline(transaction=False) as pipe:  # not MGET: keys of many slots
            for handle in chunk:
                pipe.get(record_key(ns, handle))
            raws = pipe.execute()
        for handle, raw in zip(chunk, raws, strict=True):
            parked = Parked.decode(raw)
            if parked is None:
                gone.append(handle)
            else:
                yield parked
    if gone:
        client.zrem(index_key(ns), *gone)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
