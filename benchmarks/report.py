"""Ratios, targets, the Markdown tables and the chart of a results dict (see ``run.py``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

DASH = "—"

# Targets of issue 14 (uncontended speed), for one client as the issue measures it:
# AsyncHiLok/seed at each depth, share of the two-round-trip floor, Redis time per pair.
SEED_RATIOS = {1: 1.0, 3: 3.0, 8: 6.5}
FLOOR_SHARE = 0.70
SERVER_US_D3 = 50.0
TARGET_CLIENTS = 1
WAKEUP_MEDIAN_MS = 2.0
# A fair writer waits for the readers ahead of it plus one wake-up: allow this much more.
FAIR_SLACK_MS = 10.0
# "One command per tick": a counting window of 8 ticks can catch one tick more or less.
REFRESH_PER_TICK = 1.25
CELERY_LOCKED_SHARE = 0.85

# Targets of issue 12 (the engine under contention).
ELSEWHERE_RATIO = 1.2
DRAIN_CALLS_PER_WAITER = 3.0
DRAIN_TIME_SLACK = 1.25  # 4x the waiters, at most 5x the time
HOT_SEED_RATIO = 2.0
# A grant by hand-off: the waiter's one acquire call (refused, queued) and its release,
# which grants the next holder.
HOT_CALLS_PER_GRANT = 2.0
MEMORY_SLACK = 10
MAX_CHANNELS = 10
MAX_SCRIPT_MS = 5.0
HOLDER_MS = 1.0
#: The "now" column of issue 12's table, as measured when the issue was filed.
ISSUE12_NOW = {
    1: "2.75x at 1,000 waiters (10,000 waiters: 18.6 ms a call)",
    2: "400 waiters: 11.8 s, 196 calls per waiter; 100 waiters: 0.6 s, 31 per waiter",
    3: "4 script calls per grant",
    4: "20,002 members left",
    5: "2,000 channels",
    6: "one 60 ms script (depth 32: 200-440 ms)",
    7: "HiLokError ... too many results to unpack",
    8: "11.7 ms; 10-18 ms each",
}


# -- lookups ----------------------------------------------------------------------------------


def rate_of(results: dict[str, Any], lib: str, mode: str, depth: int, clients: int) -> float | None:
    for row in results.get("rate", {}).get("rates", []):
        if (row["lib"], row["mode"], row["depth"], row["clients"]) == (lib, mode, depth, clients):
            return float(row["rate"])
    return None


def floor_of(results: dict[str, Any], client: str, kind: str, clients: int) -> float | None:
    for row in results.get("rate", {}).get("floors", []):
        if (row["client"], row["kind"], row["clients"]) == (client, kind, clients):
            return float(row["rate"])
    return None


def cpu_of(
    results: dict[str, Any],
    lib: str,
    mode: str,
    depth: int,
    clients: int,
    name: str = "cpu_us_per_op",
) -> float | None:
    """Client CPU microseconds per pair (or another per-op figure, ``name``) of a cell;
    ``lib`` "floor:<client>" for a floor's."""
    if lib.startswith("floor:"):
        rows = results.get("rate", {}).get("floors", [])
        key: tuple[Any, ...] = (lib[6:], "evalsha", clients)
        fields: tuple[str, ...] = ("client", "kind", "clients")
    else:
        rows = results.get("rate", {}).get("rates", [])
        key, fields = (lib, mode, depth, clients), ("lib", "mode", "depth", "clients")
    for row in rows:
        if tuple(row[f] for f in fields) == key:
            value = row.get(name)
            return None if value is None else float(value)
    return None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return DASH if value is None else f"{value:{spec}}{suffix}"


def _grid(results: dict[str, Any]) -> list[tuple[int, str, int]]:
    rows = {(r["clients"], r["mode"], r["depth"]) for r in results.get("rate", {}).get("rates", [])}
    order = {"write": 0, "read": 1}
    return sorted(rows, key=lambda k: (k[0], order.get(k[1], 9), k[2]))


# -- targets ----------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target (issue 14's for the rate part) with the value measured in this run and
    whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: float | None, met: bool | None, detail: str) -> None:
        out.append({"target": name, "goal": goal, "value": value, "met": met, "detail": detail})

    grid = [(c, m, d) for c, m, d in _grid(results) if c == TARGET_CLIENTS]
    if grid:
        for depth, goal in SEED_RATIOS.items():
            ratios = [
                (
                    _div(
                        rate_of(results, "AsyncHiLok", m, d, c), rate_of(results, "seed", m, d, c)
                    ),
                    m,
                    c,
                )
                for c, m, d in grid
                if d == depth
            ]
            known = [(r, m, c) for r, m, c in ratios if r is not None]
            if known:
                worst = min(known)
                ceiling = _div(
                    floor_of(results, "async", "evalsha", worst[2]),
                    rate_of(results, "seed", worst[1], depth, worst[2]),
                )
                add(
                    f"acquire+release vs seed, depth {depth}",
                    f">= {goal:g}x",
                    worst[0],
                    worst[0] >= goal,
                    f"worst: {worst[1]}, {worst[2]} client(s); AsyncHiLok/seed. Ceiling for "
                    f"any two-round-trip lock there (floor/seed): {_fmt(ceiling, '.1f', 'x')}",
                )
        for lib, client in (("AsyncHiLok", "async"), ("HiLok", "sync")):
            shares = [
                (
                    _div(rate_of(results, lib, m, d, c), floor_of(results, client, "evalsha", c)),
                    m,
                    d,
                    c,
                )
                for c, m, d in grid
            ]
            known4 = [(r, m, d, c) for r, m, d, c in shares if r is not None]
            if known4:
                worst4 = min(known4)
                add(
                    f"{lib}: share of the two-EVALSHA floor",
                    f">= {FLOOR_SHARE:.2f}",
                    worst4[0],
                    worst4[0] >= FLOOR_SHARE,
                    f"worst: {worst4[1]} depth {worst4[2]}, {worst4[3]} client(s); {lib}/floor",
                )
        server = [
            (cpu_of(results, "AsyncHiLok", m, 3, c, "server_us_per_op"), m)
            for c, m, d in grid
            if d == 3
        ]
        known_s = [(v, m) for v, m in server if v is not None]
        if known_s:
            most = max(known_s)
            add(
                "Redis time per pair, depth 3",
                f"<= {SERVER_US_D3:g} µs",
                most[0],
                most[0] <= SERVER_US_D3,
                f"worst: {most[1]}, AsyncHiLok (INFO commandstats)",
            )
    wake = results.get("wakeup", {}).get("ours", [])
    if wake:
        worst_case = max(wake, key=lambda r: r["median_ms"])
        add(
            "wake-up median",
            f"<= {WAKEUP_MEDIAN_MS:g} ms",
            worst_case["median_ms"],
            worst_case["median_ms"] <= WAKEUP_MEDIAN_MS,
            f"worst case: {worst_case['case']}",
        )
    fair = results.get("fairness", {}).get("ours")
    if fair:
        after = fair["max_after_ahead_ms"]
        ok = (
            fair["starved"] == 0
            and fair["overtaking_grants"] == 0
            and after is not None
            and after <= FAIR_SLACK_MS
        )
        add(
            "fair writer waits only for the readers ahead",
            f"no reader overtakes; granted <= {FAIR_SLACK_MS:g} ms after the last one ahead left",
            after,
            ok,
            f"overtaking reader grants: {fair['overtaking_grants']}, starved: {fair['starved']}; "
            f"max wait {fair['max_wait_ms']:.1f} ms (value: ms after the readers ahead)",
        )
    refresh = results.get("refresh", {}).get("ours", [])
    if refresh:
        # round trips per tick: a tick's calls (cut to at most MAX_CALL_KEYS keys each, so
        # that no script holds Redis long) go in one pipeline
        def trips(r: dict[str, Any]) -> float:
            return float(r["calls_per_tick"]) / max(1, r.get("calls_per_round_trip") or 1)

        worst_r = max(refresh, key=trips)
        add(
            "refresh: one round trip per tick, any number of leases",
            f"<= {REFRESH_PER_TICK:g} round trips/tick",
            trips(worst_r),
            trips(worst_r) <= REFRESH_PER_TICK,
            f"worst at {worst_r['leases']} leases "
            f"({worst_r.get('calls_per_round_trip') or 1} script calls a round trip)",
        )
    celery = results.get("celery")
    if celery:
        rates = celery.get("rates", {})
        share = _div(rates.get("distinct"), rates.get("unlocked"))
        add(
            "Celery locked (distinct paths) vs unlocked",
            f">= {CELERY_LOCKED_SHARE:.0%}",
            share,
            None if share is None else share >= CELERY_LOCKED_SHARE,
            "skipped: " + celery["skipped"] if celery.get("skipped") else "distinct/unlocked",
        )
    park = results.get("celery-contention", {}).get("results", {}).get("park")
    if park:
        for target, bound, value, met in celery_contention_targets(park):
            add(f"Celery under contention (park): {target}", bound, value, met, "issue 13")
    return out


# -- tables -----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown (readable as plain text too)."""
    meta = results.get("meta", {})
    seed = meta.get("seed") or {}
    parts = [
        "## Machine and run",
        "",
        f"- {meta.get('nproc')} CPUs ({meta.get('cpu')}), {meta.get('os')}",
        f"- Python {meta.get('python')}, redis-server {meta.get('redis_server')}, "
        f"redis-py {meta.get('redis_py')}, hiredis {meta.get('hiredis')}, "
        f"celery {meta.get('celery')}, celery-hilok {meta.get('celery_hilok')} "
        f"(git {meta.get('git_commit')}{', dirty tree' if meta.get('git_dirty') else ''})",
        "- seed: "
        + (
            f"redishilok {seed.get('redishilok')} on redis-py {seed.get('redis')}, "
            f"hiredis {seed.get('hiredis')}, Python {seed.get('python')}"
            if seed
            else "not measured (--no-seed)"
        ),
        f"- mode {meta.get('mode')}, `{meta.get('command')}`, {meta.get('date')}, "
        f"{meta.get('seconds')} s; load average "
        f"{_load(meta.get('loadavg_start'))} at start, {_load(meta.get('loadavg_end'))} at end",
    ]
    if "rate" in results:
        parts += ["", _rate_section(results)]
    if "wakeup" in results:
        parts += ["", _wakeup_section(results["wakeup"])]
    if "fairness" in results:
        parts += ["", _fairness_section(results["fairness"])]
    if "handoff" in results:
        parts += ["", _handoff_section(results["handoff"])]
    if "refresh" in results:
        parts += ["", _refresh_section(results["refresh"])]
    if "celery" in results:
        parts += ["", _celery_section(results["celery"])]
    if "contention" in results:
        parts += ["", contention_section(results["contention"])]
    if "celery-contention" in results:
        parts += ["", celery_contention_section(results["celery-contention"])]
    if results.get("targets"):
        rows = [
            [
                t["target"],
                t["goal"],
                _fmt(t["value"], ".2f"),
                {True: "met", False: "**missed**", None: DASH}[t["met"]],
                t["detail"],
            ]
            for t in results["targets"]
        ]
        parts += ["", "### Targets", "", _table(["target", "goal", "value", "", "detail"], rows)]
    return "\n".join(parts) + "\n"


def _load(values: Any) -> str:
    return DASH if not values else "/".join(f"{v:.2f}" for v in values)


def _rate_section(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    rows = []
    for c, m, d in _grid(results):
        a = rate_of(results, "AsyncHiLok", m, d, c)
        s = rate_of(results, "HiLok", m, d, c)
        seed = rate_of(results, "seed", m, d, c)
        fa = floor_of(results, "async", "evalsha", c)
        fs = floor_of(results, "sync", "evalsha", c)
        rows.append(
            [
                str(c),
                m,
                str(d),
                _fmt(a),
                _fmt(s),
                _fmt(seed),
                _fmt(_div(a, seed), ".1f", "x"),
                _fmt(_div(s, seed), ".1f", "x"),
                _fmt(_div(fa, seed), ".1f", "x"),
                _fmt(_div(fa, a), ".2f", "x"),
                _fmt(_div(fs, s), ".2f", "x"),
            ]
        )
    header = [
        "clients",
        "mode",
        "depth",
        "AsyncHiLok /s",
        "HiLok /s",
        "seed /s",
        "Async/seed",
        "HiLok/seed",
        "floor/seed",
        "floor/Async",
        "floor/HiLok",
    ]
    cpu_rows = []
    for c, m, d in _grid(results):
        a = cpu_of(results, "AsyncHiLok", m, d, c)
        s = cpu_of(results, "HiLok", m, d, c)
        seed = cpu_of(results, "seed", m, d, c)
        fa = cpu_of(results, "floor:async", m, d, c)
        fs = cpu_of(results, "floor:sync", m, d, c)
        cpu_rows.append(
            [
                str(c),
                m,
                str(d),
                _fmt(a),
                _fmt(s),
                _fmt(seed),
                _fmt(_div(seed, a), ".1f", "x"),
                _fmt(_div(a, fa), ".2f", "x"),
                _fmt(_div(s, fs), ".2f", "x"),
                _fmt(cpu_of(results, "AsyncHiLok", m, d, c, "script_calls_per_op"), ".1f"),
                _fmt(cpu_of(results, "seed", m, d, c, "script_calls_per_op"), ".1f"),
                _fmt(cpu_of(results, "AsyncHiLok", m, d, c, "server_us_per_op"), ".0f"),
                _fmt(cpu_of(results, "seed", m, d, c, "server_us_per_op"), ".0f"),
            ]
        )
    cpu_header = [
        "clients",
        "mode",
        "depth",
        "AsyncHiLok µs",
        "HiLok µs",
        "seed µs",
        "seed/Async",
        "Async/floor",
        "HiLok/floor",
        "Async calls",
        "seed calls",
        "Async server µs",
        "seed server µs",
    ]
    floors = results["rate"].get("floors", [])
    clients = sorted({f["clients"] for f in floors})
    kinds = sorted({(f["client"], f["kind"]) for f in floors})
    floor_rows = [
        [client, f"2x {kind.upper()}"] + [_fmt(floor_of(results, client, kind, c)) for c in clients]
        for client, kind in kinds
    ]
    labels = {"async": "redis.asyncio", "sync": "redis (sync)", "seed-async": "seed venv asyncio"}
    for row in floor_rows:
        row[0] = labels.get(row[0], row[0])
    return "\n".join(
        [
            "### 1. Uncontended acquire+release (context managers, pairs per second)",
            "",
            f"Median of {cfg.get('rounds')} interleaved round(s) of {cfg.get('duration')} s each. "
            "Each client works on its own tree; 32 clients are 32 asyncio tasks sharing one "
            "instance (HiLok: 32 threads sharing one HiLok). floor/X: how many times slower X "
            "is than two bare EVALSHA round trips from the same kind of client; floor/seed is "
            "thus the most any lock taking two round trips per pair could gain on the seed.",
            "",
            _table(header, rows),
            "",
            "Physical floor (two round trips per pair, pairs per second):",
            "",
            _table(["client", "pair"] + [f"{c} client(s)" for c in clients], floor_rows),
            "",
            "Cost per pair. µs: client CPU time (user+system time of the whole client "
            "process, all threads; time spent waiting for a CPU is not counted, so these "
            "ratios are steadier than the rates on a busy machine). floor: two bare EVALSHA "
            "from the same kind of client. calls: script calls (EVALSHA/EVAL) per pair; "
            "server µs: time Redis spent running them (INFO commandstats).",
            "",
            _table(cpu_header, cpu_rows),
        ]
    )


def _wakeup_section(wakeup: dict[str, Any]) -> str:
    seed = {r["case"]: r for r in wakeup.get("seed", [])}
    rows = []
    for r in wakeup.get("ours", []):
        s = seed.get(r["case"], {})
        rows.append(
            [
                r["case"],
                _fmt(r.get("median_ms"), ".2f"),
                _fmt(r.get("p99_ms"), ".2f"),
                str(r.get("n")),
                _fmt(s.get("median_ms"), ".1f"),
                _fmt(s.get("p99_ms"), ".1f"),
                str(s.get("n", DASH)),
            ]
        )
    return "\n".join(
        [
            "### 2. Wake-up latency",
            "",
            "From the holder starting its release to the blocked waiter's acquire returning "
            "(holder and waiter: two instances on one event loop).",
            "",
            _table(
                ["case", "AsyncHiLok median ms", "p99 ms", "n", "seed median ms", "p99 ms", "n"],
                rows,
            ),
        ]
    )


def _fairness_section(fair: dict[str, Any]) -> str:
    rows = []
    for lib, label in (("ours", "AsyncHiLok"), ("seed", "seed")):
        f = fair.get(lib)
        if not f:
            continue
        trials = f["trials"]
        rows.append(
            [
                label,
                str(len(trials)),
                f"{f['readers']} x {f['hold_ms']:.0f} ms",
                _fmt(f["max_wait_ms"], ".1f"),
                _fmt(f["max_after_ahead_ms"], ".1f"),
                str(max(t["readers_ahead"] for t in trials)),
                str(f["overtaking_grants"]),
                f"{f['starved']} (cap {f['cap_s']:g} s)",
            ]
        )
    return "\n".join(
        [
            "### 3. Fairness: a writer behind looping readers",
            "",
            "Readers hold the path in staggered turns, each asking again as soon as it leaves. "
            "'after ahead': from the last reader that asked before the writer leaving to the "
            "writer's grant. 'overtaking': reader grants asked for after the writer asked and "
            "granted before it.",
            "",
            _table(
                [
                    "lib",
                    "trials",
                    "readers x hold",
                    "writer wait, max ms",
                    "after ahead, max ms",
                    "readers ahead",
                    "overtaking grants",
                    "starved",
                ],
                rows,
            ),
        ]
    )


def _handoff_section(handoff: dict[str, Any]) -> str:
    rows = []
    for lib, label in (("ours", "AsyncHiLok"), ("seed", "seed")):
        h = handoff.get(lib)
        if h:
            rows.append(
                [
                    label,
                    str(len(h["per_client"])),
                    _fmt(h["rate"], ".1f"),
                    f"{h['min_per_contender']} / {h['max_per_contender']}",
                    _fmt(h.get("script_calls_per_grant"), ".1f"),
                ]
            )
    ratio = _div(handoff.get("ours", {}).get("rate"), handoff.get("seed", {}).get("rate"))
    return "\n".join(
        [
            "### 4. Hot lock hand-off (contenders looping on write of one path)",
            "",
            _table(
                [
                    "lib",
                    "contenders",
                    "grants/s",
                    "grants per contender, min / max",
                    "script calls per grant",
                ],
                rows,
            ),
            "",
            f"AsyncHiLok/seed: {_fmt(ratio, '.2g', 'x')}",
        ]
    )


def _refresh_section(refresh: dict[str, Any]) -> str:
    seed = {r["leases"]: r for r in refresh.get("seed", [])}
    rows = []
    interval = depth = None
    for r in refresh.get("ours", []):
        s = seed.get(r["leases"], {})
        interval, depth = r["interval_s"], r["depth"]
        rows.append(
            [
                str(r["leases"]),
                _fmt(r["calls_per_s"], ".1f"),
                _fmt(r["calls_per_tick"], ".2f"),
                _fmt(r["server_ms_per_s"], ".2f"),
                _fmt(s.get("calls_per_s"), ".1f"),
                _fmt(s.get("calls_per_tick"), ".1f"),
                _fmt(s.get("server_ms_per_s"), ".2f"),
            ]
        )
    return "\n".join(
        [
            f"### 5. Refresh cost (context-manager locks at depth {depth}, renewed every "
            f"{interval} s, one process)",
            "",
            _table(
                [
                    "leases",
                    "AsyncHiLok script calls/s",
                    "calls/tick",
                    "server ms/s",
                    "seed script calls/s",
                    "calls/tick",
                    "server ms/s",
                ],
                rows,
            ),
        ]
    )


def _celery_section(celery: dict[str, Any]) -> str:
    rates = celery.get("rates", {})
    base = rates.get("unlocked")
    labels = {
        "unlocked": "no lock",
        "distinct": "hilok_write, distinct path per task",
        "hot": "hilok_write, one hot path (wait)",
    }
    rows = [[labels.get(v, v), _fmt(r), _fmt(_div(r, base), ".0%")] for v, r in rates.items()]
    lines = [
        f"### 6. Celery: no-op tasks through a {celery.get('pool')} worker "
        f"(concurrency {celery.get('concurrency')}, Redis broker)",
        "",
        _table(["variant", "tasks/s", "vs no lock"], rows),
    ]
    if celery.get("skipped"):
        lines += ["", f"Locked variants skipped: {celery['skipped']}"]
    commands = []
    for variant, runs in celery.get("runs", {}).items():
        per = runs[0].get("commands_per_task") if runs else None
        if per:
            scripts = per.get("evalsha", 0) + per.get("eval", 0)
            top = f"script calls {scripts:g}; " + ", ".join(
                f"{n} {v:g}" for n, v in list(per.items())[:8]
            )
            commands.append(f"- {labels.get(variant, variant)}: {top}")
    if commands:
        lines += [
            "",
            "Redis commands per task (first round, worker start-up included; commands run "
            "inside scripts count too, evalsha is the number of script calls):",
            "",
            *commands,
        ]
    return "\n".join(lines)


def _met(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: DASH}[ok]


def _n(value: int) -> str:
    return f"{value:,}"


def contention_targets(c: dict[str, Any]) -> list[dict[str, Any]]:
    """Each row of issue 12's table: what this run measured, the issue's "now", the target
    and whether it is met (None: not measured, e.g. the seed with --no-seed)."""
    out: list[dict[str, Any]] = []

    def add(row: int, case: str, measured: str, goal: str, met: bool | None) -> None:
        out.append(
            {
                "row": row,
                "case": case,
                "measured": measured,
                "now": ISSUE12_NOW[row],
                "goal": goal,
                "met": met,
            }
        )

    rows = c.get("elsewhere", [])
    if rows:
        add(
            1,
            "free acquire+release, W waiters queued on another path of the tree, vs an idle tree",
            "; ".join(
                f"{_n(r['waiters'])}: {r['ratio']:.2f}x ({r['busy']['median_ms']:.2f} vs "
                f"{r['idle']['median_ms']:.2f} ms)"
                for r in rows
            ),
            f"<= {ELSEWHERE_RATIO:g}x at every W",
            all(r["ratio"] <= ELSEWHERE_RATIO for r in rows),
        )
    rows = c.get("drain", [])
    if rows:
        scaling = [
            (b["seconds"] / a["seconds"], b["waiters"] / a["waiters"])
            for a, b in itertools.pairwise(rows)
            if a["seconds"] and b["seconds"]
        ]
        text = "; ".join(
            f"{_n(r['waiters'])}: "
            + (f"{r['seconds']:.2f} s" if r["seconds"] is not None else "**not drained**")
            + f", {_n(r['script_calls'])} calls ({r['calls_per_waiter']:.1f} per waiter)"
            for r in rows
        )
        text += "".join(f"; {t:.1f}x the time for {w:g}x the waiters" for t, w in scaling)
        drained = all(
            r["seconds"] is not None and r["calls_per_waiter"] <= DRAIN_CALLS_PER_WAITER
            for r in rows
        ) and all(t <= DRAIN_TIME_SLACK * w for t, w in scaling)
        add(
            2,
            "W waiters on one write lock, drained by releasing it",
            text,
            f"<= {DRAIN_CALLS_PER_WAITER:g} script calls per waiter; 4x the waiters <= 5x the time",
            drained,
        )
    hot = c.get("hot", {})
    if hot.get("ours"):
        h, seed = hot["ours"], hot.get("seed")
        ratio = _div(h["rate"], seed["rate"]) if seed else None
        fair = 2 * h["min_per_contender"] >= h["max_per_contender"]
        text = (
            f"{h['rate']:.0f} grants/s, {h['script_calls_per_grant']:.1f} script calls per grant, "
            f"min/max per contender {h['min_per_contender']}/{h['max_per_contender']}"
        )
        if seed:
            text += (
                f"; seed {seed['rate']:.0f} grants/s (min/max {seed['min_per_contender']}/"
                f"{seed['max_per_contender']}): {ratio:.2f}x the seed"
            )
        ok: bool | None = fair and h["script_calls_per_grant"] <= HOT_CALLS_PER_GRANT
        if ok and ratio is None:
            ok = None
        elif ok and ratio is not None:
            ok = ratio >= HOT_SEED_RATIO
        add(
            3,
            f"hot lock, {len(h['per_client'])} contenders looping on write of one path",
            text,
            f"<= {HOT_CALLS_PER_GRANT:g} calls per grant (the release grants the next holder); "
            f">= {HOT_SEED_RATIO:g}x the seed's grants/s; every contender >= half the luckiest",
            ok,
        )
    m = c.get("memory")
    if m:
        add(
            4,
            f"{_n(m['grants'])} expired read grants under tenants/<i>/doc, one live reader, "
            f"then {m['ops']} ordinary ops: sorted-set members left",
            f"{_n(m['members'])} members left ({m['live_members']} live) in {m['zset_keys']} "
            f"sorted sets",
            f"<= live members + {MEMORY_SLACK}",
            m["members"] <= m["live_members"] + MEMORY_SLACK,
        )
    ch = c.get("channels")
    if ch:
        add(
            5,
            f"{_n(ch['waits'])} contended waits, each on its own tree, one process: "
            "channels still subscribed",
            f"{_n(ch['channels'])} channels ({ch['contended']} waits contended)",
            f"<= {MAX_CHANNELS}",
            ch["channels"] <= MAX_CHANNELS,
        )
    rows = c.get("slowlog", [])
    if rows:
        add(
            6,
            f"{_n(rows[0]['leases'])} context-manager leases refreshed by one process: "
            "longest single script call (SLOWLOG)",
            "; ".join(
                f"depth {r['depth']}: {_fmt(r['max_script_ms'], '.1f', ' ms')}" for r in rows
            ),
            f"<= {MAX_SCRIPT_MS:g} ms",
            all(
                r["max_script_ms"] is not None and r["max_script_ms"] <= MAX_SCRIPT_MS for r in rows
            ),
        )
    rows = c.get("acquire_many", [])
    if rows:
        add(
            7,
            "acquire_many of N depth-2 writes",
            "; ".join(
                f"{_n(r['size'])}: " + ("granted" if r["ok"] else f"{r['exception']}") for r in rows
            ),
            "a documented limit; beyond it InvalidArgument, up front",
            all(r["ok"] or str(r["exception"]).endswith("InvalidArgument") for r in rows),
        )
    hd = c.get("holder")
    if hd:
        add(
            8,
            f"a holder of {_n(hd['reads'])} reads under c/n takes write(c/n), then acquires "
            "more while the tree has waiters",
            f"write {hd['write_ms']:.1f} ms; next acquires median "
            f"{hd['holder']['median_ms']:.1f} ms, max {hd['holder']['max_ms']:.1f} ms "
            f"(a holder of one read: {hd['baseline']['median_ms']:.2f} ms)",
            f"<= {HOLDER_MS:g} ms",
            hd["write_ms"] <= HOLDER_MS and hd["holder"]["median_ms"] <= HOLDER_MS,
        )
    return out


def contention_section(c: dict[str, Any]) -> str:
    """Issue 12's table as measured, then the details of each row."""
    summary = [
        [str(t["row"]), t["case"], t["measured"], t["now"], t["goal"], _met(t["met"])]
        for t in contention_targets(c)
    ]
    lines = [
        "### 7. Contention (issue 12)",
        "",
        "Each row of issue 12's table, measured in this run; 'issue' is the issue's \"now\" "
        "column, as measured when it was filed.",
        "",
        _table(["#", "case", "measured", "issue", "target", ""], summary),
    ]
    rows = c.get("elsewhere", [])
    if rows:
        table = [
            [
                _n(r["waiters"]),
                " / ".join(_n(q) for q in r["queued_before_after"]),
                _fmt(r["busy"]["median_ms"], ".2f"),
                _fmt(r["busy"]["p90_ms"], ".2f"),
                _fmt(r["idle"]["median_ms"], ".2f"),
                _fmt(r["idle"]["p90_ms"], ".2f"),
                f"{r['ratio']:.2f}x",
                str(r["busy"]["n"]),
            ]
            for r in rows
        ]
        lines += [
            "",
            "1. Free `async with write()` pairs in the tree where W writers wait (on another "
            "path), interleaved op by op with the same in an idle tree; the waiters are one "
            f"child process (keep-alive stretched to {rows[0].get('keepalive_s')} s, see "
            "`benchmarks/contention.py`). Queue length: ZCARD before and after.",
            "",
            _table(
                [
                    "waiters",
                    "queued",
                    "busy tree median ms",
                    "p90",
                    "idle tree median ms",
                    "p90",
                    "ratio",
                    "pairs",
                ],
                table,
            ),
        ]
    rows = c.get("drain", [])
    if rows:
        table = [
            [
                _n(r["waiters"]),
                _fmt(r["seconds"], ".2f"),
                _n(r["script_calls"]),
                f"{r['calls_per_waiter']:.1f}",
                f"{r['drained']} ({r['contended']} contended, {r['timed_out']} not done)",
            ]
            for r in rows
        ]
        lines += [
            "",
            "2. W `async with write(p)` waiters (one instance) queued behind a holder, which "
            "then releases: time until every waiter has had its turn, and script calls "
            "(INFO commandstats EVALSHA + EVAL, reset before the release).",
            "",
            _table(["waiters", "seconds", "script calls", "per waiter", "drained"], table),
        ]
    hot = c.get("hot", {})
    if hot.get("ours"):
        table = []
        for lib, label in (("ours", "AsyncHiLok"), ("seed", "seed")):
            h = hot.get(lib)
            if h:
                table.append(
                    [
                        label,
                        _fmt(h["rate"], ".1f"),
                        _fmt(h.get("script_calls_per_grant"), ".2f"),
                        f"{h['min_per_contender']} / {h['max_per_contender']}",
                        "yes" if 2 * h["min_per_contender"] >= h["max_per_contender"] else "no",
                    ]
                )
        lines += [
            "",
            "3. Hot lock: the hand-off workload of part 4, in this part's run.",
            "",
            _table(
                ["lib", "grants/s", "script calls per grant", "min / max per contender", "fair"],
                table,
            ),
        ]
    m = c.get("memory")
    if m:
        biggest = ", ".join(f"`{b['key']}` {_n(b['members'])}" for b in m["biggest"])
        lines += [
            "",
            f"4. {_n(m['grants'])} read grants (ttl {m['grant_ttl_s']:g} s, made in "
            f"{m['granted_in_s']:.1f} s, never released) ran out; one reader of `tenants/keep` "
            f"stayed live; then {m['ops']} acquire+release (read and write in turns) of random "
            f"`tenants/<i>/doc`. Left: {_n(m['members'])} sorted-set members "
            f"({m['live_members']} live) in {m['zset_keys']} sets; biggest: {biggest}."
            + (
                f" Apart: the tree's holder table held {_n(m['holder_entries'])} entries "
                f"({_n(m['holder_entries_in_grace'])} within their grace: an entry stays "
                "max(ttl, 10 s) past its lease, so that a release of a lease that ran out "
                "can tell so, and goes with the next writes after that)."
                if "holder_entries" in m
                else ""
            ),
        ]
    ch = c.get("channels")
    if ch:
        lines += [
            "",
            f"5. {_n(ch['waits'])} waits, each on its own tree ({ch['contended']} contended), "
            f"in {ch['seconds']:.1f} s; afterwards the server had {_n(ch['channels'])} "
            f"channels of the namespace subscribed ({_n(ch['subscriptions'])} subscriptions, "
            "PUBSUB CHANNELS / NUMSUB).",
        ]
    rows = c.get("slowlog", [])
    if rows:
        table = [
            [
                str(r["depth"]),
                _n(r["leases"]),
                f"{r['interval_s']:g}",
                str(r["refresh_calls"]),
                ", ".join(f"{v:.1f}" for v in r["refresh_ms"]),
                _fmt(r["max_script_ms"], ".1f"),
                str(r["lost"]),
            ]
            for r in rows
        ]
        lines += [
            "",
            "6. Context-manager write leases held by one instance, each on its own tree, "
            "renewed every interval; SLOWLOG (slowlog-log-slower-than "
            f"{rows[0].get('slowlog_log_slower_than_us')}, reset once every lease was held) "
            "read until the ticks were logged.",
            "",
            _table(
                [
                    "depth",
                    "leases",
                    "interval s",
                    "refresh calls",
                    "refresh call ms",
                    "longest script ms",
                    "leases lost",
                ],
                table,
            ),
        ]
    rows = c.get("acquire_many", [])
    if rows:
        lines += ["", "7. `acquire_many` of N depth-2 writes in one tree:", ""]
        lines += [
            f"- {_n(r['size'])}: "
            + ("granted" if r["ok"] else f"`{r['exception']}`: {r['message']}")
            for r in rows
        ]
    hd = c.get("holder")
    if hd:
        table = [
            [
                label,
                _fmt(hd[key]["median_ms"], ".2f"),
                _fmt(hd[key]["p90_ms"], ".2f"),
                _fmt(hd[key]["max_ms"], ".2f"),
                str(hd[key]["n"]),
            ]
            for key, label in (
                ("holder", f"holder of {_n(hd['reads'])} reads and write(c/n)"),
                ("baseline", "holder of one read in the tree"),
            )
        ]
        lines += [
            "",
            f"8. One holder takes {_n(hd['reads'])} reads `c/n/r<i>` (in chunks of "
            f"`acquire_many`), then `write(c/n)` with the same handle: {hd['write_ms']:.1f} ms. "
            f"Another client then waits on `write(c/n)` ({hd['waiters']} queued); the holder "
            "acquires more reads in the tree (same handle), interleaved with a holder of one "
            "read:",
            "",
            _table(["acquire by", "median ms", "p90", "max", "n"], table),
        ]
    return "\n".join(lines)


# Targets of issue 13 for the new default policy (park); see benchmarks/celery_contention.py.
CC_BUSY = 0.85
CC_OUT_OF_ORDER = 5
CC_REINDEX_AFTER_S = 0.25
CC_FREE_S = 0.5


def celery_contention_targets(
    policy: dict[str, Any],
) -> list[tuple[str, str, float | None, bool | None]]:
    """(target, goal, value, met) of issue 13 for one policy's results."""
    hot = policy.get("hot", {})
    rx = policy.get("reindex", {})
    free = policy.get("free", {})

    def check(value: Any, ok: Callable[[float], bool]) -> tuple[float | None, bool | None]:
        return (None, None) if value is None else (float(value), ok(float(value)))

    rows: list[tuple[str, str, float | None, bool | None]] = []
    value, met = check(hot.get("busy"), lambda v: v >= CC_BUSY)
    rows.append(("hot path lock busy", f">= {CC_BUSY:.0%}", value, met))
    value, met = check(hot.get("out_of_order"), lambda v: v <= CC_OUT_OF_ORDER)
    rows.append(("hot path out-of-order pairs", f"<= {CC_OUT_OF_ORDER}", value, met))
    value, met = check(rx.get("after_ahead_s"), lambda v: v <= CC_REINDEX_AFTER_S)
    rows.append(("reindex after the edits ahead, s", f"<= {CC_REINDEX_AFTER_S:g} s", value, met))
    value, met = check(free.get("free_done_s"), lambda v: v <= CC_FREE_S)
    rows.append(("free tasks done, s", f"<= {CC_FREE_S:g} s", value, met))
    return rows


def celery_contention_section(cc: dict[str, Any]) -> str:
    """Issue 13's scenarios: rows are the metrics, columns the policies."""
    policies: list[str] = cc.get("policies", [])
    res: dict[str, dict[str, Any]] = cc.get("results", {})
    sz: dict[str, Any] = cc.get("sizes", {})

    def cell(scenario: str, fn: Callable[[dict[str, Any]], str]) -> list[str]:
        cells = []
        for p in policies:
            r = res.get(p, {}).get(scenario)
            cells.append(DASH if r is None else fn(r))
        return cells

    def done(r: dict[str, Any]) -> str:
        if r["completed"]:
            return "yes"
        states = ", ".join(f"{k} {v}" for k, v in sorted(r.get("states", {}).items()))
        return f"**no** ({states})"

    hot_n = sz.get("hot_tasks", 0)
    hot_body = sz.get("hot_body", 0.0)
    edits = max(1, round(sz.get("edit_stream", 0.0) / sz.get("edit_gap", 1.0)))
    rows: list[list[str]] = [
        ["hot: makespan, s", *cell("hot", lambda r: _fmt(r.get("makespan_s"), ".2f"))],
        ["hot: lock busy", *cell("hot", lambda r: _fmt(r.get("busy"), ".0%"))],
        [
            f"hot: out-of-order pairs (of {hot_n * (hot_n - 1) // 2})",
            *cell("hot", lambda r: str(r.get("out_of_order", DASH))),
        ],
        ["hot: longest wait, s", *cell("hot", lambda r: _fmt(r.get("max_wait_s"), ".2f"))],
        ["hot: contention retries (park: parkings)", *cell("hot", lambda r: str(r["retries"]))],
        ["hot: all tasks completed", *cell("hot", done)],
        [
            "reindex: started after the edits ahead ended, s",
            *cell("reindex", lambda r: _fmt(r.get("after_ahead_s"), ".2f")),
        ],
        [
            "reindex: later edits that started before it",
            *cell(
                "reindex",
                lambda r: f"{r.get('overtaking_edits', DASH)} of {r.get('edits_behind', DASH)}",
            ),
        ],
        ["reindex: its wait, s", *cell("reindex", lambda r: _fmt(r.get("wait_s"), ".2f"))],
        [
            "reindex: longest edit wait, s",
            *cell("reindex", lambda r: _fmt(r.get("max_edit_wait_s"), ".2f")),
        ],
        [
            "reindex: stream done (last edit end), s",
            *cell("reindex", lambda r: _fmt(r.get("stream_done_s"), ".2f")),
        ],
        [
            "reindex: contention retries (park: parkings)",
            *cell("reindex", lambda r: str(r["retries"])),
        ],
        ["reindex: all tasks completed", *cell("reindex", done)],
        ["free: free tasks done, s", *cell("free", lambda r: _fmt(r.get("free_done_s"), ".2f"))],
        ["free: busy tasks done, s", *cell("free", lambda r: _fmt(r.get("busy_done_s"), ".2f"))],
        ["free: contention retries (park: parkings)", *cell("free", lambda r: str(r["retries"]))],
        ["free: all tasks completed", *cell("free", done)],
    ]
    goals = {
        "hot: lock busy": f">= {CC_BUSY:.0%}",
        "hot: out-of-order pairs": f"<= {CC_OUT_OF_ORDER}",
        "reindex: started after the edits ahead ended, s": f"<= {CC_REINDEX_AFTER_S:g}",
        "free: free tasks done, s": f"<= {CC_FREE_S:g}",
    }
    for row in rows:
        row.append(next((g for k, g in goals.items() if row[0].startswith(k)), ""))
    lines = [
        f"### 8. Celery under contention (issue 13): a {cc.get('pool')} worker, concurrency "
        f"{cc.get('concurrency')}, every policy",
        "",
        f"hot: {hot_n} tasks write one path, {hot_body * 1000:g} ms each, sent "
        f"{sz.get('hot_gap', 0) * 1000:g} ms apart (ideal makespan {hot_n * hot_body:.2f} s). "
        f"reindex: {edits} edits of {sz.get('edit_body', 0) * 1000:g} ms "
        f"(`tenants/t/docs/<d>`, {sz.get('docs')} docs), one sent every "
        f"{sz.get('edit_gap', 0) * 1000:g} ms, and a {sz.get('reindex_body', 0) * 1000:g} ms "
        f"reindex (`tenants/t`) sent {sz.get('reindex_at')} s into the stream. free: "
        f"{sz.get('busy_tasks')} tasks of {sz.get('busy_body', 0) * 1000:g} ms on one path, "
        f"then {sz.get('free_tasks')} of {sz.get('free_body', 0) * 1000:g} ms on paths of "
        "their own. Times from the sends (by the sender) and the bodies' start and end; "
        "busy: the bodies' time over first body start to last body end.",
        "",
        _table(["metric", *policies, "target (park)"], rows),
    ]
    for p, why in cc.get("skipped", {}).items():
        lines += ["", f"{p}: skipped ({why})."]
    return "\n".join(lines)


# -- chart ------------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> None:
    """PNG of acquire+release rate vs depth, one panel per client count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _grid(results)
    clients = sorted({c for c, _, _ in grid})
    depths = sorted({d for _, _, d in grid})
    fig, axes = plt.subplots(1, len(clients), figsize=(5.5 * len(clients), 4.2), squeeze=False)
    styles = {"AsyncHiLok": "tab:blue", "HiLok": "tab:green", "seed": "tab:red"}
    for ax, c in zip(axes[0], clients, strict=True):
        for lib, color in styles.items():
            for mode, dash in (("write", "-"), ("read", "--")):
                ys = [rate_of(results, lib, mode, d, c) for d in depths]
                if all(y is None for y in ys):
                    continue
                ax.plot(
                    depths,
                    [float("nan") if y is None else y for y in ys],
                    dash,
                    color=color,
                    marker="o",
                    label=f"{lib} {mode}",
                )
        floor = floor_of(results, "async", "evalsha", c)
        if floor is not None:
            ax.axhline(floor, color="grey", linestyle=":", label="floor: 2 EVALSHA (asyncio)")
        ax.set_yscale("log")
        ax.set_xticks(depths)
        ax.set_xlabel("path depth")
        ax.set_ylabel("acquire+release pairs per second")
        ax.set_title(f"{c} client{'s' if c > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = results.get("meta", {})
    fig.suptitle(
        f"celery_hilok vs redishilok 1.1.0: {meta.get('nproc')} CPUs, "
        f"redis-server {meta.get('redis_server')}, {meta.get('mode')} mode",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
