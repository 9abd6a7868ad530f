"""The ``hilok`` command (celery_hilok.cli), run through click's test runner and as
``python -m celery_hilok`` / ``celery -A app hilok`` subprocesses, against a real Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from celery_hilok import HiLok
from celery_hilok._core import new_handle
from celery_hilok._parked import Parked, index_key, record_key
from celery_hilok.cli import hilok
from celery_hilok.inspect import RELEASE_NOTE_TTL, release_note, release_note_key


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def hl(redis_url: str, namespace: str) -> Iterator[HiLok]:
    engine = HiLok(redis_url, namespace=namespace)
    yield engine
    engine.close()


def run(redis_url: str, namespace: str, *args: str, input: str | None = None) -> str:
    result = CliRunner().invoke(
        hilok, ["--url", redis_url, "--namespace", namespace, *args], input=input
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_tree_shows_holders_and_waiters(hl: HiLok, redis_url: str, namespace: str) -> None:
    w = hl.acquire("tenants/42/invoices/7", "write")
    r = hl.acquire("tenants/43", "read")
    out = run(redis_url, namespace, "tree")
    assert "tenants" in out and "invoices" in out
    assert f"[write] holder {w.handle}" in out
    assert f"[read] holder {r.handle}" in out
    assert f"token {w.token}" in out


def test_tree_names_a_parked_task_with_no_worker_running(
    hl: HiLok, redis_url: str, namespace: str
) -> None:
    # What a task parked by the park policy leaves (celery_hilok.celery.park): its queue
    # entry and its record; no worker process publishes a holder directory.
    holder = hl.acquire("tenants/42", "write")
    handle = new_handle()
    channel = hl._protocol.keys.channel("park-test")
    hl._park([("tenants/42", "write")], handle=handle, ttl=30, queue_ttl=60, channel=channel)
    parked = Parked(handle, "t-1", "bank.debit", [("tenants/42", "write")], 300.0, None,
                    time.time(), "w1@host", "application/json", "utf-8", "")  # fmt: skip
    hl.redis.set(record_key(namespace, handle), parked.encode())
    hl.redis.zadd(index_key(namespace), {handle: parked.parked_at})
    out = run(redis_url, namespace, "tree")
    assert f"(waiting write) holder {handle}" in out
    assert "task bank.debit[t-1] parked (by w1@host)" in out
    hl.release(holder)


def test_tree_json_and_focus_on_a_path(hl: HiLok, redis_url: str, namespace: str) -> None:
    w = hl.acquire("a/b/c", "write")
    hl.acquire("x/y", "read")
    data = json.loads(run(redis_url, namespace, "tree", "a/b", "--json"))
    assert data["namespace"] == namespace
    assert [(g["path"], g["mode"], g["handle"], g["token"]) for g in data["grants"]] == [
        ("a/b/c", "write", w.handle, w.token)
    ]


def test_tree_says_when_namespace_is_empty(redis_url: str, namespace: str) -> None:
    assert "no locks held or awaited" in run(redis_url, namespace, "tree")


def test_show_lists_holders_relative_to_the_path(hl: HiLok, redis_url: str, namespace: str) -> None:
    hl.acquire("t", "read")
    hl.acquire("t/1/2", "read")
    out = run(redis_url, namespace, "show", "t/1")
    assert "above  read      t " in out
    assert "below  read      t/1/2 " in out
    data = json.loads(run(redis_url, namespace, "show", "t/1", "--json"))
    assert sorted(h["relation"] for h in data["holders"]) == ["above", "below"]


def fails(redis_url: str, namespace: str, *args: str) -> str:
    result = CliRunner().invoke(hilok, ["--url", redis_url, "--namespace", namespace, *args])
    assert result.exit_code == 1, result.output
    return result.output


def test_release_by_handle_is_owner_checked(hl: HiLok, redis_url: str, namespace: str) -> None:
    mine = hl.acquire("p/q", "write")
    other = hl.acquire("p/r", "write")
    out = fails(redis_url, namespace, "release", "p/q", "--handle", other.handle)
    assert f"nothing released: holder {other.handle} holds no lock on 'p/q' or below it" in out
    assert "a wrong handle" in out
    assert hl.status("p/q").held
    out = run(redis_url, namespace, "release", "p/q", "--handle", mine.handle)
    assert "released 1 grant(s)" in out
    assert not hl.status("p/q").held
    assert hl.status("p/r").held


def test_release_by_handle_covers_the_subtree_and_names_a_lock_above(
    hl: HiLok, redis_url: str, namespace: str
) -> None:
    below = hl.acquire_many([("s/t/u", "write"), ("s/t/v", "read")])
    out = run(redis_url, namespace, "release", "s/t", "--handle", below[0].handle)
    assert "released 2 grant(s)" in out
    assert not hl.status("s").holders
    above = hl.acquire("s", "read")
    out = fails(redis_url, namespace, "release", "s/t", "--handle", above.handle)
    assert "it holds 's' above it: name that path" in out
    assert hl.status("s").held


def test_without_a_url_it_says_which_server_it_uses(
    hl: HiLok, redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hl.acquire("d/e", "write")
    monkeypatch.delenv("HILOK_REDIS_URL", raising=False)
    monkeypatch.setattr("celery_hilok.cli.DEFAULT_URL", redis_url)  # the session's server
    result = CliRunner().invoke(hilok, ["--namespace", namespace, "tree", "--json"])
    assert result.exit_code == 0, result.output
    server = redis_url.split("://", 1)[1]
    assert f"using Redis at {server}, namespace {namespace!r} (the default" in result.stderr
    assert json.loads(result.stdout)["grants"][0]["path"] == "d/e"  # stdout stays JSON
    named = CliRunner().invoke(hilok, ["--url", redis_url, "--namespace", namespace, "tree"])
    assert named.exit_code == 0 and "using Redis" not in named.stderr


def test_force_release_asks_and_frees_the_subtree(
    hl: HiLok, redis_url: str, namespace: str
) -> None:
    a = hl.acquire("f/a", "write")
    hl.acquire("f/b/c", "read")
    g = hl.acquire("g", "write")
    result = CliRunner().invoke(
        hilok,
        ["--url", redis_url, "--namespace", namespace, "release", "f", "--force"],
        input="n\n",
    )
    assert result.exit_code != 0  # aborted at the prompt
    assert hl.status("f").holders
    out = run(redis_url, namespace, "release", "f", "--force", input="y\n")
    assert "released 2 grant(s)" in out
    assert not hl.status("f").holders
    assert hl.status("g").held
    hl.acquire("f", "write", block=False)
    # Each holder finds a note saying who released its locks, for a while only.
    note = release_note(hl, a.handle)
    assert note is not None and note.how == "force" and note.paths == ("f/a",)
    assert note.describe().startswith("released by force from the command line")
    ttl = hl.redis.ttl(release_note_key(namespace, a.handle))
    assert 0 < ttl <= RELEASE_NOTE_TTL
    assert release_note(hl, g.handle) is None  # not released: no note


def test_release_needs_handle_or_force(redis_url: str, namespace: str) -> None:
    result = CliRunner().invoke(hilok, ["--url", redis_url, "release", "x"])
    assert result.exit_code == 2
    assert "exactly one of --handle H or --force" in result.output


def test_unreachable_redis_is_a_clear_error(unused_port: int) -> None:
    url = f"redis://127.0.0.1:{unused_port}/0"
    result = CliRunner().invoke(hilok, ["--url", url, "tree"])
    assert result.exit_code == 1
    assert f"127.0.0.1:{unused_port}" in result.output
    assert "Traceback" not in result.output


def test_watch_redraws(hl: HiLok, redis_url: str, namespace: str) -> None:
    hl.acquire("w/1", "write")
    out = run(redis_url, namespace, "watch", "--count", "2", "--interval", "0.01")
    assert out.count("w/1") == 0 and out.count("[write]") == 2


def test_python_m_and_celery_subcommand(
    hl: HiLok, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    lease = hl.acquire("m/n", "write")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery_hilok",
            "--url",
            redis_url,
            "--namespace",
            namespace,
            "tree",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert lease.handle in out
    (tmp_path / "cliapp.py").write_text(
        textwrap.dedent(
            f"""
            from celery import Celery
            app = Celery("cliapp", broker="redis://127.0.0.1:1/0")
            app.conf.hilok_redis_url = {redis_url!r}
            app.conf.hilok_namespace = {namespace!r}
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "cliapp", "hilok", "show", "m/n"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    ).stdout
    assert f"self   write     m/n  holder {lease.handle}" in out
