"""Lock specs of a task: ``hilok_read`` / ``hilok_write`` turned into (path, mode) pairs.

A spec is a template, a callable, or a list of these:

- a **template** is a ``str.format`` string over the task's arguments by name, with
  defaults applied: ``"tenants/{tenant_id}/accounts/{account.id}"``. Every field must name
  an argument of the task (checked when the task class is created). Each substituted value
  must be one non-empty path segment: a value that is empty or contains the separator is an
  error at run time, so that ``tenant_id=""`` can never turn ``"tenants/{tenant_id}"``
  into a lock on every tenant. Build multi-segment paths with a callable.
- a **callable** is called like the task (``spec(*args, **kwargs)``, without ``self``) and
  returns a path, a list of paths, or None (no lock). It is called in the worker process
  that runs the task, and again in the worker's main process to release the locks of a
  task whose process died, so it must be a pure function of the arguments.
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import InvalidArgument
from ..paths import parse_path

__all__ = ["LockSpec", "SpecItem"]

Mode = Literal["read", "write"]
SpecItem = str | Callable[..., Any]
"""One element of a spec: a template or a callable."""

_ROOT_NAME = re.compile(r"[^.\[]*")


@dataclass(frozen=True, slots=True)
class _Template:
    text: str
    mode: Mode


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[..., Any]
    mode: Mode


class LockSpec:
    """The compiled lock spec of one task: what it locks, as a function of its arguments."""

    __slots__ = ("_items", "_signature", "_varkw", "task")

    def __init__(
        self,
        task: str,
        signature: inspect.Signature | None,
        read: object = None,
        write: object = None,
    ) -> None:
        """Compile and check ``read`` and ``write`` against the task's ``signature``.

        ``signature`` is the task body's, without ``self``; None when the task has no body
        yet (an abstract base class), in which case templates are not checked. Raises
        :class:`InvalidArgument` naming the task, the template and the unknown field.
        """
        self.task = task
        self._signature = signature
        self._varkw: str | None = None
        if signature is not None:
            for p in signature.parameters.values():
                if p.kind is inspect.Parameter.VAR_KEYWORD:
                    self._varkw = p.name
        items: list[_Template | _Call] = []
        for mode, spec in (("read", read), ("write", write)):
            for item in _items_of(spec, task, f"hilok_{mode}"):
                if isinstance(item, str):
                    self._check_template(item, f"hilok_{mode}")
                    items.append(_Template(item, mode))  # type: ignore[arg-type]
                else:
                    items.append(_Call(item, mode))  # type: ignore[arg-type]
        self._items: tuple[_Template | _Call, ...] = tuple(items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __repr__(self) -> str:
        parts = [
            f"{i.mode} {i.text!r}" if isinstance(i, _Template) else f"{i.mode} {i.fn!r}"
            for i in self._items
        ]
        return f"<LockSpec of {self.task}: {', '.join(parts) or 'no locks'}>"

    # -- definition time ------------------------------------------------------------------

    def _check_template(self, template: str, option: str) -> None:
        where = f"{self.task}: {option} template {template!r}"
        sig = self._signature
        names = [
            p.name
            for p in (sig.parameters.values() if sig is not None else ())
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        used = template_names(template, where, names[0] if names else "account_id")
        if not used and not template.strip():
            raise InvalidArgument(f"{where} is empty")
        if sig is None:
            return
        for name in used:
            if name not in names and self._varkw is None:
                known = ", ".join(names) or "none"
                raise InvalidArgument(
                    f"{where} names {name!r}, which is not an argument of "
                    f"{self.task}{_plain(sig)}; its arguments are: {known}"
                )

    # -- run time -------------------------------------------------------------------------

    def locks(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], separator: str
    ) -> list[tuple[str, Mode]]:
        """The (path, mode) pairs of a call with ``args`` and ``kwargs``, in spec order.

        Raises :class:`InvalidArgument` for a value that is not one path segment, a callable
        returning something other than paths, or a path the engine rejects; ``TypeError``
        when the arguments do not fit the task's signature.
        """
        if not self._items:
            return []
        values: dict[str, Any] | None = None
        out: list[tuple[str, Mode]] = []
        for item in self._items:
            if isinstance(item, _Template):
                if values is None:
                    values = self._arguments(args, kwargs)
                path = _SegmentFormatter(self.task, item.text, separator).vformat(
                    item.text, (), values
                )
                out.append((path, item.mode))
            else:
                for path in _paths_of(item.fn(*args, **kwargs), self.task, item.fn):
                    out.append((path, item.mode))
        # Normalised (fails here, with the path in the message) and each lock once.
        normal = [(parse_path(path, separator).text, mode) for path, mode in out]
        return list(dict.fromkeys(normal))

    def _arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self._signature is None:
            return dict(kwargs)
        return bound_arguments(self._signature, self._varkw, args, kwargs)


class _SegmentFormatter(string.Formatter):
    """``str.format`` whose every substituted value must be one non-empty path segment."""

    def __init__(self, task: str, template: str, separator: str) -> None:
        self.task = task
        self.template = template
        self.separator = separator

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        try:
            return kwargs[key]  # type: ignore[index]
        except KeyError:
            raise InvalidArgument(
                f"{self.task}: template {self.template!r} names {key!r}, which this call "
                "does not pass"
            ) from None

    def format_field(self, value: Any, format_spec: str) -> str:
        text: str = super().format_field(value, format_spec)
        if not text or self.separator in text:
            raise InvalidArgument(
                f"{self.task}: template {self.template!r} got {value!r}, which is "
                f"{'empty' if not text else f'more than one path segment ({self.separator!r})'}"
                "; every value must be one non-empty segment (build such paths with a "
                "callable spec)"
            )
        return text


def _plain(sig: inspect.Signature) -> inspect.Signature:
    """``sig`` without annotations, for messages."""
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=inspect.Signature.empty)


def bound_arguments(
    signature: inspect.Signature,
    varkw: str | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """A call's arguments by name, defaults applied, ``**kwargs`` (named ``varkw``) merged."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    if varkw is not None:
        values.update(values.pop(varkw, {}))
    return values


def template_names(template: str, where: str, example: str = "") -> list[str]:
    """The root argument name of every replacement field of format string ``template``
    (``{account.id}`` -> ``account``), in order; :class:`InvalidArgument` (naming ``where``)
    for a string that is not a valid format, or a positional field (``{}``, ``{0}``)."""
    try:
        fields = list(_fields(template))
    except ValueError as exc:
        raise InvalidArgument(f"{where} is not a valid format string: {exc}") from None
    names = []
    for field in fields:
        root = _ROOT_NAME.match(field)
        name = root.group() if root else ""
        if name == "" or name.isdigit():
            hint = f", e.g. {{{example}}}" if example else ""
            raise InvalidArgument(
                f"{where} uses a positional field {{{field}}}: name the argument{hint}"
            )
        names.append(name)
    return names


def _fields(template: str) -> Iterable[str]:
    """Every replacement field of a format string, nested ones included."""
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is not None:
            yield field
            if spec:
                yield from _fields(spec)


def _items_of(spec: object, task: str, option: str) -> list[SpecItem]:
    if spec is None:
        return []
    if isinstance(spec, str) or callable(spec):
        return [spec]
    if isinstance(spec, (list, tuple)):
        for item in spec:
            if not (isinstance(item, str) or callable(item)):
                raise InvalidArgument(
                    f"{task}: every element of {option} must be a template str or a "
                    f"callable, got {item!r}"
                )
        return list(spec)
    raise InvalidArgument(
        f"{task}: {option} must be a template str, a callable, or a list of these; got {spec!r}"
    )


def _paths_of(result: object, task: str, fn: object) -> list[str]:
    if result is None:
        return []
    if isinstance(result, str):
        return [result]
    if isinstance(result, (list, tuple, set, frozenset)) and all(
        isinstance(p, str) for p in result
    ):
        return list(result)
    raise InvalidArgument(
        f"{task}: lock spec {fn!r} returned {result!r}; expected a path, a list of paths, or None"
    )


def task_signature(cls: type) -> inspect.Signature | None:
    """The signature of a task class's body as its callers see it (no ``self``).

    None for a class without a body of its own (an abstract base).
    """
    from celery import Task

    raw = inspect.getattr_static(cls, "run", None)
    if raw is None or raw is inspect.getattr_static(Task, "run"):
        return None
    if isinstance(raw, staticmethod):
        return inspect.signature(raw.__func__)
    if isinstance(raw, classmethod):
        return inspect.signature(raw.__get__(None, cls))
    sig = inspect.signature(raw)
    params = list(sig.parameters.values())
    if params and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        params = params[1:]  # self
    return sig.replace(parameters=params)
