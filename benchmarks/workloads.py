"""The measurements, written once for any lock library (standard library only).

A *backend* makes lock-service instances: objects with ``read(path)`` and ``write(path)``
async context managers, which both ``celery_hilok.AsyncHiLok`` and the seed's
``redishilok.RedisHiLok`` have. Every workload below takes a backend, so the two libraries
are measured by exactly the same code; only the backend differs (:mod:`benchmarks.ours`
in-process, :mod:`benchmarks.seed_bench` inside the seed's own virtualenv).

This module is imported inside the seed's virtualenv, where neither celery_hilok nor a
recent redis-py is installed: it must use the standard library only (the plain Redis
client it needs comes from ``backend.raw()``).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Protocol

__all__ = [
    "Backend",
    "HeldWrites",
    "LockService",
    "chain_path",
    "measure_rate",
    "measure_rate_threads",
    "run_request",
    "summarize",
]


class LockService(Protocol):
    """What both libraries offer: subtree-or-node locks as async context managers."""

    def read(self, path: str) -> AbstractAsyncContextManager[Any]: ...

    def write(self, path: str) -> AbstractAsyncContextManager[Any]: ...


class Backend(Protocol):
    """Makes lock-service instances ("clients") of one library on one Redis server."""

    name: str
    #: INFO commandstats entries that count the library's script calls.
    script_commands: tuple[str, ...]

    async def new(self, refresh_interval: float | None = None) -> Any:
        """A new lock-service instance with its own connection pool.

        ``refresh_interval`` (seconds): make context managers renew their leases this often
        (with a lease three times as long); None keeps the library's defaults.
        """

    async def close(self, service: Any) -> None: ...

    def raw(self) -> Any:
        """A plain ``redis.asyncio.Redis`` client on the same server (caller closes it)."""


# -- helpers --------------------------------------------------------------------------------


def chain_path(root: str, depth: int) -> str:
    """A path of ``depth`` segments under the first segment ``root``: ``root/n2/n3...``."""
    return "/".join([root, *(f"n{i}" for i in range(2, depth + 1))])


class HeldWrites:
    """``count`` write locks of ``service`` (``service.write(path)`` context managers, so
    renewed by the library), on distinct trees ``<tag>c<i>`` at ``depth``, each held by a
    task of its own until :meth:`end`. At most ``gate`` acquires (and releases) are in
    flight: redis-py >= 8 caps an asyncio pool at 100 connections and raises past that."""

    def __init__(self, service: Any, tag: str, count: int, depth: int, gate: int = 32) -> None:
        self.leases: list[Any] = []
        self.all_held = asyncio.Event()
        self._release = asyncio.Event()
        self._gate = asyncio.Semaphore(gate)
        self._count = count
        self.tasks = [
            asyncio.create_task(self._hold(service, chain_path(f"{tag}c{i}", depth)))
            for i in range(count)
        ]

    async def _hold(self, service: Any, path: str) -> None:
        stack = AsyncExitStack()
        async with self._gate:
            lease = await stack.enter_async_context(service.write(path))
        try:
            self.leases.append(lease)
            if len(self.leases) == self._count:
                self.all_held.set()
            await self._release.wait()
        finally:
            async with self._gate:
                await stack.aclose()

    async def end(self) -> list[Any]:
        """Let every lock go; the tasks' outcomes (exceptions returned, not raised)."""
        self._release.set()
        return await asyncio.gather(*self.tasks, return_exceptions=True)


def summarize(seconds: Sequence[float]) -> dict[str, float | None]:
    """Median, p90, p99 (nearest rank), max and mean of durations, in milliseconds."""
    if not seconds:
        return {"n": 0, "median_ms": None, "p99_ms": None}
    ordered = sorted(s * 1000 for s in seconds)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": ordered[-1],
        "mean_ms": statistics.fmean(ordered),
    }


def _tag(prefix: str) -> str:
    """A fresh first-segment prefix, so no two measurements share a key."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def measure_rate(
    ops: Sequence[Callable[[], Awaitable[object]]], duration: float, warmup: float
) -> dict[str, Any]:
    """Run each op in its own task, back to back, and count completions in a window.

    The window opens after ``warmup`` seconds (connections made, scripts cached) and lasts
    ``duration`` seconds; ``rate`` is completions per second inside it, all tasks together.
    """
    counts = [0] * len(ops)
    stopping = False

    async def loop(i: int, op: Callable[[], Awaitable[object]]) -> None:
        while not stopping:
            await op()
            counts[i] += 1

    tasks = [asyncio.create_task(loop(i, op)) for i, op in enumerate(ops)]
    try:
        await asyncio.sleep(warmup)
        _raise_failed(tasks)
        before, t0, cpu0 = list(counts), time.perf_counter(), time.process_time()
        await asyncio.sleep(duration)
        after, t1, cpu1 = list(counts), time.perf_counter(), time.process_time()
    finally:
        stopping = True
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return {**_rate_result(before, after, t1 - t0, cpu1 - cpu0), "total_ops": sum(counts)}


def _rate_result(before: list[int], after: list[int], seconds: float, cpu: float) -> dict[str, Any]:
    per_client = [a - b for a, b in zip(after, before, strict=True)]
    ops_done = sum(per_client)
    return {
        "ops": ops_done,
        "seconds": seconds,
        "rate": ops_done / seconds,
        # CPU time of this whole process per op (user + system, every thread): steadier
        # than the rate on a busy machine, since time spent waiting for a CPU is left out.
        "cpu_us_per_op": cpu / ops_done * 1e6 if ops_done else None,
        "per_client": per_client,
    }


def _raise_failed(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def measure_rate_threads(
    ops: Sequence[Callable[[], object]], duration: float, warmup: float
) -> dict[str, Any]:
    """:func:`measure_rate` with one thread per op, for synchronous clients."""
    counts = [0] * len(ops)
    stopping = threading.Event()
    errors: list[BaseException] = []

    def loop(i: int, op: Callable[[], object]) -> None:
        try:
            while not stopping.is_set():
                op()
                counts[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=loop, args=(i, op), name=f"bench-{i}", daemon=True)
        for i, op in enumerate(ops)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(warmup)
        before, t0, cpu0 = list(counts), time.perf_counter(), time.process_time()
        time.sleep(duration)
        after, t1, cpu1 = list(counts), time.perf_counter(), time.process_time()
    finally:
        stopping.set()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return {**_rate_result(before, after, t1 - t0, cpu1 - cpu0), "total_ops": sum(counts)}


async def script_stats(raw: Any, names: Sequence[str]) -> tuple[int, int]:
    """(calls, server microseconds) of the named INFO commandstats entries, summed."""
    info = await raw.info("commandstats")
    calls = usec = 0
    for name in names:
        entry = info.get(name)
        if isinstance(entry, dict):
            calls += int(entry.get("calls", 0))
            usec += int(entry.get("usec", 0))
    return calls, usec


# -- 1. uncontended acquire+release ------------------------------------------------------


async def lock_rate(
    backend: Backend, mode: str, depth: int, clients: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Acquire+release pairs per second with ``async with``; each client on its own tree.

    Also: script calls and Redis server time per pair (INFO commandstats, whole run).
    """
    service = await backend.new()
    raw = backend.raw()
    try:
        enter = service.write if mode == "write" else service.read
        tag = _tag("rate")

        def make(path: str) -> Callable[[], Awaitable[None]]:
            async def op() -> None:
                async with enter(path):
                    pass

            return op

        ops = [make(chain_path(f"{tag}c{i}", depth)) for i in range(clients)]
        calls0, usec0 = await script_stats(raw, backend.script_commands)
        result = await measure_rate(ops, duration, warmup)
        calls1, usec1 = await script_stats(raw, backend.script_commands)
    finally:
        await backend.close(service)
        await raw.aclose()
    total = max(1, result["total_ops"])
    result["script_calls_per_op"] = (calls1 - calls0) / total
    result["server_us_per_op"] = (usec1 - usec0) / total
    return result


TRIVIAL_SCRIPT = "return 1"


async def floor_rate(
    backend: Backend, kind: str, clients: int, duration: float, warmup: float
) -> dict[str, Any]:
    """The physical floor: two bare round trips (``ping`` or ``evalsha``) per pair."""
    raw = backend.raw()
    try:
        sha = await raw.script_load(TRIVIAL_SCRIPT)

        async def two_pings() -> None:
            await raw.ping()
            await raw.ping()

        async def two_evalshas() -> None:
            await raw.evalsha(sha, 0)
            await raw.evalsha(sha, 0)

        op = two_pings if kind == "ping" else two_evalshas
        return await measure_rate([op] * clients, duration, warmup)
    finally:
        await raw.aclose()


# -- 2. wake-up latency ------------------------------------------------------------------------


async def wakeup(
    backend: Backend,
    holder_mode: str,
    holder_path: str,
    waiter_mode: str,
    waiter_path: str,
    trials: int,
    hold_min: float,
    hold_max: float,
    seed: int = 1,
) -> dict[str, Any]:
    """From the holder starting its release to the blocked waiter's acquire returning.

    Holder and waiter are separate instances (two clients) on one event loop. The holder
    keeps the lock a random ``hold_min..hold_max`` seconds after the waiter started, so a
    polling waiter is caught at a random phase. One extra first trial is a warm-up.
    """
    holder, waiter = await backend.new(), await backend.new()
    rng = random.Random(seed)
    tag = _tag("wk")
    hold_enter = holder.write if holder_mode == "write" else holder.read
    wait_enter = waiter.write if waiter_mode == "write" else waiter.read
    samples: list[float] = []
    try:
        for trial in range(trials + 1):
            hp, wp = f"{tag}{trial}{holder_path}", f"{tag}{trial}{waiter_path}"

            async def wait_side(wp: str = wp) -> float:
                async with wait_enter(wp):
                    return time.perf_counter()

            async with hold_enter(hp):
                task = asyncio.create_task(wait_side())
                await asyncio.sleep(rng.uniform(hold_min, hold_max))
                if task.done():
                    task.result()
                    raise RuntimeError(f"the waiter on {wp!r} was not blocked by {hp!r}")
                released_at = time.perf_counter()
            woke_at = await task
            if trial:
                samples.append(woke_at - released_at)
    finally:
        await backend.close(holder)
        await backend.close(waiter)
    return {
        "case": f"{holder_mode}({holder_path}) -> {waiter_mode}({waiter_path})",
        **summarize(samples),
    }


# -- 3. fairness -------------------------------------------------------------------------------


async def fairness(
    backend: Backend,
    readers: int,
    hold: float,
    settle: float,
    cap: float,
    trials: int,
) -> dict[str, Any]:
    """A writer asks for a path that ``readers`` looping readers hold in turns.

    Each reader holds ``hold`` seconds and asks again at once; their starts are staggered so
    the path is never free. Every reader grant is recorded with the time it was asked for,
    granted and left. Reported per trial:

    - ``wait_ms``: from the writer asking to its grant;
    - ``overtaking_grants``: reader grants asked for *after* the writer asked and granted
      before it (a first-come-first-served lock has none);
    - ``readers_ahead``: reader grants asked for before the writer, granted before it and
      not yet left when it asked (holding, or asking, at that moment);
    - ``after_ahead_ms``: from the last of those readers leaving to the writer's grant,
      i.e. how much longer than the readers ahead of it the writer waited.

    A writer still waiting after ``cap`` seconds gives up and is reported ``starved``.
    """
    reader_service, writer_service = await backend.new(), await backend.new()
    tag = _tag("fair")
    try:
        out = [
            await _fairness_trial(
                reader_service, writer_service, f"{tag}{trial}", readers, hold, settle, cap
            )
            for trial in range(trials)
        ]
    finally:
        await backend.close(reader_service)
        await backend.close(writer_service)
    done = [t for t in out if not t["starved"]]
    return {
        "readers": readers,
        "hold_ms": hold * 1000,
        "cap_s": cap,
        "trials": out,
        "max_wait_ms": max(t["wait_ms"] for t in out),
        "max_after_ahead_ms": max((t["after_ahead_ms"] for t in done), default=None),
        "overtaking_grants": sum(t["overtaking_grants"] for t in out),
        "starved": len(out) - len(done),
    }


async def _fairness_trial(
    reader_service: Any,
    writer_service: Any,
    path: str,
    readers: int,
    hold: float,
    settle: float,
    cap: float,
) -> dict[str, Any]:
    records: list[list[float]] = []  # (asked, granted, left) of every reader grant
    asked: list[float] = []
    stopping = False

    async def reader(i: int) -> None:
        await asyncio.sleep(i * hold / readers)
        while not stopping:
            t_ask = time.perf_counter()
            async with reader_service.read(path):
                record = [t_ask, time.perf_counter(), math.inf]
                records.append(record)
                await asyncio.sleep(hold)
                record[2] = time.perf_counter()

    async def writer() -> float:
        asked.append(time.perf_counter())
        async with writer_service.write(path):
            return time.perf_counter()

    tasks = [asyncio.create_task(reader(i)) for i in range(readers)]
    try:
        await asyncio.sleep(settle)
        try:
            granted = await asyncio.wait_for(writer(), cap)
            starved = False
        except asyncio.TimeoutError:
            granted, starved = time.perf_counter(), True
    finally:
        stopping = True
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    t0 = asked[0]
    # asked before the writer, granted before it, and not gone when it asked
    ahead = [r for r in records if r[0] <= t0 and r[1] <= granted and r[2] > t0]
    overtaking = [r for r in records if r[0] > t0 and r[1] < granted]
    last_left = max([t0, *(r[2] for r in ahead)])
    return {
        "wait_ms": (granted - t0) * 1000,
        "overtaking_grants": len(overtaking),
        "readers_ahead": len(ahead),
        "after_ahead_ms": None if starved else (granted - last_left) * 1000,
        "starved": starved,
    }


# -- 4. hot lock hand-off --------------------------------------------------------------------


async def handoff(
    backend: Backend, contenders: int, duration: float, warmup: float
) -> dict[str, Any]:
    """``contenders`` clients take write on one path in a loop: grants per second."""
    services = [await backend.new() for _ in range(contenders)]
    raw = backend.raw()
    path = _tag("hot")
    try:

        def make(service: Any) -> Callable[[], Awaitable[None]]:
            async def op() -> None:
                async with service.write(path):
                    pass

            return op

        calls0, _ = await script_stats(raw, backend.script_commands)
        result = await measure_rate([make(s) for s in services], duration, warmup)
        calls1, _ = await script_stats(raw, backend.script_commands)
    finally:
        for service in services:
            await backend.close(service)
        await raw.aclose()
    per = result["per_client"]
    result["min_per_contender"], result["max_per_contender"] = min(per), max(per)
    # Over the whole run (warm-up and stop included), not only the counting window.
    result["script_calls_per_grant"] = (calls1 - calls0) / max(1, result["total_ops"])
    return result


# -- 5. refresh cost ---------------------------------------------------------------------------


async def refresh_cost(
    backend: Backend,
    leases: int,
    depth: int,
    interval: float,
    settle: float,
    window: float,
) -> dict[str, Any]:
    """Script calls per second that keep ``leases`` context-manager locks alive.

    All locks are held by one instance (one process) on distinct trees, renewed every
    ``interval`` seconds; calls are counted with INFO commandstats over ``window`` seconds,
    after ``settle`` seconds so that start-up refreshes are not counted.
    """
    service = await backend.new(refresh_interval=interval)
    raw = backend.raw()
    tag = _tag("rf")
    held = HeldWrites(service, tag, leases, depth)
    tasks = held.tasks
    try:
        waiter = asyncio.create_task(held.all_held.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            _raise_failed(tasks)
            raise RuntimeError(
                "a holder was cancelled before every lock was held (a lease lost on the way?)"
            )
        await asyncio.sleep(settle)
        calls0, usec0 = await script_stats(raw, backend.script_commands)
        t0 = time.perf_counter()
        await asyncio.sleep(window)
        calls1, usec1 = await script_stats(raw, backend.script_commands)
        t1 = time.perf_counter()
        _raise_failed(tasks)
        # A holder that ended on its own lost its lease (the seed cancels the holder then).
        lost = sum(1 for task in tasks if task.done())
    finally:
        outcomes = await held.end()
        await backend.close(service)
        await raw.aclose()
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome
    calls, seconds = calls1 - calls0, t1 - t0
    return {
        "leases": leases,
        "lost": lost,
        "depth": depth,
        # the script calls one tick of ours sends, pipelined in one round trip (None: seed)
        "calls_per_round_trip": _refresh_calls(
            backend, [chain_path(f"{tag}c{i}", depth) for i in range(leases)]
        ),
        "interval_s": interval,
        "calls": calls,
        "seconds": seconds,
        "calls_per_s": calls / seconds,
        "calls_per_tick": calls / seconds * interval,
        "server_ms_per_s": (usec1 - usec0) / 1000 / seconds,
        "server_us_per_call": (usec1 - usec0) / calls if calls else 0.0,
    }


def _refresh_calls(backend: Backend, paths: list[str]) -> int | None:
    """How many script calls celery_hilok cuts one refresh of these paths into (all sent
    in one pipeline: one round trip); None for a backend that is not ours."""
    if not getattr(backend, "script_commands", ()) or type(backend).__name__ != "OursBackend":
        return None
    from celery_hilok import _core

    protocol = _core.Protocol("bench", "/")
    handle = _core.new_handle()
    items = [(handle, _core.Request.parse(p, "write", "/"), 10.0) for p in paths]
    return len(protocol.refresh_batches(items, False))


# -- dispatch ---------------------------------------------------------------------------------

_WORKLOADS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "rate": lock_rate,
    "floor": floor_rate,
    "wakeup": wakeup,
    "fairness": fairness,
    "handoff": handoff,
    "refresh": refresh_cost,
}


async def run_request(backend: Backend, request: dict[str, Any]) -> dict[str, Any]:
    """Run ``{"bench": <workload name>, **its keyword arguments}`` on ``backend``."""
    params = dict(request)
    name = params.pop("bench")
    workload = _WORKLOADS.get(name)
    if workload is None:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(_WORKLOADS)}")
    return await workload(backend, **params)
