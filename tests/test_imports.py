"""How the package imports: ``import celery_hilok`` leaves Celery out, and no module of the
package imports, however indirectly, a module that imports it back.

The import checks run in a fresh interpreter (this one has imported Celery long ago); the
cycle check reads the source with :mod:`ast`, so it sees every import: top-level, under
``if TYPE_CHECKING:`` and inside functions alike.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "celery_hilok"

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


# -- the import graph ---------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_by(name: str, path: Path) -> Iterator[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from p import m` imports submodule p.m when there is one, else p's name m.
            targets = [f"{source}.{alias.name}" for alias in node.names]
            targets = [t if t in MODULES else source for t in targets]
        else:
            continue
        yield from (target for target in targets if target in MODULES)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle through each node of ``graph`` that is on one, each cycle once
    (from its first node in sorted order; ``["a", "b"]`` is a -> b -> a)."""
    cycles: set[tuple[str, ...]] = set()
    for start in graph:
        came_from: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in came_from:
            following = []
            for node in frontier:
                for target in sorted(graph[node]):
                    if target not in came_from:
                        came_from[target] = node
                        following.append(target)
            frontier = following
        if start in came_from:
            cycle = [came_from[start]]
            while cycle[-1] != start:
                cycle.append(came_from[cycle[-1]])
            cycle.reverse()  # start, ..., the node that imports start
            first = cycle.index(min(cycle))
            cycles.add(tuple(cycle[first:] + cycle[:first]))
    return [list(cycle) for cycle in sorted(cycles)]


def import_graph() -> dict[str, set[str]]:
    return {name: set(imported_by(name, path)) for name, path in MODULES.items()}


def test_the_import_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "celery_hilok.celery" in graph["celery_hilok"]  # under `if TYPE_CHECKING:`
    assert "celery_hilok.metrics" in graph["celery_hilok._engine"]  # `from . import metrics`
    assert "celery_hilok.celery.task" in graph["celery_hilok.celery._hooks"]
    assert "celery_hilok.lease" in graph["celery_hilok.celery.locks"]  # `from ..lease import`
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"a", "b"}, "b": {"c", "a"}, "c": set()}) == [["a"], ["a", "b"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_among_the_celery_integration_and_the_tools() -> None:
    graph = import_graph()
    ours = {
        name
        for name in graph
        if name.startswith("celery_hilok.celery")
        or name in ("celery_hilok.inspect", "celery_hilok.cli")
    }
    assert import_cycles({name: graph[name] & ours for name in ours}) == []


def test_no_import_cycle_in_the_package() -> None:
    cycles = [" -> ".join([*cycle, cycle[0]]) for cycle in import_cycles(import_graph())]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
