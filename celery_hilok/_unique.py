"""The Redis side of unique tasks: claim names, the claim and release scripts, the listing.

A unique task (``HiLokTask`` with ``hilok_unique``) claims one key per call when it is
published, and gives it back when the call is over (see ``celery_hilok.celery.unique``).
This module knows only keys and scripts, neither Celery nor kombu, so that the ``celery
hilok`` command can list and release claims without them.

Key of a claim, under namespace ``ns``::

    ns:celery:unique:<task>:<digest>    string: the task id of the queued-or-running call

``<task>`` is the task's name percent-encoded (every character but letters, digits and
``_ . - ~``), for people and for ``SCAN``; ``<digest>`` is the SHA-256 (hex) of the call's
canonical JSON, which includes the task name again: the digest alone tells calls apart, so
no argument value can make two calls share a key or reach into another key. Key names are
built here and reach Redis as ``KEYS``; the scripts never build one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote

from redis.exceptions import NoScriptError

__all__ = [
    "UNIQUE_PREFIX",
    "UniqueClaim",
    "claim",
    "claim_name",
    "claims",
    "release",
    "unique_key",
]

UNIQUE_PREFIX: Final = "celery:unique:"
"""Key of a claim, after the namespace and ``:``: the prefix, then its :func:`claim_name`."""

_NAME_RE: Final = re.compile(r"([A-Za-z0-9%._~-]+):([0-9a-f]{64})")

# Claim KEYS[1] for task id ARGV[1] for ARGV[2] ms, unless a call holds it already. A claim
# held by that same id is renewed when ARGV[3] is "1" (the call's own retry is being sent).
# Reply: false (nil) when the caller now holds the claim, else {holder's task id, ms left}.
_CLAIM: Final = """
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
if held == ARGV[1] and ARGV[3] == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return false
end
return {held, redis.call('PTTL', KEYS[1])}
"""

# Delete KEYS[1] if task id ARGV[1] holds it (never somebody else's claim). Reply: 1 or 0.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_SHAS: Final = {source: hashlib.sha1(source.encode()).hexdigest() for source in (_CLAIM, _RELEASE)}


def claim_name(task: str, digest: str) -> str:
    """The part of a claim's key after the prefix: ``<encoded task name>:<digest>``."""
    return f"{quote(task, safe='')}:{digest}"


def parse_claim_name(name: object) -> tuple[str, str] | None:
    """(task name, digest) of a claim name, or None if ``name`` is not one (a message
    header from elsewhere: a worker never releases a key it did not name itself)."""
    if not isinstance(name, str):
        return None
    match = _NAME_RE.fullmatch(name)
    if match is None:
        return None
    return unquote(match.group(1)), match.group(2)


def unique_key(namespace: str, name: str) -> str:
    """The Redis key of claim ``name`` in ``namespace``."""
    return f"{namespace}:{UNIQUE_PREFIX}{name}"


def _script(client: Any, source: str, key: str, *args: object) -> Any:
    try:
        return client.evalsha(_SHAS[source], 1, key, *args)
    except NoScriptError:  # by source, as the engine does: no SCRIPT LOAD in the ACL
        return client.eval(source, 1, key, *args)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def claim(
    client: Any, key: str, task_id: str, ttl: float, *, renew: bool = False
) -> tuple[str, float | None] | None:
    """Claim ``key`` for ``task_id`` for ``ttl`` seconds, in one round trip.

    ``renew``: a claim ``task_id`` holds already is renewed (the call's retry); otherwise it
    counts as held. Returns None when ``task_id`` now holds the claim, else the holder's
    task id and the seconds its claim has left (None if it has no expiry). Raises redis-py
    errors as they come.
    """
    ms = max(1, int(ttl * 1000))
    reply = _script(client, _CLAIM, key, task_id, ms, "1" if renew else "0")
    if not reply:
        return None
    holder, left = reply
    left_ms = int(left)
    return _text(holder), (left_ms / 1000 if left_ms >= 0 else None)


def release(client: Any, key: str, task_id: str) -> bool:
    """Delete ``key`` if ``task_id`` holds it; True if it did. Raises redis-py errors."""
    return bool(_script(client, _RELEASE, key, task_id))


@dataclass(frozen=True, slots=True)
class UniqueClaim:
    """One claim of a unique task: its ``task`` name, the ``task_id`` of the call holding
    it, ``ttl`` (seconds left; None without expiry), its ``digest`` and Redis ``key``."""

    task: str
    task_id: str
    ttl: float | None
    digest: str
    key: str


def claims(client: Any, namespace: str, task: str | None = None) -> list[UniqueClaim]:
    """Every claim of unique tasks in ``namespace`` (of one ``task`` name, if given), by
    task name then task id. Walks the namespace with ``SCAN``, like ``celery hilok tree``."""
    prefix = unique_key(namespace, "")
    pattern = prefix + (_glob_escape(quote(task, safe="")) + ":*" if task else "*")
    keys = sorted({_text(k) for k in client.scan_iter(match=pattern, count=1000)})
    if not keys:
        return []
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies: Sequence[Any] = pipe.execute()
    found: list[UniqueClaim] = []
    for i, key in enumerate(keys):
        holder, left = replies[2 * i], replies[2 * i + 1]
        parsed = parse_claim_name(key[len(prefix) :])
        if holder is None or parsed is None:
            continue  # released meanwhile, or not a claim
        left_ms = int(left)
        ttl = left_ms / 1000 if left_ms >= 0 else None
        found.append(UniqueClaim(parsed[0], _text(holder), ttl, parsed[1], key))
    found.sort(key=lambda c: (c.task, c.task_id))
    return found


def _glob_escape(text: str) -> str:
    # A percent-encoded name has no glob characters but the ones quote() keeps: none of
    # ``* ? [ ] \\``; escape anyway, so the pattern never matches more than the name.
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
