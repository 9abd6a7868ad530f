"""A multi-tenant invoicing app on Celery, with hierarchical locks from celery_hilok.

No Django, no ORM: the data lives in Redis hashes, the lock tree mirrors it::

    tenants/<tenant>                          close_month (write), tenant_report (read)
    tenants/<tenant>/invoices/<invoice>       issue_invoice (write)
    tenants/<tenant>/accounts/<account>       transfer (write on two accounts)

- ``issue_invoice`` adds a line to one invoice (read, work, write). Lines of one invoice
  go one at a time; invoices of one tenant, and of different tenants, go side by side.
  A busy invoice parks until its turn (the default ``"park"`` policy).
- ``transfer`` moves money between two accounts of a tenant. It locks **both** accounts
  in one atomic acquire, so transfers a->b and b->a can never deadlock, and no money is
  lost or created however many run at once.
- ``close_month`` wants the whole tenant to itself (``hilok_write="tenants/{tenant}"``):
  it waits for every invoice line and transfer in flight, and keeps new ones out while it
  adds up the month.
- ``tenant_report`` reads the whole tenant (``hilok_read="tenants/{tenant}"``): reports
  share the tenant, writers below it wait, so the totals it reads twice always agree.

Every task writes to a journal (a Redis list) that ``examples.tenants.run`` checks.
Run a worker with ``HILOK_TENANTS_REDIS=redis://127.0.0.1:6379 celery -A
examples.tenants.app worker``; ``python -m examples.tenants.run`` does everything itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import worker_ready

from celery_hilok import HiLokTask
from celery_hilok.celery.signals import hilok_lock_refused

REDIS = os.environ.get("HILOK_TENANTS_REDIS", "redis://127.0.0.1:6379")
WORK = 0.05  # seconds each task "works" while it holds its locks
JOURNAL = "tenants:journal"
READY = "tenants:worker-ready"

app = Celery("examples.tenants.app")
app.conf.update(
    broker_url=f"{REDIS}/0",  # the locks live here too: hilok_redis_url defaults to it
    result_backend=f"{REDIS}/1",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # Contention retries: quick for an example (the defaults start at 1 s, up to 60 s).
    hilok_retry_backoff=0.05,
    hilok_retry_backoff_max=0.3,
    hilok_max_retries=None,
)

_db: dict[int, redis.Redis] = {}


def db() -> redis.Redis:
    """The app's data (database 2), one client per process."""
    client = _db.get(os.getpid())
    if client is None:
        client = _db[os.getpid()] = redis.Redis.from_url(f"{REDIS}/2", decode_responses=True)
    return client


def journal(task: Task, kind: str, label: str, **extra: Any) -> None:
    """The same entries as examples.bank, so examples.demo's overlap check reads them."""
    entry = {
        "kind": kind,
        "label": label,
        "id": task.request.id,
        "handle": task.hilok.handle,
        "locks": [[lease.path, lease.mode, lease.token] for lease in task.hilok.leases],
        "pid": os.getpid(),
        "t": time.time(),
        **extra,
    }
    db().rpush(JOURNAL, json.dumps(entry))


def tenant_task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    decorator: Callable[[Callable[..., Any]], Any] = app.task(base=HiLokTask, bind=True, **options)
    return decorator


def invoice_total(tenant: str) -> int:
    return sum(int(v) for v in db().hvals(f"tenants:{tenant}:invoices"))


def balances(tenant: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in db().hgetall(f"tenants:{tenant}:accounts").items()}


@tenant_task(hilok_write="tenants/{tenant}/invoices/{invoice}")
def issue_invoice(self: Task, tenant: str, invoice: str, cents: int, label: str) -> int:
    """Add a line of ``cents`` to an invoice: read, work, write (safe only under the lock)."""
    journal(self, "start", label)
    key = f"tenants:{tenant}:invoices"
    amount = int(db().hget(key, invoice) or 0)
    time.sleep(WORK)
    db().hset(key, invoice, amount + cents)
    journal(self, "end", label)
    return amount + cents


@tenant_task(hilok_write=["tenants/{tenant}/accounts/{src}", "tenants/{tenant}/accounts/{dst}"])
def transfer(self: Task, tenant: str, src: str, dst: str, cents: int, label: str) -> None:
    """Move ``cents`` between two accounts, both locked in one atomic acquire."""
    journal(self, "start", label)
    key = f"tenants:{tenant}:accounts"
    a, b = (int(v or 0) for v in db().hmget(key, [src, dst]))
    time.sleep(WORK)
    db().hset(key, mapping={src: a - cents, dst: b + cents})
    journal(self, "end", label)


@tenant_task(hilok_write="tenants/{tenant}", hilok_on_contention="wait", hilok_timeout=30)
def close_month(self: Task, tenant: str, label: str) -> int:
    """The month's total, with the whole tenant to itself."""
    journal(self, "start", label)
    before = invoice_total(tenant)
    time.sleep(WORK * 2)
    after = invoice_total(tenant)
    db().hset("tenants:closed", tenant, after)
    journal(self, "end", label, total=after, stable=before == after)
    return after


@tenant_task(hilok_read="tenants/{tenant}", hilok_on_contention="wait", hilok_timeout=30)
def tenant_report(self: Task, tenant: str, label: str) -> dict[str, int]:
    """Invoices and balances of a tenant, read twice: nothing below may change meanwhile."""
    journal(self, "start", label)
    first = (invoice_total(tenant), sum(balances(tenant).values()))
    time.sleep(WORK)
    second = (invoice_total(tenant), sum(balances(tenant).values()))
    journal(self, "end", label, stable=first == second)
    return {"invoiced": second[0], "balances": second[1]}


def _on_refused(sender: Any = None, action: str = "", **_: Any) -> None:
    """A task was refused its locks (it parks, the default, or retries): count it."""
    label = (getattr(sender.request, "kwargs", None) or {}).get("label")
    if label and action in ("park", "retry"):
        db().hincrby("tenants:retries", label.split()[0], 1)


def _on_ready(**_: Any) -> None:
    db().set(READY, os.getpid(), ex=300)


hilok_lock_refused.connect(_on_refused, weak=False)
worker_ready.connect(_on_ready, weak=False)
