"""The lock-set harness: worker processes, their grant logs, and the offline checker.

Every worker (a ``spawn`` process) appends one JSON line per event to its own log file
and flushes it at once, so a worker killed with SIGKILL loses at most a torn last line.
Times are ``time.monotonic()``: CLOCK_MONOTONIC, one clock for every process on Linux,
so intervals from different processes compare directly.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import redis

from celery_hilok import HiLok, HiLokError, Lease, LockLost, LockNotAcquired
from examples.fenced_store import FencedStore, StaleToken
from tests._reference import conflicts, segments

SPAWN = multiprocessing.get_context("spawn")
LONG = os.environ.get("HILOK_FAULTS_LONG", "") not in ("", "0")
TREE = ("a", "a/b", "a/c", "a/b/d", "a/b/e", "f", "f/g")  # depth <= 3, two trees
READ_SHARE = 0.7
WAIT = 60.0  # cap on any cross-process step: a hang fails the test, slowness does not
# Workers fail fast on a dead or silent server rather than after redis-py's 10 s default.
CLIENT_OPTIONS: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}


def scenario_seconds(short: float) -> float:
    """How long a scenario's workload runs: ``short`` normally, 60 s in long mode."""
    return 60.0 if LONG else short


@dataclass
class Config:
    """What a worker needs (picklable: it crosses the spawn boundary)."""

    url: str  # where the lock client connects (maybe through the proxy)
    store_url: str  # where the fenced store lives
    namespace: str
    logdir: str
    duration: float = 4.0
    ttl: float = 2.0
    timeout: float = 1.0
    hold_max: float = 0.02
    options: dict[str, Any] = field(default_factory=lambda: dict(CLIENT_OPTIONS))


class Log:
    """One process's append-only event log (JSON lines, flushed per line)."""

    def __init__(self, logdir: str, name: str) -> None:
        self._file = open(Path(logdir) / f"{name}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115

    def __call__(self, kind: str, **fields: Any) -> None:
        fields.update(k=kind, pid=os.getpid())
        self._file.write(json.dumps(fields) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _store(cfg: Config) -> FencedStore:
    client = redis.Redis.from_url(cfg.store_url, socket_timeout=2.0, socket_connect_timeout=1.0)
    return FencedStore(client, prefix=f"{cfg.namespace}:store")


def _fenced_write(store: FencedStore, lease: Lease, log: Log, value: str) -> None:
    began = time.monotonic()
    try:
        store.write(lease.path, value, lease)
        outcome = "accepted"
    except StaleToken:
        outcome = "refused"
    except redis.RedisError as exc:
        outcome = f"error:{type(exc).__name__}"
    log("W", path=lease.path, token=lease.token, t0=began, t1=time.monotonic(), outcome=outcome)


def worker(cfg: Config, seed: int, start: Any) -> None:
    """Random reads (70%) and writes with short random holds until ``cfg.duration`` is up.

    Each grant is logged at acquire ("G") and at its end ("E"); the end is taken just
    before a refresh that proves the lease was still held then (a lease found gone is
    logged as lost and its grant is not held to the exclusion rule).
    """
    log = Log(cfg.logdir, "worker")
    try:
        rng = random.Random(seed)
        hl = HiLok(cfg.url, namespace=cfg.namespace, ttl=cfg.ttl, redis_options=cfg.options)
        store = _store(cfg)
        start.wait(WAIT)
        until = time.monotonic() + cfg.duration
        for _ in range(1_000_000):  # bounded: the deadline ends it long before
            if time.monotonic() >= until:
                break
            path = rng.choice(TREE)
            mode = "read" if rng.random() < READ_SHARE else "write"
            asked = time.monotonic()
            try:
                lease = hl.acquire(path, mode, timeout=cfg.timeout)  # type: ignore[arg-type]
            except LockNotAcquired:
                log("T", path=path, mode=mode, t0=asked, t1=time.monotonic())
                continue
            except HiLokError as exc:
                log("X", op="acquire", error=type(exc).__name__, t0=asked, t1=time.monotonic())
                continue
            began = time.monotonic()
            log("G", path=lease.path, mode=mode, token=lease.token, start=began)
            hl.keep_alive(lease)
            if mode == "write":
                _fenced_write(store, lease, log, f"{os.getpid()}:{lease.token}")
            hold = rng.uniform(0.0, cfg.hold_max)
            time.sleep(hold)  # the critical section itself, not synchronisation
            ended = time.monotonic()
            lost: str | None = "keep_alive" if lease.lost else None
            try:
                hl.stop_keep_alive(lease)
                hl.refresh(lease)
            except LockLost:
                lost = lost or "LockLost"
            except HiLokError as exc:
                lost = lost or type(exc).__name__
            log("E", token=lease.token, end=ended, lost=lost)
            try:
                hl.release(lease)
            except HiLokError as exc:
                log("X", op="release", error=type(exc).__name__, t0=ended, t1=time.monotonic())
        hl.close()
        log("DONE")
    except BaseException:
        log("CRASH", trace=traceback.format_exc())
    finally:
        log.close()


def victim(cfg: Config, path: str, ready: Any) -> None:
    """Hold a write lock on ``path`` (kept alive) and write to the fenced store every few
    milliseconds until the lease is found lost (or ``cfg.duration`` is up); then refresh,
    which must raise LockLost, and try one last write knowing the lease is gone."""
    log = Log(cfg.logdir, "victim")
    try:
        hl = HiLok(cfg.url, namespace=cfg.namespace, ttl=cfg.ttl, redis_options=cfg.options)
        store = _store(cfg)
        lease = hl.acquire(path, "write", timeout=WAIT)
        log("G", path=lease.path, mode="write", token=lease.token, start=time.monotonic())
        hl.keep_alive(lease)
        _fenced_write(store, lease, log, "victim-first")
        ready.set()
        until = time.monotonic() + cfg.duration
        for i in range(1_000_000):
            if lease.lost or time.monotonic() >= until:
                break
            _fenced_write(store, lease, log, f"victim-{i}")
            time.sleep(0.005)  # pacing of the writes, not synchronisation
        log("LOST", lost=lease.lost, at=time.monotonic())
        try:
            hl.refresh(lease)
            outcome = "ok"
        except LockLost:
            outcome = "LockLost"
        except HiLokError as exc:
            outcome = type(exc).__name__
        log("R", outcome=outcome)
        _fenced_write(store, lease, log, "victim-after-loss")
        hl.close()
        log("DONE")
    except BaseException:
        log("CRASH", trace=traceback.format_exc())
    finally:
        log.close()


# -- running --------------------------------------------------------------------------------


@contextmanager
def workload(cfg: Config, workers: int, to_kill: int = 0) -> Iterator[list[Any]]:
    """Start ``workers`` worker processes, release them together, and on exit wait for them
    (a worker still alive ``WAIT`` seconds after its deadline is a hang: killed, reported).

    The first ``to_kill`` of them work on past ``cfg.duration`` (for up to ``WAIT``), until
    the test kills them: still at work whenever the test gets to it, however slow it is.
    """
    start = SPAWN.Barrier(workers + 1)
    seeds = [random.randrange(2**32) for _ in range(workers)]
    until_killed = dataclasses.replace(cfg, duration=WAIT)
    procs = [
        SPAWN.Process(
            target=worker, args=(until_killed if i < to_kill else cfg, s, start), daemon=True
        )
        for i, s in enumerate(seeds)
    ]
    for proc in procs:
        proc.start()
    hung: list[int] = []
    try:
        start.wait(WAIT)
        yield procs
    finally:
        for proc in procs[:to_kill]:  # not killed: the test failed before it got to it
            if proc.is_alive():
                proc.kill()
        deadline = time.monotonic() + cfg.duration + WAIT
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                hung.append(proc.pid or 0)
                proc.kill()
                proc.join(5.0)
    assert not hung, f"workers {hung} did not finish (seeds {seeds}): a hang"


def start_victim(cfg: Config, path: str) -> Any:
    ready = SPAWN.Event()
    proc = SPAWN.Process(target=victim, args=(cfg, path, ready), daemon=True)
    proc.start()
    assert ready.wait(WAIT), "victim never got its lock"
    return proc


# -- the history ----------------------------------------------------------------------------


class Grant(NamedTuple):
    pid: int
    path: str
    mode: str
    token: int
    start: float
    end: float
    lost: str | None


@dataclass
class History:
    grants: list[Grant]
    events: list[dict[str, Any]]

    def kind(self, k: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["k"] == k]

    @property
    def valid(self) -> list[Grant]:
        """Grants whose lease was never found lost: the exclusion rule applies to them."""
        return [g for g in self.grants if g.lost is None]


def read_history(logdir: str, ended_at: dict[int, float] | None = None) -> History:
    """Parse every log; an open grant ends at ``ended_at[pid]`` (the time the test killed or
    stopped that process), or is an error if the process was not faulted."""
    events: list[dict[str, Any]] = []
    for file in sorted(Path(logdir).glob("*.jsonl")):
        for line in file.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line torn by SIGKILL
    crashes = [e["trace"] for e in events if e["k"] == "CRASH"]
    assert not crashes, "a worker crashed:\n" + "\n".join(crashes)
    open_: dict[tuple[int, int], dict[str, Any]] = {}
    grants: list[Grant] = []
    for e in events:
        if e["k"] == "G":
            open_[(e["pid"], e["token"])] = e
        elif e["k"] == "E":
            g = open_.pop((e["pid"], e["token"]))
            grants.append(
                Grant(e["pid"], g["path"], g["mode"], g["token"], g["start"], e["end"], e["lost"])
            )
    for (pid, _), g in open_.items():
        assert ended_at is not None and pid in ended_at, f"grant never ended: {g}"
        grants.append(Grant(pid, g["path"], g["mode"], g["token"], g["start"], ended_at[pid], None))
    return History(grants, events)


@dataclass
class Verdict:
    grants: int
    excluded: int
    pairs: int
    overlaps: list[tuple[Grant, Grant]]
    token_inversions: list[tuple[Grant, Grant]]

    @property
    def violations(self) -> int:
        return len(self.overlaps) + len(self.token_inversions)


def check(grants: list[Grant], epochs: Callable[[Grant], int] | None = None) -> Verdict:
    """Check every conflicting pair of grants: their intervals must not overlap, and the one
    that started later must carry the larger token (compared only within one ``epochs``
    group: a server restarted without persistence starts its tokens again)."""
    valid = [g for g in grants if g.lost is None]
    epoch = epochs or (lambda g: 0)
    kinds = {(g.path, g.mode) for g in valid}
    rivals = {k: [o for o in kinds if conflicts(o[1], o[0], k[1], k[0])] for k in kinds}
    # per (path, mode) so far: how many, the grant with the latest end, and per epoch the
    # grant with the largest token; one pass in start order checks every conflicting pair
    count: dict[tuple[str, str], int] = {}
    latest: dict[tuple[str, str], Grant] = {}
    top: dict[tuple[tuple[str, str], int], Grant] = {}
    overlaps: list[tuple[Grant, Grant]] = []
    inversions: list[tuple[Grant, Grant]] = []
    pairs = 0
    for g in sorted(valid, key=lambda g: g.start):
        me = (g.path, g.mode)
        for other in rivals[me]:
            pairs += count.get(other, 0)
            ended = latest.get(other)
            if ended is not None and ended.end > g.start:
                overlaps.append((ended, g))
            tokened = top.get((other, epoch(g)))
            if tokened is not None and tokened.token >= g.token:
                inversions.append((tokened, g))
        count[me] = count.get(me, 0) + 1
        if me not in latest or latest[me].end < g.end:
            latest[me] = g
        if (me, epoch(g)) not in top or top[(me, epoch(g))].token < g.token:
            top[(me, epoch(g))] = g
    return Verdict(len(grants), len(grants) - len(valid), pairs, overlaps, inversions)


def assert_sound(verdict: Verdict, minimum: int) -> None:
    assert verdict.grants - verdict.excluded >= minimum, (
        f"only {verdict.grants - verdict.excluded} checked grants: the run proves nothing"
    )
    assert not verdict.overlaps, f"conflicting grants overlap: {verdict.overlaps[:3]}"
    assert not verdict.token_inversions, (
        f"a later conflicting grant has a smaller token: {verdict.token_inversions[:3]}"
    )


def trees_of(grants: list[Grant]) -> set[str]:
    return {segments(g.path)[0] for g in grants}
