"""The installed package has what the wheel must carry: Lua scripts, py.typed, entry points.

Nothing is built here (``python3 dev.py package`` builds and checks the sdist and wheel);
these tests look at the installed distribution through importlib.resources/metadata.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata, resources
from pathlib import Path

from packaging.requirements import Requirement

import celery_hilok

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("acquire.lua", "common.lua", "refresh.lua", "release.lua", "status.lua")


def test_lua_scripts_are_package_data() -> None:
    scripts = resources.files("celery_hilok") / "_scripts"
    for name in SCRIPTS:
        text = (scripts / name).read_text(encoding="utf-8")
        assert text.strip(), name


def test_py_typed_marker_is_shipped() -> None:
    assert (resources.files("celery_hilok") / "py.typed").is_file()


def test_version_has_one_source() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", celery_hilok.__version__)
    assert metadata.version("celery-hilok") == celery_hilok.__version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    assert not re.search(r"^version\s*=\s*[\"']", pyproject, re.M)  # no second copy
    assert 'version = { attr = "celery_hilok._version.__version__" }' in pyproject
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {celery_hilok.__version__}" in changelog


def test_celery_command_entry_point() -> None:
    points = metadata.entry_points(group="celery.commands")
    hilok = [ep for ep in points if ep.name == "hilok"]
    assert len(hilok) == 1
    assert hilok[0].value == "celery_hilok.cli:hilok"
    from celery_hilok.cli import hilok as command

    assert hilok[0].load() is command


def test_console_script_entry_point() -> None:
    points = metadata.entry_points(group="console_scripts")
    script = [ep for ep in points if ep.name == "celery-hilok"]
    assert len(script) == 1
    assert script[0].value == "celery_hilok.cli:main"
    assert callable(script[0].load())


def test_distribution_metadata() -> None:
    meta = metadata.metadata("celery-hilok")
    assert meta["Name"] == "celery-hilok"
    assert meta["Requires-Python"] == ">=3.10"
    requires = metadata.requires("celery-hilok") or []
    assert any(r.startswith("redis") for r in requires)
    assert any(r.startswith("celery") and "extra" not in r for r in requires)


def test_a_redis_broker_needs_nothing_more() -> None:
    # A Celery worker on a Redis broker imports kombu's Redis transport, whose own needs
    # kombu lists under its "redis" extra (celery[redis]); celery-hilok, or kombu itself,
    # must bring each of them (`pip install celery-hilok`, then `celery worker`).
    ours = {Requirement(r).name.lower() for r in metadata.requires("celery-hilok") or []}
    kombu = [Requirement(r) for r in metadata.requires("kombu") or []]
    base = {r.name.lower() for r in kombu if r.marker is None}
    transport = {
        r.name.lower()
        for r in kombu
        if r.marker is not None and 'extra == "redis"' in str(r.marker)
    }
    assert transport, "kombu lists no redis extra: has the Redis transport moved?"
    assert transport <= ours | base
    importlib.import_module("kombu.transport.redis")  # and it imports
