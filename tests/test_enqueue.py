"""The engine's one-try-and-stay-queued call (``HiLok._park``), which the Celery ``park``
policy is built on: a refused request keeps its place without a waiter in the process, the
release that frees its way grants it the lock and says so on the request's channel, and
asking again keeps the place and takes what was granted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from celery_hilok import HiLok, InvalidArgument, LockNotAcquired
from celery_hilok._core import new_handle, told
from celery_hilok.lease import Lease


@pytest.fixture
def hl(redis_url: str, namespace: str) -> Iterator[HiLok]:
    client = HiLok(redis_url, namespace=namespace)
    try:
        yield client
    finally:
        client.close()


def park(hl: HiLok, handle: str, channel: str, path: str = "t/a") -> list[Lease] | LockNotAcquired:
    return hl._park([(path, "write")], handle=handle, ttl=30, queue_ttl=60, channel=channel)


def test_a_parked_request_keeps_its_place_and_is_told_of_its_grant(
    hl: HiLok, redis_client: redis.Redis
) -> None:
    holder = hl.acquire("t/a", "write")
    first, second = new_handle(), new_handle()
    channel = hl._protocol.keys.channel("parked-test")
    listener = redis_client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
    listener.subscribe(channel)
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    refused = park(hl, first, channel)
    assert isinstance(refused, LockNotAcquired) and refused.path == "t/a"
    assert isinstance(park(hl, second, channel), LockNotAcquired)
    # Asked again, the first keeps its place in front of the second.
    assert isinstance(park(hl, first, channel), LockNotAcquired)
    assert [w.handle for w in hl.status("t/a").waiters] == [first, second]
    # A queue entry lives 60 s (queue_ttl), not the 6 s of a waiter in a process.
    found: list[bytes] = redis_client.keys(f"{hl.namespace}:*")  # type: ignore[assignment]
    [key] = [k for k in found if k.endswith(b":qx")]
    assert redis_client.ttl(key) > 30
    hl.release(holder)
    message = listener.get_message(timeout=5)
    assert message is not None and message["type"] == "message"
    grant = told(message["data"].decode())[first]
    assert grant is not None and grant.token > holder.token
    # The handle holds the lock now; asking again takes it with the token of the grant.
    taken = park(hl, first, channel)
    assert isinstance(taken, list) and taken[0].token == grant.token
    assert isinstance(park(hl, second, channel), LockNotAcquired)  # still behind it
    hl.release(*taken)
    assert isinstance(park(hl, second, channel), list)
    listener.close()


def test_a_parked_request_in_a_cluster_must_be_of_one_tree(hl: HiLok) -> None:
    hl._cluster = True  # what the check looks at; no call is sent
    with pytest.raises(InvalidArgument, match="one tree"):
        hl._park(
            [("a/x", "write"), ("b/y", "write")],
            handle=new_handle(),
            ttl=30,
            queue_ttl=60,
            channel="c",
        )
