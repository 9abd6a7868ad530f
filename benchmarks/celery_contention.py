"""Issue 13's "Measure it": Celery tasks under contention, every policy side by side.

Three scenarios run through a real prefork worker (``celery worker -P prefork -c 4``,
Redis broker, otherwise the project's and Celery's defaults: default prefetch, the
``retry`` policy's shipped backoff), once per policy (``hilok_on_contention``):

1. ``hot``: ``hot_tasks`` tasks write one path, each sleeping ``hot_body`` s, sent
   ``hot_gap`` s apart: makespan, lock busy share, out-of-order pairs, longest wait;
2. ``reindex``: a stream of edits (``edit_body`` s each, one sent every ``edit_gap`` s for
   ``edit_stream`` s) of ``tenants/t/docs/<d>``, d cycling over ``docs`` docs, and a
   reindex (write ``tenants/t``) sent ``reindex_at`` s into the stream: how long after the
   edits sent before it finished it started, and how many edits sent after it went first;
3. ``free``: ``busy_tasks`` tasks of ``busy_body`` s on one path, then at once
   ``free_tasks`` tasks of ``free_body`` s on paths of their own: how long until the free
   tasks were done.

Every (policy, scenario) gets its own run id, which is the root of its lock paths (a tree
of its own) and names its Celery queue, and a fresh worker consuming that queue, warmed
up first (short tasks until every pool process has run one). The task bodies record what
happened (see :mod:`benchmarks.celery_contention_app`); the sender passes its send time
as an argument; every figure is computed afterwards from those records.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import redis

from benchmarks.celery_bench import load_app, start_worker, stop_worker, tail

ROOT = Path(__file__).resolve().parent.parent
APP = "benchmarks.celery_contention_app"
#: the policies run by default, in this order, if this version knows them
POLICIES = ("park", "retry", "wait")
SCENARIOS = ("hot", "reindex", "free")

Say = Callable[[str], None]


@dataclass
class Sizes:
    """Sizes of the part (see :data:`QUICK` for the smoke mode)."""

    concurrency: int = 4
    #: 1. hot path
    hot_tasks: int = 32
    hot_body: float = 0.05
    hot_gap: float = 0.005
    #: 2. reindex among edits
    edit_body: float = 0.1
    edit_gap: float = 0.03
    edit_stream: float = 6.0
    docs: int = 8
    reindex_at: float = 0.5
    reindex_body: float = 0.2
    #: 3. free work behind busy work
    busy_tasks: int = 16
    busy_body: float = 0.2
    free_tasks: int = 8
    free_body: float = 0.0
    #: warm-up batches (of 2x concurrency short tasks) at most, until every process ran one
    warmup_batches: int = 5
    #: seconds for one scenario's tasks to end, else an error with the worker's log
    timeout: float = 180.0


QUICK = Sizes(
    hot_tasks=5,
    edit_stream=0.6,
    reindex_at=0.2,
    busy_tasks=3,
    free_tasks=3,
    warmup_batches=2,
    timeout=60.0,
)


# -- the worker -------------------------------------------------------------------------------


# -- one (policy, scenario) -------------------------------------------------------------------


@dataclass
class Send:
    """One task to send, ``at`` seconds after the scenario's start."""

    at: float
    kind: str
    i: int
    path: str
    seconds: float


class Session:
    """A fresh worker on a fresh queue, for one (policy, scenario)."""

    def __init__(
        self,
        module: ModuleType,
        base_url: str,
        policy: str,
        scenario: str,
        sizes: Sizes,
        log: IO[bytes],
    ) -> None:
        self.module = module
        self.base_url = base_url
        self.policy = policy
        self.scenario = scenario
        self.sizes = sizes
        self.task = module.app.tasks[module.task_name(policy)]
        self.run_id = f"{policy}-{scenario}-{os.getpid()}-{time.monotonic_ns()}"
        self.queue = f"bench.cc.{self.run_id}"
        self.client = redis.Redis.from_url(f"{base_url}/0")
        self.log = log
        self.worker: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Session:
        self.worker = start_worker(self.base_url, self.queue, self.sizes.concurrency, self.log, APP)
        return self

    def __exit__(self, *_: object) -> None:
        try:
            if self.worker is not None:
                stop_worker(self.worker)
        finally:
            self.client.close()

    def path(self, run: str, *segments: str) -> str:
        return "/".join((run, *segments))

    def send(self, run: str, plan: Sequence[Send]) -> tuple[float, list[dict[str, Any]]]:
        """Send ``plan`` on schedule (sleeping only to pace the sends); the start time and
        each send as sent."""
        sent: list[dict[str, Any]] = []
        t0 = time.monotonic()
        for item in sorted(plan, key=lambda s: s.at):
            delay = t0 + item.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            kwargs = {
                "path": item.path,
                "run": run,
                "kind": item.kind,
                "i": item.i,
                "sent": now,
                "seconds": item.seconds,
            }
            self.task.apply_async(kwargs=kwargs, queue=self.queue)
            sent.append({"kind": item.kind, "i": item.i, "sent": now})
        return t0, sent

    def wait_ends(self, run: str, tasks: int, timeout: float, what: str) -> None:
        """Poll until ``tasks`` executions of ``run`` have ended (not counting contention
        retries); an error with the worker's log if the worker dies or time runs out."""
        key = self.module.ENDS + run
        deadline = time.monotonic() + timeout
        while True:
            done = int(self.client.llen(key))
            if done >= tasks:
                return
            assert self.worker is not None
            if self.worker.poll() is not None:
                raise RuntimeError(
                    f"celery-contention {self.policy}/{what}: the worker exited with "
                    f"{self.worker.returncode}:\n{tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"celery-contention {self.policy}/{what}: {done}/{tasks} tasks ended in "
                    f"{timeout:g} s; worker log:\n{tail(self.log)}"
                )
            time.sleep(0.01)

    def outcome(self, run: str) -> tuple[list[dict[str, Any]], dict[str, int], int]:
        """The body records, the end states (counted) and the contention retries of ``run``."""
        m = self.module
        records = [json.loads(r) for r in self.client.lrange(m.RECORDS + run, 0, -1)]
        ends = self.client.lrange(m.ENDS + run, 0, -1)
        states = Counter(s.decode() if isinstance(s, bytes) else str(s) for s in ends)
        retries = int(self.client.get(m.RETRIES + run) or 0)
        return records, dict(states), retries

    def warm_up(self) -> int:
        """Short tasks on paths of their own until every pool process has run one (or
        ``warmup_batches`` batches ran): the worker is up and each process has its lock
        client. Returns the pool processes seen."""
        sizes = self.sizes
        pids: set[int] = set()
        for batch in range(sizes.warmup_batches):
            run = f"{self.run_id}-warmup{batch}"
            n = 2 * sizes.concurrency
            plan = [Send(0.0, "warmup", i, self.path(run, "w", str(i)), 0.05) for i in range(n)]
            self.send(run, plan)
            # the first batch waits for the worker's start-up too
            self.wait_ends(run, n, self.sizes.timeout, "warm-up")
            records, _, _ = self.outcome(run)
            pids |= {r["pid"] for r in records}
            if len(pids) >= sizes.concurrency:
                break
        return len(pids)

    def scenario_run(self, plan: list[Send], run: str) -> dict[str, Any]:
        pool = self.warm_up()
        t0, sent = self.send(run, plan)
        self.wait_ends(run, len(plan), self.sizes.timeout, self.scenario)
        records, states, retries = self.outcome(run)
        return {
            "run": run,
            "tasks": len(plan),
            "pool_processes_warmed": pool,
            "t0": t0,
            "sent": sent,
            "records": records,
            "states": states,
            "retries": retries,
            "completed": states.get("SUCCESS", 0) == len(plan) and len(records) == len(plan),
        }


# -- the scenarios ----------------------------------------------------------------------------


def hot_plan(run: str, sizes: Sizes) -> list[Send]:
    path = f"{run}/hot"
    return [Send(i * sizes.hot_gap, "hot", i, path, sizes.hot_body) for i in range(sizes.hot_tasks)]


def reindex_plan(run: str, sizes: Sizes) -> list[Send]:
    edits = max(1, round(sizes.edit_stream / sizes.edit_gap))
    plan = [
        Send(
            k * sizes.edit_gap,
            "edit",
            k,
            f"{run}/tenants/t/docs/d{k % sizes.docs}",
            sizes.edit_body,
        )
        for k in range(edits)
    ]
    plan.append(Send(sizes.reindex_at, "reindex", 0, f"{run}/tenants/t", sizes.reindex_body))
    return plan


def free_plan(run: str, sizes: Sizes) -> list[Send]:
    busy = [Send(0.0, "busy", i, f"{run}/busy", sizes.busy_body) for i in range(sizes.busy_tasks)]
    # "right after": at the same scheduled instant, sent after the busy ones (stable sort)
    free = [
        Send(0.0, "free", i, f"{run}/free/{i}", sizes.free_body) for i in range(sizes.free_tasks)
    ]
    return busy + free


PLANS = {"hot": hot_plan, "reindex": reindex_plan, "free": free_plan}


def hot_metrics(out: dict[str, Any]) -> dict[str, Any]:
    bodies = sorted((r for r in out["records"] if r["kind"] == "hot"), key=lambda r: r["i"])
    sent = [s["sent"] for s in out["sent"] if s["kind"] == "hot"]
    n = len(bodies)
    if not bodies:
        return {"ran": 0}
    first_start = min(r["start"] for r in bodies)
    last_end = max(r["end"] for r in bodies)
    span = last_end - first_start
    out_of_order = sum(
        1 for a in range(n) for b in range(a + 1, n) if bodies[b]["start"] < bodies[a]["start"]
    )
    return {
        "ran": n,
        "makespan_s": last_end - min(sent),
        "busy": sum(r["end"] - r["start"] for r in bodies) / span if span > 0 else None,
        "out_of_order": out_of_order,
        "pairs": n * (n - 1) // 2,
        "max_wait_s": max(r["start"] - r["sent"] for r in bodies),
        "ideal_s": sum(r["end"] - r["start"] for r in bodies),
    }


def reindex_metrics(out: dict[str, Any]) -> dict[str, Any]:
    edits = [r for r in out["records"] if r["kind"] == "edit"]
    found = [r for r in out["records"] if r["kind"] == "reindex"]
    if not found:
        return {"ran": False, "edits_ran": len(edits)}
    rx = found[0]
    ahead = [e for e in edits if e["sent"] < rx["sent"]]
    behind = [e for e in edits if e["sent"] > rx["sent"]]
    return {
        "ran": True,
        "edits_ran": len(edits),
        "edits_ahead": len(ahead),
        # start of the reindex - end of the last edit sent before it (negative: some edit
        # sent before it ran after it)
        "after_ahead_s": rx["start"] - max(e["end"] for e in ahead) if ahead else None,
        "overtaking_edits": sum(1 for e in behind if e["start"] < rx["start"]),
        "edits_behind": len(behind),
        "overtaken_edits": sum(1 for e in ahead if e["start"] > rx["start"]),
        "wait_s": rx["start"] - rx["sent"],
        "stream_done_s": (
            max(e["end"] for e in edits) - min(s["sent"] for s in out["sent"]) if edits else None
        ),
        "max_edit_wait_s": max((e["start"] - e["sent"] for e in edits), default=None),
    }


def free_metrics(out: dict[str, Any]) -> dict[str, Any]:
    free = [r for r in out["records"] if r["kind"] == "free"]
    busy = [r for r in out["records"] if r["kind"] == "busy"]
    free_sent = [s["sent"] for s in out["sent"] if s["kind"] == "free"]
    busy_sent = [s["sent"] for s in out["sent"] if s["kind"] == "busy"]
    return {
        "free_ran": len(free),
        "busy_ran": len(busy),
        "free_done_s": max(r["end"] for r in free) - min(free_sent) if free else None,
        "busy_done_s": max(r["end"] for r in busy) - min(busy_sent) if busy else None,
    }


METRICS = {"hot": hot_metrics, "reindex": reindex_metrics, "free": free_metrics}


def _compact(out: dict[str, Any]) -> dict[str, Any]:
    """The raw records, times relative to the scenario's start, for the JSON file."""
    t0 = out["t0"]
    rows = [
        [r["kind"], r["i"], *(round(r[k] - t0, 4) for k in ("sent", "start", "end")), r["pid"]]
        for r in sorted(out["records"], key=lambda r: r["start"])
    ]
    return {"columns": ["kind", "i", "sent", "start", "end", "pid"], "rows": rows}


def run_one(
    module: ModuleType, base_url: str, policy: str, scenario: str, sizes: Sizes
) -> dict[str, Any]:
    with (
        tempfile.TemporaryFile() as log,
        Session(module, base_url, policy, scenario, sizes, log) as session,
    ):
        run = session.run_id
        out = session.scenario_run(PLANS[scenario](run, sizes), run)
    return {
        **METRICS[scenario](out),
        "tasks": out["tasks"],
        "completed": out["completed"],
        "states": out["states"],
        "retries": out["retries"],
        "pool_processes_warmed": out["pool_processes_warmed"],
        "records": _compact(out),
    }


def _summary(scenario: str, r: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    if scenario == "hot":
        return (
            f"makespan {f(r.get('makespan_s'))} s, busy {f(r.get('busy'), '.0%')}, "
            f"{r.get('out_of_order')}/{r.get('pairs')} out of order, "
            f"retries {r['retries']}, completed {r['completed']}"
        )
    if scenario == "reindex":
        return (
            f"reindex {f(r.get('after_ahead_s'))} s after the edits ahead, "
            f"{r.get('overtaking_edits')} later edits first, wait {f(r.get('wait_s'))} s, "
            f"retries {r['retries']}"
        )
    return f"free tasks done in {f(r.get('free_done_s'))} s, retries {r['retries']}"


def run(
    base_url: str,
    sizes: Sizes | None = None,
    *,
    policies: Sequence[str] | None = None,
    scenarios: Sequence[str] = SCENARIOS,
    say: Say = print,
) -> dict[str, Any]:
    """Every scenario for every policy (default: those of :data:`POLICIES` this version
    knows); a policy this version does not know is skipped, and said so."""
    sizes = sizes or Sizes()
    module = load_app(base_url, APP)
    known: tuple[str, ...] = module.KNOWN
    wanted = list(POLICIES if policies is None else policies)
    ran = [p for p in wanted if p in known]
    skipped = {
        p: f"this version's hilok_on_contention policies are {', '.join(known)}: no {p!r}"
        for p in wanted
        if p not in known
    }
    for p, why in skipped.items():
        say(f"celery-contention: {p} skipped: {why}")
    results: dict[str, dict[str, Any]] = {p: {} for p in ran}
    for scenario in scenarios:
        for policy in ran:
            t = time.monotonic()
            r = run_one(module, base_url, policy, scenario, sizes)
            results[policy][scenario] = r
            say(
                f"celery-contention {scenario} {policy}: {_summary(scenario, r)} "
                f"({time.monotonic() - t:.1f} s with the worker's start and stop)"
            )
    return {
        "pool": "prefork",
        "concurrency": sizes.concurrency,
        "sizes": asdict(sizes),
        "policies": ran,
        "skipped": skipped,
        "results": results,
    }
