"""A griffe extension for the API reference: methods that a class body makes by a call.

``acquire_read, acquire_write = _pair(...)`` in ``celery_hilok.seed.RedisHiLok`` makes two
methods at import time. griffe reads the source and finds no ``def`` for them, so the
reference would leave them out. This extension imports the class, and each function such a
statement binds (``name = call(...)`` or ``a, b = call(...)``) becomes a method of the
class in the reference, with the signature, ``async`` and docstring it has at run time, in
the place of that statement.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import griffe


def _bound_names(statement: ast.stmt) -> list[str]:
    """The names ``statement`` binds to the result of a call; none for other statements."""
    if not isinstance(statement, ast.Assign) or not isinstance(statement.value, ast.Call):
        return []
    names = []
    for target in statement.targets:
        elements = target.elts if isinstance(target, ast.Tuple) else [target]
        names += [element.id for element in elements if isinstance(element, ast.Name)]
    return names


def _annotation(value: Any, cls: griffe.Class) -> str | griffe.Expr | None:
    if value is inspect.Parameter.empty:
        return None
    text = value if isinstance(value, str) else inspect.formatannotation(value)
    return griffe.safe_get_annotation(ast.parse(text, mode="eval").body, parent=cls) or text


def _method(name: str, runtime: Any, cls: griffe.Class, statement: ast.stmt) -> griffe.Function:
    signature = inspect.signature(runtime)
    parameters = griffe.Parameters(
        *(
            griffe.Parameter(
                parameter.name,
                annotation=_annotation(parameter.annotation, cls),
                kind=griffe.ParameterKind(parameter.kind.description),
                default=None if parameter.default is parameter.empty else repr(parameter.default),
            )
            for parameter in signature.parameters.values()
        )
    )
    method = griffe.Function(
        name,
        lineno=statement.lineno,
        endlineno=statement.end_lineno,
        parameters=parameters,
        returns=_annotation(signature.return_annotation, cls),
    )
    doc = inspect.getdoc(runtime)
    if doc:
        method.docstring = griffe.Docstring(
            doc,
            lineno=statement.lineno,
            parent=method,
            parser=cls.docstring.parser if cls.docstring else None,
            parser_options=cls.docstring.parser_options if cls.docstring else None,
        )
    body = inspect.unwrap(runtime)  # an async context manager's generator function, say
    if inspect.iscoroutinefunction(body) or inspect.isasyncgenfunction(body):
        method.labels.add("async")  # as griffe labels an `async def`
    return method


def _insert(cls: griffe.Class, method: griffe.Function, lineno: int) -> None:
    """Add ``method`` (made at ``lineno``) to ``cls`` before the members after it there."""
    later = [name for name, member in cls.members.items() if (member.lineno or 0) > lineno]
    cls.set_member(method.name, method)
    for name in later:
        cls.members[name] = cls.members.pop(name)


class MadeMethods(griffe.Extension):
    """Functions bound by a call in a class body become the class's methods in the docs."""

    def on_class_members(
        self, *, node: ast.AST | griffe.ObjectNode, cls: griffe.Class, agent: Any, **_: Any
    ) -> None:
        if not isinstance(node, ast.ClassDef):
            return  # an inspected class has them already
        runtime_class: Any = None
        for statement in node.body:
            for name in _bound_names(statement):
                if runtime_class is None:
                    try:
                        runtime_class = griffe.dynamic_import(cls.path)
                    except ImportError as error:
                        griffe.logger.warning("%s: not imported (%s)", cls.path, error)
                        return
                runtime = vars(runtime_class).get(name)
                if inspect.isfunction(runtime):
                    method = _method(name, runtime, cls, statement)
                    _insert(cls, method, statement.lineno)
                    agent.extensions.call("on_instance", node=statement, obj=method, agent=agent)
