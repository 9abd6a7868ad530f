"""Every runnable example under examples/ runs against the test Redis and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(module: str, redis_url: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, "HILOK_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_fenced_store_refuses_the_stale_holder(redis_url: str) -> None:
    out = run_example("examples.fenced_store", redis_url)
    assert "refused: write of 'reports/q3'" in out
    assert "value: final by the second holder" in out
    assert "accepted 2, refused 1" in out


@pytest.mark.celery_worker
def test_tenants_app_runs_a_worker_and_every_check_passes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "HILOK_DEMO_REDIS"}
    done = subprocess.run(
        [sys.executable, "-m", "examples.tenants.run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "WRONG" not in out and "all checks passed" in out
    assert "0 overlapped" in out
    assert "all finished (no deadlock)" in out
    assert "worker and redis-server stopped" in out
