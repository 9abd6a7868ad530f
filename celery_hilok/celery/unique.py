"""Unique tasks: at most one queued-or-running call of a task per chosen arguments.

A ``HiLokTask`` with ``hilok_unique`` claims a key when a call is published
(``apply_async``, so also ``delay`` and signatures): the key is named after the task and
the chosen arguments, and holds the call's task id. Publishing an identical call while that
key is held returns the held call's ``AsyncResult`` (``hilok_unique_on_duplicate="return"``)
or raises :class:`~celery_hilok.DuplicateTask` (``"raise"``), and publishes nothing.

The key is given back, owner-checked (only the task id holding it can), when the call is
over, on the same ways out as the locks: the pool process's ``task_postrun`` (success,
failure, Reject, Ignore, skip, a retry budget used up), the worker's main process for a
revoked message, a terminated task and a lost pool process (SIGKILL, hard time limit), and
the publisher itself when the message could not be published. A retry (``self.retry``, a
contention retry, a retry after a lost worker) is the same call: its message carries the
claim's name and renews it. What no process is left to release (the whole worker killed)
expires after ``hilok_unique_ttl``.

Which process knows which key: the publisher computes it and sends its name with the
message (header ``hilok_unique``); the worker releases the name it was sent, never one it
computed, so a spec changed between two deploys still frees what the old code claimed.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import string
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from celery import states
from celery._state import get_current_task
from celery.utils import uuid
from celery.utils.time import maybe_make_aware
from kombu.utils.json import dumps as kombu_dumps
from redis.exceptions import RedisError

from .._redis import translate
from .._unique import claim, claim_name, parse_claim_name, release, unique_key
from ..errors import DuplicateTask, InvalidArgument
from ._runtime import PARKED_ATTR, Runtime, runtime
from .config import check_task_option
from .locks import option
from .spec import _plain, bound_arguments, template_names

__all__ = [
    "UNIQUE_HEADER",
    "UniqueSpec",
    "claim_of",
    "publish_once",
    "release_after_run",
    "release_claim",
]

log = logging.getLogger("celery_hilok.celery")

UNIQUE_HEADER: Final = "hilok_unique"
"""Message header naming the claim a call holds (see :func:`celery_hilok._unique.claim_name`)."""
_dumps: Callable[..., str] = kombu_dumps  # Celery's JSON: dates, UUIDs, Decimals encode
_VERSION: Final = "hilok-unique/1"
"""First element of the hashed document: a new key format gets a new one."""


class UniqueSpec:
    """The compiled ``hilok_unique`` of one task: which calls count as identical.

    - ``True``: all arguments, by name, with defaults applied (``f(1)``, ``f(a=1)`` and
      ``f(1, b=<b's default>)`` are one call);
    - a list or tuple of argument names: only those (``()``: one call of the task at a
      time, whatever its arguments);
    - a template str over the arguments, as in lock specs (``"accounts/{account.id}"``):
      calls whose text is the same;
    - a callable, called like the task (without ``self``): calls whose return values are
      equal as JSON; returning None makes that call not unique;
    - None or False: not unique.
    """

    __slots__ = ("_fn", "_names", "_signature", "_template", "_varkw", "kind", "task")

    def __init__(self, task: str, signature: inspect.Signature | None, spec: object) -> None:
        """Compile ``spec``, checking the names it uses against ``signature`` (the task
        body's, without ``self``; None for an abstract class). Raises
        :class:`InvalidArgument` naming the task and the problem."""
        self.task = task
        self._signature = signature
        self._varkw: str | None = None
        self._names: tuple[str, ...] = ()
        self._template: str | None = None
        self._fn: Callable[..., Any] | None = None
        if signature is not None:
            for p in signature.parameters.values():
                if p.kind is inspect.Parameter.VAR_KEYWORD:
                    self._varkw = p.name
        self.kind: str | None
        if spec is None or spec is False:
            self.kind = None
        elif spec is True:
            self.kind = "all"
        elif isinstance(spec, str):
            self.kind = "template"
            self._template = spec
            self._check_template(spec)
        elif callable(spec):
            self.kind = "call"
            self._fn = spec
        elif isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
            self.kind = "names"
            self._names = tuple(dict.fromkeys(spec))
            for name in self._names:
                self._check_name(name, f"names {name!r}, which")
        else:
            raise InvalidArgument(
                f"{task}: hilok_unique must be True, a list of argument names, a template str "
                f"or a callable; got {spec!r}"
            )

    def __bool__(self) -> bool:
        return self.kind is not None

    def __repr__(self) -> str:
        what = {
            None: "not unique",
            "all": "all arguments",
            "names": f"arguments {list(self._names)}",
            "template": f"template {self._template!r}",
            "call": f"{self._fn!r}",
        }[self.kind]
        return f"<UniqueSpec of {self.task}: {what}>"

    # -- definition time ------------------------------------------------------------------

    def _argument_names(self) -> list[str]:
        assert self._signature is not None
        return [
            p.name
            for p in self._signature.parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]

    def _check_name(self, name: str, what: str) -> None:
        if self._signature is None or self._varkw is not None:
            return
        names = self._argument_names()
        if name not in names:
            raise InvalidArgument(
                f"{self.task}: hilok_unique {what} is not an argument of "
                f"{self.task}{_plain(self._signature)}; its arguments are: "
                f"{', '.join(names) or 'none'}"
            )

    def _check_template(self, template: str) -> None:
        where = f"template {template!r}"
        names = template_names(template, f"{self.task}: hilok_unique {where}")
        if not names:
            raise InvalidArgument(
                f"{self.task}: hilok_unique {where} names no argument: to key on arguments by "
                f"name pass a tuple ({template!r},); for one call of the task at a time, ()"
            )
        for name in names:
            self._check_name(name, f"{where} names {name!r}, which")

    # -- publish time ---------------------------------------------------------------------

    def digest(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
        """SHA-256 (hex) of the call's canonical JSON: the task name and the chosen
        arguments; None when the call is not unique (a callable spec returned None).

        Raises :class:`InvalidArgument` when a chosen value cannot be encoded as JSON (the
        same encoder as Celery's messages: dates, UUIDs and Decimals are fine) or a template
        names an argument the call does not pass; ``TypeError`` when the arguments do not
        fit the task's signature.
        """
        material: object
        if self.kind is None:
            return None
        if self.kind == "call":
            assert self._fn is not None
            material = self._fn(*args, **kwargs)
            if material is None:
                return None
        else:
            values = self._arguments(args, kwargs)
            if self.kind == "all":
                material = values
            elif self.kind == "names":
                material = {name: self._value(values, name) for name in self._names}
            else:
                assert self._template is not None
                material = _Formatter(self).vformat(self._template, (), values)
        try:
            text = _dumps(
                [_VERSION, self.task, self.kind, material],
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=True,
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"{self.task}: hilok_unique needs chosen arguments that JSON can encode "
                f"(the key is a hash of them): {exc}"
            ) from None
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def _arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self._signature is None:
            return {"args": list(args), "kwargs": dict(kwargs)}
        return bound_arguments(self._signature, self._varkw, args, kwargs)

    def _value(self, values: Mapping[str, Any], name: str) -> Any:
        try:
            return values[name]
        except KeyError:
            raise InvalidArgument(
                f"{self.task}: hilok_unique names {name!r}, which this call does not pass"
            ) from None


class _Formatter(string.Formatter):
    def __init__(self, spec: UniqueSpec) -> None:
        self.spec = spec

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return self.spec._value(kwargs, str(key))


# -- publishing ---------------------------------------------------------------------------


def publish_once(
    task: Any,
    publish: Callable[..., Any],
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
) -> Any:
    """``publish(args, kwargs, **options)`` (Celery's ``apply_async``) unless an identical
    call of ``task`` is queued or running; then its ``AsyncResult``, or
    :class:`DuplicateTask`, as ``hilok_unique_on_duplicate`` says.

    The claim is taken (or renewed, for a retry of the call) before the message is sent and
    given back if sending fails; in eager mode, once the call ran. Raises
    :class:`~celery_hilok.HiLokConnectionError` (or another ``HiLokError``) when Redis
    cannot be asked: nothing is published then.
    """
    on_duplicate = options.pop("hilok_unique_on_duplicate", None)
    check_task_option("hilok_unique_on_duplicate", on_duplicate, task.name)
    headers = dict(options.get("headers") or {})
    task_id = options.get("task_id")
    # signature_from_request (self.retry, a contention retry, a retry after a lost worker)
    # sends the running call again under its own id: the same call, not a duplicate.
    again = task_id is not None and "retries" in options
    name = _claim_to_renew(headers, str(task_id)) if again else None
    if name is None:
        digest = task._hilok_unique.digest(args or (), kwargs or {})
        if digest is None:
            headers.pop(UNIQUE_HEADER, None)
            return publish(args, kwargs, **{**options, "headers": headers})
        name = claim_name(task.name, digest)
    task_id = str(task_id or uuid())
    rt = runtime(task.app)
    key = unique_key(rt.namespace, name)
    ttl = float(option(task, "hilok_unique_ttl")) + _delay(task.app, options)
    try:
        held = claim(rt.hilok.redis, key, task_id, ttl, renew=again)
    except RedisError as exc:
        raise translate(exc, rt.hilok.server, f"the unique claim of {task.name}") from exc
    if held is not None and not again:
        return _duplicate(task, on_duplicate, *held)
    ours = held is None  # a retry finds another call's claim only after its own ran out
    if ours:
        headers[UNIQUE_HEADER] = name
    else:
        headers.pop(UNIQUE_HEADER, None)
    eager = bool(task.app.conf.task_always_eager)
    sent = False
    try:
        result = publish(args, kwargs, **{**options, "task_id": task_id, "headers": headers})
        sent = True
        return result
    finally:
        if ours and not sent:
            release_claim(rt, name, task_id, "its message could not be published")
        elif ours and eager:
            release_claim(rt, name, task_id, "it ran eagerly")


def _claim_to_renew(headers: Mapping[str, Any], task_id: str) -> str | None:
    """The claim a call being sent again holds: from its headers, else from the running
    request when it is that call (None: compute it again from the arguments)."""
    name = headers.get(UNIQUE_HEADER)
    if parse_claim_name(name) is not None:
        return str(name)
    current = get_current_task()
    request = getattr(current, "request", None)
    if request is not None and getattr(request, "id", None) == task_id:
        return claim_of(request)
    return None


def _duplicate(task: Any, on_duplicate: str | None, holder: str, left: float | None) -> Any:
    policy = on_duplicate or option(task, "hilok_unique_on_duplicate")
    expires = "no expiry" if left is None else f"its claim expires in {left:.1f}s"
    if policy == "raise":
        raise DuplicateTask(
            f"{task.name}: an identical call is already queued or running as {holder} ({expires})",
            task=task.name,
            task_id=holder,
            ttl=left,
        )
    log.info("%s: an identical call is queued or running as %s; not sent again", task.name, holder)
    return task.AsyncResult(holder)


def _delay(app: Any, options: Mapping[str, Any]) -> float:
    """Seconds until a call is due (``countdown`` / ``eta``): its claim outlives the wait."""
    countdown = options.get("countdown")
    if countdown is not None:
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if isinstance(eta, str):
        try:
            eta = datetime.fromisoformat(eta)
        except ValueError:
            return 0.0
    if isinstance(eta, datetime):
        due: datetime = maybe_make_aware(eta, app.timezone)
        left: float = (due - app.now()).total_seconds()
        return max(0.0, left)
    return 0.0


# -- releasing ------------------------------------------------------------------------------


def claim_of(request: Any) -> str | None:
    """The claim name a task request carries (a ``Context``, or the worker's request with
    its ``request_dict``), if it is a valid one."""
    data = getattr(request, "request_dict", None)
    name = data.get(UNIQUE_HEADER) if isinstance(data, dict) else None
    if name is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, dict):
            name = headers.get(UNIQUE_HEADER)
    if name is None:
        name = getattr(request, UNIQUE_HEADER, None)
    return str(name) if parse_claim_name(name) is not None else None


def release_claim(rt: Runtime, name: str, task_id: str | None, why: str) -> None:
    """Give back claim ``name`` if ``task_id`` holds it; quietly (log, never raise)."""
    if not task_id:
        return
    try:
        released = release(rt.hilok.redis, unique_key(rt.namespace, name), task_id)
    except RedisError as exc:
        log.warning(
            "could not release the unique claim of %s (%s): %s; it expires by its ttl",
            task_id,
            why,
            exc,
        )
        return
    if released:
        log.debug("released the unique claim of %s: %s", task_id, why)


def release_after_run(task: Any, request: Any, state: str | None, retval: Any) -> None:
    """``task_postrun``: the call is over unless it is being retried or was requeued."""
    name = claim_of(request)
    if name is None:
        return
    if state == states.RETRY or getattr(request, PARKED_ATTR, False):
        return  # its retry, or (parked) its next sending, is the same call: it holds on
    if state == states.REJECTED and getattr(retval, "requeue", False):
        return  # back in the queue: still the queued call
    release_claim(runtime(task.app), name, getattr(request, "id", None), f"task {state}")


def release_for_request(task: Any, request: Any, why: str) -> None:
    """The worker's main process: the call of ``request`` ended without its pool process
    (revoked, terminated, lost); give back its claim."""
    name = claim_of(request)
    if name is None:
        return
    data = getattr(request, "request_dict", None)
    task_id = data.get("id") if isinstance(data, dict) else getattr(request, "id", None)
    try:
        rt = runtime(task.app)
    except Exception as exc:
        log.warning("%s[%s]: cannot release its unique claim: %s", task.name, task_id, exc)
        return
    release_claim(rt, name, task_id, why)
