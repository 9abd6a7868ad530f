"""Small helpers around redis-py shared by the sync and asyncio drivers (no I/O here)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from redis.backoff import ExponentialBackoff
from redis.connection import Connection, ConnectionPool
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import HiLokConnectionError, HiLokError, InvalidArgument

#: Options for clients that celery_hilok builds from a URL: never hang on a dead server.
DEFAULT_CLIENT_OPTIONS: Mapping[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 5.0,
    "health_check_interval": 30,
}

_SCHEMES = ("redis://", "rediss://", "unix://")

RETRIES = 1
"""Retries of a call that failed on a connection error or a timeout, for clients built from a
URL (redis-py 8's own default, 10 with backoff, lets a server that stopped answering hold a
caller for a minute or more: with this one, a call gives up after about two socket
timeouts)."""

MAX_CONNECTIONS = 1024
"""Most connections in the pool of a client celery_hilok builds from a URL (redis-py's own
default, 100, fails a 101st concurrent call). A plain pool, not a blocking one: with 32
concurrent asyncio callers redis-py's BlockingConnectionPool costs about a third of the
rate of script calls."""


SMALL_WRITE: Final = 16384
"""Bytes of a command (or pipeline) below which a send on an idle connection cannot wait:
see :func:`fast_connection`."""


def _hiredis_pack() -> Any:
    """hiredis's ``pack_command``, or None without hiredis."""
    try:
        import hiredis
    except ImportError:  # pragma: no cover - hiredis is a dependency
        return None
    return hiredis.pack_command


def _split_name(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with a command name of several words (``"FUNCTION LOAD"``) split, as
    redis-py's packers do."""
    first = args[0]
    if isinstance(first, str):
        return (*first.encode().split(), *args[1:])
    if b" " in first:
        return (*first.split(), *args[1:])
    return args


def fast_packing(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` (of ``redis``) that packs a command with one call of hiredis.

    redis-py's own hiredis packer first copies every argument through a generator (to turn
    a ``memoryview`` into ``bytes``), which costs twice what hiredis's packing does: some
    15 microseconds for a depth-8 acquire's 86 arguments. Ours are all ``str`` and ``int``;
    anything hiredis refuses goes to redis-py's packer as before."""
    pack = _hiredis_pack()
    if pack is None:  # pragma: no cover - hiredis is a dependency
        return connection_class

    class Packer:
        __slots__ = ("fallback",)

        def __init__(self, fallback: Any) -> None:
            self.fallback = fallback

        def pack(self, *args: Any) -> list[bytes]:
            args = _split_name(args)
            try:
                return [pack(args)]
            except TypeError:
                result: list[bytes] = self.fallback.pack(*args)
                return result

    class FastPacking(connection_class):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            packer = getattr(self, "_command_packer", None)  # (redis-py's, since 4.4)
            if packer is not None and type(packer).__name__ == "HiredisRespSerializer":
                self._command_packer = Packer(packer)

    FastPacking.__name__ = FastPacking.__qualname__ = f"Fast{connection_class.__name__}"
    return FastPacking


def fast_connection(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` (of ``redis.asyncio``) with a cheaper way to send a command.

    It packs commands with hiredis (redis-py's asyncio connections pack in pure Python, which
    dominates the cost of a script call with many keys). And it sends a small command
    without ``asyncio.wait_for``: with a ``socket_timeout``, redis-py wraps every send in
    one, which on Python before 3.12 starts a task and costs more client time than the
    round trip itself. A connection checked out of the pool has no reply pending and
    nothing left in its send buffers, so a write far below asyncio's high-water mark
    (64 KiB) completes at once, server or no server; the reply's read keeps its timeout,
    and so does the send of anything larger."""
    pack = _hiredis_pack()

    class FastConnection(connection_class):  # type: ignore[misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            if pack is not None:
                args = _split_name(args)
                try:
                    return [pack(args)]
                except TypeError:  # an argument hiredis cannot pack: let redis-py do it
                    pass
            result: list[bytes] = super().pack_command(*args)
            return result

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            timeout: float | None = getattr(self, "socket_timeout", None)
            small = isinstance(command, list) and sum(map(len, command)) < SMALL_WRITE
            if not (timeout and small and self.is_connected):
                await super().send_packed_command(command, check_health)
                return
            if check_health:
                await self.check_health()  # (its PING keeps the timeout)
            self.socket_timeout = None
            try:
                await super().send_packed_command(command, False)
            finally:
                self.socket_timeout = timeout

    FastConnection.__name__ = FastConnection.__qualname__ = f"Fast{connection_class.__name__}"
    return FastConnection


def check_url(url: str) -> str:
    """``url`` if redis-py can build a client from it; raises :class:`InvalidArgument` (a
    message without the URL's password) for another scheme, a bad port, database or option."""
    if not url.startswith(_SCHEMES):
        raise InvalidArgument(
            "Redis URL must start with redis://, rediss://, unix:// or sentinel://, "
            f"got {redact_url(url)!r}"
        )
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    try:
        options = parse_url(url)  # type: ignore[no-untyped-call]
        db = urlsplit(url).path.strip("/") if not url.startswith("unix://") else ""
    except ValueError as exc:
        raise InvalidArgument(f"bad Redis URL {redact_url(url)!r}: {exc}") from None
    if db and not db.isdigit():
        raise InvalidArgument(
            f"bad Redis URL {redact_url(url)!r}: the database must be a number, got {db!r}"
        )
    # redis-py passes unknown query parameters on to the connection, which fails later
    # with a TypeError at the first command: refuse them here instead.
    unknown = sorted(set(options) - _url_options(options.get("connection_class", Connection)))
    if unknown:
        raise InvalidArgument(
            f"bad Redis URL {redact_url(url)!r}: unknown parameter(s) {', '.join(unknown)}"
        )
    return url


def _url_options(connection_class: type[Any]) -> set[str]:
    """Names a URL's query may set: the keyword arguments of the pool and connection."""
    import inspect

    names = {"connection_class"}
    for klass in (ConnectionPool, *connection_class.__mro__):
        init = vars(klass).get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names


def redact_url(url: str) -> str:
    """``url`` (or each URL of a ``;`` list) with its credentials replaced by ``***``, for
    messages and logs."""
    return re.sub(r"//[^/@;]*@", "//***@", url)


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def split_cluster_url(url: str) -> tuple[str, bool]:
    """``(url, cluster)``: a ``redis://`` or ``rediss://`` URL with ``cluster=true`` in its
    query names a Redis Cluster (any node; the client discovers the others). The parameter is
    removed from the URL returned, which redis-py's ``RedisCluster.from_url`` then takes."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [value.lower() for name, value in query if name == "cluster"]
    if not flags:
        return url, False
    if any(flag not in _TRUE + _FALSE for flag in flags):
        raise InvalidArgument(
            f"cluster= in a Redis URL must be true or false, got {redact_url(url)!r}"
        )
    cluster = flags[-1] in _TRUE
    rest = [(name, value) for name, value in query if name != "cluster"]
    stripped = urlunsplit(parts._replace(query=urlencode(rest)))
    if cluster:
        if parts.scheme not in ("redis", "rediss"):
            raise InvalidArgument(
                f"a Redis Cluster URL must be redis:// or rediss://host:port, "
                f"got {redact_url(url)!r}"
            )
        db = parts.path.strip("/")
        if db not in ("", "0") or any(name == "db" and v != "0" for name, v in rest):
            raise InvalidArgument(f"Redis Cluster has only database 0, got {redact_url(url)!r}")
    return stripped, cluster


def describe_server(client: Any) -> str:
    """``host:port`` (or socket path) of a redis-py client, for error messages."""
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:
        kwargs = {}
    service = getattr(getattr(client, "connection_pool", None), "service_name", None)
    if service:
        return f"sentinel master {service}"
    if not kwargs:
        nodes = getattr(client, "startup_nodes", None)
        if nodes:
            return "cluster " + ",".join(f"{n.host}:{n.port}" for n in nodes[:3])
        return repr(client)
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def translate(error: RedisError, server: str, operation: str) -> HiLokError:
    """The celery_hilok error for a redis-py error raised during ``operation``.

    Connection failures and timeouts become :class:`HiLokConnectionError`; a refusal says
    why in the user's terms (credentials, ACL, a read-only replica, memory, a foreign key of
    the wrong type in the namespace) before Redis's own words.
    """
    detail = f"{type(error).__name__}: {error}"
    if isinstance(error, AuthenticationError):
        return HiLokConnectionError(
            f"Redis at {server} rejected the credentials during {operation} (wrong or "
            f"missing username/password in the URL or options): {detail}"
        )
    if isinstance(error, (RedisConnectionError, RedisTimeoutError)):
        return HiLokConnectionError(f"Redis at {server} failed during {operation}: {detail}")
    text = str(error)
    why = ""
    if isinstance(error, NoPermissionError) or "user executing the script can't" in text:
        why = (
            " because its ACL does not allow a command, key or channel celery_hilok needs "
            "(see 'Minimal Redis ACL' in docs/operations.md)"
        )
    elif isinstance(error, ReadOnlyError) or text.startswith("READONLY"):
        why = " because it is a read-only replica: point celery_hilok at the master"
    elif isinstance(error, OutOfMemoryError) or text.startswith("OOM"):
        why = " because it is out of memory (maxmemory): nothing was granted or extended"
    elif text.startswith("WRONGTYPE"):
        why = (
            " because a key under the lock namespace holds a value of another type (was it "
            "written by something else?)"
        )
    return HiLokError(f"Redis at {server} refused {operation}{why}: {detail}")


def waker_log_level(error: BaseException) -> int:
    """How loudly to log a failure of the wake-up (pub/sub) connection: an ACL refusing
    SUBSCRIBE is a warning (blocked acquires then poll, up to 2 s late); a drop is routine."""
    if isinstance(error, NoPermissionError) or "no permissions" in str(error):
        return logging.WARNING
    return logging.DEBUG


SENTINEL_SCHEME = "sentinel://"


def parse_sentinel_url(url: str, options: Mapping[str, Any]) -> tuple[Any, ...]:
    """``(sentinels, master_name, sentinel_kwargs, connection_kwargs)`` of a kombu-style
    ``sentinel://[[user]:password@]host:port[;sentinel://host2:port2...][/db][?master_name=x]``
    URL; ``master_name`` and ``sentinel_kwargs`` may also come from ``options``."""
    from urllib.parse import parse_qs, unquote, urlsplit

    hosts: list[tuple[str, int]] = []
    conn: dict[str, Any] = {}
    master = options.get("master_name")
    for part in url.split(";"):
        part = part.strip()
        if not part.startswith(SENTINEL_SCHEME):
            raise InvalidArgument(f"every URL of a sentinel list must be sentinel://, got {part!r}")
        try:
            parts = urlsplit(part)
            host, port = parts.hostname, parts.port or 26379
        except ValueError as exc:
            raise InvalidArgument(f"bad sentinel URL {part!r}: {exc}") from None
        if not host:
            raise InvalidArgument(f"sentinel URL without a host: {part!r}")
        hosts.append((host, port))
        if parts.password is not None:
            conn["password"] = unquote(parts.password)
        if parts.username:
            conn["username"] = unquote(parts.username)
        db = parts.path.strip("/")
        if db:
            if not db.isdigit():
                raise InvalidArgument(f"sentinel URL database must be a number, got {db!r}")
            conn["db"] = int(db)
        for name, values in parse_qs(parts.query).items():
            if name == "master_name":
                master = values[-1]
            elif name in ("db", "virtual_host") and values[-1].isdigit():
                conn["db"] = int(values[-1])
            else:
                raise InvalidArgument(f"unknown sentinel URL parameter {name!r} in {part!r}")
    if not master:
        raise InvalidArgument(
            "a sentinel:// URL needs the master's name: add ?master_name=NAME to the URL "
            "or pass redis_options={'master_name': NAME}"
        )
    extra = {k: v for k, v in options.items() if k not in ("master_name", "sentinel_kwargs")}
    return hosts, master, dict(options.get("sentinel_kwargs") or {}), {**conn, **extra}


def sentinel_client(url: str, options: Mapping[str, Any], sentinel_class: type[Any]) -> Any:
    """A client on the current master of a Sentinel-monitored group (``sentinel_class`` is
    ``redis.sentinel.Sentinel`` or its asyncio twin). It finds the master again when a
    connection breaks or the old master turns replica after a failover."""
    hosts, master, sentinel_kwargs, conn = parse_sentinel_url(url, options)
    kwargs = {**DEFAULT_CLIENT_OPTIONS, "max_connections": MAX_CONNECTIONS, **conn}
    kwargs.pop("timeout", None)
    for name in ("socket_timeout", "socket_connect_timeout"):
        sentinel_kwargs.setdefault(name, kwargs[name])
    sentinel = sentinel_class(hosts, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(master, **kwargs)


def eviction_warning(policy: object, server: str) -> str | None:
    """The warning to log for a ``maxmemory-policy`` that can evict lock keys, if any."""
    text = policy.decode() if isinstance(policy, bytes) else str(policy)
    if text == "noeviction":
        return None
    return (
        f"Redis at {server} has maxmemory-policy {text!r}: under memory pressure it may "
        "evict lock keys, and a lock held by one client could then be granted to another. "
        "Use maxmemory-policy noeviction for the database that holds the locks."
    )


class ClientKind(NamedTuple):
    """The redis-py classes of one driver (``redis`` or ``redis.asyncio``)."""

    name: str
    redis: type[Any]
    cluster: type[Any]
    pool: type[Any]
    sentinel: type[Any]
    retry: type[Any]
    hiredis_packing: bool  # redis.asyncio, which packs in pure Python (else: redis)


def client_kind(asyncio: bool) -> ClientKind:
    """The classes of the asyncio driver, or of the synchronous one."""
    if asyncio:
        import redis.asyncio as aredis
        from redis.asyncio.retry import Retry as AsyncRetry

        return ClientKind(
            "redis.asyncio", aredis.Redis, aredis.RedisCluster, aredis.ConnectionPool,
            aredis.sentinel.Sentinel, AsyncRetry, True,
        )  # fmt: skip
    import redis
    import redis.sentinel
    from redis.retry import Retry

    return ClientKind(
        "redis", redis.Redis, redis.RedisCluster, redis.ConnectionPool, redis.sentinel.Sentinel,
        Retry, False,
    )  # fmt: skip


def make_client(target: object, options: Mapping[str, Any] | None, kind: ClientKind) -> Any:
    """The client of a lock client: ``target`` itself if it is a client of ``kind``, else one
    built from the URL ``target`` (retrying a failed call :data:`RETRIES` times)."""
    if isinstance(target, str) and target.startswith(SENTINEL_SCHEME):
        return sentinel_client(target, options or {}, kind.sentinel)
    if isinstance(target, str):
        kwargs = {"max_connections": MAX_CONNECTIONS, **DEFAULT_CLIENT_OPTIONS, **(options or {})}
        url, cluster = split_cluster_url(target)
        check_url(url)
        retry = kind.retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES)
        if cluster:
            return kind.cluster.from_url(url, retry=retry, **kwargs)
        # The Retry goes to the pool, whose connections use it: redis-py ignores a retry=
        # given to a client beside its connection_pool.
        pool = kind.pool.from_url(url, retry=retry, **kwargs)
        if pool.connection_kwargs.get("encoding", "utf-8") == "utf-8":
            fast = fast_connection if kind.hiredis_packing else fast_packing
            pool.connection_class = fast(pool.connection_class)
        built = kind.redis(connection_pool=pool, retry=retry)
        built.auto_close_connection_pool = True  # as Redis.from_pool does
        return built
    if isinstance(target, (kind.redis, kind.cluster)):
        return target
    raise InvalidArgument(
        f"expected a Redis URL or a {kind.name}.Redis / {kind.name}.RedisCluster client, "
        f"got {target!r}"
    )
