"""The benchmarks still run: ``python -m benchmarks.run --quick --no-seed`` exits 0 and writes
its JSON. No timing is asserted; this only keeps the benchmark code from rotting.

Deselect with ``-m 'not bench'``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.bench, pytest.mark.celery_worker, pytest.mark.timeout(300)]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` in the repository, which must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_quick_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    chart = tmp_path / "depth.png"
    # The chart needs matplotlib (in the `dev` extra, not in `test`).
    with_chart = importlib.util.find_spec("matplotlib") is not None
    args = ["--quick", "--no-seed", "--output", str(output)]
    if with_chart:
        args += ["--chart", str(chart)]
    done = run_module("benchmarks.run", *args)
    results = json.loads(output.read_text())
    for part in (
        "rate",
        "wakeup",
        "fairness",
        "handoff",
        "refresh",
        "celery",
        "contention",
        "celery-contention",
    ):
        assert part in results, part
    assert results["rate"]["rates"] and results["rate"]["floors"]
    assert results["meta"]["seed"] is None
    assert results["targets"]
    assert "### 1. Uncontended acquire+release" in done.stdout
    # every row of issue 12's table was measured (its quick sizes)
    rows = results["contention"]
    for row in ("elsewhere", "drain", "hot", "memory", "channels", "slowlog", "acquire_many"):
        assert rows[row], row
    assert rows["holder"]["holder"]["n"] > 0
    assert "### 7. Contention (issue 12)" in done.stdout
    # issue 13: every policy this version has of park, retry and wait, every scenario
    cc = results["celery-contention"]
    assert "retry" in cc["policies"] and "wait" in cc["policies"]
    for policy in cc["policies"]:
        assert set(cc["results"][policy]) == {"hot", "reindex", "free"}, policy
    assert "### 8. Celery under contention (issue 13)" in done.stdout
    if with_chart:
        assert chart.stat().st_size > 0


def test_compare_runs_two_checkouts_side_by_side(tmp_path: Path) -> None:
    # this checkout against itself, tiny rounds: the table has every case, with numbers
    done = run_module(
        "benchmarks.compare", str(ROOT), str(ROOT), "--rounds", "2", "--duration", "0.05"
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 12, done.stdout  # the header, 2 drivers x 2 modes x 3 depths
    assert all("| - |" not in row for row in rows if row.startswith("| AsyncHiLok"))


def test_anatomy_runs_each_part() -> None:
    # the engine, the replay and the floor; redis-py's path and around it; our Lua against a
    # minimal one; (the versions part needs the seed's virtualenv)
    done = run_module("benchmarks.anatomy", "--quick", "--parts", "replay,bypass,lua")
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    names = [row.split("|")[1].strip() for row in rows]
    names = [name for name in names if name not in ("what", "library", "operation")]
    assert names == [
        *["ours: with hl.write(p)", "replay: its two FCALLs, no engine", "floor: two bare EVALSHA"]
        * 2,
        "sync, execute_command",
        "sync, a pooled connection",
        "asyncio, execute_command",
        "asyncio, a pooled connection",
        "our library",
        "a minimal one, the same 18 commands",
        "redis.call('TIME')",
        "redis.call('EXISTS', key)",
        "a string of 5 pieces joined",
        "a table of 4 fields made",
        "a closure made",
    ], done.stdout
