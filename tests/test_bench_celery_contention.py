"""The Celery contention benchmark (issue 13) still runs, and computes what it says.

The metrics are checked on made-up records (no worker); one quick run of the part with one
policy (plus one this version does not know, which must be skipped, not fail) goes through
a real worker. No timing is asserted.

Deselect with ``-m 'not bench'``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import celery_contention as cc
from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.bench]


def _rec(kind: str, i: int, sent: float, start: float, end: float) -> dict[str, Any]:
    return {"kind": kind, "i": i, "sent": sent, "start": start, "end": end, "pid": 1}


def _out(records: list[dict[str, Any]]) -> dict[str, Any]:
    sent = [{"kind": r["kind"], "i": r["i"], "sent": r["sent"]} for r in records]
    return {"records": records, "sent": sent}


def test_hot_metrics() -> None:
    # sent at 0, 1, 2; task 2 ran first, then 0, then 1
    records = [
        _rec("hot", 0, 0.0, 3.0, 4.0),
        _rec("hot", 1, 1.0, 5.0, 6.0),
        _rec("hot", 2, 2.0, 2.0, 3.0),
    ]
    m = cc.hot_metrics(_out(records))
    assert m["ran"] == 3 and m["pairs"] == 3
    assert m["out_of_order"] == 2  # (0, 2) and (1, 2)
    assert m["makespan_s"] == 6.0
    assert m["busy"] == pytest.approx(3.0 / 4.0)  # 3 s of bodies over 2.0 .. 6.0
    assert m["max_wait_s"] == 4.0  # task 1


def test_reindex_metrics() -> None:
    records = [
        _rec("edit", 0, 0.0, 0.0, 1.0),
        _rec("edit", 1, 0.5, 0.5, 1.5),
        _rec("reindex", 0, 0.7, 2.0, 3.0),
        _rec("edit", 2, 0.8, 0.9, 1.2),  # later, went first
        _rec("edit", 3, 0.9, 3.0, 3.5),  # later, waited
    ]
    m = cc.reindex_metrics(_out(records))
    assert m["edits_ahead"] == 2 and m["edits_behind"] == 2
    assert m["after_ahead_s"] == pytest.approx(0.5)  # 2.0 - 1.5
    assert m["overtaking_edits"] == 1 and m["overtaken_edits"] == 0
    assert m["wait_s"] == pytest.approx(1.3)
    assert m["stream_done_s"] == 3.5


def test_free_metrics() -> None:
    records = [
        _rec("busy", 0, 0.0, 0.0, 2.0),
        _rec("free", 0, 0.1, 0.2, 0.2),
        _rec("free", 1, 0.2, 2.0, 2.5),
    ]
    m = cc.free_metrics(_out(records))
    assert m["free_done_s"] == pytest.approx(2.4)
    assert m["busy_done_s"] == 2.0


def test_plans_have_unique_roots_and_the_sizes_asked_for() -> None:
    sizes = cc.QUICK
    hot = cc.hot_plan("r1", sizes)
    assert len(hot) == sizes.hot_tasks and {s.path for s in hot} == {"r1/hot"}
    rx = cc.reindex_plan("r2", sizes)
    assert [s.path for s in rx if s.kind == "reindex"] == ["r2/tenants/t"]
    assert all(s.path.startswith("r2/tenants/t/docs/") for s in rx if s.kind == "edit")
    free = cc.free_plan("r3", sizes)
    assert len({s.path for s in free if s.kind == "free"}) == sizes.free_tasks


@pytest.mark.celery_worker
@pytest.mark.timeout(120)
def test_quick_run_through_a_worker(tmp_path: Path) -> None:
    output = tmp_path / "cc.json"
    args = ["--quick", "--no-seed", "--parts", "celery-contention", "--output", str(output)]
    args += ["--policies", "wait,no-such-policy"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    part = json.loads(output.read_text())["celery-contention"]
    assert part["policies"] == ["wait"]
    assert "no-such-policy" in part["skipped"]
    for scenario in cc.SCENARIOS:
        r = part["results"]["wait"][scenario]
        assert r["completed"], (scenario, r["states"])
        assert r["records"]["rows"], scenario
    assert "### 8. Celery under contention (issue 13)" in done.stdout
    assert "| metric | wait | target (park) |" in done.stdout
    # the table renders from the JSON alone, too
    assert "hot: lock busy" in report.celery_contention_section(part)
