"""Every error of celery_hilok survives pickle and Celery's JSON results with its attributes."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from celery import Celery
from celery.backends.base import BaseBackend

from celery_hilok import errors
from celery_hilok.seed import RedisHiLokError

BLOCKER = "write lock on 'tenants/42' held by AbC123..., 29.9s left on its lease"

# One of each error, with every attribute it has set to something other than its default.
EXAMPLES: list[tuple[BaseException, dict[str, Any]]] = [
    (errors.HiLokError("something failed"), {}),
    (
        errors.LockNotAcquired(
            "could not acquire write lock on 'tenants/42/a' at once",
            path="tenants/42/a",
            mode="write",
            blocker=BLOCKER,
        ),
        {"path": "tenants/42/a", "mode": "write", "blocker": BLOCKER},
    ),
    (
        errors.LockNotReplicated(
            "granted, but 1 of 2 replicas acknowledged it",
            path="tenants/42",
            mode="read",
            replicas=2,
            acknowledged=1,
        ),
        {"path": "tenants/42", "mode": "read", "blocker": None, "replicas": 2, "acknowledged": 1},
    ),
    (errors.LockLost("lock lost while the task ran"), {}),
    (
        errors.DuplicateTask(
            "bank.sync: an identical call is already queued or running as 6f1c...",
            task="bank.sync",
            task_id="6f1c0f6e-31c5-4b52-9c1e-8d1e0c1b2a3d",
            ttl=86399.5,
        ),
        {"task": "bank.sync", "task_id": "6f1c0f6e-31c5-4b52-9c1e-8d1e0c1b2a3d", "ttl": 86399.5},
    ),
    (errors.HiLokConnectionError("cannot reach redis://127.0.0.1:1/0"), {}),
    (errors.InvalidArgument("ttl must be > 0, got -1"), {}),
    (RedisHiLokError("could not acquire"), {}),
]
IDS = [type(exc).__name__ for exc, _ in EXAMPLES]


def test_every_error_of_the_package_is_covered() -> None:
    covered = {type(exc) for exc, _ in EXAMPLES}
    assert {getattr(errors, name) for name in errors.__all__} <= covered


def check(before: BaseException, after: BaseException, attributes: dict[str, Any]) -> None:
    assert type(after) is type(before)
    assert str(after) == str(before)
    assert after.args == before.args
    for name, value in attributes.items():
        assert getattr(after, name) == value, name


@pytest.mark.parametrize(("exc", "attributes"), EXAMPLES, ids=IDS)
def test_pickle_round_trip(exc: BaseException, attributes: dict[str, Any]) -> None:
    check(exc, pickle.loads(pickle.dumps(exc)), attributes)


@pytest.mark.parametrize("serializer", ["json", "pickle"])
@pytest.mark.parametrize(("exc", "attributes"), EXAMPLES, ids=IDS)
def test_celery_result_round_trip(
    exc: BaseException, attributes: dict[str, Any], serializer: str
) -> None:
    # What a result backend does with a task's exception: prepare it for the result
    # serializer, encode, store; decode and make it again on the caller's side.
    app = Celery(set_as_current=False, result_serializer=serializer)
    app.conf.accept_content = ["json", "pickle"]
    app.conf.result_accept_content = ["json", "pickle"]
    backend = BaseBackend(app)
    stored = backend.encode(backend.prepare_exception(exc))
    check(exc, backend.exception_to_python(backend.decode(stored)), attributes)


def test_message_is_str_and_keywords_still_work() -> None:
    exc = errors.LockNotAcquired("nope", path="a/b", mode="read")
    assert str(exc) == "nope" and exc.blocker is None
    assert repr(exc) == "LockNotAcquired('nope', 'a/b', 'read', None)"
