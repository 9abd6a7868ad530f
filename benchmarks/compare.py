"""Two builds of celery_hilok side by side in one run: the uncontended rate, interleaved.

    python -m benchmarks.compare BEFORE AFTER [--rounds 6] [--duration 1.0] [--clients 1]

BEFORE and AFTER are checkouts of the repository (say ``git worktree add ../before
<commit>``). Each runs in a child process of its own that imports ``celery_hilok`` from that
checkout and the workloads from this one, against one throw-away redis-server. Rounds
alternate the order of the two (before then after, then after then before...), so a machine
whose speed drifts during the run (a shared VM can change by half within minutes) slows both
alike, and each case's ratio after/before is taken within a round, then its median over the
rounds. A comparison of two separate runs of ``benchmarks.run`` compares two machines.

Printed per case (driver, mode, depth): the median pairs per second, client CPU µs per pair
and, for AsyncHiLok, Redis µs per pair (``INFO commandstats``) of each, with the median
per-round ratio after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "@@compare "
METRICS = (("rate", "pairs/s"), ("cpu_us_per_op", "CPU µs"), ("server_us_per_op", "Redis µs"))


def _child(tree: str, url: str) -> None:
    """Serve rate requests, one JSON line each on stdin, with ``tree``'s celery_hilok."""
    sys.path.insert(0, tree)
    import celery_hilok

    sys.path.remove(tree)
    where = Path(celery_hilok.__file__).resolve()
    if not where.is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"celery_hilok came from {where}, not from {tree}")
    from benchmarks import ours

    for line in sys.stdin:
        request = json.loads(line)
        driver = request.pop("driver")
        if driver == "AsyncHiLok":
            result = ours.run_async(url, {"bench": "rate", **request})
        else:
            result = ours.sync_lock_rate(url, **request)
        print(PREFIX + json.dumps(result), flush=True)


class _Child:
    def __init__(self, tree: Path, url: str) -> None:
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.compare", "--child", str(tree), "--url", url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        return _answer(stdout, self.tree)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _answer(stdout: IO[str], tree: Path) -> dict[str, Any]:
    for line in stdout:
        if line.startswith(PREFIX):
            answer: dict[str, Any] = json.loads(line[len(PREFIX) :])
            return answer
        print(f"[{tree.name}] {line.rstrip()}", file=sys.stderr)
    raise RuntimeError(f"the process for {tree} ended without an answer")


def compare(
    before: Path, after: Path, rounds: int, duration: float, clients: int, say: Any = print
) -> list[dict[str, Any]]:
    """Run the rounds; one row per case, with both builds' results per round."""
    from tests._redis import RedisServer

    cases = [
        {"driver": driver, "mode": mode, "depth": depth, "clients": clients}
        for driver in ("AsyncHiLok", "HiLok")
        for mode in ("write", "read")
        for depth in (1, 3, 8)
    ]
    server = RedisServer().start()
    children: dict[str, _Child] = {}
    try:
        children = {"before": _Child(before, server.url), "after": _Child(after, server.url)}
        rows: list[dict[str, Any]] = [{**case, "before": [], "after": []} for case in cases]
        for r in range(rounds):
            say(f"round {r + 1}/{rounds}")
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for row, case in zip(rows, cases, strict=True):
                for name in order:
                    timing = {"duration": duration, "warmup": min(0.3, duration)}
                    row[name].append(children[name].request({**case, **timing}))
        return rows
    finally:
        for child in children.values():
            child.close()
        server.stop()


def table(rows: list[dict[str, Any]]) -> str:
    head = ["driver", "mode", "depth"]
    for _, label in METRICS:
        head += [f"{label} before", f"{label} after", "after/before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["driver"], row["mode"], str(row["depth"])]
        for key, _ in METRICS:
            b = [x.get(key) for x in row["before"]]
            a = [x.get(key) for x in row["after"]]
            if None in a or None in b:
                cells += ["-", "-", "-"]
                continue
            ratio = statistics.median(y / x for x, y in zip(b, a, strict=True) if x)
            cells += [f"{statistics.median(b):.0f}", f"{statistics.median(a):.0f}", f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("before", nargs="?", type=Path)
    parser.add_argument("after", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.url)
        return 0
    if args.before is None or args.after is None:
        parser.error("give the two checkouts to compare")
    rows = compare(args.before, args.after, args.rounds, args.duration, args.clients)
    print(f"\n`python -m benchmarks.compare {' '.join(sys.argv[1:])}`\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
