"""The demo (``python -m examples.demo``, the README's main command) runs and checks out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.celery_worker
def test_demo_runs_a_worker_and_every_check_passes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "HILOK_DEMO_REDIS"}
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "conflicting executions, 0 overlapped" in out
    assert "nobody got in between" in out
    assert "WRONG" not in out and "all checks passed" in out
    assert '("skip" policy)' in out  # skipped, or ran if acme happened to be idle
    assert "worker and redis-server stopped" in out
