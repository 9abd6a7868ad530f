"""Lock metrics: acquire wait, hold time, contention, refusals and lost leases.

Off by default and free when off: the drivers test one module-level tuple for emptiness
before they build an event. Register an :class:`Observer` to turn it on::

    from celery_hilok import metrics

    metrics.add_observer(metrics.PrometheusObserver())      # pip install celery-hilok[metrics]

Every event names the lock by ``path`` and ``mode`` and by a low-cardinality ``prefix``
label: the path's first :func:`prefix_depth` segments (default 1, so ``"tenants"`` for
``tenants/42/invoices/7``). Metrics backends keep one time series per label value, and
paths usually embed ids (a tenant, an account): labelling by the whole path would make a
series per id, unbounded. Raise the depth only where the first segments are a small,
fixed set.

Observers are called synchronously, in the thread (or event loop task) that acquired,
released or found the lease lost, so they must be quick and must not block. An observer
that raises is logged and ignored: metrics never break locking.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec

from ._core import Mode, Request
from ._version import __version__

if TYPE_CHECKING:
    from .errors import LockNotAcquired
    from .lease import Lease
    from .paths import LockPath

__all__ = [
    "Acquired",
    "Lost",
    "Observer",
    "OpenTelemetryObserver",
    "PrometheusObserver",
    "Refused",
    "Released",
    "add_observer",
    "observers",
    "prefix_depth",
    "remove_observer",
    "set_prefix_depth",
]

log = logging.getLogger("celery_hilok")

INSTALL_HINT: Final = "pip install 'celery-hilok[metrics]'"

P = ParamSpec("P")
FoundBy = Literal["refresher", "refresh", "release"]


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acquired:
    """A lock was granted (one event per lease of a multi-lock acquire).

    ``wait`` is the seconds from the start of the acquire to the grant (monotonic clock,
    one round trip when uncontended); ``contended`` is true when the acquire met a
    conflict and had to wait.
    """

    path: str
    mode: Mode
    prefix: str
    wait: float
    contended: bool
    lease: Lease


@dataclass(frozen=True, slots=True)
class Refused:
    """A lock was not granted: :class:`~celery_hilok.LockNotAcquired` was raised.

    ``block`` is false for a ``block=False`` try and true for a timeout; ``wait`` is the
    seconds spent before giving up; ``blocker`` describes who was in the way (its mode,
    path, a 6-character handle prefix and its remaining lease). One event per requested lock.
    """

    path: str
    mode: Mode
    prefix: str
    wait: float
    block: bool
    blocker: str | None


@dataclass(frozen=True, slots=True)
class Released:
    """A lease was released (one event per lease).

    ``hold`` is the seconds from its grant to its release, None when unknown (a lease
    rebuilt in another process, e.g. from a pickle or a Celery message, has no grant time
    there). ``lost`` is true when its lease had run out by the time of the release (the
    release then raised :class:`~celery_hilok.LockLost`). A release of a grant released
    already (through another copy of its lease) sends no event: that grant's release did.
    """

    path: str
    mode: Mode
    prefix: str
    hold: float | None
    lost: bool
    lease: Lease


@dataclass(frozen=True, slots=True)
class Lost:
    """A lease was found gone: one event per :class:`~celery_hilok.Lease` object, the first
    time the library finds it gone.

    ``found_by`` says who noticed: the background ``"refresher"`` (``keep_alive``, the
    context managers, the Celery worker), an explicit ``"refresh"``, or a ``"release"``.
    ``hold`` is the seconds from its grant until it was found lost (None when unknown).
    """

    path: str
    mode: Mode
    prefix: str
    hold: float | None
    found_by: FoundBy
    lease: Lease


class Observer:
    """Receives lock events; override the methods you need (each does nothing here).

    Called synchronously from the thread or task that caused the event: keep them quick.
    Exceptions are logged and swallowed.
    """

    def on_acquired(self, event: Acquired) -> None:
        """A lock was granted."""

    def on_refused(self, event: Refused) -> None:
        """An acquire gave up (``block=False`` conflict or timeout)."""

    def on_released(self, event: Released) -> None:
        """A lease was released."""

    def on_lost(self, event: Lost) -> None:
        """A lease was found gone."""


# -- the registry -----------------------------------------------------------------------------

_observers: tuple[Observer, ...] = ()
"""The registered observers. Replaced, never mutated, so readers need no lock; the drivers
test it for emptiness before doing any work for metrics."""
_registry_lock = threading.Lock()
_prefix_depth = 1


def add_observer(observer: Observer) -> None:
    """Send every lock event of this process to ``observer`` (once, even if added twice)."""
    global _observers
    with _registry_lock:
        if not any(o is observer for o in _observers):
            _observers = (*_observers, observer)


def remove_observer(observer: Observer) -> None:
    """Stop sending events to ``observer``; nothing happens if it was not registered."""
    global _observers
    with _registry_lock:
        _observers = tuple(o for o in _observers if o is not observer)


def observers() -> tuple[Observer, ...]:
    """The observers registered in this process."""
    return _observers


def set_prefix_depth(depth: int) -> None:
    """Label events with the first ``depth`` segments of the path (default 1).

    Keep it low: every distinct prefix is a time series in Prometheus and OpenTelemetry.
    """
    global _prefix_depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        from .errors import InvalidArgument

        raise InvalidArgument(f"prefix depth must be an int >= 1, got {depth!r}")
    _prefix_depth = depth


def prefix_depth() -> int:
    """How many leading path segments make the ``prefix`` label."""
    return _prefix_depth


def prefix_of(path: LockPath) -> str:
    """The ``prefix`` label of ``path``: its first :func:`prefix_depth` segments."""
    return path.separator.join(path.segments[:_prefix_depth])


# -- what the drivers call (only when ``_observers`` is not empty) ------------------------


def _quiet(func: Callable[P, None]) -> Callable[P, None]:
    """Metrics never break locking: log whatever goes wrong in ``func`` and carry on."""

    @functools.wraps(func)
    def quiet(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            func(*args, **kwargs)
        except Exception:
            log.exception("lock metrics: %s failed", func.__name__)

    return quiet


def _hold(lease: Lease, now: float) -> float | None:
    return None if lease.granted_at is None else max(0.0, now - lease.granted_at)


def _dispatch(method: str, event: object) -> None:
    for observer in _observers:
        try:
            getattr(observer, method)(event)
        except Exception:
            log.exception("metrics observer %r failed in %s", observer, method)


@_quiet
def acquired(leases: Sequence[Lease]) -> None:
    for lease in leases:
        p = lease.request.path
        event = Acquired(
            p.text,
            lease.mode,
            prefix_of(p),
            lease.waited or 0.0,
            bool(lease.contended),
            lease,
        )
        _dispatch("on_acquired", event)


@_quiet
def refused(
    requests: Sequence[Request], started: float, block: bool, error: LockNotAcquired
) -> None:
    wait = max(0.0, time.monotonic() - started)
    for request in requests:
        p = request.path
        event = Refused(p.text, request.mode, prefix_of(p), wait, block, error.blocker)
        _dispatch("on_refused", event)


@_quiet
def released(leases: Sequence[Lease], lost: Sequence[bool]) -> None:
    now = time.monotonic()
    for lease, ran_out in zip(leases, lost, strict=True):
        p = lease.request.path
        event = Released(p.text, lease.mode, prefix_of(p), _hold(lease, now), ran_out, lease)
        _dispatch("on_released", event)


@_quiet
def lost(lease: Lease, found_by: FoundBy) -> None:
    p = lease.request.path
    event = Lost(p.text, lease.mode, prefix_of(p), _hold(lease, time.monotonic()), found_by, lease)
    _dispatch("on_lost", event)


# -- Prometheus -------------------------------------------------------------------------------

WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
HOLD_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


class PrometheusObserver(Observer):
    """Lock metrics as ``prometheus_client`` collectors (``pip install celery-hilok[metrics]``).

    Registers, in ``registry`` (default: prometheus_client's global ``REGISTRY``), with
    the labels ``prefix`` and ``mode``:

    - ``<namespace>_acquire_wait_seconds`` (histogram): acquire start to grant;
    - ``<namespace>_hold_seconds`` (histogram): grant to release, for leases released while
      held and whose grant time is known;
    - ``<namespace>_acquired_total``, ``<namespace>_released_total``;
    - ``<namespace>_contended_total``: acquires that met a conflict (granted after waiting,
      or refused);
    - ``<namespace>_refused_total``: ``LockNotAcquired`` (``block=False`` or timeout);
    - ``<namespace>_lost_total``: leases found gone before their release.

    Make one per process and registry (a second one on the same registry raises
    prometheus_client's "Duplicated timeseries" error), then :func:`add_observer` it.
    """

    def __init__(self, registry: Any = None, namespace: str = "hilok") -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ImportError(
                f"PrometheusObserver needs prometheus_client: {INSTALL_HINT}"
            ) from exc
        registry = prom.REGISTRY if registry is None else registry
        labels = ("prefix", "mode")

        def counter(name: str, doc: str) -> Any:
            return prom.Counter(f"{namespace}_{name}", doc, labels, registry=registry)

        self.wait = prom.Histogram(
            f"{namespace}_acquire_wait_seconds",
            "Seconds from the start of an acquire to the grant.",
            labels,
            registry=registry,
            buckets=WAIT_BUCKETS,
        )
        self.hold = prom.Histogram(
            f"{namespace}_hold_seconds",
            "Seconds a lock was held, from its grant to its release.",
            labels,
            registry=registry,
            buckets=HOLD_BUCKETS,
        )
        self.acquired = counter("acquired", "Locks granted.")
        self.released = counter("released", "Leases released.")
        self.contended = counter("contended", "Acquires that met a conflict (waited or refused).")
        self.refused = counter("refused", "Acquires that gave up (block=False or timeout).")
        self.lost = counter("lost", "Leases found gone before their release.")

    def on_acquired(self, event: Acquired) -> None:
        self.wait.labels(event.prefix, event.mode).observe(event.wait)
        self.acquired.labels(event.prefix, event.mode).inc()
        if event.contended:
            self.contended.labels(event.prefix, event.mode).inc()

    def on_refused(self, event: Refused) -> None:
        self.refused.labels(event.prefix, event.mode).inc()
        self.contended.labels(event.prefix, event.mode).inc()

    def on_released(self, event: Released) -> None:
        self.released.labels(event.prefix, event.mode).inc()
        if event.hold is not None and not event.lost:
            self.hold.labels(event.prefix, event.mode).observe(event.hold)

    def on_lost(self, event: Lost) -> None:
        self.lost.labels(event.prefix, event.mode).inc()


# -- OpenTelemetry ----------------------------------------------------------------------------


class OpenTelemetryObserver(Observer):
    """Lock metrics as OpenTelemetry instruments (``pip install celery-hilok[metrics]``).

    The same metrics as :class:`PrometheusObserver` (``hilok.acquire.wait``,
    ``hilok.hold`` histograms in seconds; ``hilok.acquired``, ``hilok.released``,
    ``hilok.contended``, ``hilok.refused``, ``hilok.lost`` counters), with the attributes
    ``hilok.prefix`` and ``hilok.mode``. ``meter`` defaults to the global meter provider's
    meter ``"celery_hilok"``: configure the OpenTelemetry SDK (a ``MeterProvider`` with
    an exporter) for them to go anywhere.
    """

    def __init__(self, meter: Any = None) -> None:
        try:
            from opentelemetry import metrics as otel
        except ImportError as exc:
            raise ImportError(
                f"OpenTelemetryObserver needs opentelemetry-api: {INSTALL_HINT}"
            ) from exc

        meter = otel.get_meter("celery_hilok", __version__) if meter is None else meter
        self.wait = meter.create_histogram(
            "hilok.acquire.wait", unit="s", description="Acquire start to grant."
        )
        self.hold = meter.create_histogram(
            "hilok.hold", unit="s", description="Grant to release of a lease."
        )
        self.acquired = meter.create_counter("hilok.acquired", description="Locks granted.")
        self.released = meter.create_counter("hilok.released", description="Leases released.")
        self.contended = meter.create_counter(
            "hilok.contended", description="Acquires that met a conflict (waited or refused)."
        )
        self.refused = meter.create_counter(
            "hilok.refused", description="Acquires that gave up (block=False or timeout)."
        )
        self.lost = meter.create_counter(
            "hilok.lost", description="Leases found gone before their release."
        )

    @staticmethod
    def _attributes(prefix: str, mode: str) -> dict[str, str]:
        return {"hilok.prefix": prefix, "hilok.mode": mode}

    def on_acquired(self, event: Acquired) -> None:
        attributes = self._attributes(event.prefix, event.mode)
        self.wait.record(event.wait, attributes)
        self.acquired.add(1, attributes)
        if event.contended:
            self.contended.add(1, attributes)

    def on_refused(self, event: Refused) -> None:
        attributes = self._attributes(event.prefix, event.mode)
        self.refused.add(1, attributes)
        self.contended.add(1, attributes)

    def on_released(self, event: Released) -> None:
        attributes = self._attributes(event.prefix, event.mode)
        self.released.add(1, attributes)
        if event.hold is not None and not event.lost:
            self.hold.record(event.hold, attributes)

    def on_lost(self, event: Lost) -> None:
        self.lost.add(1, self._attributes(event.prefix, event.mode))
