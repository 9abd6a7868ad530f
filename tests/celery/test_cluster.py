"""The Celery integration with its locks on a real three-master Redis Cluster.

``hilok_redis_url = "redis://host:port?cluster=true"`` names any node of the cluster; the
broker and result backend stay on a plain Redis (Celery's Redis transport has no cluster
support), and so do the tasks' records. A real worker subprocess (threads pool) runs the
locked test tasks of ``tests/celery/app.py``; what each task did is checked afterwards.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_hilok import HiLok
from celery_hilok._parked import parked_records
from celery_hilok.inspect import snapshot
from tests._cluster import RedisClusterServers
from tests._wait import wait_for
from tests.celery.app import events, tasks
from tests.celery.conftest import WorkerProcess, run_keep_chain

pytestmark = pytest.mark.celery_worker

RESULT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture(scope="module")
def cluster_url(cluster: RedisClusterServers) -> str:
    return f"{cluster.url}?cluster=true"


@pytest.fixture(scope="module")
def cluster_worker(hilok_config: dict[str, Any], cluster_url: str) -> Iterator[WorkerProcess]:
    config = {
        **hilok_config,
        "hilok_redis_url": cluster_url,
        "lab_redis_url": hilok_config["hilok_redis_url"],
    }
    lab = redis.Redis.from_url(hilok_config["hilok_redis_url"], decode_responses=True)
    worker = WorkerProcess(config, 4, pool="threads")
    try:
        yield worker.start(lab)
    finally:
        worker.stop()
        lab.close()


@pytest.fixture
def cluster_hl(cluster_url: str, hilok_config: dict[str, Any]) -> Iterator[HiLok]:
    with HiLok(cluster_url, namespace=hilok_config["hilok_namespace"]) as hl:
        yield hl


@pytest.mark.parametrize("policy", ["park", "retry"])
def test_locked_tasks_on_a_cluster_never_overlap_and_leave_nothing(
    policy: str,
    cluster_worker: WorkerProcess,
    cluster: RedisClusterServers,
    cluster_hl: HiLok,
    lab: redis.Redis,
) -> None:
    run = f"r{uuid.uuid4().hex[:8]}"
    runs = [f"{run}-{i}" for i in range(6)]  # six lock trees (a tree per run), over 3 shards
    client = cluster.client()
    shards = {client.get_node_from_key(f"x:{{{r}}}").port for r in runs}  # type: ignore[no-untyped-call]
    client.close()
    assert len(shards) > 1
    results = [
        getattr(tasks, f"write_{policy}").apply_async(
            (r, "t1", account), {"name": f"{account}#{k}", "work": 0.02}, queue=cluster_worker.queue
        )
        for r, account, k in itertools.product(runs, ("a1", "a2"), range(2))
    ]
    for result in results:
        result.get(timeout=RESULT_TIMEOUT)
    for r in runs:
        spans: dict[str, list[float]] = {}
        for entry in events(lab, r):
            if entry["kind"] in ("start", "end"):
                spans.setdefault(entry["name"], []).append(entry["t"])
        assert len(spans) == 4
        for account in ("a1", "a2"):
            a, b = spans[f"{account}#0"], spans[f"{account}#1"]
            assert a[1] <= b[0] or b[1] <= a[0], f"two writers of {r}/.../{account} overlapped"
    wait_for(lambda: not snapshot(cluster_hl).grants, what="every lock to be released")
    assert not [p for p in parked_records(cluster_hl) if p.task_id in {x.id for x in results}]
    if policy == "park":  # two writers of one account, sent together: some of them parked
        assert "parked (" in cluster_worker.log()


def test_a_chain_on_a_cluster_hands_its_lock_down_to_its_last_step(
    cluster_worker: WorkerProcess, cluster_hl: HiLok, lab: redis.Redis
) -> None:
    run_keep_chain(cluster_worker.queue, lab, RESULT_TIMEOUT)
    wait_for(lambda: not snapshot(cluster_hl).grants, what="the chain's lock to be released")


def test_the_cli_snapshot_sees_every_shard(cluster: RedisClusterServers, cluster_url: str) -> None:
    namespace = f"s{uuid.uuid4().hex[:10]}"
    with HiLok(cluster_url, namespace=namespace) as hl:
        leases = [hl.acquire(f"tree{i}/node", "write") for i in range(9)]
        client = cluster.client()
        ports = {client.get_node_from_key(f"{namespace}:{{tree{i}}}").port for i in range(9)}  # type: ignore[no-untyped-call]
        client.close()
        assert len(ports) > 1
        grants = snapshot(hl).grants
        assert {(g.path, g.handle, g.token) for g in grants} == {
            (lease.path, lease.handle, lease.token) for lease in leases
        }
        hl.release(*leases)
        assert not snapshot(hl).grants


def test_unique_claims_on_a_cluster(
    cluster: RedisClusterServers, cluster_url: str, hilok_config: dict[str, Any]
) -> None:
    # An eager app whose claims live on the cluster: claimed, met again, given back; and the
    # listing of `celery hilok unique` finds claims on every shard.
    from celery import Celery

    from celery_hilok import _unique
    from tests.celery import app as test_app

    namespace = f"u{uuid.uuid4().hex[:10]}"
    app = Celery("tests.celery.cluster-unique", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=False,
        hilok_redis_url=cluster_url,
        hilok_namespace=namespace,
        lab_redis_url=hilok_config["hilok_redis_url"],
    )
    t = test_app.register(app)
    run = f"r{uuid.uuid4().hex[:8]}"
    result = t.unique_nested.delay(run)
    assert result.get() == result.id
    assert t.unique_nested.hilok_unique_holder((run,)) is None
    with HiLok(cluster_url, namespace=namespace) as hl:
        keys = {t.unique.hilok_unique_key((run, "t1", f"a{i}")): f"id-{i}" for i in range(9)}
        for key, task_id in keys.items():
            assert _unique.claim(hl.redis, key, task_id, 60.0) is None
        client = cluster.client()
        ports = {client.get_node_from_key(key).port for key in keys}  # type: ignore[no-untyped-call]
        client.close()
        assert len(ports) > 1
        listed = _unique.claims(hl.redis, namespace, "hilok_tests.unique")
        assert {(c.key, c.task_id) for c in listed} == set(keys.items())
        for key, task_id in keys.items():
            assert _unique.release(hl.redis, key, task_id)
        assert not _unique.claims(hl.redis, namespace)
