"""Opt-in WAIT for replicas on acquire (``wait_replicas``), against a real master and replica.

A grant is only handed out once ``wait_replicas`` replicas acknowledged it; with fewer acks
within ``wait_timeout`` the acquire raises LockNotReplicated and leaves nothing locked.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_hilok import (
    AsyncHiLok,
    HiLok,
    InvalidArgument,
    LockNotAcquired,
    LockNotReplicated,
)
from celery_hilok.celery._runtime import Runtime
from tests._cluster import RedisClusterServers
from tests._sentinel import ReplicaSet, info, quick_client, wait_for

# Generous: only proves that a failed WAIT ends near wait_timeout rather than hanging.
NO_HANG = 10.0


@pytest.fixture(scope="module")
def replicated() -> Iterator[ReplicaSet]:
    with ReplicaSet(replicas=1) as servers:
        yield servers


@pytest.fixture
def master_url(replicated: ReplicaSet) -> str:
    replicated.wait_synced()  # a test before may have frozen the replica
    return f"{replicated.master.url}/0"


def _keys(port: int, namespace: str) -> set[str]:
    client = quick_client(port)
    try:
        return {str(k) for k in client.keys(f"{namespace}*")}
    finally:
        client.close()


def _lock_keys(port: int, namespace: str) -> set[str]:
    """The keys of live grants (holder hashes and marks), not the token counters."""
    return {k for k in _keys(port, namespace) if not k.endswith((":c", ":n"))}


# -- sync ---------------------------------------------------------------------------------


def test_a_grant_is_on_the_replica_when_acquire_returns(
    replicated: ReplicaSet, master_url: str, namespace: str
) -> None:
    replica = replicated.replicas[0]
    with HiLok(master_url, namespace=namespace, wait_replicas=1) as hl:
        lease = hl.acquire("a/b/c", "write")
        master_keys = _keys(replicated.master.port, namespace)
        assert master_keys
        # Read on the replica's own connection, right away: WAIT already saw it acked.
        assert _keys(replica.port, namespace) == master_keys
        assert hl.status("a/b/c").held
        hl.release(lease)


def test_acquire_waits_for_a_frozen_replica_until_it_acknowledges(
    replicated: ReplicaSet, master_url: str, namespace: str
) -> None:
    replica = replicated.replicas[0]
    resumed = threading.Event()
    outcome: list[Any] = []
    with HiLok(master_url, namespace=namespace, wait_replicas=1, wait_timeout=20.0) as hl:

        def acquire() -> None:
            try:
                lease = hl.acquire("x/y", "read")
                outcome.append((resumed.is_set(), lease))
            except BaseException as exc:
                outcome.append(exc)

        with replicated.paused(replica):
            thread = threading.Thread(target=acquire)
            thread.start()
            # The acquire's WAIT blocks its connection on the master until the replica acks.
            wait_for(
                lambda: info(replicated.master.port, "clients")["blocked_clients"] >= 1,
                NO_HANG,
                "the acquire to block in WAIT",
            )
            assert not outcome
            resumed.set()
        thread.join(NO_HANG)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], tuple), outcome
        returned_after_resume, lease = outcome[0]
        assert returned_after_resume
        assert _lock_keys(replica.port, namespace)
        hl.release(lease)


def test_too_few_replicas_raise_and_leave_nothing_locked(master_url: str, namespace: str) -> None:
    with (
        HiLok(master_url, namespace=namespace, wait_replicas=2, wait_timeout=0.3) as hl,
        HiLok(master_url, namespace=namespace) as other,
    ):
        start = time.monotonic()
        with pytest.raises(LockNotReplicated) as caught:
            hl.acquire("t/1", "write", block=False)
        assert time.monotonic() - start < 0.3 + NO_HANG
        error = caught.value
        assert isinstance(error, LockNotAcquired)
        assert (error.replicas, error.acknowledged) == (2, 1)
        assert (error.path, error.mode) == ("t/1", "write")
        assert "1 of 2 replica(s)" in str(error) and "0.3s" in str(error)
        assert not hl.status("t/1").held
        assert not hl.status("t/1").waiters
        lease = other.acquire("t/1", "write", block=False)  # free at once
        other.release(lease)


def test_a_frozen_replica_makes_the_acquire_fail_and_release(
    replicated: ReplicaSet, master_url: str, namespace: str
) -> None:
    with (
        HiLok(master_url, namespace=namespace, wait_replicas=1, wait_timeout=0.2) as hl,
        replicated.paused(replicated.replicas[0]),
    ):
        with pytest.raises(LockNotReplicated, match="0 of 1 replica"):
            hl.acquire_many([("p/q", "write"), ("r", "read")], timeout=5.0)
        assert not hl.status("p/q").held and not hl.status("r").held
        assert not _lock_keys(replicated.master.port, namespace)


def test_a_renewal_that_is_not_replicated_keeps_the_earlier_grant(
    replicated: ReplicaSet, master_url: str, namespace: str
) -> None:
    # Only what the failed call granted is undone: the holder's earlier grant stays.
    with (
        HiLok(master_url, namespace=namespace) as plain,
        HiLok(master_url, namespace=namespace, wait_replicas=1, wait_timeout=0.2) as hl,
    ):
        lease = plain.acquire("k", "write")
        with replicated.paused(replicated.replicas[0]), pytest.raises(LockNotReplicated):
            hl.acquire_many([("k", "write"), ("k2", "write")], handle=lease.handle)
        holders = plain.status("k").holders
        assert [h.handle for h in holders] == [lease.handle]
        assert not plain.status("k2").held
        plain.release(lease)


def test_a_waiter_with_wait_replicas_gets_the_lock_on_release(
    master_url: str, namespace: str
) -> None:
    with (
        HiLok(master_url, namespace=namespace, wait_replicas=1) as hl,
        HiLok(master_url, namespace=namespace) as holder,
    ):
        held = holder.acquire("w", "write")
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(hl.acquire("w/1", "write")))
        thread.start()
        wait_for(lambda: hl.status("w").waiters, NO_HANG, "the waiter to queue")
        holder.release(held)
        thread.join(NO_HANG)
        assert len(got) == 1
        hl.release(got[0])


def test_wait_survives_a_script_flush(master_url: str, namespace: str) -> None:
    with HiLok(master_url, namespace=namespace, wait_replicas=1) as hl:
        hl.release(hl.acquire("f", "write"))
        hl.redis.function_flush()  # the FCALL is refused, the library loaded, FCALL + WAIT again
        lease = hl.acquire("f", "write")
        hl.release(lease)
        hl._functions = False  # the same by EVALSHA: NOSCRIPT, then EVAL + WAIT
        hl.redis.script_flush()
        hl.release(hl.acquire("f", "write"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"wait_replicas": -1}, "wait_replicas"),
        ({"wait_replicas": True}, "wait_replicas"),
        ({"wait_replicas": 1.0}, "wait_replicas"),
        ({"wait_replicas": "1"}, "wait_replicas"),
        ({"wait_timeout": 0}, "wait_timeout"),
        ({"wait_timeout": -1.0}, "wait_timeout"),
        ({"wait_timeout": float("nan")}, "wait_timeout"),
        ({"wait_timeout": True}, "wait_timeout"),
        ({"wait_timeout": "1"}, "wait_timeout"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        HiLok("redis://127.0.0.1:1/0", **kwargs)
    with pytest.raises(InvalidArgument, match=message):
        AsyncHiLok("redis://127.0.0.1:1/0", **kwargs)


@pytest.mark.slow
def test_wait_replicas_is_refused_on_a_cluster() -> None:
    with RedisClusterServers() as cluster:
        client = cluster.client()
        try:
            with pytest.raises(InvalidArgument, match="not supported on Redis Cluster"):
                HiLok(client, wait_replicas=1)
            HiLok(client, wait_replicas=0).close()  # the default is fine
        finally:
            client.close()
        node = cluster.nodes[0]
        aclient = redis.asyncio.RedisCluster(host=node.host, port=node.port)
        with pytest.raises(InvalidArgument, match="not supported on Redis Cluster"):
            AsyncHiLok(aclient, wait_replicas=1)
        asyncio.run(aclient.aclose())


def test_celery_settings_reach_the_worker_client(master_url: str, namespace: str) -> None:
    app = Celery("replicas", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        hilok_redis_url=master_url,
        hilok_namespace=namespace,
        hilok_wait_replicas=1,
        hilok_wait_timeout=0.5,
    )
    runtime = Runtime(app)
    try:
        assert (runtime.hilok.wait_replicas, runtime.hilok.wait_timeout) == (1, 0.5)
        runtime.hilok.release(runtime.hilok.acquire("c", "write"))
    finally:
        runtime.hilok.close()
    app.conf.hilok_wait_replicas = -1
    with pytest.raises(InvalidArgument, match="wait_replicas"):
        Runtime(app)


# -- asyncio ------------------------------------------------------------------------------


def test_async_grant_is_on_the_replica(
    replicated: ReplicaSet, master_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with AsyncHiLok(master_url, namespace=namespace, wait_replicas=1) as hl:
            lease = await hl.acquire("a/b", "write")
            master_keys = _keys(replicated.master.port, namespace)
            assert master_keys
            assert _keys(replicated.replicas[0].port, namespace) == master_keys
            await hl.release(lease)

    asyncio.run(main())


def test_async_too_few_replicas_raise_and_leave_nothing_locked(
    master_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with (
            AsyncHiLok(master_url, namespace=namespace, wait_replicas=2, wait_timeout=0.3) as hl,
            AsyncHiLok(master_url, namespace=namespace) as other,
        ):
            start = time.monotonic()
            with pytest.raises(LockNotReplicated, match="1 of 2 replica") as caught:
                await hl.acquire("t", "read", timeout=2.0)
            assert time.monotonic() - start < 0.3 + NO_HANG
            assert (caught.value.replicas, caught.value.acknowledged) == (2, 1)
            status = await hl.status("t")
            assert not status.held and not status.waiters
            await other.release(await other.acquire("t", "write", block=False))

    asyncio.run(main())


def test_async_frozen_replica_makes_the_acquire_fail(
    replicated: ReplicaSet, master_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with AsyncHiLok(
            master_url, namespace=namespace, wait_replicas=1, wait_timeout=0.2
        ) as hl:
            with replicated.paused(replicated.replicas[0]):
                with pytest.raises(LockNotReplicated, match="0 of 1 replica"):
                    await hl.acquire("p/q", "write")
                assert not (await hl.status("p/q")).held
            await hl.redis.function_flush()
            await hl.release(await hl.acquire("p/q", "write"))  # loaded, then FCALL + WAIT

    asyncio.run(main())
