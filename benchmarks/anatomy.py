"""Where an uncontended pair's client time goes: the engine, redis-py, or redis-py's version.

    python -m benchmarks.anatomy                 # all three parts, interleaved rounds
    python -m benchmarks.anatomy --parts replay --rounds 12
    python -m benchmarks.anatomy --quick         # smoke mode

Starts its own redis-server on 127.0.0.1. Parts, each printed as a Markdown table (the
median and the best of the rounds, which alternate the order of what they compare):

``replay``
    ``with hl.write(path)`` on a depth-3 path from one ``HiLok``, against the very ``FCALL``
    commands of that pair (recorded from it) replayed through the same ``redis.Redis`` with
    no engine, against the floor (two bare ``EVALSHA``): with one thread and with 32. What
    separates ours from the replay is our Python; what separates the replay from the floor
    is the scripts' arguments and Redis's time running them.
``bypass``
    One ``EVALSHA`` by ``execute_command`` against the same command sent on a connection
    taken from the pool (``send_packed_command`` + ``read_response``), sync and asyncio:
    what going around redis-py's per-call path would save.
``lua``
    Redis's time per pair (``INFO commandstats``) for that recorded depth-3 pair (fresh
    handles each time), through our library and through a minimal one that runs the very
    same 18 commands with as little Lua as can be: what the scripts' own Lua costs, beside
    the commands they run; and what one ``redis.call`` and one Lua operation (a string
    joined, a table or a closure made) cost inside Redis.
``versions``
    The asyncio floor (two ``EVALSHA`` per pair) in this virtualenv and in the seed's
    (``benchmarks/.seed-venv``, which pins the redis-py redishilok 1.1.0 was built on), in
    alternating child processes: the floor each library stands on. Skipped when the seed's
    virtualenv cannot be built.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aredis

from benchmarks.ours import sync_floor_rate
from benchmarks.workloads import TRIVIAL_SCRIPT, chain_path, measure_rate_threads
from celery_hilok import HiLok

PARTS = ("replay", "bypass", "lua", "versions")

_FLOOR_CHILD = """
import asyncio, sys, time
import redis, redis.asyncio as aredis
async def main(url, pairs):
    client = aredis.Redis.from_url(url)
    sha = await client.script_load({script!r})
    for _ in range(200):
        await client.evalsha(sha, 0)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(pairs):
        await client.evalsha(sha, 0)
        await client.evalsha(sha, 0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.aclose()
    print(redis.__version__, pairs / wall, cpu / pairs * 1e6)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timed(work: Callable[[], None], count: int) -> tuple[float, float]:
    """Pairs (or calls) per second and client CPU µs per one of ``count``, for ``work``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, cpu / count * 1e6


def _repeat(op: Callable[[], None], count: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(count):
            op()

    return run


def _row(name: str, samples: list[tuple[float, float]]) -> str:
    rates, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return (
        f"| {name} | {statistics.median(rates):.0f} | {max(rates):.0f} "
        f"| {statistics.median(cpus):.0f} | {min(cpus):.0f} |"
    )


_HEAD = (
    "| what | per s, median | per s, best | CPU µs, median | CPU µs, best |\n|---|---|---|---|---|"
)


def _recorded_pair(hl: HiLok, path: str) -> list[tuple[Any, ...]]:
    """The commands ``with hl.write(path)`` sends, once the library is loaded."""
    seen: list[tuple[Any, ...]] = []
    client: Any = hl.redis
    original: Any = client.execute_command

    def spy(*args: Any, **options: Any) -> Any:
        seen.append(args)
        return original(*args, **options)

    client.execute_command = spy
    try:
        for _ in range(2):
            seen.clear()
            with hl.write(path):
                pass
    finally:
        del client.execute_command
    assert [c[0] for c in seen] == ["FCALL", "FCALL"], seen
    return seen


def replay(url: str, rounds: int, duration: float, pairs: int) -> str:
    out = []
    with HiLok(url, namespace="anatomy", ttl=30) as hl:
        client = redis.Redis.from_url(url)
        sha = client.script_load(TRIVIAL_SCRIPT)
        execute: Any = hl.redis.execute_command

        def ours(path: str) -> Callable[[], None]:
            def op() -> None:
                with hl.write(path):
                    pass

            return op

        def again(path: str) -> Callable[[], None]:
            first, second = _recorded_pair(hl, path)

            def op() -> None:
                execute(*first)
                execute(*second)

            return op

        def floor() -> None:
            client.evalsha(sha, 0)
            client.evalsha(sha, 0)

        # one thread
        paths = [chain_path(f"anatomy-{i}", 3) for i in range(32)]
        cases: dict[str, Callable[[], None]] = {
            "ours: with hl.write(p)": ours(paths[0]),
            "replay: its two FCALLs, no engine": again(paths[0]),
            "floor: two bare EVALSHA": floor,
        }
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for r in range(rounds):
            say(f"replay, one thread: round {r + 1}/{rounds}")
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                samples[name].append(_timed(_repeat(cases[name], pairs), pairs))
        out += ["One thread, depth-3 write pairs:", "", _HEAD]
        out += [_row(name, s) for name, s in samples.items()]
        # 32 threads, each on its own tree
        threaded: dict[str, Callable[[], dict[str, Any]]] = {
            "ours: with hl.write(p)": lambda: measure_rate_threads(
                [ours(p) for p in paths], duration, duration / 5
            ),
            "replay: its two FCALLs, no engine": lambda: measure_rate_threads(
                [again(p) for p in paths], duration, duration / 5
            ),
            "floor: two bare EVALSHA": lambda: sync_floor_rate(
                url, "evalsha", 32, duration, duration / 5
            ),
        }
        samples = {name: [] for name in threaded}
        for r in range(rounds):
            say(f"replay, 32 threads: round {r + 1}/{rounds}")
            order = list(threaded) if r % 2 == 0 else list(reversed(threaded))
            for name in order:
                result = threaded[name]()
                samples[name].append((result["rate"], result["cpu_us_per_op"]))
        out += ["", "32 threads sharing the client (each its own tree):", "", _HEAD]
        out += [_row(name, s) for name, s in samples.items()]
        client.close()
    return "\n".join(out)


def bypass(url: str, rounds: int, calls: int) -> str:
    client: Any = redis.Redis.from_url(url)
    sha = client.script_load(TRIVIAL_SCRIPT)
    pool = client.connection_pool

    def by_execute() -> None:
        for _ in range(calls):
            client.execute_command("EVALSHA", sha, 0)

    def by_connection() -> None:
        for _ in range(calls):
            conn = pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_command("EVALSHA", sha, 0), False)
                conn.read_response()
            finally:
                pool.release(conn)

    async def async_samples() -> dict[str, list[tuple[float, float]]]:
        aclient: Any = aredis.Redis.from_url(url)
        apool = aclient.connection_pool

        async def by_execute_async() -> None:
            for _ in range(calls):
                await aclient.execute_command("EVALSHA", sha, 0)

        async def by_connection_async() -> None:
            for _ in range(calls):
                conn = await apool.get_connection()
                try:
                    await conn.send_packed_command(conn.pack_command("EVALSHA", sha, 0), False)
                    await conn.read_response()
                finally:
                    await apool.release(conn)

        cases = {
            "asyncio, execute_command": by_execute_async,
            "asyncio, a pooled connection": by_connection_async,
        }
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for r in range(rounds):
            for name in cases if r % 2 == 0 else reversed(cases):
                wall, cpu = time.perf_counter(), time.process_time()
                await cases[name]()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                got[name].append((calls / wall, cpu / calls * 1e6))
        await aclient.aclose()
        return got

    sync_cases = {"sync, execute_command": by_execute, "sync, a pooled connection": by_connection}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sync_cases}
    for r in range(rounds):
        say(f"bypass: round {r + 1}/{rounds}")
        for name in sync_cases if r % 2 == 0 else reversed(sync_cases):
            samples[name].append(_timed(sync_cases[name], calls))
    samples.update(asyncio.run(async_samples()))
    client.close()
    lines = ["One bare EVALSHA, one client (per s and CPU µs per call):", "", _HEAD]
    return "\n".join(lines + [_row(name, s) for name, s in samples.items()])


# The commands of an uncontended depth-3 write pair (a new holder, lean calls), with as little
# Lua around them as can be: KEYS and ARGV as celery_hilok lays them out for that pair.
_MINIMAL = r"""#!lua name=anatomy_minimal
redis.register_function('anatomy_acquire', function(keys, args)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local token = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  local member = args[1] .. '|X|' .. args[12]
  if redis.call('EXISTS', keys[2], keys[9], keys[10], keys[12], keys[13], keys[14], keys[15],
                keys[16], keys[17]) > 0 then return { 0 } end
  redis.call('SET', keys[1], token, 'PX', 604800000, 'GET')
  local exp = now + tonumber(args[2])
  for _, k in ipairs({ keys[8], keys[11], keys[17] }) do
    redis.call('ZADD', k, exp, member)
    redis.call('PEXPIRE', k, args[2], 'NX')
  end
  redis.call('HSET', keys[7], member, token .. '|' .. exp .. '|' .. args[7], '@', exp)
  redis.call('PEXPIRE', keys[7], 2 * tonumber(args[2]), 'NX')
  return { 1, { token } }
end)
redis.register_function('anatomy_release', function(keys, args)
  redis.call('TIME')
  local member = args[1] .. '|X|' .. args[10]
  if redis.call('EXISTS', keys[2]) == 1 then return { -1 } end
  redis.call('HMGET', keys[7], member, '@')
  for i = 8, 10 do redis.call('ZREM', keys[i], member) end
  redis.call('HDEL', keys[7], member, '@')
  return { 1 }
end)
"""


# What one Lua operation costs inside Redis: each function does 100 of one kind.
_OPERATIONS = r"""#!lua name=anatomy_operations
redis.register_function('op_loop', function(keys, args)
  local x = 0 for i = 1, 100 do x = x + i end return x end)
redis.register_function('op_call_time', function(keys, args)
  for i = 1, 100 do redis.call('TIME') end return 1 end)
redis.register_function('op_call_exists', function(keys, args)
  for i = 1, 100 do redis.call('EXISTS', keys[1]) end return 1 end)
redis.register_function('op_join', function(keys, args)
  local s for i = 1, 100 do s = args[1] .. '|' .. args[2] .. '|' .. i end return 1 end)
redis.register_function('op_table', function(keys, args)
  local t
  for i = 1, 100 do t = { mode = 'X', depth = 3, tree = 1, path = args[2] } end
  return 1 end)
redis.register_function('op_closure', function(keys, args)
  local f for i = 1, 100 do f = function() return i end end return 1 end)
"""
_OPERATION_NAMES = {
    "op_call_time": "redis.call('TIME')",
    "op_call_exists": "redis.call('EXISTS', key)",
    "op_join": "a string of 5 pieces joined",
    "op_table": "a table of 4 fields made",
    "op_closure": "a closure made",
}


def lua_operations(client: Any, rounds: int) -> list[str]:
    """What one operation of each kind costs inside Redis (µs), as Markdown lines."""
    client.execute_command("FUNCTION", "LOAD", "REPLACE", _OPERATIONS)
    costs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name in ("op_loop", *_OPERATION_NAMES):
            client.config_resetstat()
            for _ in range(200):
                client.execute_command("FCALL", name, 1, "anatomy:k", "h" * 24, "a/b/c")
            stats = client.info("commandstats")["cmdstat_fcall"]
            costs.setdefault(name, []).append(stats["usec"] / 200)
    client.execute_command("FUNCTION", "DELETE", "anatomy_operations")
    loop = statistics.median(costs["op_loop"])
    lines = [
        "",
        "Lua inside Redis, µs per operation (an FCALL of 100 of them, less an empty loop's "
        f"{loop:.1f} µs):",
        "",
        "| operation | µs |",
        "|---|---|",
    ]
    for name, text in _OPERATION_NAMES.items():
        lines.append(f"| {text} | {(statistics.median(costs[name]) - loop) / 100:.2f} |")
    return lines


def lua(url: str, rounds: int, pairs: int) -> str:
    client: Any = redis.Redis.from_url(url)
    with HiLok(url, namespace="anatomy-lua", ttl=30) as hl:
        acquire, release = _recorded_pair(hl, chain_path("anatomy-lua", 3))
    assert acquire[2] == 17 and release[2] == 10, "not the lean layout the minimal one expects"
    handle = acquire[3 + acquire[2]]
    client.execute_command("FUNCTION", "LOAD", "REPLACE", _MINIMAL)
    names = {
        "our library": (acquire[1], release[1]),
        "a minimal one, the same 18 commands": ("anatomy_acquire", "anatomy_release"),
    }

    def pair(name: str, fresh: str) -> None:
        for command, function in zip((acquire, release), names[name], strict=True):
            args = [a.replace(handle, fresh) if isinstance(a, str) else a for a in command]
            reply = client.execute_command(args[0], function, *args[2:])
            assert reply[0] == 1, (name, reply)

    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        say(f"lua: round {r + 1}/{rounds}")
        for name in names if r % 2 == 0 else reversed(names):
            client.config_resetstat()
            for _ in range(pairs):
                pair(name, base64.urlsafe_b64encode(os.urandom(18)).decode())
            samples[name].append(client.info("commandstats")["cmdstat_fcall"]["usec"] / pairs)
    client.execute_command("FUNCTION", "DELETE", "anatomy_minimal")
    operations = lua_operations(client, rounds)
    client.close()
    lines = [
        "Redis µs per depth-3 write pair (two FCALLs, 18 commands inside):",
        "",
        "| library | median | best |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {statistics.median(s):.1f} | {min(s):.1f} |" for name, s in samples.items()
    ]
    return "\n".join(lines + operations)


def versions(url: str, rounds: int, pairs: int) -> str:
    from benchmarks import seed

    try:
        seed_python = str(seed.ensure_venv(say))
    except seed.SeedUnavailable as exc:
        return f"(versions skipped: {exc})"
    child = _FLOOR_CHILD.format(script=TRIVIAL_SCRIPT)
    pythons = {"this virtualenv": sys.executable, "the seed's virtualenv": seed_python}
    samples: dict[str, list[tuple[float, float]]] = {}
    names: dict[str, str] = {}
    for r in range(rounds):
        say(f"versions: round {r + 1}/{rounds}")
        for where in pythons if r % 2 == 0 else reversed(pythons):
            done = subprocess.run(
                [pythons[where], "-c", child, url, str(pairs)],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            )
            version, rate, cpu = done.stdout.split()
            names[where] = f"{where}: redis-py {version}"
            samples.setdefault(where, []).append((float(rate), float(cpu)))
    lines = ["The asyncio floor, two bare EVALSHA per pair, one client:", "", _HEAD]
    return "\n".join(lines + [_row(names[w], s) for w, s in samples.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per threaded run")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs (calls) per round")
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny rounds")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    if args.quick:
        args.rounds, args.duration, args.pairs = 2, 0.1, 20
    from tests._redis import RedisServer

    server = RedisServer().start()
    try:
        given = sys.argv[1:] if argv is None else argv
        print("`" + " ".join(["python -m benchmarks.anatomy", *given]) + "`")
        for part in parts:
            print()
            if part == "replay":
                print(replay(server.url, args.rounds, args.duration, args.pairs))
            elif part == "bypass":
                print(bypass(server.url, args.rounds, args.pairs))
            elif part == "lua":
                print(lua(server.url, args.rounds, args.pairs))
            else:
                print(versions(server.url, args.rounds, args.pairs))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
