"""The engine on a real three-master Redis Cluster (tests/_cluster.py): every tree lives in
one slot through its hash tag, trees spread over the shards, and what spans several trees
(multi-lock acquires, batched refresh and release) is split per slot."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aredis

from celery_hilok import (
    AsyncHiLok,
    HiLok,
    InvalidArgument,
    LockNotAcquired,
    RedisHiLok,
    RedisHiLokError,
)
from tests._cluster import RedisClusterServers


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture
def hl(cluster: RedisClusterServers, namespace: str) -> Iterator[HiLok]:
    engine = HiLok(cluster.client(), namespace=namespace, ttl=10.0)
    yield engine
    engine.close()
    engine.redis.close()


def test_trees_spread_over_shards_and_each_lives_in_one_slot(
    hl: HiLok, cluster: RedisClusterServers, namespace: str
) -> None:
    client = hl.redis
    assert isinstance(client, redis.RedisCluster)
    ports = set()
    for i in range(24):
        lease = hl.acquire(f"tree{i}/a/b/c", "write")
        found = client.keys(f"{namespace}:{{tree{i}}}*", target_nodes=redis.RedisCluster.ALL_NODES)
        keys = [k.decode() if isinstance(k, bytes) else k for k in found]
        assert keys, "the grant left no keys"
        assert len({client.keyslot(k) for k in keys}) == 1  # type: ignore[no-untyped-call]
        ports.add(client.get_node_from_key(keys[0]).port)  # type: ignore[no-untyped-call]
        hl.release(lease)
    assert len(ports) == 3  # 24 trees over 3 masters


def test_conflicts_and_wake_up_on_a_cluster(hl: HiLok) -> None:
    lease = hl.acquire("t/x/y", "write")
    with pytest.raises(LockNotAcquired):
        hl.acquire("t", "read", block=False)
    released = threading.Event()

    def release_soon() -> None:
        released.wait(10)
        hl.release(lease)

    threading.Thread(target=release_soon).start()
    released.set()
    reader = hl.acquire("t", "read", timeout=10)
    hl.release(reader)


def test_multi_tree_acquire_is_all_or_nothing(hl: HiLok) -> None:
    blocker = hl.acquire("b2/x", "write")
    with pytest.raises(LockNotAcquired):
        hl.acquire_many([("a1/x", "write"), ("b2", "read"), ("c3/y", "write")], block=False)
    assert not hl.status("a1/x").held  # taken first, given back
    assert not hl.status("c3/y").held
    hl.release(blocker)
    leases = hl.acquire_many([("c3/y", "write"), ("a1/x", "write"), ("b2", "read")], timeout=5)
    assert [lease.path for lease in leases] == ["c3/y", "a1/x", "b2"]
    assert len({lease.handle for lease in leases}) == 1
    assert hl.refresh_many(leases) == [True, True, True]
    hl.release(*leases)
    assert not any(hl.status(p).held for p in ("a1", "b2", "c3"))


def test_refresh_and_release_many_trees_in_one_round_trip(hl: HiLok) -> None:
    leases = [hl.acquire(f"r{i}/n", "read") for i in range(20)]
    assert hl.refresh_many(leases) == [True] * 20
    hl.release(*leases)
    assert all(lease.released and not lease.lost for lease in leases)
    assert not hl.status("r7").held


def test_async_engine_on_a_cluster(cluster: RedisClusterServers, namespace: str) -> None:
    async def main() -> None:
        client = aredis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        ahl = AsyncHiLok(client, namespace=namespace)
        try:
            held = await ahl.acquire("q/1", "write")
            waiter = asyncio.create_task(ahl.acquire("q", "write", timeout=10))
            await asyncio.sleep(0)
            await ahl.release(held)
            lease = await waiter
            many = await ahl.acquire_many([("m1", "read"), ("m2", "write")], timeout=5)
            assert await ahl.refresh_many([lease, *many]) == [True, True, True]
            await ahl.release(lease, *many)
            assert not (await ahl.status("m2")).held
        finally:
            await ahl.close()
            await client.aclose()

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started >= 0  # ran to the end without raising


def test_a_cluster_url_builds_cluster_clients(cluster: RedisClusterServers, namespace: str) -> None:
    url = f"{cluster.url}?cluster=true"
    with HiLok(url, namespace=namespace) as hl:
        assert isinstance(hl.redis, redis.RedisCluster)
        leases = hl.acquire_many([(f"u{i}/a", "write") for i in range(6)])
        with pytest.raises(LockNotAcquired):
            hl.acquire("u3", "read", block=False)
        hl.release(*leases)

    async def main() -> None:
        async with AsyncHiLok(url, namespace=namespace) as ah:
            assert isinstance(ah.redis, aredis.RedisCluster)
            async with ah.write("u1/a/b"):
                with pytest.raises(LockNotAcquired):
                    await ah.acquire("u1", "read", block=False)
            await ah.acquire("u1", "read", block=False)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:7000?cluster=maybe", "must be true or false"),
        ("redis://127.0.0.1:7000/2?cluster=true", "only database 0"),
        ("redis://127.0.0.1:7000?cluster=true&db=1", "only database 0"),
        ("unix:///tmp/redis.sock?cluster=true", "redis:// or rediss://"),
    ],
)
def test_bad_cluster_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        HiLok(url)


def test_cluster_false_is_a_plain_client(redis_url: str) -> None:
    with HiLok(f"{redis_url}?cluster=false") as hl:
        assert isinstance(hl.redis, redis.Redis)
        hl.acquire("a", "write", block=False).release()


def test_the_seed_compatible_class_on_a_cluster(
    cluster: RedisClusterServers, namespace: str
) -> None:
    async def main() -> None:
        async with RedisHiLok(f"{cluster.url}?cluster=true", namespace=namespace) as h:
            async with h.write("c1/a/b") as uuid:
                levels = await h.status("c1/a/b", uuid)
                assert [s.held for s in levels] == [True, True, True]
                assert levels[-1].type == "write" and levels[-1].owned
                with pytest.raises(RedisHiLokError):
                    await h.acquire_read("c1/a/b", block=False)
                other = await h.acquire_read("c2/x", block=False)  # another tree, shard
                await h.release_read("c2/x", other)
            assert not any(s.held for s in await h.status("c1/a/b", uuid))

    asyncio.run(main())
