"""Issue 12: the engine under contention, one measurement per row of the issue's table.

Every row uses the public API (``AsyncHiLok``) against the run's own redis-server; the
Redis-side figures come from the server itself (``INFO commandstats``, ``SLOWLOG``,
``PUBSUB``, ``SCAN``/``ZCARD``). The only key names built here are the wait queue's
(``KeySpace(namespace).tree_keys(tree)[1]``), polled with ``ZCARD`` to know when every
waiter has queued, instead of sleeping blindly.

1. ``elsewhere``: free acquire+release in a tree where W waiters queue on another path,
   interleaved op by op with the same in an idle tree (the waiters run in a child process,
   ``python -m benchmarks.contention waiters ...``, so that their retries do not share the
   measuring event loop; that process alone stretches the library's waiter keep-alive, a
   module constant, so that it can keep 10,000 queue entries alive: see
   :func:`_serve_waiters`);
2. ``drain``: W waiters on one write lock, drained by releasing it: time and script calls;
3. ``hot``: the existing hand-off workload (8 contenders on one path), ours and the seed;
4. ``memory``: expired read grants under ``tenants/<i>/doc``, one live reader, ordinary ops,
   then the sorted-set members left in the namespace;
5. ``channels``: contended waits each on its own tree, then the channels still subscribed;
6. ``slowlog``: the longest single script call while one process refreshes many leases;
7. ``acquire_many``: what a big ``acquire_many`` does (an outcome, not a time);
8. ``holder``: a holder of many reads takes a write above them, then acquires more while
   the tree has waiters.

Every loop is bounded in count and in time (``Sizes.cap``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

from benchmarks.ours import OursBackend
from benchmarks.seed import end_process
from benchmarks.workloads import HeldWrites, handoff, summarize
from celery_hilok import AsyncHiLok, Lease, _core
from celery_hilok.paths import KeySpace

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")
#: redis-py >= 8 fails a call past the pool's size: at most this many acquires in flight.
GATE = 32

Say = Callable[[str], None]
SeedRequest = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Sizes:
    """Sizes of the contention part (see :data:`QUICK` for the smoke mode)."""

    #: 1. waiters queued on another path of the tree; measured pairs per tree and size
    elsewhere_waiters: tuple[int, ...] = (1000, 10000)
    elsewhere_ops: int = 60
    #: the waiters' keep-alive, seconds (None: the library's 2 s; see _serve_waiters)
    elsewhere_keepalive: float | None = 20.0
    #: 2. waiters on one write lock, drained by its release
    drain_waiters: tuple[int, ...] = (100, 400)
    #: 3. hot lock (the "handoff" workload, ours and the seed)
    hot_contenders: int = 8
    hot_duration: float = 3.0
    hot_warmup: float = 0.5
    #: 4. expired read grants, their lease (s), ordinary ops afterwards
    memory_grants: int = 20000
    memory_ttl: float = 1.0
    memory_ops: int = 400
    #: 5. contended waits, each on its own tree
    channel_waits: int = 2000
    #: 6. context-manager leases refreshed by one process, at these depths; tick (s)
    refresh_leases: int = 1000
    refresh_depths: tuple[int, ...] = (8, 32)
    refresh_interval: float = 2.0
    refresh_ticks: int = 2
    #: SLOWLOG threshold while counting (0: every command; Redis 7.0 then logs the commands
    #: run inside a script too, which makes a big script slower than it is otherwise)
    # Log script calls, not the commands inside them (Redis 7.0 logs those too, and a tick
    # of chunked calls at depth 32 would push the calls out of the log): every refresh call
    # takes longer than this, the commands in it much less.
    slowlog_slower_than_us: int = 100
    #: 7. acquire_many of this many depth-2 writes (one tree)
    many_sizes: tuple[int, ...] = (1333, 1334)
    #: 8. reads one holder has under c/n; its acquires measured afterwards
    holder_reads: int = 10000
    holder_acquires: int = 20
    #: longest wait for any one condition (waiters queued, a drain, lease expiry), seconds
    cap: float = 90.0


FULL = Sizes()
QUICK = Sizes(
    elsewhere_waiters=(20, 100),
    elsewhere_ops=10,
    drain_waiters=(10, 40),
    hot_duration=0.3,
    hot_warmup=0.05,
    memory_grants=300,
    memory_ttl=0.3,
    memory_ops=40,
    channel_waits=40,
    refresh_leases=50,
    refresh_interval=0.25,
    refresh_ticks=1,
    holder_reads=500,
    holder_acquires=5,
    cap=20.0,
)


def _tag(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def queue_key(namespace: str, tree: str) -> str:
    """The wait queue (a sorted set of ticket numbers) of one tree."""
    return KeySpace(namespace).tree_keys(tree)[1]


async def _until(
    check: Callable[[], Awaitable[bool]], cap: float, what: str, poll: float = 0.02
) -> float:
    """Wait until ``check()`` is true (at most ``cap`` seconds); returns the seconds waited."""
    t0 = time.perf_counter()
    while not await check():
        if time.perf_counter() - t0 > cap:
            raise RuntimeError(f"gave up after {cap:g} s waiting for {what}")
        await asyncio.sleep(poll)
    return time.perf_counter() - t0


async def _zcard_at_least(raw: aredis.Redis, key: str, n: int) -> bool:
    return int(await raw.zcard(key)) >= n


async def _script_calls(raw: aredis.Redis) -> int:
    info = await raw.info("commandstats")
    return sum(int(info.get(name, {}).get("calls", 0)) for name in SCRIPT_COMMANDS)


async def _server_ms(raw: aredis.Redis) -> int:
    sec, usec = await raw.time()
    return int(sec) * 1000 + int(usec) // 1000


def _ms(seconds: float) -> float:
    return seconds * 1000


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


# -- 1. waiters elsewhere in the tree ----------------------------------------------------------


class _WaiterProcess:
    """``python -m benchmarks.contention waiters ...``: blocked writers on one path, in a
    child process; it exits when its stdin closes."""

    def __init__(
        self, url: str, namespace: str, path: str, count: int, keepalive: float | None
    ) -> None:
        args = ["waiters", "--url", url, "--namespace", namespace, "--path", path]
        if keepalive is not None:
            args += ["--keepalive", str(keepalive)]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.contention", *args, "--count", str(count)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        end_process(self._proc, 15)


async def _serve_waiters(
    url: str, namespace: str, path: str, count: int, keepalive: float | None
) -> None:
    """The child of :class:`_WaiterProcess`: ``count`` blocking ``write(path)`` acquires on
    one AsyncHiLok, started in chunks (each chunk queued before the next starts), until
    stdin closes. Its client uses a blocking pool of 64 connections: 10,000 waiters must
    not open 10,000 connections when many retries fall due at once.

    ``keepalive`` (seconds) stretches the waiters' longest sleep (the library's KEEPALIVE,
    2 s) and their queue entries' life (QUEUE_TTL_MS, 6 s) to ``keepalive`` and three times
    that. With the defaults a waiter retries every 2 s: 5,000 calls a second for 10,000
    waiters, which one process on a 2-core machine cannot keep up (the queue levelled off
    at about 6,500 live entries). The entries the measured acquires read are the same.
    """
    if keepalive is not None:
        # (module constants, read at each use; Final to the type checker, hence vars())
        vars(_core).update(KEEPALIVE=keepalive, QUEUE_TTL_MS=int(3000 * keepalive))
    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=None)
    client = aredis.Redis(connection_pool=pool)
    hl = AsyncHiLok(client, namespace=namespace)
    raw = aredis.Redis.from_url(url)
    qkey = queue_key(namespace, path.split("/")[0])
    tasks: list[asyncio.Task[Lease]] = []
    loop = asyncio.get_running_loop()
    eof = loop.run_in_executor(None, sys.stdin.readline)
    chunk = 250
    for start in range(0, count, chunk):
        for _ in range(min(chunk, count - start)):
            tasks.append(asyncio.create_task(hl.acquire(path, "write")))
        started = len(tasks)

        async def queued(n: int = started) -> bool:
            return await _zcard_at_least(raw, qkey, n)

        await _until(queued, 60.0, f"{started} waiters queued")
    await eof
    # Leave at once: the parent flushes the server; cleaning 10,000 queue entries one
    # cancellation at a time would only cost time.
    os._exit(0)


async def _elsewhere(
    url: str, waiters: int, ops: int, keepalive: float | None, cap: float, say: Say
) -> dict[str, Any]:
    ns = "ct1"
    busy, idle = _tag("busy"), _tag("idle")
    held = f"{busy}/held"
    raw = aredis.Redis.from_url(url)
    holder = AsyncHiLok(url, namespace=ns)
    measurer = AsyncHiLok(url, namespace=ns)
    qkey = queue_key(ns, busy)
    times: dict[str, list[float]] = {"busy": [], "idle": []}
    queued: list[int] = []

    def pair(path: str) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            async with measurer.write(path):
                pass

        return op

    ops_of = {"busy": pair(f"{busy}/free"), "idle": pair(f"{idle}/free")}
    try:
        async with holder.write(held):
            child = _WaiterProcess(url, ns, held, waiters, keepalive)
            # (stopped before the holder releases, which would wake every waiter)
            try:

                async def all_queued() -> bool:
                    if not child.alive():
                        raise RuntimeError("the waiter process exited early")
                    return await _zcard_at_least(raw, qkey, waiters)

                took = await _until(all_queued, cap, f"{waiters} waiters queued", poll=0.1)
                say(f"  elsewhere: {waiters} waiters queued in {took:.1f} s")
                for op in ops_of.values():  # warm-up: connections, scripts
                    await op()
                queued.append(int(await raw.zcard(qkey)))
                deadline = time.perf_counter() + cap
                for i in range(ops):
                    order = ("busy", "idle") if i % 2 == 0 else ("idle", "busy")
                    for which in order:
                        times[which].append(await _timed(ops_of[which]))
                    if time.perf_counter() > deadline:
                        break
                queued.append(int(await raw.zcard(qkey)))
            finally:
                child.stop()
    finally:
        await measurer.close()
        await holder.close()
        await raw.aclose()
    busy_s, idle_s = summarize(times["busy"]), summarize(times["idle"])
    ratio = (busy_s["median_ms"] or 0.0) / (idle_s["median_ms"] or 1.0)
    return {
        "waiters": waiters,
        "keepalive_s": keepalive,
        "queued_before_after": queued,
        "busy": busy_s,
        "idle": idle_s,
        "ratio": ratio,
    }


# -- 2. drain ----------------------------------------------------------------------------------


async def _drain(url: str, waiters: int, cap: float) -> dict[str, Any]:
    ns = "ct2"
    path = _tag("drain")
    raw = aredis.Redis.from_url(url)
    holder = AsyncHiLok(url, namespace=ns)
    crowd = AsyncHiLok(url, namespace=ns)  # one process of waiters: one instance
    qkey = queue_key(ns, path)
    finished: list[float] = []

    async def wait_one() -> bool:
        async with crowd.write(path) as lease:
            contended = bool(lease.contended)
        finished.append(time.perf_counter())
        return contended

    tasks: list[asyncio.Task[bool]] = []
    try:
        lease = await holder.acquire(path, "write", ttl=cap + 30)
        tasks = [asyncio.create_task(wait_one()) for _ in range(waiters)]
        await _until(lambda: _zcard_at_least(raw, qkey, waiters), cap, f"{waiters} queued")
        await raw.config_resetstat()
        t0 = time.perf_counter()
        await holder.release(lease)
        done, pending = await asyncio.wait(tasks, timeout=cap)
        elapsed = time.perf_counter() - t0
        calls = await _script_calls(raw)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await crowd.close()
        await holder.close()
        await raw.aclose()
    contended = sum(1 for t in done if not t.cancelled() and t.exception() is None and t.result())
    errors = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
    return {
        "waiters": waiters,
        "drained": len(finished),
        "timed_out": len(pending),
        "contended": contended,
        "errors": errors[:3],
        "seconds": elapsed if not pending else None,
        "last_grant_s": (max(finished) - t0) if finished else None,
        "script_calls": calls,
        "calls_per_waiter": (calls - 1) / waiters,  # the holder's own release is not a waiter's
    }


# -- 4. memory ---------------------------------------------------------------------------------


async def _zset_members(raw: aredis.Redis, namespace: str, now_ms: int) -> dict[str, Any]:
    """Members of every sorted set of the namespace (SCAN), live ones apart: the mark and
    wait-mark sets of the nodes, the queue and the holders' indexes (``members``), and the
    tree's holder table (``::hx``), whose entries outlive their leases by a grace period on
    purpose (a release of a lease that ran out can tell so) and are counted apart."""
    total = live = keys = table = table_live = 0
    biggest: list[tuple[int, str]] = []
    async for raw_key in raw.scan_iter(match=KeySpace(namespace).tree_pattern(), count=1000):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        if await raw.type(key) not in (b"zset", "zset"):
            continue
        card = int(await raw.zcard(key))
        rest = key[key.index("}:") + 2 :]
        if rest == ":hx":
            table += card
            table_live += int(await raw.zcount(key, f"({now_ms}", "+inf"))
            continue
        keys += 1
        total += card
        biggest.append((card, key))
        by_ticket = rest in (":q",) or rest.rsplit(":", 1)[-1] in ("wis", "wix", "ws", "wx")
        if by_ticket:  # scored by ticket: alive while its waiter's queue entry is
            live += card
        else:
            live += int(await raw.zcount(key, f"({now_ms}", "+inf"))
    biggest.sort(reverse=True)
    return {
        "members": total,
        "live_members": live,
        "zset_keys": keys,
        "biggest": [{"key": k, "members": c} for c, k in biggest[:3]],
        "holder_entries": table,
        "holder_entries_in_grace": table_live,
    }


async def _memory(url: str, grants: int, ttl: float, ops: int, cap: float) -> dict[str, Any]:
    ns = "ct4"
    raw = aredis.Redis.from_url(url)
    hl = AsyncHiLok(url, namespace=ns, ttl=3.0)  # the live reader renews every second
    gate = asyncio.Semaphore(GATE)
    rng = random.Random(12)
    leases: list[Lease] = []

    async def grant(i: int) -> None:
        async with gate:
            leases.append(await hl.acquire(f"tenants/{i}/doc", "read", ttl=ttl))

    try:
        async with hl.read("tenants/keep"):
            t0 = time.perf_counter()
            for start in range(0, grants, 1000):
                await asyncio.gather(*(grant(i) for i in range(start, min(grants, start + 1000))))
                if time.perf_counter() - t0 > cap:
                    raise RuntimeError(f"{len(leases)} of {grants} read grants made in {cap} s")
            granted_s = time.perf_counter() - t0
            # Every grant was made before this server time: it runs out by then + ttl.
            expiry = await _server_ms(raw) + int(ttl * 1000)

            async def expired() -> bool:
                return await _server_ms(raw) > expiry

            await _until(expired, cap, "the read grants' leases to run out", poll=0.05)
            for k in range(ops):
                path = f"tenants/{rng.randrange(grants)}/doc"
                async with hl.write(path) if k % 2 else hl.read(path):
                    pass
            counted = await _zset_members(raw, ns, await _server_ms(raw))
    finally:
        await hl.close()
        await raw.aclose()
    return {
        "grants": grants,
        "grant_ttl_s": ttl,
        "granted_in_s": granted_s,
        "ops": ops,
        "live_grants": 1,
        **counted,
    }


# -- 5. channels -------------------------------------------------------------------------------


async def _channels(url: str, waits: int, cap: float) -> dict[str, Any]:
    ns = "ct5"
    tag = _tag("ch")
    raw = aredis.Redis.from_url(url)
    holder = AsyncHiLok(url, namespace=ns)
    waiter = AsyncHiLok(url, namespace=ns)  # the one process whose subscriptions count
    gate = asyncio.Semaphore(16)
    contended = 0

    async def one(i: int) -> None:
        nonlocal contended
        path = f"{tag}{i}/x"
        async with gate:
            lease = await holder.acquire(path, "write")

            async def wait_side() -> bool:
                async with waiter.write(path) as got:
                    return bool(got.contended)

            task = asyncio.create_task(wait_side())
            try:
                qkey = queue_key(ns, f"{tag}{i}")
                await _until(lambda: _zcard_at_least(raw, qkey, 1), cap, "a queued waiter", 0.001)
            finally:
                await holder.release(lease)
            got = await task  # (not `contended += await task`: that reads contended first)
            contended += got

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(waits)))
        seconds = time.perf_counter() - t0
        channels = await raw.pubsub_channels(f"{ns}:*")
        numsub = await raw.pubsub_numsub(*channels) if channels else []
    finally:
        await waiter.close()
        await holder.close()
        await raw.aclose()
    return {
        "waits": waits,
        "contended": contended,
        "seconds": seconds,
        "channels": len(channels),
        "subscriptions": sum(int(n) for _, n in numsub),
    }


# -- 6. SLOWLOG during a big refresh -------------------------------------------------------------


async def _slowlog(
    url: str, leases: int, depth: int, interval: float, ticks: int, slower_than: int, cap: float
) -> dict[str, Any]:
    ns = "ct6"
    tag = _tag("sl")
    raw = aredis.Redis.from_url(url)
    # the context managers renew every ttl/3
    hl = AsyncHiLok(url, namespace=ns, ttl=3 * interval)
    held = HeldWrites(hl, tag, leases, depth, GATE)
    kept: list[Lease] = held.leases

    old = await raw.config_get("slowlog-*")
    old_slower = str(old.get("slowlog-log-slower-than") or 10000)
    old_len = str(old.get("slowlog-max-len") or 128)
    tasks = held.tasks
    entries: list[dict[str, Any]] = []
    try:
        waiter = asyncio.create_task(held.all_held.wait())
        done, _ = await asyncio.wait([waiter, *tasks], timeout=cap, return_when="FIRST_COMPLETED")
        if waiter not in done:
            waiter.cancel()
            raise RuntimeError(
                f"{len(kept)} of {leases} leases held; a holder failed or {cap} s passed"
            )
        # Load the refresh script now (EVALSHA, NOSCRIPT, EVAL): only EVALSHA ticks follow.
        await hl.refresh(*kept[:1])
        await raw.config_set("slowlog-max-len", 1024)
        await raw.config_set("slowlog-log-slower-than", slower_than)
        await raw.slowlog_reset()
        seen: dict[int, dict[str, Any]] = {}
        # A tick renews every kept lease (in one call, or in chunks of one pipeline): one
        # has passed when the least recently renewed lease is newer than the last tick.
        marks = [max(lease.renewed_at for lease in kept)]

        async def ticked() -> bool:
            if min(lease.renewed_at for lease in kept) > marks[-1]:
                marks.append(max(lease.renewed_at for lease in kept))
            # Commands run inside scripts are logged too (from "?:0"), before the script
            # itself: polled often, a script's own entry is read before the next one's
            # commands push it out of the log.
            for entry in await raw.slowlog_get(1024):
                if _command(entry).upper().startswith("EVAL"):
                    seen[int(entry["id"])] = entry
            entries[:] = list(seen.values())
            return len(marks) - 1 >= ticks

        waited = await _until(ticked, max(cap, 10 * interval), "refresh ticks", poll=interval / 4)
        lost = sum(1 for task in tasks if task.done())
    finally:
        await raw.config_set("slowlog-log-slower-than", old_slower)
        await raw.config_set("slowlog-max-len", old_len)
        await held.end()
        await hl.close()
        await raw.aclose()
    scripts = entries
    refreshes = [e for e in scripts if _numkeys(e) > 0]
    longest = max(scripts, key=lambda e: int(e["duration"]), default=None)
    return {
        "leases": leases,
        "depth": depth,
        "interval_s": interval,
        "slowlog_log_slower_than_us": slower_than,
        "window_s": waited,
        "lost": lost,
        "script_calls": len(scripts),
        "refresh_calls": len(refreshes),
        "refresh_ms": [int(e["duration"]) / 1000 for e in refreshes],
        "max_script_ms": int(longest["duration"]) / 1000 if longest else None,
        "max_script_numkeys": _numkeys(longest) if longest else None,
    }


def _command(entry: dict[str, Any]) -> str:
    command = entry.get("command", b"")
    return command.decode(errors="replace") if isinstance(command, bytes) else str(command)


def _numkeys(entry: dict[str, Any]) -> int:
    """The numkeys argument of a logged EVALSHA/EVAL (0 for any other command)."""
    words = _command(entry).split(" ", 3)
    if len(words) < 3 or words[0].upper() not in ("EVALSHA", "EVAL"):
        return 0
    try:
        return int(words[2])
    except ValueError:
        return 0


# -- 7. acquire_many ---------------------------------------------------------------------------


async def _many(url: str, size: int) -> dict[str, Any]:
    hl = AsyncHiLok(url, namespace="ct7")
    tree = _tag("many")
    locks: list[tuple[str, Any]] = [(f"{tree}/{i}", "write") for i in range(size)]
    try:
        try:
            leases = await hl.acquire_many(locks, timeout=10)
        except Exception as exc:
            return {
                "size": size,
                "ok": False,
                "exception": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc)[:400],
            }
        await hl.release(*leases)
        return {"size": size, "ok": True, "exception": None, "message": f"{len(leases)} leases"}
    finally:
        await hl.close()


# -- 8. a holder of many reads -------------------------------------------------------------------


async def _holder(url: str, reads: int, acquires: int, cap: float) -> dict[str, Any]:
    ns = "ct8"
    tree = _tag("c")
    raw = aredis.Redis.from_url(url)
    hl = AsyncHiLok(url, namespace=ns, ttl=cap + 60)  # no refresh needed during the row
    other = AsyncHiLok(url, namespace=ns)
    qkey = queue_key(ns, tree)
    waiter: asyncio.Task[None] | None = None
    try:
        first = await hl.acquire(f"{tree}/n/r0", "read")
        handle = first.handle
        t0 = time.perf_counter()
        step = 250  # within acquire_many's limit (MAX_LOCKS)
        for start in range(1, reads, step):
            chunk = [(f"{tree}/n/r{i}", "read") for i in range(start, min(reads, start + step))]
            await hl.acquire_many(chunk, handle=handle)  # type: ignore[arg-type]
            if time.perf_counter() - t0 > cap:
                raise RuntimeError(f"the {reads} reads were not granted within {cap} s")
        # The baseline holder: one read in the same tree.
        base = await hl.acquire(f"{tree}/b", "read")
        write_s = await _timed(lambda: hl.acquire(f"{tree}/n", "write", handle=handle))

        async def wait_side() -> None:
            async with other.write(f"{tree}/n"):
                pass

        waiter = asyncio.create_task(wait_side())
        await _until(lambda: _zcard_at_least(raw, qkey, 1), cap, "a waiter in the tree", 0.005)
        times: dict[str, list[float]] = {"holder": [], "baseline": []}
        for i in range(acquires):
            for who, h in (("holder", handle), ("baseline", base.handle)):

                async def op(path: str = f"{tree}/{who}{i}", h: str = h) -> None:
                    await hl.acquire(path, "read", handle=h)

                times[who].append(await _timed(op))
        still_waiting = int(await raw.zcard(qkey))
    finally:
        if waiter is not None:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        await other.close()
        await hl.close()
        await raw.aclose()
    return {
        "reads": reads,
        "write_ms": _ms(write_s),
        "waiters": still_waiting,
        "holder": summarize(times["holder"]),
        "baseline": summarize(times["baseline"]),
    }


# -- the part -------------------------------------------------------------------------------------


def run(url: str, sizes: Sizes, seed: SeedRequest | None, say: Say) -> dict[str, Any]:
    """Measure every row; ``seed`` (None: not measured) answers the hot-lock request."""
    flusher = redis.Redis.from_url(url)
    out: dict[str, Any] = {}

    def step(row: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        """Run one measurement on an empty server and its own event loop."""
        flusher.flushall()
        t0 = time.perf_counter()
        result = asyncio.run(row)
        result["seconds_total"] = round(time.perf_counter() - t0, 1)
        return result

    try:
        out["elsewhere"] = []
        for w in sizes.elsewhere_waiters:
            r = step(
                _elsewhere(url, w, sizes.elsewhere_ops, sizes.elsewhere_keepalive, sizes.cap, say)
            )
            say(
                f"contention 1: {w} waiters elsewhere: {r['busy']['median_ms']:.2f} ms vs "
                f"{r['idle']['median_ms']:.2f} ms idle ({r['ratio']:.2f}x)"
            )
            out["elsewhere"].append(r)
        out["drain"] = []
        for w in sizes.drain_waiters:
            r = step(_drain(url, w, sizes.cap))
            say(
                f"contention 2: drain {w} waiters: {r['seconds']} s, "
                f"{r['calls_per_waiter']:.1f} script calls per waiter"
            )
            out["drain"].append(r)
        req = {
            "bench": "handoff",
            "contenders": sizes.hot_contenders,
            "duration": sizes.hot_duration,
            "warmup": sizes.hot_warmup,
        }
        hot: dict[str, Any] = {"ours": step(_hot_ours(url, req))}
        say(f"contention 3: hot lock AsyncHiLok {hot['ours']['rate']:.0f} grants/s")
        if seed is not None:
            flusher.flushall()
            hot["seed"] = seed(req)
            say(f"contention 3: hot lock seed {hot['seed']['rate']:.0f} grants/s")
        out["hot"] = hot
        r = step(_memory(url, sizes.memory_grants, sizes.memory_ttl, sizes.memory_ops, sizes.cap))
        say(f"contention 4: {r['members']} sorted-set members left ({r['live_members']} live)")
        out["memory"] = r
        r = step(_channels(url, sizes.channel_waits, sizes.cap))
        say(f"contention 5: {r['channels']} channels subscribed after {r['waits']} waits")
        out["channels"] = r
        out["slowlog"] = []
        for depth in sizes.refresh_depths:
            r = step(
                _slowlog(
                    url,
                    sizes.refresh_leases,
                    depth,
                    sizes.refresh_interval,
                    sizes.refresh_ticks,
                    sizes.slowlog_slower_than_us,
                    sizes.cap,
                )
            )
            say(f"contention 6: depth {depth}: longest script call {r['max_script_ms']} ms")
            out["slowlog"].append(r)
        out["acquire_many"] = []
        for size in sizes.many_sizes:
            r = step(_many(url, size))
            say(f"contention 7: acquire_many({size}): {r['exception'] or 'ok'} {r['message']}")
            out["acquire_many"].append(r)
        r = step(_holder(url, sizes.holder_reads, sizes.holder_acquires, sizes.cap))
        say(
            f"contention 8: write above {r['reads']} own reads {r['write_ms']:.1f} ms; next "
            f"acquires {r['holder']['median_ms']:.2f} ms (baseline "
            f"{r['baseline']['median_ms']:.2f} ms)"
        )
        out["holder"] = r
    finally:
        flusher.flushall()
        flusher.close()
    return out


async def _hot_ours(url: str, request: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in request.items() if k != "bench"}
    return await handoff(OursBackend(url, namespace="ct3"), **params)


# -- the child process of row 1 -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contention")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("waiters", help="blocked writers on one path until stdin closes")
    w.add_argument("--url", required=True)
    w.add_argument("--namespace", required=True)
    w.add_argument("--path", required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--keepalive", type=float, help="seconds (default: the library's)")
    args = parser.parse_args(argv)
    asyncio.run(_serve_waiters(args.url, args.namespace, args.path, args.count, args.keepalive))
    return 0


if __name__ == "__main__":
    sys.exit(main())
