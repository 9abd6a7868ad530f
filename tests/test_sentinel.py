"""Redis Sentinel URLs: parsing (the failover test against real sentinels is still to come)."""

from __future__ import annotations

import pytest

from celery_hilok._redis import parse_sentinel_url
from celery_hilok.celery.config import redis_url
from celery_hilok.errors import InvalidArgument


def test_kombu_style_url_is_parsed() -> None:
    hosts, master, skw, conn = parse_sentinel_url(
        "sentinel://:pw@127.0.0.1:26379/2;sentinel://127.0.0.1:26380?master_name=m",
        {"sentinel_kwargs": {"password": "s"}},
    )
    assert hosts == [("127.0.0.1", 26379), ("127.0.0.1", 26380)]
    assert master == "m"
    assert skw == {"password": "s"}
    assert conn == {"password": "pw", "db": 2}


def test_master_name_is_required() -> None:
    with pytest.raises(InvalidArgument, match="master_name"):
        parse_sentinel_url("sentinel://127.0.0.1:26379", {})


def test_celery_broker_sentinel_url_is_taken_with_its_master_name() -> None:
    conf = {
        "broker_url": "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380",
        "broker_transport_options": {"master_name": "mymaster"},
    }
    url = redis_url(conf)
    assert url.endswith("?master_name=mymaster")
    assert parse_sentinel_url(url, {})[1] == "mymaster"
