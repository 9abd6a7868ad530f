"""The Celery integration with its locks on a real three-master Redis Cluster.

``hilok_redis_url = "redis://host:port?cluster=true"`` names any node of the cluster; the
broker and result backend stay on a plain Redis (Celery's Redis transport has no cluster
support). A real in-process worker runs locked tasks whose lock trees spread over the
shards; what each task did is recorded in a plain Redis list and checked afterwards.
"""

from __future__ import annotations

import gc
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chain
from celery.contrib.testing.worker import start_worker

from celery_hilok import HiLok, HiLokTask
from celery_hilok.inspect import snapshot
from tests._cluster import RedisClusterServers
from tests.celery.conftest import wait_for

RESULT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture(scope="module")
def cluster_url(cluster: RedisClusterServers) -> str:
    return f"{cluster.url}?cluster=true"


@pytest.fixture(scope="module")
def lab_url(redis_server: str) -> str:
    return f"{redis_server}/4"


@pytest.fixture(scope="module")
def cluster_app(redis_server: str, cluster_url: str, lab_url: str) -> Iterator[Celery]:
    app = Celery(f"cluster-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(
        broker_url=f"{redis_server}/1",
        result_backend=f"{redis_server}/2",
        task_default_queue=f"cluster-{uuid.uuid4().hex[:8]}",
        hilok_redis_url=cluster_url,
        hilok_namespace=f"k{uuid.uuid4().hex[:10]}",
        hilok_retry_backoff=0.05,
        hilok_retry_backoff_max=0.2,
    )
    lab = redis.Redis.from_url(lab_url, decode_responses=True)

    def note(run: str, name: str, kind: str, locks: Any) -> None:
        entry = {"name": name, "kind": kind, "t": time.monotonic(), "tokens": locks.tokens}
        lab.rpush(f"lab:{run}", json.dumps(entry))

    @app.task(base=HiLokTask, bind=True, name="cluster.write", hilok_write="{tree}/acct/{n}")  # type: ignore[untyped-decorator]
    def write(self: Any, run: str, tree: str, n: int, name: str) -> str:
        note(run, name, "start", self.hilok)
        time.sleep(0.02)  # the work a task does under its lock
        note(run, name, "end", self.hilok)
        return name

    @app.task(  # type: ignore[untyped-decorator]
        base=HiLokTask,
        bind=True,
        name="cluster.step",
        hilok_write=["{a}/x", "{b}/y"],
        hilok_keep=True,
    )
    def step(self: Any, _previous: Any, run: str, a: str, b: str) -> str:
        note(run, "step", "start", self.hilok)
        return self.hilok.handle  # type: ignore[no-any-return]

    app.conf.update(cluster_tasks={"write": write, "step": step})
    with start_worker(
        app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30.0
    ):
        yield app
    gc.collect()  # AsyncResults unsubscribe from the result backend while it still exists
    lab.close()


def records(lab_url: str, run: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(lab_url, decode_responses=True) as lab:
        return [json.loads(e) for e in lab.lrange(f"lab:{run}", 0, -1)]


def test_locked_tasks_on_a_cluster_never_overlap_and_leave_nothing(
    cluster_app: Celery, cluster: RedisClusterServers, cluster_url: str, lab_url: str
) -> None:
    run = f"r{uuid.uuid4().hex[:8]}"
    write = cluster_app.conf.cluster_tasks["write"]
    trees = [f"{run}-{i}" for i in range(6)]  # six lock trees, spread over three shards
    results = [
        write.delay(run, tree, n, f"{tree}/{n}#{k}")
        for tree, n, k in itertools.product(trees, (1, 2), range(2))
    ]
    assert sorted(r.get(timeout=RESULT_TIMEOUT) for r in results) == sorted(
        f"{tree}/{n}#{k}" for tree, n, k in itertools.product(trees, (1, 2), range(2))
    )
    spans: dict[str, list[float]] = {}
    for entry in records(lab_url, run):
        spans.setdefault(entry["name"], []).append(entry["t"])
    assert len(spans) == 24
    for tree, n in itertools.product(trees, (1, 2)):
        a, b = (spans[f"{tree}/{n}#{k}"] for k in range(2))
        assert a[1] <= b[0] or b[1] <= a[0], f"two writers of {tree}/acct/{n} overlapped"
    client = cluster.client()
    slots = {client.keyslot(f"x:{{{tree}}}") for tree in trees}  # type: ignore[no-untyped-call]
    nodes = {client.get_node_from_key(f"x:{{{tree}}}").port for tree in trees}  # type: ignore[no-untyped-call]
    assert len(slots) == 6 and len(nodes) > 1
    client.close()
    with HiLok(cluster_url, namespace=cluster_app.conf.hilok_namespace) as hl:
        wait_for(lambda: not snapshot(hl).grants, what="every lock to be released")


def test_a_chain_hands_its_locks_on_two_shards_down_to_its_last_step(
    cluster_app: Celery, cluster_url: str, lab_url: str
) -> None:
    run = f"r{uuid.uuid4().hex[:8]}"
    step = cluster_app.conf.cluster_tasks["step"]
    a, b = f"{run}-a", f"{run}-b"
    chain(step.s(None, run, a, b), step.s(run, a, b), step.s(run, a, b)).apply_async().get(
        timeout=RESULT_TIMEOUT
    )
    starts = [e for e in records(lab_url, run) if e["kind"] == "start"]
    assert len(starts) == 3
    # One holder from the first step to the last: the same grants, so the same tokens.
    assert all(e["tokens"] == starts[0]["tokens"] for e in starts)
    assert set(starts[0]["tokens"]) == {f"{a}/x", f"{b}/y"}
    with HiLok(cluster_url, namespace=cluster_app.conf.hilok_namespace) as hl:
        wait_for(lambda: not snapshot(hl).grants, what="the chain's locks to be released")


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
