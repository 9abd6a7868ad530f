"""The seed library's side of the benchmarks; runs inside ``benchmarks/.seed-venv``.

redishilok 1.1.0 pins redis-py < 6, so it cannot share celery_hilok's virtualenv.
:mod:`benchmarks.seed` builds the seed's virtualenv and starts this module there::

    benchmarks/.seed-venv/bin/python -m benchmarks.seed_bench --url redis://127.0.0.1:PORT --serve

With ``--serve`` it reads one JSON request per line on stdin (``{"bench": "rate", ...}``,
see :func:`benchmarks.workloads.run_request`) and answers each with one line
``@@result <JSON>`` on stdout, so that the runner can interleave the seed's measurements
with its own. ``--request JSON`` runs one request and prints its result as JSON.

The seed gets its best configuration: a client built on an explicit connection pool,
``RedisHiLok(redis.asyncio.Redis(connection_pool=ConnectionPool.from_url(url)))``. Given a
URL instead, it disconnects the whole pool at every level release (see
``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import traceback
from importlib import metadata
from typing import Any

from benchmarks.workloads import run_request

RESULT_PREFIX = "@@result "


class SeedBackend:
    """Lock-service instances of redishilok 1.1.0, each on its own connection pool."""

    name = "seed"
    # The seed sends every script with EVAL (never EVALSHA).
    script_commands: tuple[str, ...] = ("cmdstat_eval", "cmdstat_evalsha")

    def __init__(self, url: str) -> None:
        self.url = url

    async def new(self, refresh_interval: float | None = None) -> Any:
        from redis.asyncio import ConnectionPool, Redis
        from redishilok import RedisHiLok  # type: ignore[import-not-found]

        client = Redis(connection_pool=ConnectionPool.from_url(self.url))
        if refresh_interval is None:
            return RedisHiLok(client)
        return RedisHiLok(
            client, ttl=round(3000 * refresh_interval), refresh_interval=1000 * refresh_interval
        )

    async def close(self, service: Any) -> None:
        pool = service.redis.connection_pool
        await service.close()
        await pool.disconnect()

    def raw(self) -> Any:
        from redis.asyncio import Redis

        return Redis.from_url(self.url)


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for package in ("redishilok", "redis", "hiredis"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def answer(backend: SeedBackend, request: dict[str, Any]) -> dict[str, Any]:
    if request.get("bench") == "versions":
        return versions()
    return asyncio.run(run_request(backend, request))


def serve(backend: SeedBackend) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result: dict[str, Any] = {"ok": True, "result": answer(backend, json.loads(line))}
        except Exception as exc:
            result = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="redis://127.0.0.1:PORT")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--serve", action="store_true", help="answer JSON requests on stdin")
    group.add_argument("--request", help="run one JSON request and print its result")
    args = parser.parse_args(argv)
    backend = SeedBackend(args.url)
    if args.serve:
        serve(backend)
    else:
        print(json.dumps(answer(backend, json.loads(args.request)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
