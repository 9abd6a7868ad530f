"""Run the multi-tenant invoicing app: a throwaway Redis, a real Celery worker, a workload.

``python -m examples.tenants.run``

1. starts a private ``redis-server`` on a free port of 127.0.0.1 (nothing is saved),
2. starts ``celery -A examples.tenants.app worker -P prefork -c 4`` against it,
3. sends, all at once, for two tenants: invoice lines (several per invoice), transfers in
   both directions between the same accounts, tenant reports, and a month-end close of
   each tenant in the middle of it all,
4. checks every invoice total and account balance to the cent, that money was neither
   lost nor created, that reports and closes saw nothing change under them, that the
   opposite transfers finished (no deadlock) and, from the journal, that no two
   conflicting tasks ever overlapped; prints what happened,
5. stops the worker and Redis (also on Ctrl-C or an error) and exits non-zero if a check
   failed.

The helpers for Redis and the worker process are examples.demo's. Without a local
redis-server binary it uses ``HILOK_DEMO_REDIS=redis://host:port`` and clears its
databases 0 to 2.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from examples.demo import (
    Run,
    _interrupt,
    celery_worker,
    executions,
    throwaway_redis,
)

CONCURRENCY = 4
RUN_TIMEOUT = 60.0

TENANTS = {"acme": ["a1", "a2", "a3"], "globex": ["g1", "g2"]}
OPENING = 1_000_00  # cents in every account at the start
LINES = {  # tenant -> invoice -> lines (cents)
    "acme": {"inv-1": [1_000, 2_500, 400], "inv-2": [700, 700], "inv-3": [9_900]},
    "globex": {"inv-1": [120, 380, 500, 1_000], "inv-2": [5_000]},
}
TRANSFERS = [  # both directions between the same accounts: deadlock bait without the locks
    ("acme", "a1", "a2", 300),
    ("acme", "a2", "a1", 200),
    ("acme", "a2", "a3", 50),
    ("acme", "a3", "a1", 75),
    ("globex", "g1", "g2", 1_000),
    ("globex", "g2", "g1", 400),
] * 3


def worker(url: str, log_path: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``celery -A examples.tenants.app worker -P prefork -c 4``, ready to take tasks."""
    env = {"HILOK_TENANTS_REDIS": url}
    return celery_worker(
        "examples.tenants.app", "tenants", env, "tenants:worker-ready", url, log_path
    )


def workload(url: str) -> tuple[Run, dict[str, Any]]:
    """Send everything at once; wait for every result; read back the journal and data."""
    from examples.tenants import app

    data = redis.Redis.from_url(f"{url}/2", decode_responses=True)
    for tenant, accounts in TENANTS.items():
        data.hset(f"tenants:{tenant}:accounts", mapping=dict.fromkeys(accounts, OPENING))
    run = Run(time.time())
    results: dict[str, Any] = {}

    lines = [
        (tenant, invoice, cents, f"line {tenant}/{invoice} #{n}")
        for tenant, invoices in LINES.items()
        for invoice, amounts in invoices.items()
        for n, cents in enumerate(amounts, 1)
    ]
    transfers = [
        (tenant, src, dst, cents, f"transfer {tenant} {src}->{dst} #{n}")
        for n, (tenant, src, dst, cents) in enumerate(TRANSFERS, 1)
    ]
    half = len(lines) // 2
    for item in itertools.chain(*itertools.zip_longest(lines[:half], transfers[:9])):
        if item is not None:
            send(app, results, item)
    for tenant in TENANTS:
        label = f"close {tenant}"
        results[label] = app.close_month.delay(tenant, label=label)
        label = f"report {tenant} #1"
        results[label] = app.tenant_report.delay(tenant, label=label)
    for item in itertools.chain(*itertools.zip_longest(lines[half:], transfers[9:])):
        if item is not None:
            send(app, results, item)
    for tenant in TENANTS:
        label = f"report {tenant} #2"
        results[label] = app.tenant_report.delay(tenant, label=label)

    deadline = time.monotonic() + RUN_TIMEOUT
    for label, result in results.items():
        left = max(1.0, deadline - time.monotonic())
        results[label] = result.get(timeout=left, propagate=False)
    run.journal = [json.loads(e) for e in data.lrange("tenants:journal", 0, -1)]
    state = {
        "invoices": {t: data.hgetall(f"tenants:{t}:invoices") for t in TENANTS},
        "accounts": {t: data.hgetall(f"tenants:{t}:accounts") for t in TENANTS},
        "retries": data.hgetall("tenants:retries"),
        "results": results,
    }
    data.close()
    return run, state


def send(app: Any, results: dict[str, Any], item: tuple[Any, ...]) -> None:
    label = item[-1]
    if label.startswith("line"):
        tenant, invoice, cents, _ = item
        results[label] = app.issue_invoice.delay(tenant, invoice, cents, label=label)
    else:
        tenant, src, dst, cents, _ = item
        results[label] = app.transfer.delay(tenant, src, dst, cents, label=label)


def check(run: Run, state: dict[str, Any]) -> bool:
    ok = True

    def verdict(good: bool, text: str) -> None:
        nonlocal ok
        ok = ok and good
        print(f"  {'ok   ' if good else 'WRONG'} {text}")

    ex = executions(run)
    print(f"\n== {len(ex)} task executions, {len(state['results'])} tasks sent ==")
    failed = {k: v for k, v in state["results"].items() if isinstance(v, BaseException)}
    verdict(not failed, f"every task succeeded{'' if not failed else f': {failed}'}")
    verdict(len(ex) == len(state["results"]), "every task ran exactly once to its end")
    retries = ", ".join(f"{k} {v}" for k, v in sorted(state["retries"].items())) or "none"
    print(f"  refused (parked or retried) by task kind: {retries}")

    print("\n== invoices ==")
    for tenant, invoices in LINES.items():
        for invoice, amounts in invoices.items():
            got = int(state["invoices"][tenant].get(invoice, 0))
            verdict(
                got == sum(amounts), f"{tenant}/{invoice}: {got / 100:.2f} ({len(amounts)} line(s))"
            )

    print("\n== accounts ==")
    expected = {(t, a): OPENING for t, accounts in TENANTS.items() for a in accounts}
    for tenant, src, dst, cents in TRANSFERS:
        expected[(tenant, src)] -= cents
        expected[(tenant, dst)] += cents
    for (tenant, account), want in expected.items():
        got = int(state["accounts"][tenant].get(account, 0))
        verdict(got == want, f"{tenant}/{account}: {got / 100:.2f}, expected {want / 100:.2f}")
    for tenant, accounts in TENANTS.items():
        total = sum(int(v) for v in state["accounts"][tenant].values())
        verdict(total == OPENING * len(accounts), f"{tenant}: no money lost or created")
    opposite = [x for x in ex if x.label.startswith("transfer")]
    verdict(
        len(opposite) == len(TRANSFERS),
        f"{len(opposite)} transfers, a->b and b->a at once, all finished (no deadlock)",
    )

    print("\n== closes and reports (each read its tenant twice) ==")
    for e in run.journal:
        if e["kind"] == "end" and e["label"].startswith(("close", "report")):
            what = f"total {e['total'] / 100:.2f}" if "total" in e else "read"
            verdict(e["stable"], f"{e['label']}: {what}, nothing changed under it")

    print("\n== no overlap (from the journal) ==")
    pairs = [(a, b) for a, b in itertools.combinations(ex, 2) if a.handle != b.handle]
    conflicting = [(a, b) for a, b in pairs if a.conflicts(b)]
    overlapping = [(a, b) for a, b in conflicting if a.start < b.end and b.start < a.end]
    parallel = [(a, b) for a, b in pairs if not a.conflicts(b) and b.start < a.end]
    verdict(
        not overlapping,
        f"{len(conflicting)} pairs of conflicting executions, {len(overlapping)} overlapped",
    )
    for a, b in overlapping:
        print(f"        OVERLAP: {a.label} and {b.label}")
    print(f"  {len(parallel)} pairs of non-conflicting executions ran at the same time")
    for x in ex:
        if x.label.startswith("close"):
            tenant = x.label.split()[1]
            before = [y for y in ex if y.conflicts(x) and y.end <= x.start]
            after = [y for y in ex if y.conflicts(x) and y.start >= x.end]
            print(
                f"  {x.label}: held tenants/{tenant} {x.end - x.start:.3f}s; "
                f"{len(before)} conflicting tasks ended before it, {len(after)} started after"
            )
    return ok


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on kill as on Ctrl-C
    log_path = Path(tempfile.mkstemp(prefix="hilok-tenants-worker-", suffix=".log")[1])
    started = time.monotonic()
    try:
        with throwaway_redis() as url:
            print(f"redis-server: {url} (throwaway)")
            os.environ["HILOK_TENANTS_REDIS"] = url  # read by examples.tenants.app on import
            with worker(url, log_path) as proc:
                print(f"celery worker: pid {proc.pid}, prefork, {CONCURRENCY} processes")
                run, state = workload(url)
            ok = check(run, state)
        print(f"\nworker and redis-server stopped; {time.monotonic() - started:.1f}s in all")
        print("all checks passed" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted: worker and redis-server stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"\nexample failed: {exc}\n--- worker log (last lines) ---", file=sys.stderr)
        print("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
        return 1
    finally:
        log_path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
