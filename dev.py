#!/usr/bin/env python3
"""Developer command for celery-hilok (standard library only, Python >= 3.10).

Usage: python3 dev.py <command> [args...]

Commands:
  setup            create .venv, install celery-hilok[dev] into it (editable) and
                   make sure a redis-server binary is available
  test [ARGS...]   setup, then run pytest with ARGS (e.g. `dev.py test -x -k foo`)
  lint             setup, then `ruff check .`, `ruff format --check .` and `mypy`
  demo             setup, then run `python -m examples.demo`
  bench [ARGS...]  setup, then run `python -m benchmarks.run ARGS`
  docs             setup, then build the documentation site strictly into site/
                   (`mkdocs build --strict`)
  package          setup, then build the sdist and wheel into dist/ (`python -m build`)
                   and check them with `twine check`
  oldest [ARGS...] setup, then run the Celery and engine tests again in .venv-oldest, on
                   the oldest Celery and redis-py pyproject.toml allows (celery 5.5.3,
                   redis 6.4.0)
  ci               lint, docs, package, test, then oldest; exits non-zero if anything
                   failed

Environment:
  HILOK_REDIS_URL     use this existing Redis server (redis://host:port) in tests
                      instead of starting local redis-server processes
  HILOK_REDIS_SERVER  path of the redis-server binary (default: found on PATH)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".hilok-installed"
PYPROJECT = ROOT / "pyproject.toml"

# Used only if the `files` list cannot be read from [tool.mypy] in pyproject.toml.
DEFAULT_MYPY_FILES = ("celery_hilok", "tests", "examples", "benchmarks", "dev.py")

EXIT_NO_REDIS = 2


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def fail(message: str) -> None:
    print(f"ERROR: {message}", file=sys.stderr, flush=True)


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def venv_env() -> dict[str, str]:
    """Environment for commands run inside the virtualenv."""
    env = dict(os.environ)
    bin_dir = venv_python().parent
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env


def run(cmd: Sequence[str | os.PathLike[str]], env: Mapping[str, str] | None = None) -> int:
    """Run a command from the repository root and return its exit code."""
    args = [os.fspath(c) for c in cmd]
    try:
        return subprocess.call(args, cwd=ROOT, env=env)
    except FileNotFoundError:
        fail(f"command not found: {args[0]}")
        return 127


# --------------------------------------------------------------------------- setup


def ensure_venv() -> None:
    python = venv_python()
    if not python.exists():
        step(f"creating virtualenv {VENV.relative_to(ROOT)}")
        if run([sys.executable, "-m", "venv", VENV]) != 0 or not python.exists():
            fail(
                "could not create the virtualenv; on Debian/Ubuntu install the venv "
                "module first: apt install python3-venv"
            )
            sys.exit(1)

    if STAMP.exists() and STAMP.stat().st_mtime > PYPROJECT.stat().st_mtime:
        return
    step("installing celery-hilok[dev] into .venv (pip install -e '.[dev]')")
    pip: list[str | os.PathLike[str]] = [
        python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "-e",
        ".[dev]",
    ]
    if run(pip, env=venv_env()) != 0:
        fail("pip install failed")
        sys.exit(1)
    STAMP.touch()


def find_redis_server() -> str | None:
    explicit = os.environ.get("HILOK_REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server")


def is_root() -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0


def ensure_redis_server() -> None:
    url = os.environ.get("HILOK_REDIS_URL")
    if url:
        step(f"using the Redis server at HILOK_REDIS_URL={url}")
        return
    if find_redis_server():
        return

    if is_root() and shutil.which("apt-get"):
        step("redis-server not found: installing it with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if run(["apt-get", "update", "-q"], env=env) != 0:
            print("warning: apt-get update failed; trying the install anyway", flush=True)
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"]
        if run(install, env=env) != 0:
            fail("apt-get install redis-server failed")
            sys.exit(EXIT_NO_REDIS)
        if find_redis_server():
            return
        fail("apt-get installed redis-server but no redis-server binary is on PATH")
        sys.exit(EXIT_NO_REDIS)

    fail(
        "the tests need a redis-server binary, and none was found on PATH.\n"
        "  Either install one, e.g.:   sudo apt install redis-server\n"
        "  (or set HILOK_REDIS_SERVER=/path/to/redis-server),\n"
        "  or point the tests at an existing server whose data they may write to:\n"
        "      HILOK_REDIS_URL=redis://127.0.0.1:6379 python3 dev.py test"
    )
    sys.exit(EXIT_NO_REDIS)


def setup() -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py may be run by any python3
        fail("dev.py needs Python >= 3.10")
        sys.exit(1)
    ensure_venv()
    ensure_redis_server()


# ------------------------------------------------------------------------ commands


def mypy_files() -> list[str]:
    """The `files` of [tool.mypy] in pyproject.toml that exist (mypy errors on missing ones)."""
    text = PYPROJECT.read_text(encoding="utf-8")
    section = re.search(r"^\[tool\.mypy\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    body = section.group(1) if section else ""
    listed = re.search(r"^files\s*=\s*\[(.*?)\]", body, re.M | re.S)
    names = re.findall(r"""["']([^"']+)["']""", listed.group(1)) if listed else []
    return [name for name in (names or DEFAULT_MYPY_FILES) if (ROOT / name).exists()]


def cmd_setup(args: Sequence[str]) -> int:
    setup()
    step("setup done")
    return 0


def run_tests(args: Sequence[str]) -> int:
    step("starting tests" + (f" (pytest {' '.join(args)})" if args else ""))
    return run([venv_python(), "-m", "pytest", *args], env=venv_env())


def run_lint() -> int:
    python = venv_python()
    checks: list[tuple[str, list[str | os.PathLike[str]]]] = [
        ("ruff check", [python, "-m", "ruff", "check", "."]),
        ("ruff format --check", [python, "-m", "ruff", "format", "--check", "."]),
        ("mypy", [python, "-m", "mypy", *mypy_files()]),
    ]
    failed = []
    for name, cmd in checks:
        step(f"running {name}")
        if run(cmd, env=venv_env()) != 0:
            failed.append(name)
    if failed:
        fail("lint failed: " + ", ".join(failed))
        return 1
    step("lint passed")
    return 0


def run_docs() -> int:
    step("building the docs (mkdocs build --strict -d site)")
    cmd: list[str | os.PathLike[str]] = [venv_python(), "-m", "mkdocs", "build", "--strict"]
    env = {**venv_env(), "NO_MKDOCS_2_WARNING": "1"}  # material's end-of-life banner
    rc = run([*cmd, "--site-dir", ROOT / "site"], env=env)
    if rc != 0:
        fail("docs build failed")
    return rc


def run_package() -> int:
    dist = ROOT / "dist"
    step("building the sdist and wheel into dist/ (python -m build)")
    shutil.rmtree(dist, ignore_errors=True)
    rc = run([venv_python(), "-m", "build", "--outdir", dist], env=venv_env())
    if rc == 0:
        built = sorted(dist.glob("*.tar.gz")) + sorted(dist.glob("*.whl"))
        step("checking " + ", ".join(p.name for p in built) + " (twine check --strict)")
        rc = run([venv_python(), "-m", "twine", "check", "--strict", *built], env=venv_env())
    if rc != 0:
        fail("package build or check failed")
    return rc


def cmd_test(args: Sequence[str]) -> int:
    setup()
    return run_tests(args)


def cmd_lint(args: Sequence[str]) -> int:
    if args:
        fail("lint takes no arguments")
        return 2
    setup()
    return run_lint()


def cmd_demo(args: Sequence[str]) -> int:
    setup()
    step("running examples.demo")
    return run([venv_python(), "-m", "examples.demo", *args], env=venv_env())


def cmd_bench(args: Sequence[str]) -> int:
    setup()
    step("running benchmarks.run")
    return run([venv_python(), "-m", "benchmarks.run", *args], env=venv_env())


def cmd_docs(args: Sequence[str]) -> int:
    if args:
        fail("docs takes no arguments")
        return 2
    setup()
    return run_docs()


def cmd_package(args: Sequence[str]) -> int:
    if args:
        fail("package takes no arguments")
        return 2
    setup()
    return run_package()


OLDEST_VENV = ROOT / ".venv-oldest"
OLDEST_PINS = ("celery==5.5.3", "kombu==5.5.4", "redis==6.4.0")
"""The oldest releases of the dependencies pyproject.toml allows (and their kombu)."""
OLDEST_TESTS = (
    "tests/celery",
    "tests/test_engine.py",
    "tests/test_aio.py",
    "tests/test_seed.py",
    "tests/test_cluster.py",
    "tests/test_sentinel.py",
    "tests/test_metrics.py",
)
"""What touches Celery and redis-py most: run again on the oldest releases."""


def run_oldest(args: Sequence[str]) -> int:
    """The Celery and engine tests on the oldest Celery and redis-py allowed (.venv-oldest)."""
    python = OLDEST_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    stamp = OLDEST_VENV / ".hilok-installed"
    if not python.exists():
        step(f"creating virtualenv {OLDEST_VENV.relative_to(ROOT)}")
        if run([sys.executable, "-m", "venv", OLDEST_VENV]) != 0:
            fail("could not create the virtualenv of the oldest dependencies")
            return 1
    env = {**os.environ, "VIRTUAL_ENV": str(OLDEST_VENV)}
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    if not (stamp.exists() and stamp.stat().st_mtime > PYPROJECT.stat().st_mtime):
        step("installing celery-hilok[test,metrics] with " + ", ".join(OLDEST_PINS))
        pip: list[str | os.PathLike[str]] = [python, "-m", "pip", "install", "-q"]
        pip.append("--disable-pip-version-check")
        extra = ("opentelemetry-sdk",)  # for the OpenTelemetry observer's tests, as in dev
        if run([*pip, "-e", ".[test,metrics]", *OLDEST_PINS, *extra], env=env) != 0:
            fail("pip install of the oldest dependencies failed")
            return 1
        stamp.touch()
    step("starting the tests on " + ", ".join(OLDEST_PINS))
    return run([python, "-m", "pytest", "-q", *OLDEST_TESTS, *args], env=env)


def cmd_oldest(args: Sequence[str]) -> int:
    setup()
    return run_oldest(args)


def cmd_ci(args: Sequence[str]) -> int:
    setup()
    lint_rc = run_lint()
    # Run every step even when one failed, so one CI run reports everything.
    docs_rc = run_docs()
    package_rc = run_package()
    test_rc = run_tests(args)
    oldest_rc = run_oldest(())
    if lint_rc or docs_rc or package_rc or test_rc or oldest_rc:
        fail(
            f"ci failed (lint exit {lint_rc}, docs exit {docs_rc}, "
            f"package exit {package_rc}, tests exit {test_rc}, "
            f"oldest dependencies exit {oldest_rc})"
        )
        return lint_rc or docs_rc or package_rc or test_rc or oldest_rc
    step("ci passed")
    return 0


COMMANDS = {
    "setup": cmd_setup,
    "test": cmd_test,
    "lint": cmd_lint,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "docs": cmd_docs,
    "package": cmd_package,
    "oldest": cmd_oldest,
    "ci": cmd_ci,
}


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        fail(f"unknown command {argv[0]!r}; choose from: {', '.join(COMMANDS)}")
        return 2
    try:
        return command(argv[1:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
