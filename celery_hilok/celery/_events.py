"""Lock state in Celery's task events, and the metrics observers a worker installs.

A worker that sends task events (``celery worker -E``, ``worker_send_task_events``, or
``celery control enable_events``, which Flower sends) also gets a ``task-hilok`` event at
each step of a task's locks, so a monitor shows why a task waited, retried or was skipped.
The worker's main process decides per message whether events are on (its
:class:`~celery_hilok.celery.HiLokRequest` sees the worker's event dispatcher) and tells
the process that runs the task through the request (:data:`EVENTS_FLAG`).

Every field is prefixed ``hilok_``: Celery's event state (and Flower) merges the fields of
a task's events into one task record, where they must not shadow ``state`` or ``result``.
Handles are bearer secrets, so events carry only their first 6 characters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

from .. import metrics
from ..errors import InvalidArgument
from ..lease import Lease
from .config import setting

__all__ = [
    "EVENTS_FLAG",
    "EVENT_TYPE",
    "WORKER_KEY",
    "install_metrics",
    "lock_fields",
    "send_task_event",
    "worker_name",
]

log = logging.getLogger("celery_hilok.celery")

EVENT_TYPE: Final = "task-hilok"
EVENTS_FLAG: Final = "hilok_events"
"""Request key set (by the worker's main process) when the worker sends task events."""
WORKER_KEY: Final = "hilok_worker"
"""Request key with the worker's node name, set by the worker's main process."""


def worker_name(request: Any) -> str | None:
    """The node name of the worker running ``request`` (the threads pool's own
    ``request.hostname`` is the machine's name, not the worker's)."""
    return getattr(request, WORKER_KEY, None) or getattr(request, "hostname", None)


HANDLE_PREFIX: Final = 6


def lock_fields(leases: Sequence[Lease]) -> list[dict[str, Any]]:
    """JSON-ready description of ``leases``: path, mode, token, a handle prefix."""
    return [
        {
            "path": lease.path,
            "mode": lease.mode,
            "token": lease.token,
            "handle": lease.handle[:HANDLE_PREFIX],
        }
        for lease in leases
    ]


def send_task_event(app: Any, task_id: str | None, hostname: str | None, **fields: Any) -> None:
    """Send a ``task-hilok`` event for ``task_id``; never raises (monitoring is best effort).

    Not retried when the broker is unreachable: the caller may be the refresher thread,
    which must not stall on it.
    """
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(EVENT_TYPE, uuid=task_id, **fields)
    except Exception as exc:
        log.debug("could not send %s for %s: %s", EVENT_TYPE, task_id, exc)


# -- metrics observers of a worker --------------------------------------------------------

_installed: dict[str, metrics.Observer] = {}
"""The observers installed by ``hilok_metrics`` in this process (inherited through fork)."""
_KINDS: Final = ("prometheus", "opentelemetry")


def metrics_kinds(value: Any) -> list[str]:
    """The observers ``hilok_metrics`` asks for: False/None none, True ``["prometheus"]``."""
    if value is None or value is False:
        return []
    if value is True:
        return ["prometheus"]
    kinds = [value] if isinstance(value, str) else list(value)
    for kind in kinds:
        if kind not in _KINDS:
            raise InvalidArgument(
                f"hilok_metrics must be True, False, 'prometheus', 'opentelemetry' or a list "
                f"of them; got {value!r}"
            )
    return kinds


def install_metrics(conf: Any) -> list[metrics.Observer]:
    """Register the observers ``hilok_metrics`` names, once per process; the ones active."""
    kinds = metrics_kinds(setting(conf, "hilok_metrics"))
    if not kinds:
        return []
    metrics.set_prefix_depth(int(setting(conf, "hilok_metrics_prefix_depth")))
    active = []
    for kind in kinds:
        observer = _installed.get(kind)
        if observer is None:
            observer = (
                metrics.PrometheusObserver()
                if kind == "prometheus"
                else metrics.OpenTelemetryObserver()
            )
            _installed[kind] = observer
        metrics.add_observer(observer)
        active.append(observer)
    return active
