"""A small multi-tenant bank on Celery, with hierarchical locks from celery_hilok.

The lock tree mirrors the data: ``tenants/<tenant>/accounts/<account>``.

- ``debit`` writes one account: ``hilok_write="tenants/{tenant}/accounts/{account}"``.
  Debits of one account run one at a time (each reads, works, writes the balance: without
  the lock, concurrent debits would lose updates); debits of different accounts run side by
  side. When the account is busy the task parks (the default policy): it gives its pool
  slot back, keeps its place in the account's queue, and is sent again holding the lock.
- ``report`` reads a whole tenant: ``hilok_read="tenants/{tenant}"``. Reports of one tenant
  share the lock, and it keeps every debit of that tenant out while they add up balances,
  so a report never sees half of a transfer. It waits for the lock (``"wait"`` policy).
- ``audit`` wants a tenant to itself, but only if it is idle: ``"skip"`` policy.
- Month-end close is a chain of three tasks on one account, ``freeze | charge_fee |
  statement``, whose first two steps keep their lock (``hilok_keep=True``): the lock goes
  from step to step with no moment where a debit could slip in between.

Every task writes what it does to a journal (a Redis list) that ``examples.demo`` reads to
show who waited for whom. Run a worker with ``celery -A examples.bank worker`` and
``HILOK_DEMO_REDIS=redis://127.0.0.1:6379``; ``python -m examples.demo`` does all of it.
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

REDIS = os.environ.get("HILOK_DEMO_REDIS", "redis://127.0.0.1:6379")
WORK = 0.12  # seconds each task spends "processing" while it holds its lock
JOURNAL = "bank:journal"
READY = "bank:worker-ready"

app = Celery("examples.bank")
app.conf.update(
    broker_url=f"{REDIS}/0",  # the locks live here too: hilok_redis_url defaults to it
    result_backend=f"{REDIS}/1",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # Contention retries: quick for a demo (the defaults start at 1 s, up to 60 s).
    hilok_retry_backoff=0.05,
    hilok_retry_backoff_max=0.4,
)

ACCOUNT = "tenants/{tenant}/accounts/{account}"

_db: dict[int, redis.Redis] = {}


def db() -> redis.Redis:
    """The bank's data (database 2), one client per process."""
    client = _db.get(os.getpid())
    if client is None:
        client = _db[os.getpid()] = redis.Redis.from_url(f"{REDIS}/2", decode_responses=True)
    return client


def journal(task: Task, kind: str, label: str, **extra: Any) -> None:
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


def bank_task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    decorator: Callable[[Callable[..., Any]], Any] = app.task(base=HiLokTask, bind=True, **options)
    return decorator


@bank_task(hilok_write=ACCOUNT)
def debit(self: Task, tenant: str, account: str, cents: int, label: str) -> int:
    """Take ``cents`` from an account: read, work, write (safe only under the lock)."""
    journal(self, "start", label)
    balances = f"bank:balances:{tenant}"
    balance = int(db().hget(balances, account) or 0)
    time.sleep(WORK)  # the slow part of a real debit: checks, ledger, notifications
    db().hset(balances, account, balance - cents)
    journal(self, "end", label)
    return balance - cents


@bank_task(hilok_read="tenants/{tenant}", hilok_on_contention="wait", hilok_timeout=30)
def report(self: Task, tenant: str, label: str) -> int:
    """Total of a tenant's balances, with no debit of that tenant under way."""
    journal(self, "start", label)
    values = db().hvals(f"bank:balances:{tenant}")
    time.sleep(WORK)
    total = sum(int(v) for v in values)
    journal(self, "end", label, total=total)
    return total


@bank_task(hilok_write="tenants/{tenant}", hilok_on_contention="skip")
def audit(self: Task, tenant: str, label: str) -> str:
    """Runs only when nothing at all happens in the tenant; skipped otherwise."""
    journal(self, "start", label)
    journal(self, "end", label)
    return "audited"


@bank_task(hilok_write=ACCOUNT, hilok_keep=True)
def freeze(self: Task, tenant: str, account: str, label: str) -> int:
    """Month-end step 1: take the balance to close the month with."""
    journal(self, "start", label)
    balance = int(db().hget(f"bank:balances:{tenant}", account) or 0)
    time.sleep(WORK)
    journal(self, "end", label)
    return balance


@bank_task(hilok_write=ACCOUNT, hilok_keep=True)
def charge_fee(self: Task, balance: int, tenant: str, account: str, cents: int, label: str) -> int:
    """Month-end step 2: the monthly fee, from the balance step 1 froze."""
    journal(self, "start", label)
    time.sleep(WORK)
    db().hset(f"bank:balances:{tenant}", account, balance - cents)
    journal(self, "end", label)
    return balance - cents


@bank_task(hilok_write=ACCOUNT)
def statement(self: Task, balance: int, tenant: str, account: str, label: str) -> str:
    """Month-end step 3: the statement; the chain's lock is released after it."""
    journal(self, "start", label)
    time.sleep(WORK)
    assert int(db().hget(f"bank:balances:{tenant}", account) or 0) == balance
    journal(self, "end", label, closing=balance)
    return f"{tenant}/{account} closed at {balance / 100:.2f}"


def _on_refused(sender: Any = None, error: Any = None, action: str = "", **_: Any) -> None:
    """A task was refused its locks: it parked (the default policy), retries, or skipped."""
    label = (getattr(sender.request, "kwargs", None) or {}).get("label")
    if label:
        kind = "skipped" if action == "skip" else "waited"
        entry = {
            "kind": kind,
            "label": label,
            "action": action,
            "why": str(error),
            "t": time.time(),
        }
        db().rpush(JOURNAL, json.dumps(entry))


def _on_ready(**_: Any) -> None:
    db().set(READY, os.getpid(), ex=300)


hilok_lock_refused.connect(_on_refused, weak=False)
worker_ready.connect(_on_ready, weak=False)
