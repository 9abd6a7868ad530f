"""Run every benchmark against one throw-away redis-server and report.

    python -m benchmarks.run                 # full mode: a few minutes
    python -m benchmarks.run --quick         # smoke mode: every part, tiny durations
    python -m benchmarks.run --no-seed       # without the seed library (no virtualenv needed)
    python -m benchmarks.run --chart docs/benchmarks-depth.png

(``python3 dev.py bench [ARGS]`` runs the same inside .venv.) Progress goes to stderr, the
tables to stdout, everything measured to ``benchmarks/results/latest.json`` (``--output``).
Parts: rate (uncontended acquire+release, with the physical floor), wakeup, fairness,
handoff, refresh, celery, contention (issue 12: the engine under contention, see
:mod:`benchmarks.contention`), celery-contention (issue 13: Celery tasks under contention,
every ``hilok_on_contention`` policy side by side, see :mod:`benchmarks.celery_contention`);
``--parts`` picks some. The seed library runs in its own
virtualenv (built on first use) as a subprocess; its measurements are interleaved with
ours round by round, so that machine noise hits both alike and the ratios stay meaningful.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from benchmarks import celery_bench, celery_contention, contention, ours, report
from benchmarks.seed import SeedProcess, SeedUnavailable, ensure_venv
from tests._redis import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"
PARTS = (
    "rate",
    "wakeup",
    "fairness",
    "handoff",
    "refresh",
    "celery",
    "contention",
    "celery-contention",
)

#: (holder mode, holder path, waiter mode, waiter path); each path gets a unique prefix.
WAKEUP_CASES = (
    ("write", "a", "write", "a"),
    ("read", "a", "write", "a"),
    ("write", "a", "read", "a"),
    ("write", "a", "read", "a/b/c"),
)


@dataclass
class Config:
    """Sizes and durations of one run (see :data:`FULL` and :data:`QUICK`)."""

    rounds: int = 3
    duration: float = 0.8
    warmup: float = 0.25
    depths: tuple[int, ...] = (1, 3, 8)
    clients: tuple[int, ...] = (1, 32)
    modes: tuple[str, ...] = ("write", "read")
    wakeup_trials: int = 100
    wakeup_hold: tuple[float, float] = (0.005, 0.05)
    seed_wakeup_trials: int = 16
    # The seed's writers poll every 0.4 s: holds over 50-500 ms catch it at every phase.
    seed_wakeup_hold: tuple[float, float] = (0.05, 0.5)
    fair_readers: int = 4
    fair_hold: float = 0.05
    fair_trials: int = 5
    seed_fair_trials: int = 1
    fair_cap: float = 10.0
    handoff_contenders: int = 8
    handoff_duration: float = 3.0
    handoff_warmup: float = 0.5
    refresh_leases: tuple[int, ...] = (1, 100, 1000)
    refresh_depth: int = 3
    # The seed renews each level of each lock from its own task: 3000 EVALs a tick for 1000
    # locks at depth 3. Ticks of a second leave its single process time to keep up.
    refresh_interval: float = 1.0
    refresh_window: float = 4.0
    celery_tasks: int = 2000
    celery_skip: int = 100
    celery_rounds: int = 2
    #: sizes of the contention part (issue 12)
    contention: contention.Sizes = field(default_factory=contention.Sizes)
    #: sizes of the Celery contention part (issue 13)
    celery_contention: celery_contention.Sizes = field(default_factory=celery_contention.Sizes)
    #: policies of the Celery contention part (None: every one of its POLICIES known here)
    celery_contention_policies: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)


FULL = Config()
QUICK = Config(
    rounds=1,
    duration=0.1,
    warmup=0.03,
    wakeup_trials=5,
    seed_wakeup_trials=2,
    seed_wakeup_hold=(0.05, 0.1),
    fair_trials=1,
    fair_cap=1.0,
    handoff_duration=0.3,
    handoff_warmup=0.05,
    refresh_leases=(1, 100),
    refresh_interval=0.25,
    refresh_window=0.5,
    celery_tasks=60,
    celery_skip=10,
    celery_rounds=1,
    contention=contention.QUICK,
    celery_contention=celery_contention.QUICK,
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the run ----------------------------------------------------------------------------------


class Runner:
    def __init__(self, url: str, config: Config, seed: SeedProcess | None) -> None:
        self.url = url
        self.cfg = config
        self.seed = seed
        self.flusher = redis.Redis.from_url(url)

    def clean(self) -> None:
        """Start every part on an empty server (the server is ours alone)."""
        self.flusher.flushall()

    def ours(self, request: dict[str, Any]) -> dict[str, Any]:
        return ours.run_async(self.url, request)

    # 1 ------------------------------------------------------------------------------------

    def rate(self) -> dict[str, Any]:
        cfg = self.cfg
        rates: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
        floors: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        timing = {"duration": cfg.duration, "warmup": cfg.warmup}

        def keep(store: dict[Any, list[dict[str, Any]]], key: Any, result: dict[str, Any]) -> float:
            store.setdefault(key, []).append(result)
            return float(result["rate"])

        for rnd in range(cfg.rounds):
            say(f"rate: round {rnd + 1}/{cfg.rounds}")
            for clients in cfg.clients:
                for kind in ("ping", "evalsha"):
                    req = {"bench": "floor", "kind": kind, "clients": clients, **timing}
                    keep(floors, ("async", kind, clients), self.ours(req))
                    keep(
                        floors,
                        ("sync", kind, clients),
                        ours.sync_floor_rate(self.url, kind, clients, **timing),
                    )
                if self.seed is not None:
                    req = {"bench": "floor", "kind": "evalsha", "clients": clients, **timing}
                    keep(floors, ("seed-async", "evalsha", clients), self.seed.request(req))
                for depth in cfg.depths:
                    for mode in cfg.modes:
                        req = {
                            "bench": "rate",
                            "mode": mode,
                            "depth": depth,
                            "clients": clients,
                            **timing,
                        }
                        line = [f"  {mode:5} d={depth} c={clients:2}:"]
                        r = keep(rates, ("AsyncHiLok", mode, depth, clients), self.ours(req))
                        line.append(f"AsyncHiLok {r:7.0f}/s")
                        if self.seed is not None:
                            r = keep(rates, ("seed", mode, depth, clients), self.seed.request(req))
                            line.append(f"seed {r:7.0f}/s")
                        result = ours.sync_lock_rate(self.url, mode, depth, clients, **timing)
                        r = keep(rates, ("HiLok", mode, depth, clients), result)
                        line.append(f"HiLok {r:7.0f}/s")
                        say("  ".join(line))
            self.clean()
        return {
            "rates": [
                {"lib": lib, "mode": mode, "depth": depth, "clients": clients, **_medians(runs)}
                for (lib, mode, depth, clients), runs in rates.items()
            ],
            "floors": [
                {"client": client, "kind": kind, "clients": clients, **_medians(runs)}
                for (client, kind, clients), runs in floors.items()
            ],
        }

    # 2-5 ----------------------------------------------------------------------------------

    def wakeup(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"ours": [], "seed": []}
        for hm, hp, wm, wp in WAKEUP_CASES:
            base = {"bench": "wakeup", "holder_mode": hm, "holder_path": hp}
            base |= {"waiter_mode": wm, "waiter_path": wp}
            lo, hi = cfg.wakeup_hold
            result = self.ours(
                {**base, "trials": cfg.wakeup_trials, "hold_min": lo, "hold_max": hi}
            )
            say(f"wakeup {result['case']}: AsyncHiLok median {result['median_ms']:.2f} ms")
            out["ours"].append(result)
            if self.seed is not None:
                lo, hi = cfg.seed_wakeup_hold
                req = {**base, "trials": cfg.seed_wakeup_trials, "hold_min": lo, "hold_max": hi}
                result = self.seed.request(req)
                say(f"wakeup {result['case']}: seed median {result['median_ms']:.1f} ms")
                out["seed"].append(result)
        return out

    def fairness(self) -> dict[str, Any]:
        cfg = self.cfg
        req = {
            "bench": "fairness",
            "readers": cfg.fair_readers,
            "hold": cfg.fair_hold,
            "settle": 4 * cfg.fair_hold,
            "cap": cfg.fair_cap,
        }
        out: dict[str, Any] = {"ours": self.ours({**req, "trials": cfg.fair_trials})}
        say(f"fairness: AsyncHiLok writer waited at most {out['ours']['max_wait_ms']:.1f} ms")
        if self.seed is not None:
            out["seed"] = self.seed.request({**req, "trials": cfg.seed_fair_trials})
            say(f"fairness: seed writer waited at most {out['seed']['max_wait_ms']:.0f} ms")
        return out

    def handoff(self) -> dict[str, Any]:
        cfg = self.cfg
        req = {
            "bench": "handoff",
            "contenders": cfg.handoff_contenders,
            "duration": cfg.handoff_duration,
            "warmup": cfg.handoff_warmup,
        }
        out: dict[str, Any] = {"ours": self.ours(req)}
        say(f"handoff: AsyncHiLok {out['ours']['rate']:.0f} grants/s")
        if self.seed is not None:
            out["seed"] = self.seed.request(req)
            say(f"handoff: seed {out['seed']['rate']:.1f} grants/s")
        return out

    def refresh(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"ours": [], "seed": []}
        for leases in cfg.refresh_leases:
            req = {
                "bench": "refresh",
                "leases": leases,
                "depth": cfg.refresh_depth,
                "interval": cfg.refresh_interval,
                "settle": 1.5 * cfg.refresh_interval,
                "window": cfg.refresh_window,
            }
            result = self.ours(req)
            say(f"refresh {leases} leases: AsyncHiLok {result['calls_per_s']:.1f} calls/s")
            out["ours"].append(result)
            if self.seed is not None:
                result = self.seed.request(req)
                say(f"refresh {leases} leases: seed {result['calls_per_s']:.1f} calls/s")
                out["seed"].append(result)
            self.clean()
        return out

    # 6 ------------------------------------------------------------------------------------

    def celery(self) -> dict[str, Any]:
        cfg = self.cfg
        return celery_bench.run(
            self.url,
            tasks=cfg.celery_tasks,
            skip=cfg.celery_skip,
            rounds=cfg.celery_rounds,
            say=say,
        )

    # 7 ------------------------------------------------------------------------------------

    def contention(self) -> dict[str, Any]:
        seed = self.seed.request if self.seed is not None else None
        return contention.run(self.url, self.cfg.contention, seed, say)

    # 8 ------------------------------------------------------------------------------------

    def celery_contention(self) -> dict[str, Any]:
        cfg = self.cfg
        return celery_contention.run(
            self.url, cfg.celery_contention, policies=cfg.celery_contention_policies, say=say
        )


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median rate and CPU per op over the rounds of one cell, and each round's values."""
    out: dict[str, Any] = {"rate": statistics.median(r["rate"] for r in runs)}
    for name in ("cpu_us_per_op", "script_calls_per_op", "server_us_per_op"):
        values = [r[name] for r in runs if r.get(name) is not None]
        out[name] = statistics.median(values) if values else None
    out["rounds"] = [round(r["rate"], 1) for r in runs]
    return out


# -- the machine ------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def machine(client: redis.Redis) -> dict[str, Any]:
    server = client.info("server")
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "redis_server": server.get("redis_version"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "celery": _version("celery"),
        "celery_hilok": _version("celery-hilok"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_start": list(os.getloadavg()),
    }


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmarks of celery_hilok against the seed library and the floor.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny durations")
    parser.add_argument("--no-seed", action="store_true", help="do not measure the seed library")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument(
        "--policies",
        help="comma list of hilok_on_contention policies of the celery-contention part "
        f"(default: those of {','.join(celery_contention.POLICIES)} this version knows)",
    )
    parser.add_argument("--rounds", type=int, help="rounds of the rate part (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per rate measurement")
    parser.add_argument("--chart", type=Path, help="write a PNG chart of rate vs depth here")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: print the tables (and --chart) of an earlier results file",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON results (default {DEFAULT_OUTPUT})",
    )
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    return args


def render(path: Path, chart: Path | None) -> int:
    """Print the tables (and draw the chart) of an earlier results file."""
    results = json.loads(path.read_text())
    results["targets"] = report.targets(results)
    print(report.markdown(results))
    if chart is not None:
        report.chart(results, chart)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render, args.chart)
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    if args.rounds:
        cfg.rounds = args.rounds
    if args.duration:
        cfg.duration = args.duration
    if args.policies:
        cfg.celery_contention_policies = tuple(p for p in args.policies.split(",") if p)
    parts = [p for p in PARTS if p in args.parts.split(",")]

    started = time.time()
    server = RedisServer().start()
    seed: SeedProcess | None = None
    try:
        mode = "quick" if args.quick else "full"
        say(f"redis-server {server.url} (pid {server.pid}), mode {mode}")
        seed_info: dict[str, Any] | None = None
        if not args.no_seed:
            try:
                seed = SeedProcess(ensure_venv(say), server.url)
                seed_info = seed.request({"bench": "versions"})
            except SeedUnavailable as exc:
                say(f"ERROR: the seed library is unavailable: {exc}\n(use --no-seed to skip it)")
                return 2
        runner = Runner(server.url, cfg, seed)
        runner.clean()
        results: dict[str, Any] = {
            "meta": {
                **machine(runner.flusher),
                "seed": seed_info,
                "mode": "quick" if args.quick else "full",
                "command": "python -m benchmarks.run "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "config": asdict(cfg),
        }
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "rate": runner.rate,
            "wakeup": runner.wakeup,
            "fairness": runner.fairness,
            "handoff": runner.handoff,
            "refresh": runner.refresh,
            "celery": runner.celery,
            "contention": runner.contention,
            "celery-contention": runner.celery_contention,
        }
        for part in parts:
            t0 = time.perf_counter()
            results[part] = steps[part]()
            results.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
            runner.clean()
        results["meta"]["loadavg_end"] = list(os.getloadavg())
        results["meta"]["seconds"] = round(time.time() - started, 1)
        results["targets"] = report.targets(results)
        runner.flusher.close()
    finally:
        if seed is not None:
            seed.close()
        server.stop()

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(report.markdown(results))
    say(f"results written to {args.output}")
    if args.chart is not None:
        report.chart(results, args.chart)
        say(f"chart written to {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
