"""A store that refuses writes from stale lock holders, using fencing tokens.

A lease can outlive its holder's belief in it: a process paused (GC, swap, SIGSTOP) past its
ttl wakes up still "holding" a lock that somebody else now holds. No lock service can stop
that process from trying to write; the resource it writes to can. Every grant of
celery_hilok carries a fencing token that strictly increases within its tree, so a store that
remembers the largest token it has seen for a key and refuses any write carrying a smaller
one is safe even against paused holders.

Here the store is Redis itself (one atomic script per write); any database with a
conditional update works the same way (``UPDATE ... SET value = ?, token = ? WHERE token <= ?``).

Run: ``python -m examples.fenced_store`` (needs HILOK_REDIS_URL or a Redis on 6379).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from celery_hilok import HiLok, Lease, LockLost

# KEYS[1] value key, KEYS[2] token key; ARGV[1] value, ARGV[2] token.
# Reply: 1 if written, 0 if refused because a newer token has written already.
FENCED_SET = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local token = tonumber(ARGV[2])
if token < last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


class StaleToken(Exception):
    """A write was refused: a holder with a newer fencing token has written already."""


class FencedStore:
    """Key-value store whose writes must carry the writer's fencing token."""

    def __init__(self, client: redis.Redis, prefix: str = "fenced") -> None:
        self._client = client
        self._prefix = prefix
        self._set: Any = client.register_script(FENCED_SET)
        self.accepted = 0
        self.refused = 0

    def write(self, key: str, value: str, lease: Lease) -> None:
        """Write ``value`` under ``key`` with ``lease``'s token; raise StaleToken if refused."""
        ok = self._set(
            keys=[f"{self._prefix}:{key}", f"{self._prefix}:{key}:token"],
            args=[value, lease.token],
        )
        if ok:
            self.accepted += 1
        else:
            self.refused += 1
            raise StaleToken(f"write of {key!r} with token {lease.token} refused")

    def read(self, key: str) -> str | None:
        value: bytes | None = self._client.get(f"{self._prefix}:{key}")  # type: ignore[assignment]
        return None if value is None else value.decode()


def main() -> None:
    url = os.environ.get("HILOK_REDIS_URL", "redis://127.0.0.1:6379/0")
    hl = HiLok(url, namespace="fenced-demo")
    store = FencedStore(redis.Redis.from_url(url), prefix=f"fenced-demo:{time.time_ns()}")

    # A holder takes the lock with a short lease and then "pauses" past it.
    stale = hl.acquire("reports/q3", "write", ttl=0.2)
    store.write("reports/q3", "draft by the first holder", stale)
    time.sleep(0.3)  # the pause: the lease runs out meanwhile

    # Somebody else legitimately takes the lock and writes.
    with hl.write("reports/q3") as fresh:
        store.write("reports/q3", "final by the second holder", fresh)

    # The first holder wakes up and, unaware, writes again: the store refuses it.
    try:
        store.write("reports/q3", "stale overwrite", stale)
    except StaleToken as exc:
        print("refused:", exc)
    try:
        hl.refresh(stale)
    except LockLost:
        print("and the stale holder learns it lost the lease when it next refreshes")
    print("value:", store.read("reports/q3"))
    print(f"accepted {store.accepted}, refused {store.refused}")
    hl.close()


if __name__ == "__main__":
    main()
