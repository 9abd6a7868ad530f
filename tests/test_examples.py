"""Every runnable example under examples/ runs against the test Redis and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
