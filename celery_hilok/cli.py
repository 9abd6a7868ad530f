"""``celery hilok``: see and manage the lock tree.

Registered as a Celery sub-command (``celery -A proj hilok ...``, through the
``celery.commands`` entry point), where the Redis URL, namespace and separator come from the
app's ``hilok_*`` settings; also runnable as ``python -m celery_hilok ...`` with ``--url``
(or ``HILOK_REDIS_URL``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import click

from . import _unique
from .errors import HiLokConnectionError, HiLokError, LockLost
from .inspect import (
    Grant,
    QueuedGrant,
    Snapshot,
    TaskInfo,
    leases_of,
    note_release,
    snapshot,
    tasks_by_handle,
)
from .paths import parse_path
from .sync import HiLok

__all__ = ["hilok", "render_tree"]

log = logging.getLogger("celery_hilok.cli")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass
class _Settings:
    url: str
    namespace: str
    separator: str
    url_from: str  # "--url", "the app", "HILOK_REDIS_URL" or "the default"


def _settings(
    ctx: click.Context, url: str | None, namespace: str | None, sep: str | None
) -> _Settings:
    app = getattr(ctx.obj, "app", None)
    conf: Any = getattr(app, "conf", None)
    conf_url = conf_ns = conf_sep = None
    if conf is not None:
        conf_url = conf.get("hilok_redis_url")
        broker = conf.get("broker_url") or ""
        if not conf_url and isinstance(broker, str) and broker.startswith(_REDIS_SCHEMES):
            conf_url = broker
        conf_ns = conf.get("hilok_namespace")
        conf_sep = conf.get("hilok_separator")
    env_url = os.environ.get("HILOK_REDIS_URL")
    sources = [(url, "--url"), (conf_url, "the app"), (env_url, "HILOK_REDIS_URL")]
    chosen, url_from = next(((u, f) for u, f in sources if u), (DEFAULT_URL, "the default"))
    return _Settings(
        url=chosen,
        namespace=namespace or conf_ns or "hilok",
        separator=sep or conf_sep or "/",
        url_from=url_from,
    )


@click.group(name="hilok")
@click.option(
    "--url",
    help=f"Redis URL (default: the app's hilok_redis_url, HILOK_REDIS_URL, else {DEFAULT_URL}).",
)
@click.option("--namespace", help="Key namespace (default: hilok_namespace or 'hilok').")
@click.option("--separator", help="Path separator (default: hilok_separator or '/').")
@click.pass_context
def hilok(
    ctx: click.Context, url: str | None, namespace: str | None, separator: str | None
) -> None:
    """See and manage celery_hilok's lock tree."""
    settings = _settings(ctx, url, namespace, separator)
    try:
        engine = HiLok(settings.url, namespace=settings.namespace, separator=settings.separator)
    except HiLokError as exc:
        raise click.ClickException(str(exc)) from exc
    if settings.url_from == "the default" and not ctx.resilient_parsing:
        # Nothing named a server: say which one this is (on stderr, so --json stays clean).
        click.echo(
            f"using Redis at {engine.server}, namespace {engine.namespace!r} (the default: "
            "no --url, HILOK_REDIS_URL or Celery app named one)",
            err=True,
        )
    ctx.call_on_close(engine.close)
    ctx.meta["hilok"] = engine


def _engine(ctx: click.Context) -> HiLok:
    engine = ctx.meta["hilok"]
    assert isinstance(engine, HiLok)
    return engine


def _snapshot(engine: HiLok, path: str | None) -> Snapshot:
    try:
        return snapshot(engine, path)
    except HiLokConnectionError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # redis-py errors outside the engine's own calls
        if type(exc).__module__.startswith("redis"):
            raise click.ClickException(
                f"Redis at {engine.server} is unreachable or failed: {exc}"
            ) from exc
        raise


@hilok.command()
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a tree.")
@click.pass_context
def tree(ctx: click.Context, path: str | None, as_json: bool) -> None:
    """Draw the lock tree (or the line of PATH) with holders and waiters."""
    engine = _engine(ctx)
    snap = _snapshot(engine, path)
    if as_json:
        click.echo(json.dumps(snap.as_dict(), indent=2))
        return
    click.echo(render_tree(snap, engine.separator))


@hilok.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show(ctx: click.Context, path: str, as_json: bool) -> None:
    """Who holds PATH, what is held above and below it, and who waits."""
    engine = _engine(ctx)
    try:
        status = engine.status(path)
    except HiLokError as exc:
        raise click.ClickException(str(exc)) from exc
    tasks = _tasks(engine)
    if as_json:

        def with_task(item: Any) -> dict[str, Any]:
            task = tasks.get(item.handle)
            return {**vars_of(item), "task": vars_of(task) if task is not None else None}

        click.echo(
            json.dumps(
                {
                    "path": status.path,
                    "holders": [with_task(h) for h in status.holders],
                    "waiters": [with_task(w) for w in status.waiters],
                },
                indent=2,
            )
        )
        return
    if not status.holders and not status.waiters:
        click.echo(f"{status.path}: free (nothing held on it, above or below)")
        return
    click.echo(f"{status.path}:")
    for h in status.holders:
        task = _describe_task(tasks.get(h.handle))
        click.echo(
            f"  {h.relation:5}  {h.mode:9} {h.path}  holder {h.handle}  ttl {h.ttl:.1f}s{task}"
        )
    for w in status.waiters:
        task = _describe_task(tasks.get(w.handle))
        click.echo(f"  queued {w.mode:9} {w.path}  holder {w.handle}  ticket {w.ticket}{task}")


def _tasks(engine: HiLok) -> dict[str, TaskInfo]:
    try:
        return tasks_by_handle(engine)
    except Exception as exc:  # the directory is a nicety: show the locks without it
        log.debug("no task directory: %s", exc)
        return {}


@hilok.command()
@click.argument("path")
@click.option("--handle", help="Release what this holder holds on PATH and below (owner-checked).")
@click.option("--force", is_flag=True, help="Release every grant on PATH and below it.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation with --force.")
@click.pass_context
def release(ctx: click.Context, path: str, handle: str | None, force: bool, yes: bool) -> None:
    """Release locks on PATH: one holder's (--handle) or everybody's (--force)."""
    if bool(handle) == force:
        raise click.UsageError("give exactly one of --handle H or --force")
    engine = _engine(ctx)
    target = parse_path(path, engine.separator)
    snap = _snapshot(engine, path)
    grants = [
        g
        for g in snap.grants
        if (handle is None or g.handle == handle)
        and target.is_ancestor_or_self_of(parse_path(g.path, engine.separator))
    ]
    if not grants:
        if handle is None:
            click.echo(f"nothing to release on {target.text!r} (no grant on it or below it)")
            return
        # A wrong (or mistyped) handle, or one whose locks are gone already: say so, and
        # fail, so that a script does not take "nothing happened" for a release.
        above = sorted({g.path for g in snap.grants if g.handle == handle})
        where = (
            f"; it holds {', '.join(map(repr, above))} above it: name that path"
            if above
            else " (a wrong handle, or its locks were released or ran out already)"
        )
        raise click.ClickException(
            f"nothing released: holder {handle} holds no lock on {target.text!r} or below it{where}"
        )
    for g in grants:
        click.echo(f"  {g.mode:9} {g.path}  holder {g.handle}  ttl {g.ttl:.1f}s")
    if force and not yes:
        click.confirm(
            f"force-release these {len(grants)} grant(s) (Redis at {engine.server}, "
            f"namespace {engine.namespace!r})?",
            abort=True,
        )
    how = "force" if force else "handle"
    for holder in sorted({g.handle for g in grants}):
        try:  # tell the holder's worker why its lease is gone (see celery_hilok.inspect)
            note_release(engine, holder, [g.path for g in grants if g.handle == holder], how)
        except Exception as exc:
            log.warning("could not leave a release note for %s: %s", holder, exc)
    released = 0
    for lease in leases_of(engine, grants):
        try:
            engine.release(lease)
            released += 1
            log.warning("released %s %r of holder %s", lease.mode, lease.path, lease.handle)
        except LockLost:
            pass
        except HiLokError as exc:
            raise click.ClickException(str(exc)) from exc
    if handle is not None and not released:
        raise click.ClickException(
            f"nothing released: the locks of holder {handle} ran out or were released meanwhile"
        )
    click.echo(f"released {released} grant(s)")


@hilok.command()
@click.argument("path", required=False)
@click.option("--interval", default=1.0, show_default=True, help="Seconds between redraws.")
@click.option("--count", type=int, default=None, help="Stop after this many redraws.")
@click.pass_context
def watch(ctx: click.Context, path: str | None, interval: float, count: int | None) -> None:
    """Redraw the lock tree every INTERVAL seconds (Ctrl-C to stop)."""
    engine = _engine(ctx)
    shown = 0
    try:
        while count is None or shown < count:
            snap = _snapshot(engine, path)
            click.clear()
            click.echo(time.strftime("%H:%M:%S") + f"  namespace {engine.namespace}")
            click.echo(render_tree(snap, engine.separator))
            shown += 1
            if count is None or shown < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


@hilok.command()
@click.option("--task", "task_name", help="Only the claims of this task name.")
@click.option(
    "--release",
    "release_id",
    metavar="TASK_ID",
    help="Give back every claim this task id holds (a call that will never end).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def unique(
    ctx: click.Context, task_name: str | None, release_id: str | None, as_json: bool
) -> None:
    """List the claims of unique tasks (hilok_unique): one per queued-or-running call."""
    engine = _engine(ctx)
    try:
        found = _unique.claims(engine.redis, engine.namespace, task_name)
        if release_id is not None:
            mine = [c for c in found if c.task_id == release_id]
            if not mine:
                raise click.ClickException(
                    f"nothing released: task id {release_id} holds no claim of a unique task"
                    + (f" of {task_name}" if task_name else "")
                )
            released = sum(_unique.release(engine.redis, c.key, c.task_id) for c in mine)
            click.echo(f"released {released} claim(s) of {release_id}")
            return
    except HiLokError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # redis-py errors: say which server
        if type(exc).__module__.startswith("redis"):
            raise click.ClickException(
                f"Redis at {engine.server} is unreachable or failed: {exc}"
            ) from exc
        raise
    if as_json:
        click.echo(json.dumps([vars_of(c) for c in found], indent=2))
        return
    if not found:
        click.echo(f"(no unique task is queued or running in namespace {engine.namespace!r})")
        return
    for c in found:
        ttl = "no expiry" if c.ttl is None else f"ttl {c.ttl:.1f}s"
        click.echo(f"{c.task}[{c.task_id}]  {ttl}  key ...{c.digest[:12]}")


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def render_tree(snap: Snapshot, separator: str = "/") -> str:
    """The snapshot as an indented tree, one node per line, holders and waiters beside."""
    if not snap.grants and not snap.waiters:
        return f"(no locks held or awaited in namespace {snap.namespace!r})"
    root: dict[str, Any] = {}
    notes: dict[tuple[str, ...], list[str]] = {}
    for g in snap.grants:
        segs = parse_path(g.path, separator).segments
        _insert(root, segs)
        notes.setdefault(segs, []).append(_describe_grant(g))
    for w in snap.waiters:
        segs = parse_path(w.path, separator).segments
        _insert(root, segs)
        notes.setdefault(segs, []).append(_describe_waiter(w))
    lines: list[str] = []
    _draw(root, (), "", lines, notes)
    return "\n".join(lines)


def _insert(node: dict[str, Any], segments: tuple[str, ...]) -> None:
    for s in segments:
        node = node.setdefault(s, {})


def _draw(
    node: dict[str, Any],
    at: tuple[str, ...],
    indent: str,
    lines: list[str],
    notes: dict[tuple[str, ...], list[str]],
) -> None:
    names = sorted(node)
    for i, name in enumerate(names):
        here = (*at, name)
        last = i == len(names) - 1
        branch = "" if not at else ("└── " if last else "├── ")
        lines.append(f"{indent}{branch}{name}")
        child_indent = indent if not at else indent + ("    " if last else "│   ")
        for note in notes.get(here, []):
            lines.append(f"{child_indent}  {note}")
        _draw(node[name], here, child_indent, lines, notes)


def _describe_grant(g: Grant) -> str:
    token = f"  token {g.token}" if g.token is not None else ""
    return f"[{g.mode}] holder {g.handle}  ttl {g.ttl:.1f}s{token}{_describe_task(g.task)}"


def _describe_waiter(w: QueuedGrant) -> str:
    return f"(waiting {w.mode}) holder {w.handle}  ticket {w.ticket}{_describe_task(w.task)}"


def _describe_task(task: TaskInfo | None) -> str:
    if task is None:
        return ""
    if task.parked:
        return f"  task {task.task}[{task.task_id}] parked (by {task.worker})"
    return f"  task {task.task}[{task.task_id}] on {task.worker} pid {task.pid}"


def main() -> None:
    """Entry point of ``python -m celery_hilok``."""
    hilok(auto_envvar_prefix="HILOK")
