"""celery_hilok's side of the benchmarks: AsyncHiLok in-process, HiLok on threads."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis
import redis.asyncio as aredis

from benchmarks.workloads import (
    TRIVIAL_SCRIPT,
    chain_path,
    measure_rate_threads,
    run_request,
)
from celery_hilok import AsyncHiLok, HiLok


class OursBackend:
    """AsyncHiLok instances, each with its own client built from the URL (the usual way)."""

    name = "ours"
    script_commands: tuple[str, ...] = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")

    def __init__(self, url: str, namespace: str = "bench") -> None:
        self.url = url
        self.namespace = namespace

    async def new(self, refresh_interval: float | None = None) -> AsyncHiLok:
        # The context managers renew every ttl/3: a lease of three intervals.
        ttl = 30.0 if refresh_interval is None else 3 * refresh_interval
        return AsyncHiLok(self.url, namespace=self.namespace, ttl=ttl)

    async def close(self, service: Any) -> None:
        await service.close()

    def raw(self) -> aredis.Redis:
        return aredis.Redis.from_url(self.url)


def run_async(url: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run a :mod:`benchmarks.workloads` request for AsyncHiLok on a fresh event loop."""
    return asyncio.run(run_request(OursBackend(url), request))


def sync_lock_rate(
    url: str, mode: str, depth: int, clients: int, duration: float, warmup: float
) -> dict[str, Any]:
    """HiLok acquire+release pairs per second, ``clients`` threads sharing one HiLok."""
    hl = HiLok(url, namespace="bench")
    tag = f"srate{uuid.uuid4().hex[:8]}"
    enter = hl.write if mode == "write" else hl.read

    def make(path: str) -> Any:
        def op() -> None:
            with enter(path):
                pass

        return op

    try:
        ops = [make(chain_path(f"{tag}c{i}", depth)) for i in range(clients)]
        return measure_rate_threads(ops, duration, warmup)
    finally:
        hl.close()


def sync_floor_rate(
    url: str, kind: str, clients: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Two bare round trips per pair from a sync client shared by ``clients`` threads."""
    client = redis.Redis.from_url(url)
    try:
        sha = client.script_load(TRIVIAL_SCRIPT)

        def two_pings() -> None:
            client.ping()
            client.ping()

        def two_evalshas() -> None:
            client.evalsha(sha, 0)
            client.evalsha(sha, 0)

        op = two_pings if kind == "ping" else two_evalshas
        return measure_rate_threads([op] * clients, duration, warmup)
    finally:
        client.close()
