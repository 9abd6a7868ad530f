"""The minimal Redis ACL of celery_hilok (docs/operations.md, "Minimal Redis ACL").

A real redis-server gets a user allowed exactly :data:`ENGINE_COMMANDS` on the namespace's
keys and channels; the sync, asyncio and seed-compatible APIs and the ``hilok`` command then
work in full (wait, wake-up, refresh, release, status, a flushed script cache). Taking any
one command away makes something fail with a clear :class:`HiLokError` (or, for SUBSCRIBE,
a warning): the list is minimal.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from celery_hilok import AsyncHiLok, HiLok, HiLokError, Lease, RedisHiLok
from celery_hilok.cli import hilok
from tests._redis import RedisServer

ENGINE_COMMANDS = (
    # sent by the client: scripts by SHA, the source after a SCRIPT FLUSH (NOSCRIPT),
    # the wake-up subscription, and redis-py's connection health check
    "evalsha",
    "eval",
    "subscribe",
    "ping",
    # run inside the scripts (Redis 7 checks these against the user's ACL too)
    "time",
    "exists",
    "set",
    "hget",
    "hmget",
    "hset",
    "hvals",
    "hdel",
    "pexpire",
    "zadd",
    "zrange",
    "zrangebyscore",
    "zrem",
    "zscore",
    "publish",
)
"""What the engine needs: the ACL line of docs/operations.md, as ``+command`` each."""

FUNCTION_COMMANDS = (
    "fcall",
    "function|load",
    *(c for c in ENGINE_COMMANDS if c not in ("evalsha", "eval")),
)
"""The same with the scripts as Redis Functions (the faster way; docs/operations.md): the
client loads the library where it is missing (a new server, a restart, FUNCTION FLUSH)."""

INSPECT_COMMANDS = ("scan", "get")
"""What the ``hilok`` command (``celery hilok tree``...) needs on top of the engine's: it walks
the namespace, and reads the Celery holder directories (task names) and release notes."""

PASSWORD = "acl-test-pw"
USER = "hilok"
DEADLINE = 15.0  # seconds: every operation below is bounded well within this
# redis-py PINGs a connection idle for longer than this before using it (default 30 s):
# short here so that the health check, and so the need for PING, shows within the test.
OPTIONS = {"health_check_interval": 0.001}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    try:
        yield client
    finally:
        client.acl_deluser(USER)
        client.close()


def acl_line(namespace: str, commands: tuple[str, ...], *, channels: bool = True) -> list[str]:
    """``ACL SETUSER`` arguments of the documented minimal user for ``namespace``."""
    return [
        USER,
        "reset",
        "on",
        f">{PASSWORD}",
        f"~{namespace}:*",
        *([f"&{namespace}:*"] if channels else []),
        *(f"+{c}" for c in commands),
    ]


def make_user(
    admin: redis.Redis, namespace: str, commands: tuple[str, ...], *, channels: bool = True
) -> str:
    """Create the ACL user; return a URL that logs in as it."""
    admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", *acl_line(namespace, commands, channels=channels)
    )
    admin.script_flush()  # the first call of each script takes the NOSCRIPT fallback
    admin.function_flush()  # and the first FCALL loads the library
    kwargs = admin.connection_pool.connection_kwargs
    return f"redis://{USER}:{PASSWORD}@{kwargs['host']}:{kwargs['port']}/0"


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (a real event in Redis or a thread), failing after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def exercise_sync(url: str, namespace: str, admin: redis.Redis) -> None:
    """Acquire, wait for a conflicting holder and get woken by its release, refresh, status.

    Raises whatever the engine raises; asserts the outcome when nothing does.
    """
    queue_key = f"{namespace}:{{t}}::q"
    with (
        HiLok(url, namespace=namespace, redis_options=OPTIONS) as first,
        HiLok(url, namespace=namespace, redis_options=OPTIONS) as second,
    ):
        writer = first.acquire("t/a", "write", ttl=10)
        result: dict[str, Any] = {}

        def wait_for_read() -> None:
            try:
                result["lease"] = second.acquire("t", "read", timeout=DEADLINE)
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=wait_for_read)
        thread.start()
        try:
            wait_until(lambda: bool(admin.exists(queue_key)) or not thread.is_alive(), "waiter")
            time.sleep(0.01)  # not synchronisation: ages `first`'s connection past OPTIONS
            first.refresh(writer)
            first.release(writer)
        finally:
            thread.join(DEADLINE)
        assert not thread.is_alive(), "the waiter hangs"
        if "error" in result:
            raise result["error"]
        reader: Lease = result["lease"]
        assert [h.handle for h in second.status("t").holders] == [reader.handle]
        second.release(reader)
        assert second.status("t").holders == []


async def exercise_async(url: str, namespace: str) -> None:
    async with (
        AsyncHiLok(url, namespace=namespace, redis_options=OPTIONS) as first,
        AsyncHiLok(url, namespace=namespace, redis_options=OPTIONS) as second,
    ):
        writer = await first.acquire("t/a", "write", ttl=10)
        waiter = asyncio.create_task(second.acquire("t", "read", timeout=DEADLINE))
        while not (await first.status("t")).waiters:
            assert not waiter.done(), waiter
            await asyncio.sleep(0.005)
        await first.refresh(writer)
        await first.release(writer)
        reader = await asyncio.wait_for(waiter, DEADLINE)
        assert [h.handle for h in (await second.status("t")).holders] == [reader.handle]
        await second.release(reader)
        assert (await second.status("t")).holders == []


async def exercise_compat(url: str, namespace: str) -> None:
    async with RedisHiLok(url, namespace=namespace, ttl=5000, refresh_interval=50) as h:
        uuid = await h.acquire_write("t/a")
        assert [s.held for s in await h.status("t/a", uuid)] == [True, True]
        await h.release_write("t/a", uuid)
        async with h.read("t") as reader:
            levels = await h.status("t", reader)
            assert levels[0].owned and levels[0].type == "read"
        assert not (await h.status("t", reader))[0].held


def test_the_minimal_acl_is_enough_for_the_sync_engine(
    admin: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_user(admin, namespace, ENGINE_COMMANDS)
    with caplog.at_level(logging.WARNING, logger="celery_hilok"):
        exercise_sync(url, namespace, admin)
    # CONFIG GET (the eviction check) is refused and skipped quietly; nothing else warns.
    assert [r.getMessage() for r in caplog.records] == []


def test_the_minimal_acl_is_enough_for_the_async_engine(admin: redis.Redis, namespace: str) -> None:
    url = make_user(admin, namespace, ENGINE_COMMANDS)
    asyncio.run(asyncio.wait_for(exercise_async(url, namespace), DEADLINE))


def test_the_minimal_acl_is_enough_for_the_seed_compatible_class(
    admin: redis.Redis, namespace: str
) -> None:
    url = make_user(admin, namespace, ENGINE_COMMANDS)
    asyncio.run(asyncio.wait_for(exercise_compat(url, namespace), DEADLINE))


def test_with_functions_the_engine_needs_no_eval(
    admin: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_user(admin, namespace, FUNCTION_COMMANDS)
    admin.config_resetstat()
    with caplog.at_level(logging.INFO, logger="celery_hilok"):
        exercise_sync(url, namespace, admin)
        asyncio.run(asyncio.wait_for(exercise_async(url, namespace), DEADLINE))
        asyncio.run(asyncio.wait_for(exercise_compat(url, namespace), DEADLINE))
    stats = admin.info("commandstats")
    assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats
    assert stats["cmdstat_function|load"]["calls"] >= 1
    assert not [r for r in caplog.records if "Redis Functions" in r.getMessage()]


def test_without_functions_the_engine_says_so_once_and_uses_evalsha(
    admin: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_user(admin, namespace, ENGINE_COMMANDS)
    with (
        caplog.at_level(logging.INFO, logger="celery_hilok"),
        HiLok(url, namespace=namespace) as engine,
    ):
        for _ in range(3):
            engine.release(engine.acquire("t/a", "write"))
        assert not engine._functions
    told = [r.getMessage() for r in caplog.records if "Redis Functions" in r.getMessage()]
    assert len(told) == 1 and "'fcall'" in told[0] and "EVALSHA" in told[0], told


def test_the_cli_needs_scan_on_top(admin: redis.Redis, namespace: str) -> None:
    url = make_user(admin, namespace, ENGINE_COMMANDS + INSPECT_COMMANDS)
    with HiLok(url, namespace=namespace) as hl:
        lease = hl.acquire("t/a", "write")
        result = CliRunner().invoke(hilok, ["--url", url, "--namespace", namespace, "tree"])
        assert result.exit_code == 0, result.output
        assert f"[write] holder {lease.handle}" in result.output
        admin.acl_setuser(USER, enabled=True, commands=["-scan"])
        result = CliRunner().invoke(hilok, ["--url", url, "--namespace", namespace, "tree"])
        assert result.exit_code != 0
        assert "no permissions to run the 'scan' command" in result.output
        assert PASSWORD not in result.output
        hl.release(lease)


@pytest.mark.parametrize(
    ("acl", "missing"),
    [("eval", c) for c in ENGINE_COMMANDS if c != "subscribe"]
    + [("functions", c) for c in FUNCTION_COMMANDS if c not in ENGINE_COMMANDS],
)
def test_every_command_of_the_acl_is_needed(
    admin: redis.Redis, namespace: str, acl: str, missing: str
) -> None:
    commands = ENGINE_COMMANDS if acl == "eval" else FUNCTION_COMMANDS
    url = make_user(admin, namespace, tuple(c for c in commands if c != missing))
    started = time.monotonic()
    with pytest.raises(HiLokError, match=r"(ACL|credentials|no permissions)") as info:
        exercise_sync(url, namespace, admin)
    assert time.monotonic() - started < DEADLINE
    assert "ACL does not allow a command, key or channel celery_hilok needs" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_without_subscribe_waiters_poll_and_say_so(
    admin: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_user(admin, namespace, tuple(c for c in ENGINE_COMMANDS if c != "subscribe"))
    with caplog.at_level(logging.WARNING, logger="celery_hilok"):
        exercise_sync(url, namespace, admin)  # still correct, only slower to wake up
    assert any("'subscribe'" in r.getMessage() for r in caplog.records), caplog.text


def test_without_channel_permission_a_release_that_would_wake_a_waiter_fails_clearly(
    admin: redis.Redis, namespace: str
) -> None:
    url = make_user(admin, namespace, ENGINE_COMMANDS, channels=False)
    with pytest.raises(HiLokError, match="ACL does not allow"):
        exercise_sync(url, namespace, admin)


def test_a_database_other_than_0_needs_select(admin: redis.Redis, namespace: str) -> None:
    url = make_user(admin, namespace, ENGINE_COMMANDS).replace("/0", "/3")
    with HiLok(url, namespace=namespace) as engine:
        with pytest.raises(HiLokError, match="no permissions to run the 'select' command"):
            engine.acquire("t/a", "write")
    url = make_user(admin, namespace, (*ENGINE_COMMANDS, "select")).replace("/0", "/3")
    with HiLok(url, namespace=namespace) as engine:
        engine.release(engine.acquire("t/a", "write"))


def test_config_get_is_optional_and_turns_on_the_eviction_warning(
    admin: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin.config_set("maxmemory-policy", "allkeys-lru")
    try:
        for extra, warned in (((), False), (("config|get",), True)):
            url = make_user(admin, namespace, (*ENGINE_COMMANDS, *extra))
            caplog.clear()
            with (
                caplog.at_level(logging.WARNING, logger="celery_hilok"),
                HiLok(url, namespace=namespace) as engine,
            ):
                engine.release(engine.acquire("t/a", "write"))
            assert any("allkeys-lru" in r.getMessage() for r in caplog.records) is warned
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
