"""The demo: a throwaway Redis, a real prefork Celery worker, and a bank's busy minute.

Run ``python -m examples.demo`` (or ``python3 dev.py demo``). It

1. starts a private ``redis-server`` on a free port of 127.0.0.1 (nothing is saved),
2. starts ``celery -A examples.bank worker -P prefork -c 4`` against it,
3. submits concurrent debits, tenant reports, an audit and a three-step month-end chain
   (see examples/bank.py), and draws the lock tree while they run,
4. prints who waited for whom, checks from the recorded intervals that no two conflicting
   tasks ever overlapped, checks the chain left no gap, and checks the final balances,
5. stops the worker and Redis, also on Ctrl-C or an error.

Without a local redis-server binary it can use an existing server given as
``HILOK_DEMO_REDIS=redis://host:port``; it then uses (and clears) databases 0 to 2 there.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 4
START_TIMEOUT = 30.0
RUN_TIMEOUT = 60.0

OPENING = 100_00  # cents in every account at the start
ACCOUNTS = {"acme": ["a1", "a2", "a3"], "globex": ["g1", "g2"]}
DEBITS = [("acme", "a1", 150, 6), ("acme", "a2", 275, 3), ("globex", "g1", 90, 4)]
FEE = 500  # the month-end fee of globex/g2
LATE_DEBITS = 2  # debits of globex/g2 submitted while its month-end chain runs

# "... write lock on 'tenants/acme/accounts/a1' held by Xy12ab..., 0.2s left on its lease"
BLOCKER = re.compile(r"(\w+ lock on '[^']+') (held|queued before you) by ([\w\-]{6})")


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:.0f}s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM (a Celery worker's warm shutdown), then SIGKILL the whole process group."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        # A second Ctrl-C while waiting skips the rest of the grace period, not the kill.
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """A private redis-server on a free port; yields its base URL ``redis://127.0.0.1:N``."""
    binary = os.environ.get("HILOK_REDIS_SERVER") or shutil.which("redis-server")
    external = os.environ.get("HILOK_DEMO_REDIS")
    if binary is None:
        if not external:
            raise SystemExit(
                "no redis-server found: install one (sudo apt install redis-server), or set "
                "HILOK_DEMO_REDIS=redis://host:port to use a server whose databases 0-2 "
                "the demo may clear"
            )
        for db in range(3):
            redis.Redis.from_url(f"{external}/{db}").flushdb()
        yield external
        return
    workdir = tempfile.mkdtemp(prefix="hilok-demo-redis-")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", workdir]
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis(port=port, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until("redis-server", answers, START_TIMEOUT, proc)
        client.close()
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(proc, 5.0)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def celery_worker(
    app: str, name: str, env: dict[str, str], ready_key: str, url: str, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A <app> worker -P prefork -c 4``, returned once the app has set
    ``ready_key`` in Redis db 2 (from its worker_ready handler); stopped on the way out."""
    args = [sys.executable, "-m", "celery", "-A", app, "worker"]
    args += ["-P", "prefork", "-c", str(CONCURRENCY), "-l", "INFO", "-n", f"{name}@%h"]
    args += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    data = redis.Redis.from_url(f"{url}/2")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until("the Celery worker", lambda: data.exists(ready_key), 60.0, proc)
        yield proc
    finally:
        stop(proc, 20.0)
        data.close()


def bank_worker(
    url: str, log_path: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``celery -A examples.bank worker -P prefork -c 4``, ready to take tasks."""
    env = {"HILOK_DEMO_REDIS": url}
    return celery_worker("examples.bank", "bank", env, "bank:worker-ready", url, log_path)


# -- the workload ---------------------------------------------------------------------------


@dataclass
class Run:
    """What the demo submitted and what the worker's tasks wrote to the journal."""

    t0: float
    submitted: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    tree: str = ""
    journal: list[dict[str, Any]] = field(default_factory=list)
    balances: dict[tuple[str, str], int] = field(default_factory=dict)

    def at(self, t: float) -> str:
        return f"{t - self.t0:+7.3f}s"


def submit(url: str) -> Run:
    from celery import chain

    from examples import bank

    data = redis.Redis.from_url(f"{url}/2", decode_responses=True)
    for tenant, accounts in ACCOUNTS.items():
        data.hset(f"bank:balances:{tenant}", mapping=dict.fromkeys(accounts, OPENING))
    run = Run(time.time())

    def note(label: str, result: Any) -> None:
        run.submitted[label] = time.time()
        run.results[label] = result

    # Debits of three accounts, interleaved, all at once.
    orders = [
        [(tenant, account, cents, f"debit {tenant}/{account} #{n}") for n in range(1, k + 1)]
        for tenant, account, cents, k in DEBITS
    ]
    for order in itertools.chain(*itertools.zip_longest(*orders)):
        if order is not None:
            tenant, account, cents, label = order
            note(label, bank.debit.delay(tenant, account, cents, label=label))
    # The month-end close of globex/g2: three tasks under one lock.
    close = chain(
        bank.freeze.s(tenant="globex", account="g2", label="month-end 1/3 freeze"),
        bank.charge_fee.s(tenant="globex", account="g2", cents=FEE, label="month-end 2/3 fee"),
        bank.statement.s(tenant="globex", account="g2", label="month-end 3/3 statement"),
    )
    note("month-end", close.delay())
    wait_for_journal(data, "start", "month-end 1/3 freeze")
    for n in range(1, LATE_DEBITS + 1):
        label = f"debit globex/g2 #{n}"
        note(label, bank.debit.delay("globex", "g2", 1000, label=label))
    # Reports read all of acme; an audit wants acme to itself, only if it is idle.
    for n in (1, 2):
        note(f"report acme #{n}", bank.report.delay("acme", label=f"report acme #{n}"))
    audit = bank.audit.delay("acme", label="audit acme")
    run.submitted["audit acme"] = time.time()

    wait_for_journal(data, "start", "month-end 2/3 fee")
    run.tree = lock_tree(url)

    deadline = time.monotonic() + RUN_TIMEOUT
    for label, result in run.results.items():
        value = result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False)
        run.results[label] = value
    # A skipped audit's result is {"hilok_skipped": True, ...}; the report reads the journal,
    # whose entry is written when the task ends (after its result was stored).
    audit.get(timeout=max(1.0, deadline - time.monotonic()))
    wait_for_journal(data, ("skipped", "end"), "audit acme")
    run.journal = [json.loads(e) for e in data.lrange("bank:journal", 0, -1)]
    for tenant in ACCOUNTS:
        for account, value in data.hgetall(f"bank:balances:{tenant}").items():
            run.balances[(tenant, str(account))] = int(value)
    data.close()
    return run


def wait_for_journal(data: redis.Redis, kind: str | tuple[str, ...], label: str) -> None:
    kinds = (kind,) if isinstance(kind, str) else kind
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        for raw in data.lrange("bank:journal", 0, -1):
            entry = json.loads(raw)
            if entry["kind"] in kinds and entry["label"] == label:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{label!r} did not {kind} within {RUN_TIMEOUT:.0f}s")
        time.sleep(0.01)


def lock_tree(url: str) -> str:
    """The lock tree right now, drawn by the ``celery hilok tree`` code."""
    from celery_hilok import HiLok
    from celery_hilok.cli import render_tree
    from celery_hilok.inspect import snapshot

    with HiLok(f"{url}/0") as hl:  # the locks live with the broker (the default)
        return render_tree(snapshot(hl), hl.separator)


# -- what happened --------------------------------------------------------------------------


@dataclass
class Execution:
    label: str
    start: float
    end: float
    handle: str
    pid: int
    locks: list[tuple[str, str]]

    def conflicts(self, other: Execution) -> bool:
        """Would these two holders' locks conflict (same line, at least one writer)?"""
        for (p, m), (q, n) in itertools.product(self.locks, other.locks):
            on_line = p == q or p.startswith(q + "/") or q.startswith(p + "/")
            if on_line and "write" in (m, n):
                return True
        return False


def executions(run: Run) -> list[Execution]:
    starts = {e["label"]: e for e in run.journal if e["kind"] == "start"}
    ends = {e["label"]: e for e in run.journal if e["kind"] == "end"}
    out = []
    for label, s in starts.items():
        if label in ends:
            locks = [(p, m) for p, m, _ in s["locks"]]
            out.append(Execution(label, s["t"], ends[label]["t"], s["handle"], s["pid"], locks))
    return sorted(out, key=lambda x: x.start)


def print_report(run: Run, worker_log: str) -> bool:
    ex = executions(run)
    names: dict[str, str] = {}  # holder handle -> who it is
    for x in ex:  # the steps of a chain share one holder
        if x.handle in names:
            names[x.handle] = f"the {x.label.split()[0]} chain"
        else:
            names[x.handle] = x.label
    by_handle = {handle[:6]: name for handle, name in names.items()}
    ok = True

    print("\n== timeline (start, end, pool process, lock holder) ==")
    for x in ex:
        locks = ", ".join(f"{m} {p}" for p, m in x.locks)
        print(
            f"  {run.at(x.start)} {run.at(x.end)}  {x.label:26} pid {x.pid}  "
            f"{x.handle[:6]}  {locks}"
        )

    print("\n== who waited for whom ==")
    retries: dict[str, list[str]] = {}
    actions: dict[str, str] = {}
    for e in run.journal:
        if e["kind"] == "waited":
            actions[e["label"]] = "parked" if e["action"] == "park" else "retried"
            m = BLOCKER.search(e["why"])
            if m:
                whom = by_handle.get(m.group(3), f"holder {m.group(3)}")
                how = "held by" if m.group(2) == "held" else "queued first:"
                retries.setdefault(e["label"], []).append(f"{m.group(1)} {how} {whom}")
    for label, reasons in retries.items():
        print(f"  {label}: {actions[label]} {len(reasons)}x, blocked by")
        for reason in dict.fromkeys(reasons):
            print(f"      {reason}")
    for x in ex:
        if x.label.startswith("report"):
            waited = x.start - run.submitted[x.label]
            since = run.submitted[x.label]
            before = [y.label for y in ex if y.conflicts(x) and y.start < x.start and y.end > since]
            print(
                f'  {x.label}: started {waited:.3f}s after it was sent ("wait" policy); '
                f"meanwhile {', '.join(before) or 'nothing'} held acme"
            )
    if any(x.label == "audit acme" for x in ex):
        print('  audit acme: found acme idle, so it ran ("skip" policy)')
    for e in run.journal:
        if e["kind"] == "skipped":
            print(f'  {e["label"]}: skipped ("skip" policy): {e["why"]}')
    for line in worker_log.splitlines():
        if "skipped:" in line:
            print(f"    worker log: {line.split('] ', 1)[-1][:150]}")

    print("\n== no overlap ==")
    pairs = [(a, b) for a, b in itertools.combinations(ex, 2) if a.handle != b.handle]
    conflicting = [(a, b) for a, b in pairs if a.conflicts(b)]
    overlapping = [(a, b) for a, b in conflicting if a.start < b.end and b.start < a.end]
    parallel = [(a, b) for a, b in pairs if not a.conflicts(b) and b.start < a.end]
    print(f"  {len(conflicting)} pairs of conflicting executions, {len(overlapping)} overlapped")
    for a, b in overlapping:
        print(f"  OVERLAP: {a.label} and {b.label}")
        ok = False
    print(f"  {len(parallel)} pairs of non-conflicting executions ran at the same time")

    print("\n== month-end chain of globex/g2 ==")
    steps = [x for x in ex if x.label.startswith("month-end")]
    late = [x for x in ex if x.label.startswith("debit globex/g2")]
    handles = {x.handle for x in steps}
    print(
        f"  {len(steps)} steps under {len(handles)} holder ({steps[0].handle[:6]}...), "
        f"pool processes {sorted({x.pid for x in steps})}"
    )
    first_late = min(x.start for x in late)
    gap_free = len(handles) == 1 and first_late > steps[-1].end
    print(
        f"  the {len(late)} debits of globex/g2 sent during the chain started at "
        f"{run.at(first_late)}, after the statement ended at {run.at(steps[-1].end)}: "
        f"{'nobody got in between' if gap_free else 'SOMEONE GOT IN'}"
    )
    ok = ok and gap_free

    print("\n== balances ==")
    expected = {(t, a): OPENING for t, accounts in ACCOUNTS.items() for a in accounts}
    for tenant, account, cents, k in DEBITS:
        expected[(tenant, account)] -= cents * k
    expected[("globex", "g2")] -= FEE + 1000 * LATE_DEBITS
    actual = run.balances
    for (tenant, account), want in expected.items():
        got = actual.get((tenant, account))
        mark = "ok" if got == want else "WRONG"
        ok = ok and got == want
        print(
            f"  {tenant}/{account}: {want / 100:8.2f} expected, {(got or 0) / 100:8.2f} "
            f"in the ledger  {mark}"
        )
    totals = [v for k, v in run.results.items() if k.startswith("report")]
    print(f"  reports of acme saw totals {[t / 100 for t in totals]} (consistent snapshots)")

    print("\n== the lock tree while month-end step 2 ran ==")
    for line in run.tree.splitlines():
        m = re.search(r"holder (\S+)", line)
        if m and m.group(1) in names:
            line = line.replace(m.group(1), f"{m.group(1)[:6]}... ({names[m.group(1)]})")
        print("  " + line)
    return ok


# -- main -----------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on kill as on Ctrl-C
    log_path = Path(tempfile.mkstemp(prefix="hilok-demo-worker-", suffix=".log")[1])
    started = time.monotonic()
    try:
        with throwaway_redis() as url:
            print(f"redis-server: {url} (throwaway)")
            os.environ["HILOK_DEMO_REDIS"] = url  # read by examples.bank on import
            with bank_worker(url, log_path) as worker:
                print(f"celery worker: pid {worker.pid}, prefork, {CONCURRENCY} processes")
                run = submit(url)
                # Celery's AsyncResults unsubscribe from the result backend when collected:
                # let them do it now, while Redis is still there (Celery 5.5 would otherwise
                # retry that against the stopped server for a long time at exit).
                gc.collect()
            ok = print_report(run, log_path.read_text(errors="replace"))
        print(f"\nworker and redis-server stopped; {time.monotonic() - started:.1f}s in all")
        print("all checks passed" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted: worker and redis-server stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"\ndemo failed: {exc}\n--- worker log (last lines) ---", file=sys.stderr)
        print("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
        return 1
    finally:
        log_path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
