"""Lock specs and options are checked when a task is defined, not when it runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_hilok import HiLokTask, InvalidArgument
from celery_hilok.celery.config import redis_url


def task(app: Celery, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``app.task(...)`` for tasks of this module only (not shared with other apps)."""
    decorator: Callable[[Callable[..., Any]], Any] = app.task(shared=False, **options)
    return decorator


def new_app() -> Celery:
    return Celery("definition", broker="redis://127.0.0.1:1/0", set_as_current=False)


def test_unknown_template_argument_fails_when_the_task_is_registered() -> None:
    app = new_app()

    @task(
        app,
        name="bank.debit",
        base=HiLokTask,
        bind=True,
        hilok_write="accounts/{acount_id}",
    )
    def debit(self: Any, account_id: int, amount: int) -> None: ...

    # The app is not finalized yet, so @app.task returned a lazy proxy: the task class is
    # made (and checked) when the app finalizes, e.g. when the worker starts.
    with pytest.raises(InvalidArgument) as info:
        app.finalize()
    assert str(info.value) == (
        "bank.debit: hilok_write template 'accounts/{acount_id}' names 'acount_id', "
        "which is not an argument of bank.debit(account_id, amount); its "
        "arguments are: account_id, amount"
    )


def test_unknown_template_argument_fails_at_decoration_on_a_finalized_app() -> None:
    app = new_app()
    app.finalize()
    with pytest.raises(InvalidArgument, match="names 'region'"):

        @task(app, base=HiLokTask, hilok_read=["config/{region}"])
        def report(tenant_id: int) -> None: ...


def test_class_based_task_is_checked_at_class_definition() -> None:
    with pytest.raises(InvalidArgument, match=r"names 'x'.*its arguments are: a, b"):

        class Bad(HiLokTask):
            hilok_write = "things/{x}"

            def run(self, a: int, b: int = 2) -> None: ...


def test_templates_see_defaults_keywords_and_attributes() -> None:
    app = new_app()
    app.finalize()

    class Account:
        id = 7

    @task(
        app,
        base=HiLokTask,
        bind=True,
        hilok_write="tenants/{tenant}/accounts/{account.id}",
        hilok_read=[lambda tenant, account, region="eu": f"config/{region}", "t/{region}"],
    )
    def debit(self: Any, tenant: int, account: Account, region: str = "eu") -> None: ...

    assert debit.hilok_locks((42, Account()), {}) == [
        ("config/eu", "read"),
        ("t/eu", "read"),
        ("tenants/42/accounts/7", "write"),
    ]
    assert debit.hilok_locks((), {"tenant": 1, "account": Account(), "region": "us"})[1] == (
        "t/us",
        "read",
    )


def test_a_value_must_be_one_segment() -> None:
    app = new_app()
    app.finalize()

    @task(app, base=HiLokTask, hilok_write="tenants/{tenant}")
    def touch(tenant: str) -> None: ...

    with pytest.raises(InvalidArgument, match="got '', which is empty"):
        touch.hilok_locks(("",), {})
    with pytest.raises(InvalidArgument, match="more than one path segment"):
        touch.hilok_locks(("a/b",), {})


def test_positional_fields_and_bad_options_are_refused() -> None:
    app = new_app()
    app.finalize()
    with pytest.raises(InvalidArgument, match="positional field"):

        @task(app, base=HiLokTask, hilok_write="accounts/{}")
        def a(account_id: int) -> None: ...

    with pytest.raises(InvalidArgument, match="hilok_on_contention must be one of"):

        @task(app, base=HiLokTask, hilok_write="x", hilok_on_contention="later")
        def b() -> None: ...

    with pytest.raises(InvalidArgument, match="unknown option 'hilok_wirte'"):

        @task(app, base=HiLokTask, hilok_wirte="x")
        def c() -> None: ...


def test_var_keyword_tasks_accept_any_field() -> None:
    app = new_app()
    app.finalize()

    @task(app, base=HiLokTask, hilok_write="jobs/{job}")
    def anything(**kwargs: Any) -> None: ...

    assert anything.hilok_locks((), {"job": "j1"}) == [("jobs/j1", "write")]
    with pytest.raises(InvalidArgument, match="does not pass"):
        anything.hilok_locks((), {})


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({"broker_url": "redis://h:1/0"}, "redis://h:1/0"),
        ({"broker_url": "rediss://h:1/0;redis://other"}, "rediss://h:1/0"),
        ({"broker_url": "redis+socket:///run/r.sock?virtual_host=2"}, "unix:///run/r.sock?db=2"),
        ({"broker_url": "amqp://x", "hilok_redis_url": "redis://h/3"}, "redis://h/3"),
    ],
)
def test_redis_url_defaults_to_a_redis_broker(conf: dict[str, str], expected: str) -> None:
    assert redis_url(conf) == expected


def test_redis_url_needs_a_setting_when_the_broker_is_not_redis() -> None:
    with pytest.raises(InvalidArgument, match=r"set hilok_redis_url.*amqp://\*\*\*@rabbit"):
        redis_url({"broker_url": "amqp://user:secret@rabbit//"})
