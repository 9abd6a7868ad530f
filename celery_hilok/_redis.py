"""Small helpers around redis-py shared by the sync and asyncio drivers (no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import HiLokConnectionError, HiLokError, InvalidArgument

#: Options for clients that celery_hilok builds from a URL: never hang on a dead server.
DEFAULT_CLIENT_OPTIONS: Mapping[str, Any] = {
    "socket_timeout": 10.0,
    "socket_connect_timeout": 5.0,
    "health_check_interval": 30,
}

_SCHEMES = ("redis://", "rediss://", "unix://")

MAX_CONNECTIONS = 1024
"""Most connections in the pool of a client celery_hilok builds from a URL (redis-py's own
default, 100, fails a 101st concurrent call). A plain pool, not a blocking one: with 32
concurrent asyncio callers redis-py's BlockingConnectionPool costs about a third of the
rate of script calls."""


def fast_packing(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` packing commands with hiredis (redis-py's asyncio connections
    pack in pure Python, which dominates the cost of a script call with many keys)."""
    try:
        import hiredis
    except ImportError:  # pragma: no cover - hiredis is a dependency
        return connection_class
    pack = hiredis.pack_command

    class HiredisPacking(connection_class):  # type: ignore[misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            first = args[0]
            if isinstance(first, str):
                args = (*first.encode().split(), *args[1:])
            elif b" " in first:
                args = (*first.split(), *args[1:])
            try:
                return [pack(args)]
            except TypeError:  # an argument hiredis cannot pack: let redis-py do it
                result: list[bytes] = super().pack_command(*args)
                return result

    HiredisPacking.__name__ = HiredisPacking.__qualname__ = f"Hiredis{connection_class.__name__}"
    return HiredisPacking


def check_url(url: str) -> str:
    if not url.startswith(_SCHEMES):
        raise InvalidArgument(
            f"Redis URL must start with redis://, rediss:// or unix://, got {url!r}"
        )
    return url


def describe_server(client: Any) -> str:
    """``host:port`` (or socket path) of a redis-py client, for error messages."""
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:
        nodes = getattr(client, "startup_nodes", None)
        if nodes:
            return "cluster " + ",".join(f"{n.host}:{n.port}" for n in nodes[:3])
        return repr(client)
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def translate(error: RedisError, server: str, operation: str) -> HiLokError:
    """The celery_hilok error for a redis-py error raised during ``operation``."""
    if isinstance(error, (RedisConnectionError, RedisTimeoutError)):
        return HiLokConnectionError(
            f"Redis at {server} failed during {operation}: {type(error).__name__}: {error}"
        )
    return HiLokError(f"Redis at {server} refused {operation}: {type(error).__name__}: {error}")
