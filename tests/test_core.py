"""The sans-I/O core, without Redis: call layout, reply decoding and waiting decisions."""

from __future__ import annotations

import hashlib
import math
import threading
import time

import pytest

from celery_hilok import InvalidArgument, LockNotAcquired
from celery_hilok._core import (
    ACQUIRE,
    HANDOFF_TTL_MS,
    KEEPALIVE,
    LIBRARY,
    MODE_CODES,
    QUEUE_TTL_MS,
    REFRESH,
    RELEASE,
    STATUS,
    SUBSCRIBE,
    WITHDRAW_ONLY,
    Acquisition,
    Blocked,
    Granted,
    Handed,
    Library,
    Protocol,
    Request,
    Sleep,
    check_handle,
    check_mode,
    check_timeout,
    check_ttl,
    new_handle,
    next_wait,
    normalise_requests,
    parse_member,
    related,
    told,
)
from celery_hilok._engine import RefreshSchedule, WakeTable
from celery_hilok.lease import Lease, LockStatus
from celery_hilok.paths import parse_path

HANDLE = "holder-0001"


def req(path: str, mode: str, separator: str = "/") -> Request:
    return Request.parse(path, mode, separator)


def node(ns: str, tree: str, canonical: str, *kinds: str) -> list[str]:
    """Set keys of one node, in the order given (default: all eight, as acquire and release
    get them: the marks, then the wait marks)."""
    base = f"{ns}:{{{tree}}}:{canonical}:"
    return [base + kind for kind in (kinds or ("is", "ix", "s", "x", "wis", "wix", "ws", "wx"))]


def tree(ns: str, name: str, *kinds: str) -> list[str]:
    """Tree keys, in the order given (default: n, q, qx, qc, h, hx)."""
    prefix = f"{ns}:{{{name}}}:"
    return [prefix + ":" + kind for kind in (kinds or ("n", "q", "qx", "qc", "h", "hx"))]


def index(ns: str, name: str, handle: str = HANDLE) -> str:
    """A holder's index in a tree."""
    return f"{ns}:{{{name}}}::hl:{handle}"


def blocked_reply(
    member: str = "other-handle|X|a/b", ms: int = 1500, kind: str = "held"
) -> list[object]:
    return [0, member.encode(), ms, kind.encode()]


# -- scripts ----------------------------------------------------------------------------------


def test_scripts_are_prelude_plus_body_addressed_by_sha1() -> None:
    scripts = [ACQUIRE, RELEASE, REFRESH, STATUS]
    assert [s.name for s in scripts] == ["acquire", "release", "refresh", "status"]
    prelude = ACQUIRE.source.split("\n-- acquire:")[0]
    for script in scripts:
        assert script.source.startswith(prelude)
        assert script.source.endswith(f"\nreturn {script.name}(CALL_KEYS, CALL_ARGV)\n")
        assert script.sha == hashlib.sha1(script.source.encode()).hexdigest()
    assert len({s.sha for s in scripts}) == 4


def test_the_library_holds_every_script_as_a_function_named_by_its_code() -> None:
    first, _, code = LIBRARY.source.partition("\n")
    assert first == f"#!lua name={LIBRARY.name}" and LIBRARY.name.endswith(LIBRARY.tag)
    prelude = ACQUIRE.source.split("\n", 1)[1].split("\n-- acquire:")[0]
    assert code.startswith(prelude)
    for script in (ACQUIRE, RELEASE, REFRESH, STATUS):
        assert script.function == f"hilok_{LIBRARY.tag}_{script.name}"
        assert f"function_name = '{script.function}', callback = {script.name}," in code
        body = script.source.split("\n", 1)[1].removeprefix(prelude).rsplit("\nreturn ", 1)[0]
        assert body.strip() in code  # the same body, as a script or as a function
    assert "flags = { 'allow-oom' }" in code and "flags = { 'no-writes' }" in code
    # another version of the code is another library: both can live on one server
    assert Library(["acquire"]).tag != LIBRARY.tag


# -- call layout ----------------------------------------------------------------------------


def test_acquire_layout_one_tree() -> None:
    proto = Protocol("ns", "/")
    call = proto.acquire(
        HANDLE, [req("a/b", "write")], ttl=2.5, register=True, nonce="n1", channel="ns:w:c1"
    )
    assert call.script is ACQUIRE
    assert call.keys == [
        *tree("ns", "a"),
        index("ns", "a"),
        *node("ns", "a", "a"),
        *node("ns", "a", "a/b"),
    ]
    assert call.args == [HANDLE, 2500, 1, QUEUE_TTL_MS, 1, 1, "n1", "ns:w:c1", "X", 2, 1, "a/b"]


def test_acquire_layout_several_trees_and_grants() -> None:
    proto = Protocol("ns", ".")
    requests = [req("a.b", "read", "."), req("c", "read-node", "."), req("a.x", "write", ".")]
    call = proto.acquire(HANDLE, requests, ttl=1.0, register=False, nonce="n2")
    assert call.keys == [
        *tree("ns", "a"),
        *tree("ns", "c"),
        index("ns", "a"),
        *node("ns", "a", "a"),
        *node("ns", "a", "a/b"),
        index("ns", "c"),
        *node("ns", "c", "c"),
        index("ns", "a"),
        *node("ns", "a", "a"),
        *node("ns", "a", "a/x"),
    ]
    assert call.args == [
        HANDLE, 1000, 0, QUEUE_TTL_MS, 2, 3, "n2", "",
        "S", 2, 1, "a/b",
        "N", 1, 2, "c",
        "X", 2, 1, "a/x",
    ]  # fmt: skip
    # Every key of one grant block shares the tree's hash tag.
    for key in call.keys:
        assert key.startswith(("ns:{a}:", "ns:{c}:"))


def test_mode_codes() -> None:
    assert MODE_CODES == {"read": "S", "write": "X", "read-node": "N"}
    assert req("a", "read-node").code == "N"


def test_release_layout() -> None:
    proto = Protocol("ns", "/")
    requests = [req("a/b/c", "read"), req("z", "write")]
    call = proto.release(HANDLE, requests)
    assert call.script is RELEASE
    # Release gets every set of each chain node: it hands the lock on to waiters there.
    assert call.keys == [
        *tree("ns", "a"),
        *tree("ns", "z"),
        index("ns", "a"),
        *node("ns", "a", "a"),
        *node("ns", "a", "a/b"),
        *node("ns", "a", "a/b/c"),
        index("ns", "z"),
        *node("ns", "z", "z"),
    ]
    assert call.args == [
        HANDLE, "", 2, 2, HANDOFF_TTL_MS, 0, "S", 3, 1, "a/b/c", "X", 1, 2, "z"
    ]  # fmt: skip
    withdraw = proto.release(HANDLE, requests, WITHDRAW_ONLY)
    assert withdraw.args[1] == "-"
    assert withdraw.keys == call.keys
    # lean (nobody waits in the trees)
    lean = proto.release(HANDLE, requests, lean=True)
    assert lean.keys == [
        *tree("ns", "a"),
        *tree("ns", "z"),
        index("ns", "a"),
        *node("ns", "a", "a", "is"),  # only the sets of its own marks: IS on the ancestors
        *node("ns", "a", "a/b", "is"),
        *node("ns", "a", "a/b/c", "s"),
        index("ns", "z"),
        *node("ns", "z", "z", "x"),
    ]
    acquire = proto.acquire(HANDLE, requests, 30, True, "n", lean=True)
    assert acquire.keys == [
        *tree("ns", "a"),
        *tree("ns", "z"),
        index("ns", "a"),
        *node("ns", "a", "a", "is", "x"),  # IS on an ancestor: itself and what conflicts
        *node("ns", "a", "a/b", "is", "x"),
        *node("ns", "a", "a/b/c", "ix", "s", "x"),  # S on its own node
        index("ns", "z"),
        *node("ns", "z", "z", "is", "ix", "s", "x"),  # X: every hold set
    ]
    assert lean.args[5] == 1 and lean.args[6:] == call.args[6:]


def test_refresh_layout_many_holders() -> None:
    proto = Protocol("ns", "/")
    items = [("h-one-0001", req("a/b", "read"), 1.0), ("h-two-0002", req("a", "write"), 0.25)]
    call = proto.refresh(items)
    assert call.script is REFRESH
    assert call.keys == [  # the tree's holder table, then only the grants' own marks
        *tree("ns", "a", "h", "hx"),
        index("ns", "a", "h-one-0001"),
        *node("ns", "a", "a", "is"),
        *node("ns", "a", "a/b", "s"),
        index("ns", "a", "h-two-0002"),
        *node("ns", "a", "a", "x"),
    ]
    assert call.args == [
        1, 2,
        "S", 2, 1, "a/b", "h-one-0001", 1000,
        "X", 1, 1, "a", "h-two-0002", 250,
    ]  # fmt: skip


def test_status_layout() -> None:
    proto = Protocol("ns", "/")
    call = proto.status(parse_path("a/b/c"))
    assert call.script is STATUS
    assert call.keys == [
        *tree("ns", "a"),
        *node("ns", "a", "a", "is", "ix", "s", "x"),
        *node("ns", "a", "a/b", "is", "ix", "s", "x"),
        *node("ns", "a", "a/b/c", "is", "ix", "s", "x"),
    ]
    assert call.args == [3]


def test_encoded_segments_in_layout() -> None:
    proto = Protocol("ns", "/")
    call = proto.acquire(HANDLE, [req("{x}/a b", "read")], ttl=1.0, register=False, nonce="n")
    assert call.keys[0] == "ns:{%7Bx%7D}::n"
    assert call.args[-1] == "%7Bx%7D/a%20b"


# -- replies --------------------------------------------------------------------------------


def test_decode_granted() -> None:
    assert Protocol.decode_acquire([1, [5, 7]]) == Granted([5, 7])


def test_decode_blocked_by_holder() -> None:
    outcome = Protocol.decode_acquire(blocked_reply("other-handle|S|a/b%20c", 1500, "held"))
    assert outcome == Blocked("other-handle", "read", "a/b%20c", 1.5, queued=False)
    assert isinstance(outcome, Blocked)
    text = outcome.describe()
    assert "read lock on 'a/b c'" in text
    assert "held by other-..." in text
    assert "1.500s" in text
    assert "'a.b c'" in outcome.describe(".")


def test_decode_blocked_by_waiter_and_negative_remaining() -> None:
    outcome = Protocol.decode_acquire(blocked_reply("w-handle-1|N|q", -20, "queued"))
    assert outcome == Blocked("w-handle-1", "read-node", "q", 0.0, queued=True)
    assert isinstance(outcome, Blocked)
    assert "queued before you" in outcome.describe()


def test_decode_str_replies() -> None:
    # A client with decode_responses=True hands back str, not bytes.
    outcome = Protocol.decode_acquire([0, "h-123456|X|a", 10, "held"])
    assert outcome == Blocked("h-123456", "write", "a", 0.01, queued=False)


def test_decode_codes() -> None:
    assert Protocol.decode_codes([1, 0, 2]) == [1, 0, 2]


def test_parse_member_keeps_pipes_out_of_handle() -> None:
    assert parse_member(b"abc|X|a/b") == ("abc", "write", "a/b")
    assert parse_member("abc|S|a") == ("abc", "read", "a")
    assert parse_member("abc|N|a") == ("abc", "read-node", "a")


def test_decode_status_and_build() -> None:
    path = parse_path("a/b")
    levels = [
        # node "a": is, ix, s, x
        [
            [b"r-handle-1|N|a", 900, b"u-handle-1|S|a/b", 1000],
            [b"w-handle-1|X|a/b/c", 2000],
            [],
            [],
        ],
        # node "a/b"
        [[], [b"w-handle-1|X|a/b/c", 2000], [b"u-handle-1|S|a/b", 1000], []],
    ]
    queue = [
        b"q-handle-1|X|a",
        b"1700000000000001",
        5500,
        b"q-handle-2|X|zz",
        b"1700000000000002",
        5600,
    ]
    nodes, waiters = Protocol.decode_status(path, [levels, queue])
    assert [n.path for n in nodes] == ["a", "a/b"]
    assert nodes[0].intent_shared[0].mode == "read-node"
    assert nodes[1].shared[0].remaining == 1.0
    assert [w.ticket for w in waiters] == [1700000000000001, 1700000000000002]
    assert waiters[0].remaining == 5.5

    status = LockStatus.build(path, nodes, waiters)
    assert status.path == "a/b"
    assert status.held
    seen = {(h.handle, h.mode, h.path, h.relation) for h in status.holders}
    assert seen == {
        ("r-handle-1", "read-node", "a", "above"),
        ("u-handle-1", "read", "a/b", "self"),
        ("w-handle-1", "write", "a/b/c", "below"),
    }
    # Only waiters on one line with the path are reported.
    assert [(w.handle, w.mode, w.path) for w in status.waiters] == [("q-handle-1", "write", "a")]


def test_empty_status() -> None:
    path = parse_path("a")
    nodes, waiters = Protocol.decode_status(path, [[[[], [], [], []]], []])
    status = LockStatus.build(path, nodes, waiters)
    assert not status.held
    assert status.holders == [] and status.waiters == []


# -- waiting --------------------------------------------------------------------------------


def _blocked(remaining: float) -> Blocked:
    return Blocked("other-handle", "write", "a", remaining, queued=False)


def test_next_wait_is_capped_by_the_blockers_lease() -> None:
    assert next_wait(0.0, None, _blocked(0.5)) == pytest.approx(0.501)
    # An already expired blocker: retry (almost) at once.
    assert next_wait(0.0, None, _blocked(0.0)) == pytest.approx(0.001)


def test_next_wait_is_capped_by_keepalive() -> None:
    assert next_wait(0.0, None, _blocked(3600.0)) == KEEPALIVE
    # The queue entry must outlive the longest sleep.
    assert KEEPALIVE * 1000 < QUEUE_TTL_MS


def test_next_wait_is_capped_by_the_deadline() -> None:
    assert next_wait(10.0, 10.25, _blocked(3600.0)) == pytest.approx(0.25)
    assert next_wait(10.0, 9.0, _blocked(3600.0)) == 0.0


# -- acquisition steps ----------------------------------------------------------------------


def _acquisition(
    *, handle: str | None = None, block: bool = True, timeout: float | None = None
) -> Acquisition:
    return Acquisition(
        Protocol("ns", "/"),
        [req("a/b", "write")],
        handle=handle,
        ttl=5.0,
        block=block,
        timeout=timeout,
        now=100.0,
    )


def test_granted_at_once() -> None:
    attempt = _acquisition()
    assert attempt.fresh
    assert check_handle(attempt.handle) == attempt.handle
    assert attempt.call.args[0] == attempt.handle
    # a blocking acquire joins the queue when refused (1), and a handle made here is new (2)
    assert attempt.call.args[2] == 3
    assert attempt.step([1, [42]], 100.0) == [42]


def test_only_the_first_call_of_a_new_handle_says_it_is_new() -> None:
    attempt = _acquisition(timeout=1.0)
    assert attempt.call.args[2] == 3
    assert attempt.step(blocked_reply(ms=10_000), 100.0) is SUBSCRIBE
    # refused: it may be queued now, or be handed the lock: the next call looks it up
    assert attempt.call.args[2] == 1
    given = _acquisition(handle="given-handle-1")
    assert given.call.args[2] == 1  # a handle from the caller may hold or wait already


def test_blocked_subscribes_then_sleeps_then_gives_up() -> None:
    attempt = _acquisition(timeout=1.0)
    assert attempt.deadline == 101.0
    assert attempt.step(blocked_reply(ms=10_000), 100.0) is SUBSCRIBE
    step = attempt.step(blocked_reply(ms=10_000), 100.0)
    assert step == Sleep(1.0)
    step = attempt.step(blocked_reply(ms=300), 100.5)
    assert isinstance(step, Sleep) and step.seconds == pytest.approx(0.301)
    step = attempt.step(blocked_reply(ms=10_000), 100.9)
    assert isinstance(step, Sleep) and step.seconds == pytest.approx(0.1)
    with pytest.raises(LockNotAcquired) as info:
        attempt.step(blocked_reply(ms=10_000), 101.0)
    error = info.value
    assert error.path == "a/b" and error.mode == "write"
    assert "within 1.0s" in str(error)
    assert error.blocker is not None and "write lock on 'a/b' held by other-" in error.blocker
    # Granted even at the deadline when the reply says so.
    assert _acquisition(timeout=1.0).step([1, [1]], 200.0) == [1]


def test_blocking_without_timeout_sleeps_at_most_keepalive() -> None:
    attempt = _acquisition()
    assert attempt.deadline is None
    assert attempt.step(blocked_reply(ms=600_000), 100.0) is SUBSCRIBE
    assert attempt.step(blocked_reply(ms=600_000), 1e6) == Sleep(KEEPALIVE)


def test_non_blocking_refusal() -> None:
    attempt = _acquisition(block=False)
    assert attempt.call.args[2] == 2  # never joins the queue (and is new)
    with pytest.raises(LockNotAcquired) as info:
        attempt.step(blocked_reply("w-handle-1|S|a", 1000, "queued"), 100.0)
    message = str(info.value)
    assert "write lock on 'a/b'" in message
    assert "block=False" in message
    assert "read lock on 'a' queued before you by w-hand" in message


def test_zero_timeout_is_one_try() -> None:
    attempt = _acquisition(timeout=0)
    assert not attempt.can_wait
    assert attempt.call.args[2] == 2
    with pytest.raises(LockNotAcquired):
        attempt.step(blocked_reply(), 100.0)


def test_cleanup_choices() -> None:
    refused = LockNotAcquired("no")
    other = ConnectionError("cut")

    # A one-try refusal joined no queue: nothing to undo.
    assert _acquisition(block=False).cleanup(refused) is None
    # Anything else, a waiter that gives up included, may have left grants: exactly those
    # made by this call (its nonce) go, a lock a release handed to the waiter too, for a
    # fresh holder and an existing one alike (whose older grants stay).
    for attempt in (_acquisition(), _acquisition(handle=HANDLE), _acquisition(timeout=1.0)):
        for error in (other, refused):
            call = attempt.cleanup(error)
            assert call is not None and call.script is RELEASE
            assert call.args[:2] == [attempt.handle, attempt.nonce]
        assert attempt.call.args[6] == attempt.nonce
    assert _acquisition().nonce != _acquisition().nonce


def test_existing_handle_is_used() -> None:
    attempt = _acquisition(handle=HANDLE)
    assert not attempt.fresh
    assert attempt.handle == HANDLE
    assert attempt.call.keys[6] == index("ns", "a")


# -- argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.nan, math.inf, 1e-6, 1e10, True, "5", None])
def test_bad_ttl(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_ttl(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("good", [0.001, 0.5, 1, 30.0, 1e9])
def test_good_ttl(good: float) -> None:
    assert check_ttl(good) == float(good)


def test_ttl_error_names_the_argument() -> None:
    with pytest.raises(InvalidArgument, match="interval"):
        check_ttl(-1, "interval")


@pytest.mark.parametrize("bad", [-1, -0.001, -math.inf, math.nan, True, "1", [1]])
def test_bad_timeout(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_timeout(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(("good", "expected"), [(None, None), (0, 0.0), (0.3, 0.3), (5, 5.0)])
def test_good_timeout(good: object, expected: float | None) -> None:
    assert check_timeout(good) == expected


@pytest.mark.parametrize("bad", ["READ", "Write", "exclusive", "S", "", None, 1])
def test_bad_mode(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_mode(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("good", ["read", "write", "read-node"])
def test_good_mode(good: str) -> None:
    assert check_mode(good) == good


@pytest.mark.parametrize(
    "bad", ["short", "x" * 129, "has|pipe-1234", "has space 123", "ünïcødé-handle", None, 12345678]
)
def test_bad_handle(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_handle(bad)
    assert repr(bad) in str(info.value)
    if bad is not None:  # handle=None asks for a fresh holder
        with pytest.raises(InvalidArgument):
            _acquisition(handle=bad)  # type: ignore[arg-type]


def test_bad_timeout_in_acquisition() -> None:
    with pytest.raises(InvalidArgument):
        _acquisition(timeout=-1)


def test_new_handles_are_valid_and_unique() -> None:
    handles = {new_handle() for _ in range(1000)}
    assert len(handles) == 1000
    for handle in handles:
        assert check_handle(handle) == handle
        assert len(handle) >= 24


def test_normalise_requests() -> None:
    requests = normalise_requests([("/a/b/", "read"), ("a//b", "read"), ("a/b", "write")], "/")
    assert requests == [req("a/b", "read"), req("a/b", "write")]
    with pytest.raises(InvalidArgument):
        normalise_requests([], "/")
    with pytest.raises(InvalidArgument, match="'lock'"):
        normalise_requests([("a", "lock")], "/")
    with pytest.raises(InvalidArgument, match="'/'"):
        normalise_requests([("/", "read")], "/")


def test_related() -> None:
    assert related("a", "a")
    assert related("a", "a/b/c")
    assert related("a/b/c", "a")
    assert not related("a/b", "a/c")
    assert not related("a/b", "a/bc")
    assert not related("ab", "a")


# -- wake-ups --------------------------------------------------------------------------------


def waiting(*locks: tuple[str, str], handle: str = "waiter-0001") -> Acquisition:
    requests = [req(path, mode) for path, mode in locks]
    return Acquisition(
        Protocol("ns", "/"), requests, handle=handle, ttl=1.0, block=True, timeout=None, now=0.0
    )


def test_a_message_wakes_the_waiters_it_names_only() -> None:
    """A wait wakes when its handle is among those the message tells (WakeTable.deliver)."""
    named = waiting(("a/b", "write"), handle="front-0001")
    other = waiting(("a/b", "write"), handle="behind-001")
    assert named.handle in told("front-0001 someone-else")
    assert named.handle in told("someone-else front-0001")
    assert other.handle not in told("front-0001 someone-else")  # only refused again
    assert named.handle not in told("front-00011")
    assert named.handle in told("front-0001/ab12/1700000000000001/5000")  # granted: says so
    assert named.handle not in told("front-00011/ab12/1700000000000001/5000")


def test_a_message_says_which_waiters_it_granted_the_lock_to() -> None:
    assert told("a-000001 b-000001/0f0f/1700000000000123/2500") == {
        "a-000001": None,  # ask again
        "b-000001": Handed("0f0f", 1700000000000123, 2.5),
    }
    # a word that does not parse only wakes its holder; a grant wins over a bare name
    assert told("c-000001/x/y/z c-000002/n/1/") == {"c-000001": None, "c-000002": None}
    assert told("d-000001 d-000001/n/7/100") == {"d-000001": Handed("n", 7, 0.1)}


# -- the refresh schedule -------------------------------------------------------------------


def _kept(ttl: float) -> Lease:
    return Lease(Request.parse("t/a", "write", "/"), new_handle(), 1, ttl)


def test_refresh_schedule_wakes_the_runner_only_for_a_sooner_tick() -> None:
    schedule = RefreshSchedule()
    assert schedule.wait(100.0, 5.0) == (False, 5.0)  # idle: look again in 5 s
    long = _kept(30.0)
    assert not schedule.add(long, 100.0)  # due at 110, after the runner looks again (105)
    assert schedule.wait(105.0, 5.0) == (True, 5.0)  # now it sleeps until 110
    assert schedule.add(_kept(0.3), 105.0)  # due at 105.1: must wake it
    kept, delay = schedule.wait(105.0, 5.0)
    assert kept and delay == pytest.approx(0.1)


def test_a_lock_taken_from_a_release_message_is_renewed_within_its_short_term() -> None:
    schedule = RefreshSchedule()
    handed = _kept(30.0)
    handed.renewed_at, handed.term = 100.0, 5.0  # the hand-off lease, from the last call
    schedule.add(handed, 100.5)
    kept, delay = schedule.wait(100.5, 60.0)
    assert kept and delay == pytest.approx(5.0 / 3 - 0.5)  # a third of its term, not of 30 s
    # Redis down: a lease not renewed for its term has run out, whatever its ttl says
    assert schedule.lost([handed], None, 104.0) == []
    assert schedule.lost([handed], None, 105.5) == [handed]


def test_refresh_schedule_tick_renews_everything_and_plans_the_next() -> None:
    schedule = RefreshSchedule()
    a, b = _kept(3.0), _kept(30.0)
    schedule.add(a, 0.0)
    schedule.add(b, 0.0)
    assert schedule.wait(1.0, 5.0) == (True, 0.0)  # a is due at 1.0
    assert set(map(id, schedule.take(1.0))) == {id(a), id(b)}
    assert schedule.wait(1.0, 5.0) == (True, 1.0)  # next tick: a third of the shortest ttl
    assert not schedule.discard(a)
    assert schedule.discard(b)  # nothing kept any more
    assert schedule.wait(2.0, 5.0) == (False, 5.0)


# -- the wake table ---------------------------------------------------------------------------


def test_a_message_before_the_wait_is_registered_is_kept_for_it() -> None:
    table = WakeTable(threading.Event)
    attempt = waiting(("a/b", "write"), handle="late-00001")
    first, new, confirmations, live = table.add(waiting(("x", "read")), {"ch"}, time.monotonic())
    assert new == ["ch"] and not live  # nobody had subscribed: the waiter must ask again
    table.deliver({"type": "subscribe", "channel": "ch", "data": 1})
    assert all(event.is_set() for event in confirmations)
    sent = time.monotonic()
    # The release that frees `attempt` comes between its refusal and its registration.
    table.deliver({"type": "message", "channel": "ch", "data": "late-00001"})
    wait, new, _, live = table.add(attempt, {"ch"}, sent)
    assert new == [] and live  # subscribed before the call: no second try needed
    assert wait.event.is_set()  # and the message was not lost
    table.remove(wait)
    table.remove(first)
    # A message older than the refused call does not wake a later wait.
    table.deliver({"type": "message", "channel": "ch", "data": "late-00001"})
    wait, _, _, _ = table.add(attempt, {"ch"}, time.monotonic() + 1)
    assert not wait.event.is_set()
    table.remove(wait)


def test_the_wake_table_hands_an_attempt_the_grant_its_own_call_asked_for() -> None:
    table = WakeTable(threading.Event)
    attempt = waiting(("a/b", "write"), handle="took-00001")
    wait, _, _, _ = table.add(attempt, {"ch"}, time.monotonic())
    table.deliver({"type": "subscribe", "channel": "ch", "data": 1})
    # a grant made for another call of the same handle (another nonce) only wakes it
    table.deliver({"type": "message", "channel": "ch", "data": "took-00001/beef/9/5000"})
    first = wait.handed
    assert wait.event.is_set() and first is None
    wait.event.clear()
    word = f"took-00001/{attempt.nonce}/1700000000000042/5000"
    table.deliver({"type": "message", "channel": "ch", "data": f"other-0001 {word}"})
    assert wait.event.is_set() and wait.handed == Handed(attempt.nonce, 1700000000000042, 5.0)
    table.remove(wait)
    # and one told before its wait was registered is kept for it, grant and all
    later = waiting(("a/b", "write"), handle="took-00002")
    sent = time.monotonic()
    word = f"took-00002/{later.nonce}/1700000000000043/800"
    table.deliver({"type": "message", "channel": "ch", "data": word})
    wait, _, _, _ = table.add(later, {"ch"}, sent)
    assert wait.event.is_set() and wait.handed == Handed(later.nonce, 1700000000000043, 0.8)
