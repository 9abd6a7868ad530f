"""Bad input and faults: each row of the table in docs/operations.md ("Bad input and faults").

Every test checks three things against real redis-server processes: the exact exception
class (``InvalidArgument``, a ``ValueError``, for bad arguments; ``HiLokConnectionError`` when
Redis cannot be reached; another ``HiLokError`` when Redis refuses; never a raw redis-py
error, never a hang), a message that says what is wrong, and that nothing is left locked or
lost afterwards: no lock keys under the namespace, a writer on the tree's root gets in at
once, and a lease held before the fault is still held.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import time
import unicodedata
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import redis
from celery import Celery
from redis.crc import key_slot

from celery_hilok import (
    AsyncHiLok,
    HiLok,
    HiLokConnectionError,
    HiLokError,
    HiLokTask,
    InvalidArgument,
    Lease,
    LockLost,
    LockNotAcquired,
    RedisHiLok,
)
from celery_hilok._core import MAX_LOCKS, Mode
from celery_hilok.celery.config import redis_url as celery_redis_url
from celery_hilok.paths import MAX_DEPTH, MAX_PATH_LENGTH
from tests._redis import RedisServer, free_port

NO_HANG = 15.0  # seconds: a generous upper bound, only to prove that nothing hangs
SECRET = "s3cret-pw"


@pytest.fixture
def hl(redis_url: str, namespace: str) -> Iterator[HiLok]:
    engine = HiLok(redis_url, namespace=namespace)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def held(hl: HiLok) -> Iterator[Any]:
    """A lease held before the fault, on another tree: it must survive every row."""
    lease = hl.acquire("bystander/x", "write", ttl=60)
    yield lease
    assert_still_held(hl, lease)
    hl.release(lease)


def lock_keys(client: redis.Redis, namespace: str) -> list[str]:
    """Keys that hold locks or wait-queue entries (the ``::n`` token counters do not)."""
    keys = (k.decode() for k in client.scan_iter(match=f"{namespace}:*", count=1000))
    return sorted(k for k in keys if not k.endswith("::n") and "{bystander}" not in k)


def assert_nothing_locked(hl: HiLok, client: redis.Redis, namespace: str, *roots: str) -> None:
    assert lock_keys(client, namespace) == []
    for root in roots:
        hl.release(hl.acquire(root, "write", block=False))


def assert_still_held(hl: HiLok, lease: Any) -> None:
    assert [h.handle for h in hl.status(lease.path).holders] == [lease.handle]
    hl.refresh(lease)


def bounded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``, asserting that it returns or raises within NO_HANG seconds."""
    started = time.monotonic()
    try:
        return fn()
    finally:
        assert time.monotonic() - started < NO_HANG, "took too long: a hang?"


def url_of(server: RedisServer, user: str = "", password: str = "") -> str:
    auth = f"{user}:{password}@" if user or password else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


# -- bad paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "phrase"),
    [
        pytest.param("", "has no segment", id="empty"),
        pytest.param("/", "has no segment", id="separator-only"),
        pytest.param("///", "has no segment", id="separators-only"),
        pytest.param(42, "must be a str, got int", id="int"),
        pytest.param(b"a/b", "must be a str, got bytes", id="bytes"),
        pytest.param(None, "must be a str, got NoneType", id="none"),
        pytest.param(["a", "b"], "must be a str, got list", id="list"),
    ],
)
def test_bad_path(hl: HiLok, redis_client: redis.Redis, namespace: str, held: Any,
                  path: object, phrase: str) -> None:  # fmt: skip
    for mode in ("read", "write"):
        with pytest.raises(InvalidArgument, match=phrase):
            hl.acquire(path, mode)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=phrase):
        hl.status(path)  # type: ignore[arg-type]
    assert issubclass(InvalidArgument, ValueError)
    assert_nothing_locked(hl, redis_client, namespace)


@pytest.mark.parametrize(
    ("path", "phrase"),
    [
        pytest.param("x" * 1_000_000, "1000000 characters long, more than 1024", id="1MB-segment"),
        pytest.param("a/" * 10_000, "20000 characters long", id="10000-levels"),
        pytest.param("a/" * (MAX_DEPTH + 1), f"33 segments, more than {MAX_DEPTH}", id="33-levels"),
        pytest.param("x" * (MAX_PATH_LENGTH + 1), "1025 characters long", id="1025-chars"),
    ],
)
def test_huge_path_is_refused_before_reaching_redis(
    hl: HiLok, redis_client: redis.Redis, namespace: str, held: Any, path: str, phrase: str
) -> None:
    with pytest.raises(InvalidArgument, match=phrase) as info:
        bounded(lambda: hl.acquire(path, "write"))
    assert len(str(info.value)) < 300  # the message quotes the path's start only
    assert_nothing_locked(hl, redis_client, namespace)


def test_longest_and_deepest_allowed_paths_work(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    longest = "y" * MAX_PATH_LENGTH
    deepest = "/".join(["d"] * MAX_DEPTH)
    for path in (longest, deepest):
        lease = bounded(partial(hl.acquire, path, "write"))
        assert lease.path == path
        hl.release(lease)
    assert_nothing_locked(hl, redis_client, namespace, longest, "d")


TRICKY_SEGMENTS = [":n", ":q", ":qx", ":c", ":h:x", "::n", "{x}", "}", "{", "%3An", "a:is",
                   "x:x", "|S|a", " ", "\x00", "é", "😀", "*", "?"]  # fmt: skip


def test_segments_with_key_delimiters_never_collide_with_tree_keys(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    # Every tricky segment below one root, and as a root of its own: each is a separate
    # node, so one writer each gets in at once (a collision with another node's key or a
    # tree's own keys would make some of them conflict, or corrupt a key's type).
    paths = [f"a/{s}" for s in TRICKY_SEGMENTS] + [f"{s}/b" for s in TRICKY_SEGMENTS]
    leases = [bounded(partial(hl.acquire, p, "write", block=False)) for p in paths]
    assert [lease.path for lease in leases] == paths
    for lease in leases:
        assert [h.path for h in hl.status(lease.path).holders] == [lease.path]
    keys = lock_keys(redis_client, namespace) + [
        k.decode() for k in redis_client.scan_iter(match=f"{namespace}:*::n")
    ]
    # All keys of one tree carry one hash tag (one Redis Cluster slot), whatever its root.
    by_tree: dict[str, set[int]] = {}
    for key in keys:
        assert key.startswith(f"{namespace}:{{")
        tree = key[len(namespace) + 2 : key.index("}")]
        by_tree.setdefault(tree, set()).add(key_slot(key.encode()))
        rest = key[key.index("}") + 2 :]
        if rest.startswith(":"):  # a tree's own key
            tree_own = (":n", ":q", ":qx", ":qc", ":h", ":hx")
            assert rest in tree_own or rest.startswith(":hl:"), key
        else:  # a node's mark set: the node's name has no delimiter left unencoded
            node, mark = rest.rsplit(":", 1)
            assert mark in ("is", "ix", "s", "x", "wis", "wix", "ws", "wx"), key
            assert not set(node) & set(":{}|"), key
    assert len(by_tree) == 1 + len(TRICKY_SEGMENTS)
    assert all(len(slots) == 1 for slots in by_tree.values())
    hl.release(*leases)
    assert_nothing_locked(hl, redis_client, namespace, "a", *[f"{s}" for s in TRICKY_SEGMENTS])


def test_segment_like_a_tree_key_does_not_block_the_tree(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    # "a/:n" must not land on the token counter of tree "a", nor "a/:q" on its queue.
    first = hl.acquire("a/:n", "write")
    second = hl.acquire("a/:q", "write", block=False)
    other = HiLok(hl.redis, namespace=namespace)
    with pytest.raises(LockNotAcquired):
        other.acquire("a", "read", block=False)  # a real conflict: a is their ancestor
    assert redis_client.type(f"{namespace}:{{a}}::n") == b"string"
    hl.release(first, second)
    assert_nothing_locked(hl, redis_client, namespace, "a")


# -- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["READ", "Write", "shared", None, 1, ""])
def test_bad_mode(hl: HiLok, redis_client: redis.Redis, namespace: str, mode: object) -> None:
    with pytest.raises(InvalidArgument, match="mode must be 'read', 'write' or 'read-node'"):
        hl.acquire("m/x", mode)  # type: ignore[arg-type]
    assert_nothing_locked(hl, redis_client, namespace, "m")


@pytest.mark.parametrize(
    ("ttl", "phrase"),
    [
        (0, "positive number of seconds"),
        (-1, "positive number of seconds"),
        (math.nan, "positive number of seconds"),
        (math.inf, "between 0.001 and 1e9 seconds"),
        (True, "positive number of seconds"),
        ("30", "positive number of seconds"),
        (0.0001, "between 0.001 and 1e9 seconds"),
    ],
)
def test_bad_ttl(hl: HiLok, redis_client: redis.Redis, namespace: str, held: Any,
                 ttl: object, phrase: str) -> None:  # fmt: skip
    with pytest.raises(InvalidArgument, match=f"ttl must be .*{phrase}"):
        hl.acquire("t/x", "write", ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=phrase):
        hl.refresh(held, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=phrase):
        HiLok(hl.redis, namespace=namespace, ttl=ttl)  # type: ignore[arg-type]
    assert_nothing_locked(hl, redis_client, namespace, "t")


@pytest.mark.parametrize(
    ("timeout", "phrase"),
    [(-1, "not be negative"), (-0.001, "not be negative"),
     (math.nan, "be None or seconds >= 0"), (True, "be None or seconds >= 0"),
     ("5", "be None or seconds >= 0")],
)  # fmt: skip
def test_bad_timeout(hl: HiLok, redis_client: redis.Redis, namespace: str,
                     timeout: object, phrase: str) -> None:  # fmt: skip
    with pytest.raises(InvalidArgument, match=f"timeout must {phrase}"):
        hl.acquire("o/x", "write", timeout=timeout)  # type: ignore[arg-type]
    assert_nothing_locked(hl, redis_client, namespace, "o")


@pytest.mark.parametrize("namespace_arg", ["", "a:b", "a{b}", "a b", "x" * 65, None, "a*"])
def test_bad_namespace(redis_url: str, namespace_arg: object) -> None:
    with pytest.raises(InvalidArgument, match="namespace must be 1-64 characters"):
        HiLok(redis_url, namespace=namespace_arg)  # type: ignore[arg-type]


@pytest.mark.parametrize("separator", ["", None, 1])
def test_bad_separator(redis_url: str, separator: object) -> None:
    with pytest.raises(InvalidArgument, match="separator must be a non-empty str"):
        HiLok(redis_url, separator=separator)  # type: ignore[arg-type]


def test_acquire_many_with_nothing_to_lock(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    with pytest.raises(InvalidArgument, match="at least one lock"):
        hl.acquire_many([])
    assert_nothing_locked(hl, redis_client, namespace)


@pytest.mark.parametrize(
    ("locks", "phrase"),
    [
        pytest.param(["a/b"], "one of them is str: 'a/b'", id="list-of-str"),
        pytest.param("a/b", "got str: 'a/b'", id="str"),
        pytest.param(None, "got NoneType: None", id="none"),
        pytest.param(42, "got int: 42", id="int"),
        pytest.param({"a/b": "write"}, "for a mapping, pass its .items()", id="dict"),
        pytest.param([("a/b",)], "one of them is tuple: ('a/b',)", id="1-tuple"),
        pytest.param([("a/b", "write", 5)], "one of them is tuple", id="3-tuple"),
        pytest.param([("a/b", "write"), None], "one of them is NoneType", id="pair-then-none"),
        pytest.param([b"ab"], "one of them is bytes", id="list-of-bytes"),
    ],
)
def test_acquire_many_with_something_else_than_pairs(
    hl: HiLok, redis_client: redis.Redis, namespace: str, held: Any, locks: object, phrase: str
) -> None:
    for call in (hl.acquire_many, partial(hl.acquire_many, block=False)):
        with pytest.raises(
            InvalidArgument, match="must be an iterable of \\(path, mode\\) pairs"
        ) as info:
            call(locks)  # type: ignore[arg-type]
        assert phrase in str(info.value)
    assert_nothing_locked(hl, redis_client, namespace, "a")


def test_acquire_many_with_something_else_than_pairs_async(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    async def main() -> None:
        async with AsyncHiLok(redis_url, namespace=namespace) as ahl:
            for locks in (["a/b"], None):
                with pytest.raises(InvalidArgument, match="pairs"):
                    await ahl.acquire_many(locks)  # type: ignore[arg-type]

    asyncio.run(main())
    assert lock_keys(redis_client, namespace) == []


def deep(i: int, depth: int) -> str:
    return "/".join(["m", *(f"l{j}" for j in range(depth - 2)), f"n{i}"])


def test_acquire_many_takes_at_most_max_locks(
    hl: HiLok, redis_client: redis.Redis, namespace: str, held: Any
) -> None:
    # Just below: MAX_LOCKS writes at the deepest depth (66 keys to check each: past Lua's
    # unpack limit of about 8000 values in one call, which the script now slices).
    assert MAX_LOCKS * (2 * MAX_DEPTH + 2) > 8000
    locks: list[tuple[str, Mode]] = [(deep(i, MAX_DEPTH), "write") for i in range(MAX_LOCKS)]
    leases = bounded(lambda: hl.acquire_many(locks))
    assert len(leases) == MAX_LOCKS
    hl.release(*leases)
    # A repeated pair counts once.
    leases = hl.acquire_many([*locks[:-1], locks[0], locks[-1]])
    assert len(leases) == MAX_LOCKS
    hl.release(*leases)
    # Just above, and the 1,334 depth-2 writes of issue 12 (Lua's limit, before).
    too_many: list[list[tuple[str, Mode]]] = [
        [*locks, ("m/one-more", "write")],
        [(deep(i, 2), "write") for i in range(1334)],
    ]
    for many in too_many:
        with pytest.raises(InvalidArgument) as info:
            hl.acquire_many(many)
        assert f"at most {MAX_LOCKS} distinct locks" in str(info.value)
        assert f"got {len(many)} pairs" in str(info.value)
    with pytest.raises(
        InvalidArgument, match=f"at most {MAX_LOCKS} distinct locks in one atomic acquire, got more"
    ):
        hl.acquire_many((deep(i, 2), "read") for i in range(MAX_LOCKS + 1))
    assert_nothing_locked(hl, redis_client, namespace, "m")


SURROGATE = b"t/caf\xe9".decode("utf-8", "surrogateescape")  # 't/caf\udce9', from a file name


@pytest.mark.parametrize("path", [SURROGATE, "t/\udcff", "\ud800", "t/a\udfffb/c"])
def test_path_with_a_lone_surrogate(
    hl: HiLok, redis_url: str, redis_client: redis.Redis, namespace: str, held: Any, path: str
) -> None:
    phrase = "is not valid Unicode text: it holds the lone surrogate"
    calls: list[Callable[[], Any]] = [
        partial(hl.acquire, path, "write"),
        partial(hl.acquire, path, "read", block=False),
        partial(hl.acquire_many, [("t/ok", "write"), (path, "read")]),
        partial(hl.status, path),
        partial(hl.status_chain, path),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match=phrase):
            bounded(call)
    with pytest.raises(InvalidArgument, match=phrase):
        HiLok(redis_url, namespace=namespace, separator="\udcff")
    assert_nothing_locked(hl, redis_client, namespace, "t")


def test_path_with_a_lone_surrogate_seed(redis_url: str, namespace: str) -> None:
    async def main() -> None:
        async with RedisHiLok(redis_url, namespace=namespace) as seed:
            with pytest.raises(ValueError, match="lone surrogate"):
                await seed.acquire_write(SURROGATE)
            with pytest.raises(ValueError, match="lone surrogate"):
                await seed.status(SURROGATE, "")

    asyncio.run(main())


NFC = "caf\u00e9/na\u00efve"  # precomposed: U+00E9, U+00EF
NFD = "cafe\u0301/nai\u0308ve"  # the same text, decomposed: e + U+0301, i + U+0308


def test_nfc_and_nfd_spellings_of_a_path_are_one_lock(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC
    lease = hl.acquire(NFD, "write")
    assert lease.path == NFC  # normalised, as every path is
    for spelling in (NFC, NFD):
        with pytest.raises(LockNotAcquired):
            hl.acquire(spelling, "write", block=False)
        with pytest.raises(LockNotAcquired):
            hl.acquire(spelling.split("/")[0], "read", block=False)  # the ancestor too
        assert [(h.handle, h.path) for h in hl.status(spelling).holders] == [(lease.handle, NFC)]
    # One key space: every key names the NFC form, percent-encoded.
    keys = lock_keys(redis_client, namespace)
    assert keys and all("caf%C3%A9" in k and "e%CC%81" not in k for k in keys)
    # The same grant through the other spelling: a renewal, not a second lock.
    again = hl.acquire(NFC, "write", handle=lease.handle)
    assert again.token == lease.token
    copy = pickle.loads(pickle.dumps(lease))
    assert copy.path == NFC and copy.request == lease.request
    hl.release(lease)
    assert_nothing_locked(hl, redis_client, namespace, "caf\u00e9")


def test_release_or_refresh_through_another_namespace_is_refused(
    hl: HiLok, redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    lease = hl.acquire("ns/x", "write")
    reader = hl.acquire("ns/y", "read")
    other_ns = namespace + "-other"
    phrase = (
        f"it was granted in namespace '{namespace}', and this client works in "
        f"namespace '{other_ns}'"
    )
    with HiLok(redis_url, namespace=other_ns) as other:
        copies = [lease, pickle.loads(pickle.dumps(lease))]  # the namespace travels
        for copy in copies:
            assert copy.namespace == namespace
            calls: list[Callable[[], Any]] = [
                partial(other.release, copy),
                partial(other.refresh, copy),
                partial(other.refresh_many, [copy]),
                partial(other.keep_alive, copy),
                partial(other.release, reader, copy),  # one of them is ours
            ]
            for call in calls:
                with pytest.raises(InvalidArgument, match=phrase):
                    call()
            assert not copy.released and not copy.lost
        assert reader.namespace == namespace and not reader.released
        assert_still_held(hl, lease)
        # Not a lease at all
        with pytest.raises(InvalidArgument, match="expected a Lease, got str"):
            other.release("ns/x")  # type: ignore[arg-type]
        # A lease built by name without a namespace is taken by any client, as before:
        # there it holds nothing, so a release frees nothing and a refresh finds it gone.
        unnamed = Lease(lease.request, lease.handle, lease.token, lease.ttl)
        assert unnamed.namespace is None
        other.release(unnamed)
        assert unnamed.released and not unnamed.lost
        with pytest.raises(LockLost):
            other.refresh(unnamed)
    assert_still_held(hl, lease)
    hl.release(lease, reader)
    assert_nothing_locked(hl, redis_client, namespace, "ns")


def test_release_through_another_namespace_is_refused_async(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    async def main() -> None:
        async with (
            AsyncHiLok(redis_url, namespace=namespace) as ahl,
            AsyncHiLok(redis_url, namespace=namespace + "-b") as other,
        ):
            lease = await ahl.acquire("ns/x", "write")
            with pytest.raises(InvalidArgument, match="granted in namespace"):
                await other.release(lease)
            assert not lease.released
            await ahl.refresh(lease)
            await lease.release()

    asyncio.run(main())
    assert lock_keys(redis_client, namespace) == []


@pytest.mark.parametrize("handle", ["short", "has space", "x" * 129, "a|S|b/c", "", 12345678])
def test_garbage_handle_to_acquire(
    hl: HiLok, redis_client: redis.Redis, namespace: str, held: Any, handle: object
) -> None:
    with pytest.raises(InvalidArgument, match="handle must be 8-128 characters"):
        hl.acquire("h/x", "write", handle=handle)  # type: ignore[arg-type]
    assert_nothing_locked(hl, redis_client, namespace, "h")


# -- bad Redis URLs and clients -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        pytest.param("http://127.0.0.1:6379/0", "must start with redis://", id="http"),
        pytest.param("127.0.0.1:6379", "must start with redis://", id="no-scheme"),
        pytest.param("redis://127.0.0.1:notaport/0", "Port could not be cast", id="port-text"),
        pytest.param("redis://127.0.0.1:99999/0", "Port out of range", id="port-range"),
        pytest.param("redis://127.0.0.1:6379/abc", "database must be a number", id="db"),
        pytest.param("redis://127.0.0.1:6379/0?socket_timeout=x", "socket_timeout", id="opt"),
        pytest.param("redis://127.0.0.1:6379/0?colour=red", "unknown parameter", id="param"),
        pytest.param(f"redis://u:{SECRET}@127.0.0.1:x/0", "Port could not", id="password"),
    ],
)
def test_bad_redis_url(url: str, phrase: str) -> None:
    for engine in (HiLok, AsyncHiLok):
        with pytest.raises(InvalidArgument, match=phrase) as info:
            engine(url)
        assert SECRET not in str(info.value)


@pytest.mark.parametrize("target", [42, None, b"redis://127.0.0.1/0", object()])
def test_not_a_url_nor_a_client(target: object) -> None:
    with pytest.raises(InvalidArgument, match=r"expected a Redis URL or a redis\.Redis"):
        HiLok(target)  # type: ignore[arg-type]


# -- Redis unreachable, refusing, or failing ----------------------------------------------------


def test_unreachable_server() -> None:
    port = free_port()  # nothing listens there
    with HiLok(f"redis://127.0.0.1:{port}/0") as engine:
        with pytest.raises(HiLokConnectionError, match=f"127.0.0.1:{port}.*during acquire"):
            bounded(lambda: engine.acquire("u/x", "write"))
        assert not isinstance(HiLokConnectionError("x"), LockNotAcquired)


def test_unreachable_server_async() -> None:
    async def main() -> None:
        async with AsyncHiLok(f"redis://127.0.0.1:{free_port()}/0") as engine:
            with pytest.raises(HiLokConnectionError, match="Connect"):
                await asyncio.wait_for(engine.acquire("u/x", "write"), NO_HANG)

    asyncio.run(main())


@pytest.fixture
def server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A private redis-server for rows that change its users or settings."""
    return redis_server_factory()


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    try:
        yield client
    finally:
        client.close()


def test_wrong_password(server: RedisServer, admin: redis.Redis, namespace: str) -> None:
    admin.acl_setuser("app", enabled=True, passwords=[f"+{SECRET}"], keys=["*"],
                      channels=["*"], commands=["+@all"])  # fmt: skip
    for url in (url_of(server, "app", "wrong-pw"), url_of(server, "nobody", SECRET)):
        with HiLok(url, namespace=namespace) as engine:
            with pytest.raises(HiLokConnectionError, match="rejected the credentials") as info:
                bounded(partial(engine.acquire, "p/x", "write"))
        assert f"127.0.0.1:{server.port}" in str(info.value)
        assert "wrong-pw" not in str(info.value) and SECRET not in str(info.value)
    assert lock_keys(admin, namespace) == []
    with HiLok(url_of(server, "app", SECRET), namespace=namespace) as engine:
        engine.release(engine.acquire("p/x", "write", block=False))  # the right one works


def test_redis_without_scripting(server: RedisServer, admin: redis.Redis, namespace: str) -> None:
    admin.acl_setuser("noscript", enabled=True, passwords=[f"+{SECRET}"], keys=["*"],
                      channels=["*"], commands=["+@all", "-@scripting"])  # fmt: skip
    with HiLok(url_of(server, "noscript", SECRET), namespace=namespace) as engine:
        with pytest.raises(HiLokError, match=r"ACL does not allow.*'eval(sha)?'") as info:
            bounded(lambda: engine.acquire("s/x", "write"))
        assert type(info.value) is HiLokError
        with pytest.raises(HiLokError, match="ACL does not allow"):
            engine.status("s/x")
    assert lock_keys(admin, namespace) == []


def test_acl_denies_the_namespace_keys(
    server: RedisServer, admin: redis.Redis, namespace: str
) -> None:
    admin.acl_setuser("other", enabled=True, passwords=[f"+{SECRET}"], keys=["~app:*"],
                      channels=["*"], commands=["+@all"])  # fmt: skip
    with HiLok(url_of(server, "other", SECRET), namespace=namespace) as engine:
        with pytest.raises(HiLokError, match=r"ACL does not allow.*keys") as info:
            bounded(lambda: engine.acquire("k/x", "write"))
        assert type(info.value) is HiLokError
    assert lock_keys(admin, namespace) == []


@pytest.fixture
def no_functions(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A server without Redis Functions (as Redis before 7): scripts go by EVALSHA."""
    return redis_server_factory(extra_args=["--rename-command", "FCALL", ""])


def test_script_cache_flushed_mid_run(no_functions: RedisServer, namespace: str) -> None:
    redis_client = no_functions.client()
    with HiLok(f"{no_functions.url}/0", namespace=namespace) as hl:
        lease = hl.acquire("f/x", "write", ttl=30)
        assert not hl._functions  # refused once ("unknown command"), EVALSHA since
        other = hl.acquire("g/x", "read", ttl=30)
        for step in (
            lambda: hl.refresh(lease),
            lambda: hl.refresh_many([lease, other]),  # a pipeline of several script calls
            lambda: hl.status("f"),
            lambda: hl.release(lease, other),
            lambda: hl.release(hl.acquire("f", "write", block=False)),
        ):
            redis_client.script_flush()
            bounded(step)
        assert_nothing_locked(hl, redis_client, namespace, "f", "g")
    redis_client.close()


def test_script_cache_flushed_mid_run_async(no_functions: RedisServer, namespace: str) -> None:
    redis_client = no_functions.client()

    async def main() -> None:
        async with AsyncHiLok(f"{no_functions.url}/0", namespace=namespace) as engine:
            redis_client.script_flush()
            lease = await engine.acquire("f/x", "write")
            assert not engine._functions
            redis_client.script_flush()
            await engine.refresh(lease)
            redis_client.script_flush()
            await engine.release(lease)

    asyncio.run(asyncio.wait_for(main(), NO_HANG))
    assert lock_keys(redis_client, namespace) == []
    redis_client.close()


@pytest.mark.parametrize(
    ("path", "mode", "foreign"),
    [
        pytest.param("w/c", "read", "w/c:s", id="leaf-mark"),
        pytest.param("w/c", "write", "w:ix", id="ancestor-mark"),
        pytest.param("w/c", "write", "w/c:x", id="conflict-mark"),
        pytest.param("w/c", "read", ":q", id="queue"),
    ],
)
def test_wrong_type_key_in_our_namespace(
    hl: HiLok, redis_client: redis.Redis, namespace: str, held: Any,
    path: str, mode: Any, foreign: str,
) -> None:  # fmt: skip
    key = f"{namespace}:{{w}}:{foreign}"
    redis_client.set(key, "not a lock")  # someone else's string at one of our key names
    with pytest.raises(HiLokError, match="holds a value of another type") as info:
        bounded(lambda: hl.acquire(path, mode))
    assert type(info.value) is HiLokError
    redis_client.delete(key)
    # No partial grant: nothing marks the ancestors, so a writer on the root gets in.
    assert_nothing_locked(hl, redis_client, namespace, "w")
    hl.release(hl.acquire("v/c", mode, block=False))  # other trees are unaffected


def test_wrong_type_key_on_a_later_lock_of_a_multi_lock_acquire(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    # The first lock's marks are written before the second lock's leaf meets the foreign
    # key: the script takes them back before it fails. A renewal the holder had stays.
    before = hl.acquire("w/a", "write")
    redis_client.set(f"{namespace}:{{w}}:w/b/c:s", "not a lock")
    with pytest.raises(HiLokError, match="holds a value of another type"):
        bounded(
            lambda: hl.acquire_many(
                [("w/a", "write"), ("w/z", "write"), ("w/b/c", "read")], handle=before.handle
            )
        )
    redis_client.delete(f"{namespace}:{{w}}:w/b/c:s")
    assert [(h.path, h.handle) for h in hl.status("w").holders] == [("w/a", before.handle)]
    hl.release(before)
    assert_nothing_locked(hl, redis_client, namespace, "w")


def test_forged_handle_in_a_lease_cannot_release_or_refresh_a_holder(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    real = hl.acquire("r/x", "write")
    # Not a handle at all: refused before anything is sent.
    for handle in ("", "*", real.handle + "|X|r/x", "a|X|r", "x" * 100_000):
        for action in (hl.release, hl.refresh):
            forged = pickle.loads(pickle.dumps(real))
            forged.handle = handle
            with pytest.raises(InvalidArgument, match="handle"):
                bounded(partial(action, forged))
            assert not forged.released
    # A handle that holds nothing: a release frees nothing (quietly), a refresh is refused.
    for handle in ("not-a-real-handle", real.handle[:-1]):
        forged = pickle.loads(pickle.dumps(real))
        forged.handle = handle
        bounded(partial(hl.release, forged))
        forged = pickle.loads(pickle.dumps(real))
        forged.handle = handle
        with pytest.raises(LockLost, match="lease"):
            bounded(partial(hl.refresh, forged))
    assert_still_held(hl, real)
    hl.release(real)
    assert_nothing_locked(hl, redis_client, namespace, "r")


def test_release_twice_and_release_after_expiry(
    hl: HiLok, redis_client: redis.Redis, namespace: str
) -> None:
    lease = hl.acquire("e/x", "write")
    hl.release(lease)
    hl.release(lease)  # no error
    lease.release()
    short = hl.acquire("e/y", "write", ttl=0.05)
    deadline = time.monotonic() + NO_HANG
    while hl.status("e/y").holders:  # wait for the server to let it run out
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(LockLost, match="had run out"):
        hl.release(short)
    hl.release(short)  # and a second time, nothing
    with pytest.raises(LockLost):
        hl.refresh(short)
    assert_nothing_locked(hl, redis_client, namespace, "e")


def test_client_clock_jumps_do_not_matter(
    hl: HiLok, redis_client: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_time = time.time
    offset = 0.0
    monkeypatch.setattr(time, "time", lambda: real_time() + offset)
    other = HiLok(hl.redis, namespace=namespace)
    with hl.write("c/a", ttl=1.0) as lease:  # refreshed in the background
        for jump in (3600.0, -3600.0, 86400.0 * 365, -86400.0 * 365):
            offset = jump
            # Leases run on the server's clock: still held, for no more than the ttl.
            (holder,) = hl.status("c/a").holders
            assert 0 < holder.ttl <= 1.0
            # Timeouts run on the client's monotonic clock: they end on time.
            with pytest.raises(LockNotAcquired):
                bounded(lambda: other.acquire("c", "write", timeout=0.2))
        time.sleep(3.0)  # not synchronisation: a hold through three ttls and the jumps
        assert not lease.lost
        hl.refresh(lease)
    assert_nothing_locked(hl, redis_client, namespace, "c")


def test_server_killed_mid_hold(
    redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()
    with HiLok(f"{server.url}/0", namespace=namespace) as engine:
        lease = engine.acquire("k/x", "write", ttl=30)
        server.kill()
        for action in (engine.refresh, engine.release):
            with pytest.raises(HiLokConnectionError, match=f"127.0.0.1:{server.port}"):
                bounded(partial(action, lease))
        with pytest.raises(HiLokConnectionError):
            bounded(lambda: engine.acquire("k/y", "read", timeout=1.0))
        server.start()  # back, empty (no persistence): nothing stays locked
        engine.release(engine.acquire("k", "write", block=False))


def test_read_only_replica(
    redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    master = redis_server_factory()
    replica = redis_server_factory(extra_args=["--replicaof", "127.0.0.1", str(master.port)])
    with HiLok(f"{replica.url}/0", namespace=namespace) as engine:
        with pytest.raises(HiLokError, match="read-only replica") as info:
            bounded(lambda: engine.acquire("ro/x", "write"))
        assert type(info.value) is HiLokError
    for server in (master, replica):
        client = server.client()
        assert lock_keys(client, namespace) == []
        client.close()


def test_redis_out_of_memory(
    redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory(extra_args=["--maxmemory-policy", "noeviction"])
    client = server.client()
    with HiLok(f"{server.url}/0", namespace=namespace) as engine:
        before = engine.acquire("mem/held", "write", ttl=60)
        keys_before = lock_keys(client, namespace)
        for i in range(3000):  # about 3 MB of other data, then a limit far below it
            client.set(f"filler:{i}", "x" * 1000)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used // 2)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("one-more", "x")
        with pytest.raises(HiLokError, match="out of memory") as info:
            bounded(lambda: engine.acquire("mem2/x", "write"))
        assert type(info.value) is HiLokError
        with pytest.raises(HiLokError, match="out of memory"):
            bounded(lambda: engine.acquire("mem/other", "read", block=False))
        assert lock_keys(client, namespace) == keys_before  # no partial grant
        assert [h.handle for h in engine.status("mem").holders] == [before.handle]
        engine.release(before)  # releasing needs no memory
        assert lock_keys(client, namespace) == []
    client.close()


# -- the seed-compatible class and Celery -------------------------------------------------------


def test_compat_empty_path_and_bad_milliseconds(redis_url: str) -> None:
    async def main() -> None:
        async with RedisHiLok(redis_url) as h:
            for path in ("", "/", "//"):
                with pytest.raises(ValueError, match="has no segment"):
                    await h.acquire_write(path)
                with pytest.raises(ValueError, match="has no segment"):
                    await h.acquire_read(path)

    asyncio.run(asyncio.wait_for(main(), NO_HANG))
    for ttl in (0, -5, math.nan, "5000", True):
        with pytest.raises(InvalidArgument, match="ttl must be a number of milliseconds"):
            RedisHiLok(redis_url, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"between 0\.001 and 1e9 seconds"):
        RedisHiLok(redis_url, ttl=math.inf)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="refresh_interval must be a number"):
        RedisHiLok(redis_url, refresh_interval="2s")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/0", f"amqp://u:{SECRET}@127.0.0.1//", "127.0.0.1:6379", 6379]
)
def test_celery_bad_hilok_redis_url(url: object) -> None:
    app = Celery("bad-url", set_as_current=False)
    app.conf.hilok_redis_url = url
    with pytest.raises(InvalidArgument, match="hilok_redis_url must be a redis://") as info:
        celery_redis_url(app.conf)
    assert SECRET not in str(info.value)


def test_celery_non_redis_broker_list_hides_every_password() -> None:
    app = Celery("bad-broker", set_as_current=False)
    app.conf.broker_url = f"amqp://u:{SECRET}@127.0.0.1//;amqp://v:{SECRET}2@127.0.0.2//"
    with pytest.raises(InvalidArgument, match="is not a Redis server") as info:
        celery_redis_url(app.conf)
    assert SECRET not in str(info.value)


def test_celery_bad_template_fails_at_task_definition() -> None:
    app = Celery("bad-template", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.finalize()
    with pytest.raises(InvalidArgument, match=r"names 'missing'.*arguments are: account_id"):

        @app.task(shared=False, base=HiLokTask, hilok_write="accounts/{missing}")  # type: ignore[untyped-decorator]
        def debit(account_id: int) -> None: ...

    with pytest.raises(InvalidArgument, match="not a valid format string"):

        @app.task(shared=False, base=HiLokTask, hilok_write="accounts/{account_id")  # type: ignore[untyped-decorator]
        def credit(account_id: int) -> None: ...


@pytest.mark.parametrize(
    ("url", "error", "phrase"),
    [
        ("redis://127.0.0.1:notaport/3", InvalidArgument, "Port could not be cast"),
        (f"redis://u:{SECRET}@127.0.0.1:{free_port()}/3", HiLokConnectionError, "Connect"),
    ],
)
def test_celery_task_with_a_bad_or_unreachable_redis_url(
    url: str, error: type[Exception], phrase: str
) -> None:
    app = Celery("bad-url-eager", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True, hilok_redis_url=url)
    ran: list[int] = []

    @app.task(shared=False, base=HiLokTask, hilok_write="a/{n}", hilok_on_contention="fail")  # type: ignore[untyped-decorator]
    def locked(n: int) -> None:
        ran.append(n)

    with pytest.raises(error, match=phrase) as info:
        bounded(lambda: locked.delay(1))
    assert type(info.value) is error
    assert SECRET not in str(info.value)
    assert ran == []  # the body never ran without its lock
