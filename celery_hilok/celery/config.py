"""Settings of the Celery integration: the ``hilok_*`` keys of ``app.conf`` and their defaults.

Every task option (``hilok_on_contention``, ``hilok_ttl``, ...) can be set per task, as an
argument of ``@app.task`` or an attribute of a task class; a task that leaves it unset
(``None``) takes the app's setting of the same name, and an app that leaves it unset takes
the default below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .._redis import redact_url
from ..errors import InvalidArgument

__all__ = [
    "APP_SETTINGS",
    "DEFAULTS",
    "ON_DUPLICATE",
    "POLICIES",
    "TASK_OPTIONS",
    "check_task_option",
    "redis_url",
    "setting",
]

POLICIES: Final = ("park", "retry", "wait", "fail", "skip")
"""What a task does when its locks are taken: see :class:`~celery_hilok.HiLokTask`."""

ON_DUPLICATE: Final = ("return", "raise")
"""What publishing a unique task does while an identical call is queued or running."""

TASK_OPTIONS: Final[Mapping[str, Any]] = {
    "hilok_on_contention": "park",
    "hilok_timeout": None,  # "park", "wait": seconds to wait; None waits as long as it takes
    "hilok_ttl": 30.0,  # lease of a running task's locks, refreshed while it runs
    "hilok_refresh_interval": None,  # seconds between refreshes; None: a third of the ttl
    "hilok_keep": False,
    "hilok_keep_ttl": 300.0,  # lease of locks handed over while the next message waits
    "hilok_retry_backoff": 1.0,  # first contention retry after about this many seconds
    "hilok_retry_backoff_max": 60.0,
    "hilok_retry_jitter": True,
    "hilok_max_retries": 100,  # contention retries; None: no limit
    "hilok_unique_on_duplicate": "return",  # hilok_unique: "return" its result, or "raise"
    "hilok_unique_ttl": 86400.0,  # hilok_unique: longest life of a claim, past any countdown
}
"""Options a task may set for itself, with the defaults used when neither it nor the app do."""

APP_SETTINGS: Final[Mapping[str, Any]] = {
    "hilok_redis_url": None,  # None: the broker URL, if the broker is Redis
    "hilok_redis_options": None,  # extra keyword arguments of redis.Redis.from_url
    "hilok_namespace": "hilok",
    "hilok_separator": "/",
    "hilok_metrics": False,  # True/"prometheus", "opentelemetry" or both: observers per worker
    "hilok_metrics_prefix_depth": 1,  # path segments in the metrics' "prefix" label
    "hilok_wait_replicas": 0,  # replicas that must acknowledge each grant (Redis WAIT)
    "hilok_wait_timeout": 1.0,  # seconds an acquire waits for those acknowledgements
}
"""Settings that only the app sets: one lock client per worker process serves all tasks."""

DEFAULTS: Final[Mapping[str, Any]] = {**APP_SETTINGS, **TASK_OPTIONS}

_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", "sentinel://")
_SOCKET_SCHEMES: Final = ("redis+socket://", "socket://")


def setting(conf: Any, name: str) -> Any:
    """The app's value of ``name`` (a key of :data:`DEFAULTS`), or its default."""
    value = conf.get(name)
    return DEFAULTS[name] if value is None else value


def redis_url(conf: Any) -> str:
    """The Redis URL of the locks: ``hilok_redis_url``, else the broker's when it is Redis.

    Kombu's unix-socket form (``redis+socket:///path?virtual_host=1``) becomes redis-py's
    (``unix:///path?db=1``); of a failover list (``"redis://a;redis://b"``) the first URL
    is taken. Raises :class:`InvalidArgument` when neither names a Redis server.
    """
    explicit = conf.get("hilok_redis_url")
    if explicit:
        if not isinstance(explicit, str) or not explicit.startswith(_REDIS_SCHEMES):
            raise InvalidArgument(
                f"hilok_redis_url must be a redis://, rediss://, unix:// or sentinel:// URL, "
                f"got {_redact(explicit)}"
            )
        return explicit
    broker = conf.get("broker_url")
    if isinstance(broker, (list, tuple)):
        broker = broker[0] if broker else None
    if isinstance(broker, str) and broker.strip().startswith("sentinel://"):
        master = (conf.get("broker_transport_options") or {}).get("master_name")
        url = broker.strip()
        if master and "master_name=" not in url:
            url += ("&" if "?" in url.rsplit(";", 1)[-1] else "?") + f"master_name={master}"
        return url
    if isinstance(broker, str):
        first = broker.split(";")[0].strip()
        if first.startswith(_REDIS_SCHEMES):
            return first
        for scheme in _SOCKET_SCHEMES:
            if first.startswith(scheme):
                return "unix://" + first[len(scheme) :].replace("virtual_host=", "db=")
    raise InvalidArgument(
        "set hilok_redis_url in the Celery config: the broker "
        f"({_redact(broker)}) is not a Redis server, so the locks cannot live there"
    )


def check_task_option(name: str, value: Any, where: str) -> None:
    """Raise :class:`InvalidArgument` if ``value`` is not valid for task option ``name``."""
    if value is None:
        return
    if name == "hilok_on_contention":
        if value not in POLICIES:
            raise InvalidArgument(
                f"{where}: hilok_on_contention must be one of {', '.join(POLICIES)}; got {value!r}"
            )
    elif name == "hilok_unique_on_duplicate":
        if value not in ON_DUPLICATE:
            raise InvalidArgument(
                f"{where}: hilok_unique_on_duplicate must be one of {', '.join(ON_DUPLICATE)}; "
                f"got {value!r}"
            )
    elif name in ("hilok_keep", "hilok_retry_jitter"):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{where}: {name} must be True or False, got {value!r}")
    elif name == "hilok_max_retries":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{where}: {name} must be an int >= 0 or None, got {value!r}")
    elif name == "hilok_timeout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InvalidArgument(f"{where}: {name} must be seconds >= 0 or None, got {value!r}")
    elif name in TASK_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidArgument(f"{where}: {name} must be seconds > 0, got {value!r}")
    else:
        known = ", ".join(sorted([*TASK_OPTIONS, "hilok_read", "hilok_write", "hilok_unique"]))
        raise InvalidArgument(f"{where}: unknown option {name!r}; known options: {known}")


def _redact(url: object) -> str:
    """A broker URL fit for an error message: no password (of any URL of a list)."""
    return redact_url(url) if isinstance(url, str) else repr(url)
