"""How the package imports: ``import celery_hilok`` leaves Celery out.

The import checks run in a fresh interpreter (this one has imported Celery long ago).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What celery_hilok.celery._hooks.connect() connects: Celery signal -> receiver.
RECEIVERS = {
    signal: f"celery_hilok.celery._hooks.{receiver}"
    for signal, receiver in [
        ("before_task_publish", "on_before_publish"),
        ("task_prerun", "on_prerun"),
        ("task_postrun", "on_postrun"),
        ("task_revoked", "on_revoked"),
        ("worker_process_init", "on_process_init"),
        ("worker_process_shutdown", "on_process_shutdown"),
    ]
}

# Prints, as JSON, the receivers connected to those signals under a celery_hilok
# dispatch_uid (importing nothing of celery_hilok itself).
CONNECTED = """
import json
from celery import signals
found = {}
for name in SIGNALS:
    for (uid, _), receiver in getattr(signals, name).receivers:
        if str(uid).startswith("celery_hilok."):
            found[name] = f"{receiver.__module__}.{receiver.__name__}"
print(json.dumps(found))
"""


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def celery_modules_after(code: str) -> list[str]:
    out = run_python(
        f"{code}\nimport sys\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu')))"
    )
    return list(ast.literal_eval(out.splitlines()[-1]))


def connected_after(code: str) -> dict[str, str]:
    out = run_python(f"{code}\nSIGNALS = {list(RECEIVERS)!r}\n{CONNECTED}")
    return dict(json.loads(out.splitlines()[-1]))


def test_importing_the_package_does_not_import_celery() -> None:
    assert celery_modules_after("import celery_hilok") == []


def test_the_engine_and_the_cli_need_no_celery() -> None:
    code = "import celery_hilok, celery_hilok.inspect, celery_hilok.cli, celery_hilok.seed"
    assert celery_modules_after(code) == []


@pytest.mark.parametrize("name", ["HiLokTask", "TaskLocks", "hilok_lease_lost"])
def test_the_celery_names_of_the_package_import_the_integration(name: str) -> None:
    code = f"import celery_hilok.celery as integration\nfrom celery_hilok import {name} as value"
    out = run_python(f"{code}\nprint(value is getattr(integration, {name!r}))")
    assert out == "True"
    assert connected_after(f"from celery_hilok import {name}") == RECEIVERS


def test_from_celery_hilok_import_hilok_task_connects_the_signal_receivers() -> None:
    assert connected_after("import celery_hilok") == {}
    assert connected_after("from celery_hilok import HiLokTask") == RECEIVERS
    assert connected_after("import celery_hilok\ncelery_hilok.HiLokTask") == RECEIVERS


def test_the_lazy_names_are_listed_and_unknown_ones_raise() -> None:
    import celery_hilok

    listed = dir(celery_hilok)
    for name in celery_hilok.__all__:
        assert name in listed, name
        assert getattr(celery_hilok, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        celery_hilok.nothing  # noqa: B018
