"""The lock client, written once for both drivers.

Everything :class:`~celery_hilok.HiLok` and :class:`~celery_hilok.AsyncHiLok` decide lives
here as *flows*: generators that yield effects (send these commands in one round trip,
subscribe to these channels, wait on this event) and receive their results, or have their
errors thrown in. A flow never touches a socket, a thread or an event loop. The drivers
(:mod:`.sync`, :mod:`.aio`) run a flow by performing each effect it yields: that is all the
I/O there is, and the only code they do not share (together with the background thread or
task that reads wake-ups and renews kept leases, whose decisions are
:class:`WakeTable` and :class:`RefreshSchedule` here).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, ClassVar, Final, Generic, NamedTuple, Protocol, TypedDict, TypeVar

from redis.exceptions import NoPermissionError, NoScriptError, RedisError, ResponseError

from . import metrics
from ._core import (
    CLUSTER_WAIT,
    LIBRARY,
    RELEASE_ASK_FULL,
    RESEND,
    Acquisition,
    Blocked,
    Call,
    Handed,
    Mode,
    Request,
    by_tree,
    check_handle,
    check_timeout,
    check_ttl,
    check_wait_replicas,
    normalise_requests,
    told,
)
from ._core import Protocol as Calls
from ._redis import (
    ClientKind,
    describe_server,
    eviction_warning,
    make_client,
    translate,
    waker_log_level,
)
from .errors import HiLokError, InvalidArgument, LockLost, LockNotAcquired
from .lease import Lease, LockStatus
from .paths import parse_path, validate_namespace, validate_separator

__all__ = ["AcquireOptions", "Client", "RefreshSchedule", "WaitCheck", "WakeTable"]

log = logging.getLogger("celery_hilok")

T = TypeVar("T")
C = TypeVar("C")


# -- effects: what a flow asks its driver to do ------------------------------------------------


class Execute(NamedTuple):
    """Send ``commands`` in one round trip; the result is one reply per command, a command's
    own error (a ``ResponseError``) as its reply; a failed connection raises. With ``shield``
    the round trip is carried out even if the calling task is cancelled meanwhile (the
    cancellation is raised when the flow is done): a driver may then send the commands a
    second time, so a shielded effect is one that may run twice (a release)."""

    commands: list[tuple[Any, ...]]
    shield: bool = False


class Subscribe(NamedTuple):
    """Subscribe the driver's wake-up connection to ``channels``."""

    channels: list[str]


class Sleep(NamedTuple):
    """Wait until ``event`` is set, at most ``seconds``."""

    event: Any
    seconds: float


Effect = Execute | Subscribe | Sleep
Flow = Generator[Effect, Any, T]


class Run(Generic[T]):
    """One flow being run: :attr:`effect` is what it asks for next (None once it has
    returned :attr:`result`); a driver performs it and hands the outcome back with
    :meth:`send` or :meth:`throw`. An exception the flow raises propagates from those."""

    __slots__ = ("_flow", "effect", "result")

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self.effect: Effect | None = None
        self.result: T
        self._step(flow.send, None)

    def send(self, value: Any) -> None:
        self._step(self._flow.send, value)

    def throw(self, error: BaseException) -> None:
        self._step(self._flow.throw, error)

    def _step(self, step: Callable[[Any], Effect], arg: Any) -> None:
        try:
            self.effect = step(arg)
        except StopIteration as stop:
            self.effect = None
            self.result = stop.value


# -- options --------------------------------------------------------------------------------


class AcquireOptions(TypedDict, total=False):
    """The keyword arguments of ``acquire``, ``acquire_many``, ``read`` and ``write``.

    ``block`` (default True): wait for the lock; False makes one try. ``timeout``: give up
    after this many seconds (None: never). ``ttl``: the lease in seconds (default: the
    client's). ``handle``: acquire for this existing holder (re-entrant; renews a grant it
    already has).
    """

    block: bool
    timeout: float | None
    ttl: float | None
    handle: str | None


_OPTIONS: Final = frozenset(AcquireOptions.__annotations__)


class _Enqueue(TypedDict):
    handle: str
    ttl: float
    queue_ttl: float
    channel: str


class EnqueueOptions(_Enqueue, total=False):
    """The keyword arguments of the sync driver's ``_park`` (see ``Client._enqueue``):
    the holder ``handle``, the lease ``ttl`` if granted, how long a refused request stays
    queued unless asked again (``queue_ttl``), the ``channel`` a release tells, and whether
    a call whose reply was lost withdraws the request (``withdraw_on_error``, default
    True)."""

    withdraw_on_error: bool


class WaitCheck(NamedTuple):
    """A waiting acquire's second opinion (for the Celery integration): ``stop`` is called
    with the blocker after every refusal while the acquire waits, at least every ``every``
    seconds, and returns why to stop waiting, or None to go on. Stopping raises
    :class:`LockNotAcquired` ("gave up waiting: <why>") and withdraws the request from the
    queue; going on keeps its place. ``stop`` runs in the driver (the sync client's calling
    thread), so it may do a quick Redis call of its own there."""

    every: float
    stop: Callable[[Blocked], str | None]


def _options(options: AcquireOptions) -> tuple[bool, float | None, float | None, str | None]:
    if not options:
        return True, None, None, None
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return (
        options.get("block", True),
        options.get("timeout"),
        options.get("ttl"),
        options.get("handle"),
    )


# -- wake-ups -------------------------------------------------------------------------------


class Wait:
    """One blocked acquire waiting for releases on the channels of its trees."""

    __slots__ = ("attempt", "channels", "event", "handed")

    def __init__(self, channels: set[str], attempt: Acquisition, event: Any) -> None:
        self.channels = channels
        self.attempt = attempt
        self.event = event
        # the lock a release granted this attempt, as its message said (set before event)
        self.handed: Handed | None = None


BUSY_MEMORY: Final = 2.0
"""Seconds a client keeps sending full calls in a tree after it found somebody waiting."""
_BUSY_KEPT: Final = 4096
"""Most trees a client remembers as busy (the memory starts again past that)."""

_UNDONE_KEPT: Final = 1024
"""Most cleanups a client keeps for its next round trip (the oldest go first)."""

_TOLD_KEPT: Final = 1024
"""Most handles :class:`WakeTable` keeps from messages that came before their wait."""


class WakeTable:
    """Who waits on which channel, and whom a message wakes (the drivers' wakers only read
    the connection and feed messages here).

    A release tells the waiters it granted the lock to, or found at the front of the line,
    on their client's channel (see :func:`~celery_hilok._core.told`); a subscription is
    confirmed by the server's ``subscribe`` reply, which the first waiter on a channel waits
    for so that no release between its refusal and its subscription slips by.
    """

    def __init__(self, new_event: Callable[[], Any]) -> None:
        self._new_event = new_event
        self._lock = threading.Lock()
        self._waits: dict[str, set[Wait]] = {}
        self._confirmed: dict[str, Any] = {}
        self._confirmed_at: dict[str, float] = {}
        # handles a message named while no wait of theirs was registered (a release that
        # came between a refusal and the registration), with when and what it granted: kept
        # for add()
        self._told: OrderedDict[str, tuple[float, Handed | None]] = OrderedDict()
        self.on_idle: Callable[[], None] | None = None
        """Called when the last waiter leaves (the asyncio waker ends a while later)."""

    def idle(self) -> bool:
        """Nobody waits."""
        with self._lock:
            return not self._waits

    def add(
        self, attempt: Acquisition, channels: set[str], since: float
    ) -> tuple[Wait, list[str], list[Any], bool]:
        """Register ``attempt``, refused by a call sent at ``since``; returns its wait, the
        channels nobody subscribed to yet, the confirmation events to wait for, and whether
        every channel was confirmed before ``since``. A message for the attempt's handle
        that came after ``since`` and before now sets the wait's event at once."""
        wait = Wait(channels, attempt, self._new_event())
        new: list[str] = []
        with self._lock:
            for channel in channels:
                if channel not in self._confirmed:
                    self._confirmed[channel] = self._new_event()
                    new.append(channel)
                self._waits.setdefault(channel, set()).add(wait)
            live = not new and all(self._confirmed_at.get(c, since) < since for c in channels)
            early = self._told.pop(attempt.handle, None)
            if early is not None and early[0] >= since:
                wait.handed = _for(attempt, early[1])
                wait.event.set()
            return wait, new, [self._confirmed[c] for c in channels], live

    def forget(self, channels: Iterable[str]) -> None:
        """Let the next waiter subscribe to ``channels`` again (a subscribe failed)."""
        with self._lock:
            for channel in channels:
                self._confirmed_at.pop(channel, None)
                event = self._confirmed.pop(channel, None)
                if event is not None:
                    event.set()

    def remove(self, wait: Wait) -> None:
        with self._lock:
            for channel in wait.channels:
                waits = self._waits.get(channel)
                if waits is not None:
                    waits.discard(wait)
                    if not waits:
                        del self._waits[channel]
            idle = not self._waits
        if idle and self.on_idle is not None:
            self.on_idle()

    def reset(self) -> None:
        """A new connection: nothing is subscribed on it yet."""
        with self._lock:
            self._confirmed.clear()
            self._confirmed_at.clear()

    def deliver(self, message: dict[str, Any]) -> None:
        """Handle one pub/sub message: a confirmation, or a release that may wake waiters."""
        kind, channel = _text(message["type"]), _text(message["channel"])
        if kind == "subscribe":
            with self._lock:
                event = self._confirmed.get(channel)
                if event is not None:
                    self._confirmed_at.setdefault(channel, time.monotonic())
            if event is not None:
                event.set()
        elif kind == "message":
            words = told(_text(message["data"]))
            with self._lock:
                waits = list(self._waits.get(channel, ()))
            woken = set()
            for wait in waits:
                handle = wait.attempt.handle
                if handle in words:
                    wait.handed = _for(wait.attempt, words[handle])
                    wait.event.set()
                    woken.add(handle)
            now = time.monotonic()
            with self._lock:
                for handle in words.keys() - woken:
                    self._told[handle] = (now, words[handle])
                    self._told.move_to_end(handle)
                while len(self._told) > _TOLD_KEPT:
                    self._told.popitem(last=False)

    def wake_all(self) -> None:
        """The connection failed: every waiter retries now (and re-subscribes if need be)."""
        with self._lock:
            events = [*self._confirmed.values()]
            events += [w.event for ws in self._waits.values() for w in ws]
        for event in events:
            event.set()


def _for(attempt: Acquisition, handed: Handed | None) -> Handed | None:
    """``handed`` if it is the grant ``attempt``'s own call asked for (its nonce), else None
    (an earlier call of the same handle: it only wakes the attempt, which asks again)."""
    return handed if handed is not None and handed.nonce == attempt.nonce else None


def _library_missing(reply: object) -> bool:
    """Is ``reply`` an FCALL refused because the server lacks the library?"""
    return isinstance(reply, ResponseError) and str(reply).startswith("Function not found")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Waker(Protocol):
    """A driver's waker: a thread or task reading one pub/sub connection into its table."""

    table: WakeTable

    def ensure(self) -> None: ...
    def subscribe(self, channels: list[str]) -> Any: ...  # awaitable in the asyncio driver
    def stop(self) -> Any: ...


# -- background refresh -------------------------------------------------------------------


class RefreshSchedule:
    """The kept leases and when they are next renewed: a tick is due when the earliest one
    needs renewing (a third of its ttl, or its own shorter interval), and renews them all.

    The runner (a thread or task) asks :meth:`wait` how long it may sleep, and
    :meth:`add` says whether it must be woken before then: only when the new lease is due
    sooner. So a lease kept for a short ``with`` block usually costs no wake-up at all (a
    thread switch each, in the sync driver), and an idle runner looks again after the
    ``idle`` time the driver chose."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.leases: dict[int, Lease] = {}
        self._tick_due = float("inf")  # when the next tick is due (inf: nothing kept)
        self._wake_by = float("-inf")  # when the runner looks again by itself

    def add(self, lease: Lease, now: float) -> bool:
        """Keep ``lease``; True if the runner must be woken (the tick is due before it
        looks again)."""
        with self._lock:
            self.leases[id(lease)] = lease
            due = min(now, lease.renewed_at) + _interval(lease)
            self._tick_due = min(self._tick_due, due)
            return self._tick_due < self._wake_by

    def discard(self, lease: Lease) -> bool:
        """Stop keeping ``lease``; True if nothing is kept any more."""
        with self._lock:
            self.leases.pop(id(lease), None)
            if self.leases:
                return False
            self._tick_due = float("inf")
            return True

    def wait(self, now: float, idle: float) -> tuple[bool, float]:
        """For the runner, about to sleep: is anything kept, and how many seconds it may
        sleep (<= 0: tick now); with nothing kept, ``idle``."""
        with self._lock:
            kept = bool(self.leases)
            self._wake_by = self._tick_due if kept else now + idle
            return kept, self._wake_by - now

    def take(self, now: float) -> list[Lease]:
        """The leases to renew in the tick starting now; schedules the next one."""
        with self._lock:
            leases = list(self.leases.values())
            if leases:
                self._tick_due = now + min(_interval(lease) for lease in leases)
            return leases

    def lost(
        self, leases: Sequence[Lease], alive: Sequence[bool] | None, now: float
    ) -> list[Lease]:
        """The leases a tick found lost, no longer kept. ``alive`` None (Redis failed): a
        lease not renewed for its whole ttl has run out, whatever Redis says when it is
        back, so its holder hears of it now rather than go on unprotected. A lease released
        (or handed over) while the tick was in flight is not lost."""
        if alive is None:
            alive = [now - lease.renewed_at < lease.term for lease in leases]
        out = []
        with self._lock:
            for lease, ok in zip(leases, alive, strict=True):
                if not ok and self.leases.get(id(lease)) is lease:
                    del self.leases[id(lease)]
                    out.append(lease)
        return out


def _interval(lease: Lease) -> float:
    """How often a kept lease is renewed: its own interval, at most a third of its ttl (or
    of what it is known to last now, if shorter: a lock handed over by a release, until it
    is first renewed)."""
    third = min(lease.ttl, lease.term) / 3
    return third if lease.refresh_interval is None else min(lease.refresh_interval, third)


class _Refresher(Protocol):
    """A driver's refresher: a thread or task running the ticks of its schedule."""

    schedule: RefreshSchedule

    def add(self, lease: Lease) -> None: ...
    def discard(self, lease: Lease) -> None: ...
    def settle(self) -> Any: ...  # awaitable in the asyncio driver
    def stop(self) -> Any: ...


# -- lease bookkeeping -----------------------------------------------------------------------


def found_lost(lease: Lease, found_by: metrics.FoundBy) -> None:
    """Mark ``lease`` lost; the first time, tell the metrics observers (if any)."""
    if not lease.lost and metrics._observers:
        metrics.lost(lease, found_by)
    lease.lost = True


def report_lost(lease: Lease) -> None:
    """A background refresh found ``lease`` gone: log it and call its ``on_lost`` callbacks."""
    log.warning("lease lost: %r", lease)
    found_lost(lease, "refresher")
    for callback in lease._on_lost:
        try:
            callback(lease)
        except Exception:
            log.exception("on_lost callback of %r failed", lease)


def _describe(leases: Iterable[Lease]) -> str:
    return ", ".join(map(repr, leases))


# -- the client ----------------------------------------------------------------------------


class Client(Generic[C]):
    """What both drivers share: settings, and every operation as a flow.

    A driver subclass names its redis-py classes (``_kind``), its waker and refresher
    classes, and provides ``_drive`` (run a flow, performing its effects).
    """

    _kind: ClassVar[ClientKind]
    _waker_class: ClassVar[Callable[..., _Waker]]
    _refresher_class: ClassVar[Callable[..., _Refresher]]

    def __init__(
        self,
        redis: str | C,
        *,
        namespace: str = "hilok",
        separator: str = "/",
        ttl: float = 30.0,
        redis_options: dict[str, Any] | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self.separator = validate_separator(separator)
        self.ttl = check_ttl(ttl)
        self.wait_replicas, self.wait_timeout = check_wait_replicas(wait_replicas, wait_timeout)
        self._protocol = Calls(namespace, separator)
        self._owns_client = isinstance(redis, str)
        self.redis: C = make_client(redis, redis_options, self._kind)
        self.server = describe_server(self.redis)
        self._cluster = isinstance(self.redis, self._kind.cluster)
        if self._cluster and self.wait_replicas:
            raise InvalidArgument(CLUSTER_WAIT)
        self._eviction_checked = self._cluster  # CONFIG GET would ask one node of many
        # the scripts go as FCALL of the library until the server refuses it (see _send)
        self._functions = True
        # the channel on which releases tell this client's waiters that the lock is theirs
        self._channel = self._protocol.keys.channel(secrets.token_urlsafe(12))
        self._waker: _Waker = self._waker_class(self)
        self._refresher: _Refresher = self._refresher_class(self)
        # cleanups of failed calls that could not be sent (until when they matter, the call):
        # they go first in this client's next round trip
        self._undone: list[tuple[float, Call]] = []
        self._undone_lock = threading.Lock()
        # trees where somebody waited lately (tree -> until when, monotonic): calls there go
        # with full node blocks at once; elsewhere lean ones (see Protocol.acquire)
        self._busy: dict[str, float] = {}

    def release(self, *leases: Lease) -> Any:
        """Release the leases (the drivers' own, documented method)."""
        raise NotImplementedError

    def keep_alive(self, lease: Lease, *, interval: float | None = None) -> None:
        """Refresh ``lease`` in the background until it is released.

        One thread (``HiLok``) or task (``AsyncHiLok``) per client renews every kept lease in
        one round trip per tick (a third of the shortest ttl, or ``interval`` if shorter). A
        lease found lost gets ``lease.lost = True`` and its ``on_lost`` callbacks are called.
        """
        self._check_leases([lease], "keep alive")
        if interval is not None:
            lease.refresh_interval = check_ttl(interval, "interval")
        self._refresher.add(lease)

    def _check_leases(self, leases: Iterable[object], what: str) -> None:
        """Refuse what is not a lease, and a lease granted in another namespace: there its
        grant does not exist, so a release would report it lost (and mark it released
        while its holder goes on renewing it), a refresh would find it gone."""
        for lease in leases:
            if type(lease) is Lease and lease._owner is self:
                continue  # granted by this client: checked when it was made
            if not isinstance(lease, Lease):
                raise InvalidArgument(
                    f"cannot {what} {lease!r:.80}: expected a Lease, got {type(lease).__name__}"
                )
            check_handle(lease.handle)  # a forged one: not a handle this library hands out
            if lease.namespace is not None and lease.namespace != self.namespace:
                raise InvalidArgument(
                    f"cannot {what} {lease!r}: it was granted in namespace "
                    f"{lease.namespace!r}, and this client works in namespace "
                    f"{self.namespace!r}; use a client of namespace {lease.namespace!r}"
                )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.server} namespace={self.namespace!r}>"

    # -- sending -----------------------------------------------------------------------------

    def _send(
        self, calls: Sequence[Call], *, shield: bool = False, wait: bool = False
    ) -> Flow[Any]:
        """Send script calls in one round trip; their replies. With ``wait``, ``WAIT`` for
        ``wait_replicas`` follows on the same connection (it counts that connection's writes
        and cannot run inside a script); the replies then end with its count.

        The calls go as ``FCALL`` of the library's functions. Calls the server did not run
        (the library is not loaded: a new server, a restart, ``FUNCTION FLUSH``) are sent
        again once it is loaded; a server that refuses functions (Redis before 7, an ACL
        without ``FCALL`` or ``FUNCTION LOAD``) gets every call as ``EVALSHA`` from then on
        (by source for a script it lacks: after a restart or ``SCRIPT FLUSH``)."""
        extra = (
            [("WAIT", self.wait_replicas, max(1, round(self.wait_timeout * 1000)))] if wait else []
        )
        name = calls[0].script.name
        # cleanups that could not be sent before go first, and are kept if this fails too
        pending = self._take_undone() if self._undone else []
        if pending:
            calls = [*(call for _, call in pending), *calls]
        try:
            replies = yield Execute([self._command(c, False) for c in calls] + extra, shield)
            missing = [i for i, r in enumerate(replies[: len(calls)]) if self._unsent(r)]
            if missing:
                yield from self._load_scripts(replies[missing[0]], shield)
                commands = [self._command(calls[i], True) for i in missing]
                again = yield Execute(commands + extra, shield)
                for i, reply in zip(missing, again, strict=False):
                    replies[i] = reply
                if wait:
                    replies[-1] = again[-1]
        except BaseException as exc:
            self._keep_undone(pending)
            if isinstance(exc, RedisError):
                raise translate(exc, self.server, name) from exc
            raise
        if pending:  # their replies do not matter: a release twice is harmless
            calls, replies = calls[len(pending) :], replies[len(pending) :]
            log.info("sent %d cleanup(s) left by calls that failed earlier", len(pending))
        for call, reply in zip(calls, replies, strict=False):  # and WAIT's reply last
            if isinstance(reply, RedisError):
                raise translate(reply, self.server, call.script.name) from reply
        if wait and isinstance(replies[-1], RedisError):
            raise translate(replies[-1], self.server, name) from replies[-1]
        return replies

    def _command(self, call: Call, again: bool) -> tuple[Any, ...]:
        """``call`` as a command: FCALL, or EVALSHA (EVAL, with the source, when ``again``)."""
        if self._functions:
            return ("FCALL", call.script.function, len(call.keys), *call.keys, *call.args)
        if again:
            return ("EVAL", call.script.source, len(call.keys), *call.keys, *call.args)
        return ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)

    def _unsent(self, reply: object) -> bool:
        """Is ``reply`` a refusal before the call ran, that sending it otherwise cures?"""
        if isinstance(reply, NoScriptError):
            return True
        if not self._functions or not isinstance(reply, ResponseError):
            return False
        text = str(reply)
        return (
            _library_missing(reply)
            or "unknown command" in text  # Redis before 7, or FCALL renamed away
            or (isinstance(reply, NoPermissionError) and "'fcall'" in text)
        )

    def _load_scripts(self, refusal: object, shield: bool) -> Flow[None]:
        """Make the scripts callable again after ``refusal``: load the library, or, if the
        server will not run functions, use EVALSHA from now on."""
        if not self._functions:
            return  # NOSCRIPT: the calls go again by source
        if _library_missing(refusal):
            (loaded,) = yield Execute([("FUNCTION LOAD", "REPLACE", LIBRARY.source)], shield)
            if not isinstance(loaded, RedisError):
                return
            refusal = loaded
        self._functions = False
        log.info(
            "Redis at %s will not run Redis Functions (%s): celery_hilok sends its scripts "
            "with EVALSHA instead (slower: see 'Redis Functions' in docs/operations.md)",
            self.server,
            refusal,
        )

    def _send_batches(
        self, batches: list[tuple[list[int], Call]], count: int, shield: bool = False
    ) -> Flow[list[int]]:
        """Send the batches in one round trip; the per-item reply codes, in item order."""
        codes = [0] * count
        replies = yield from self._send([call for _, call in batches], shield=shield)
        for (part, _), reply in zip(batches, replies, strict=True):
            for i, code in zip(part, self._protocol.decode_codes(reply), strict=True):
                codes[i] = code
        return codes

    def _quietly(self, call: Call, what: str, matters: float) -> Flow[None]:
        """Send a cleanup ``call``; if that fails, it goes with this client's next round trip
        within ``matters`` seconds (after that, whatever it would undo has run out).

        Only the first cleanup kept while Redis is out of reach is a warning; more during
        the same outage (every acquire that fails then leaves one) are logged at debug
        level, and the send that carries them all says how many went (at info level)."""
        try:
            yield from self._send([call], shield=True)
        except HiLokError as exc:
            first = not self._undone
            self._keep_undone([(time.monotonic() + matters, call)])
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "could not %s (%s); it is sent again with this client's next call, and "
                "anything left expires within its ttl anyway",
                what,
                exc,
            )

    def _take_undone(self) -> list[tuple[float, Call]]:
        """The cleanups still worth sending, taken off the list (see :meth:`_keep_undone`)."""
        now = time.monotonic()
        with self._undone_lock:
            undone, self._undone = self._undone, []
        return [(until, call) for until, call in undone if until > now]

    def _keep_undone(self, items: Sequence[tuple[float, Call]]) -> None:
        """Keep cleanups (until when they matter, the call) that could not be sent, for the
        next round trip: at most :data:`_UNDONE_KEPT`, the newest."""
        if items:
            with self._undone_lock:
                self._undone = [*self._undone, *items][-_UNDONE_KEPT:]

    def _check_eviction(self) -> Flow[None]:
        """Warn once if Redis may evict lock keys (skipped where CONFIG GET is refused: an
        ACL without CONFIG, a managed Redis)."""
        self._eviction_checked = True
        try:
            (config,) = yield Execute([("CONFIG GET", "maxmemory-policy")])
        except RedisError:
            return
        if isinstance(config, dict) and config:
            warning = eviction_warning(next(iter(config.values())), self.server)
            if warning:
                log.warning("%s", warning)

    # -- lean or full calls ------------------------------------------------------------------

    def _lean(self, requests: Iterable[Request]) -> bool:
        """May calls for ``requests`` go lean: has nobody waited in their trees lately?"""
        busy = self._busy
        if not busy:
            return True
        now = time.monotonic()
        return all(busy.get(r.path.tree, 0.0) <= now for r in requests)

    def _note_busy(self, requests: Iterable[Request]) -> None:
        """Somebody waits in the trees of ``requests``: the next calls there go full (a lean
        one would be answered "ask again in full", a round trip lost)."""
        busy = self._busy
        if len(busy) >= _BUSY_KEPT:
            busy.clear()
        until = time.monotonic() + BUSY_MEMORY
        for r in requests:
            busy[r.path.tree] = until

    # -- acquiring ---------------------------------------------------------------------------

    def _acquire(
        self,
        locks: Iterable[tuple[str, Mode]],
        options: AcquireOptions,
        check: WaitCheck | None = None,
        kept: bool = False,
    ) -> Flow[list[Lease]]:
        """Acquire ``locks`` (see :class:`AcquireOptions`); ``check`` may stop a wait.
        ``kept``: the lease goes to the refresher at once (a ``with`` block), so a lock a
        release hands over may be taken from its message, for the hand-off lease, without
        a call (see :meth:`_acquire_group`)."""
        block, timeout, ttl, handle = _options(options)
        requests = normalise_requests(locks, self.separator)
        lease_ttl = self.ttl if ttl is None else check_ttl(ttl)
        limit = check_timeout(timeout)
        if not self._cluster or len({r.path.tree for r in requests}) == 1:
            return (
                yield from self._acquire_group(
                    requests, handle, lease_ttl, block, limit, check, kept
                )
            )
        # A cluster runs one script per slot: take the trees one by one, in sorted order (so
        # that two such acquires never wait for each other in a cycle), within one time
        # budget, and give back what was taken if a later tree cannot be had.
        start = time.monotonic()
        leases: list[Lease] = []
        try:
            for group in by_tree(requests):
                left = None if limit is None else max(0.0, limit - (time.monotonic() - start))
                leases += yield from self._acquire_group(
                    group, handle, lease_ttl, block, left, check
                )
                handle = leases[0].handle
        except BaseException:
            yield from self._release_quietly(leases)
            raise
        order = {req: i for i, req in enumerate(requests)}
        return sorted(leases, key=lambda lease: order[lease.request])

    def _acquire_group(
        self,
        requests: list[Request],
        handle: str | None,
        ttl: float,
        block: bool,
        timeout: float | None,
        check: WaitCheck | None = None,
        kept: bool = False,
    ) -> Flow[list[Lease]]:
        """One atomic acquire of ``requests`` (one script per try), waiting as needed;
        ``check`` may stop the wait (see :class:`WaitCheck`).

        A release that grants the lock to a waiter says so in its message, with the token
        (release.lua). A lease that will be ``kept`` alive at once is taken from there,
        without asking again: it lasts the hand-off lease (its ``term``) from the last
        refused call at the latest (the release came after it), until the refresher first
        renews it for its ttl, due within a third of that. One whose last call is older
        than half the hand-off lease (a waiter asks again every KEEPALIVE, so only a
        stalled process) asks again, and so do those with ``wait_replicas`` (the grant
        must be seen on replicas first)."""
        if not self._eviction_checked:
            yield from self._check_eviction()
        started = time.monotonic()
        attempt = Acquisition(
            self._protocol,
            requests,
            handle=handle,
            ttl=ttl,
            block=block,
            timeout=timeout,
            now=started,
            channel=self._channel,
            lean=self._lean(requests),
        )
        wait: Wait | None = None
        take = kept and not self.wait_replicas
        sent = started  # when the last call went (replaced before it is read)
        try:
            while True:
                if wait is not None:
                    handed = wait.handed
                    if take and handed and time.monotonic() - sent < handed.lease / 2:
                        return self._taken(attempt, handed, sent, started)
                    wait.event.clear()
                sent = time.monotonic()
                replies = yield from self._send([attempt.call], wait=self.wait_replicas > 0)
                step = attempt.step(replies[0], time.monotonic())
                if isinstance(step, list):
                    if self.wait_replicas and replies[1] < self.wait_replicas:
                        raise attempt.not_replicated(
                            replies[1], self.wait_replicas, self.wait_timeout
                        )
                    return self._granted(attempt, step, sent, started, wait is not None)
                self._note_busy(requests)
                if step is RESEND:
                    continue
                cap = float("inf")
                if check is not None:
                    assert attempt.last is not None
                    why = check.stop(attempt.last)
                    if why is not None:
                        raise attempt.gave_up(why)
                    cap = check.every  # ask again by then, still in the queue, to check again
                if wait is None:
                    wait, live = yield from self._register(attempt, sent)
                    if live:  # subscribed before the refused call: nothing slipped by
                        pause = attempt.pause(time.monotonic()).seconds
                        yield Sleep(wait.event, min(pause, cap))
                else:
                    yield Sleep(wait.event, min(step.seconds, cap))
        except BaseException as exc:
            if isinstance(exc, LockNotAcquired):
                self._note_busy(requests)
                if metrics._observers:
                    metrics.refused(requests, started, attempt.block, exc)
            cleanup = attempt.cleanup(exc)
            if cleanup is not None:
                matters = max(attempt.ttl, attempt.queue_ttl_ms / 1000)
                yield from self._quietly(cleanup, "clean up after a failed acquire", matters)
            raise
        finally:
            if wait is not None:
                self._waker.table.remove(wait)

    def _enqueue(
        self, locks: Iterable[tuple[str, Mode]], options: EnqueueOptions
    ) -> Flow[list[Lease] | LockNotAcquired]:
        """One try for ``locks`` that, refused, leaves the request waiting without a waiter
        in this process (the Celery integration's ``park`` policy): granted, the leases;
        refused, the refusal (not raised), and the request keeps its place in the queue for
        ``queue_ttl`` seconds, a release telling ``channel`` when it granted it the lock (or
        when to ask again). A later call of the same handle keeps that place and renews it.
        A call whose reply never came withdraws what it may have left if
        ``withdraw_on_error``; else that runs out by itself, unless asked again."""
        handle, ttl, channel = options["handle"], options["ttl"], options["channel"]
        requests = normalise_requests(locks, self.separator)
        if self._cluster and len({r.path.tree for r in requests}) > 1:
            raise InvalidArgument(
                "a request parked in Redis Cluster must lock paths of one tree (one slot): "
                f"got {', '.join(r.describe() for r in requests)}"
            )
        queue_ms = int(check_ttl(options["queue_ttl"], "queue_ttl") * 1000)
        sent = time.monotonic()
        attempt = Acquisition(
            self._protocol,
            requests,
            handle=handle,
            ttl=check_ttl(ttl),
            block=True,
            timeout=None,
            now=sent,
            channel=channel,
            queue_ttl_ms=queue_ms,
        )
        try:
            (reply,) = yield from self._send([attempt.call])
        except BaseException as exc:
            cleanup = attempt.cleanup(exc)
            if options.get("withdraw_on_error", True) and cleanup is not None:
                matters = max(attempt.ttl, queue_ms / 1000)
                yield from self._quietly(cleanup, "withdraw a parked request", matters)
            raise
        outcome = self._protocol.decode_acquire(reply)
        assert outcome is not None, "a full call never asks to be made again"
        if isinstance(outcome, Blocked):
            refusal = attempt._not_acquired(outcome, "at once (it waits in the queue)")
            assert isinstance(refusal, LockNotAcquired)
            return refusal
        return self._granted(attempt, outcome.tokens, sent, sent, False)

    def _granted(
        self, attempt: Acquisition, tokens: list[int], sent: float, started: float, waited: bool
    ) -> list[Lease]:
        leases = [
            Lease(r, attempt.handle, token, attempt.ttl, self)
            for r, token in zip(attempt.requests, tokens, strict=True)
        ]
        granted = time.monotonic()
        for lease in leases:
            lease.renewed_at = sent  # measured before the call: never late
            lease.granted_at, lease.waited = granted, granted - started
            lease.contended = waited
        if metrics._observers:
            metrics.acquired(leases)
        return leases

    def _taken(
        self, attempt: Acquisition, handed: Handed, sent: float, started: float
    ) -> list[Lease]:
        """The lock a release granted ``attempt`` and told it of. The grant came after the
        last refused call was ``sent``: from then on it lasts at least the hand-off lease."""
        leases = self._granted(attempt, [handed.token], sent, started, True)
        leases[0].term = min(handed.lease, attempt.ttl)
        return leases

    def _register(self, attempt: Acquisition, sent: float) -> Flow[tuple[Wait, bool]]:
        """Wait for wake-ups: subscribe to the client's own channel if nobody did yet, and
        wait for the server to confirm it (without confirmation the waiter still works,
        capped by leases and KEEPALIVE). One channel per client, whatever the trees.

        Also says whether the channel was live before the refused call was ``sent``: then
        no release since can have gone unheard (a message that came before the wait was
        registered is kept for it), and the waiter need not ask again at once."""
        self._waker.ensure()
        channels = {self._channel}
        wait, new, confirmations, live = self._waker.table.add(attempt, channels, sent)
        if new:
            try:
                yield Subscribe(new)
            except BaseException as exc:
                self._waker.table.forget(new)
                if not isinstance(exc, RedisError):
                    raise
                level = waker_log_level(exc)
                log.log(level, "subscribe failed (%s); waiting falls back to lease caps", exc)
                return wait, False
        for event in confirmations:
            yield Sleep(event, 5.0)
        return wait, live

    def _enter(self, path: str, mode: Mode, options: AcquireOptions) -> Flow[Lease]:
        """The start of a ``with`` block: acquire, then keep the lease alive."""
        (lease,) = yield from self._acquire([(path, mode)], options, kept=True)
        self.keep_alive(lease)
        return lease

    def _leave(self, lease: Lease, failed: bool) -> Flow[None]:
        """The end of a ``with`` block: release; after an error in the block, quietly (the
        block's own error is what matters)."""
        if failed:
            yield from self._release_quietly([lease])
        else:
            yield from self._release([lease])

    # -- holding ----------------------------------------------------------------------------

    def _refresh(self, leases: Sequence[Lease], ttl: float | None) -> Flow[None]:
        alive = yield from self._refresh_many(leases, ttl)
        lost = [lease for lease, ok in zip(leases, alive, strict=True) if not ok]
        if lost:
            raise LockLost(f"lease lost (expired or released): {_describe(lost)}")

    def _refresh_many(self, leases: Sequence[Lease], ttl: float | None) -> Flow[list[bool]]:
        alive = yield from self._renew(leases, ttl)
        for lease, ok in zip(leases, alive, strict=True):
            if not ok:
                found_lost(lease, "refresh")
        return alive

    def _renew(self, leases: Sequence[Lease], ttl: float | None) -> Flow[list[bool]]:
        """Renew ``leases`` in one round trip, without marking them found lost."""
        self._check_leases(leases, "refresh")
        if not leases:
            return []
        new_ttl = None if ttl is None else check_ttl(ttl)
        items = [(lease.handle, lease.request, new_ttl or lease.ttl) for lease in leases]
        sent = time.monotonic()
        batches = self._protocol.refresh_batches(items, self._cluster)
        codes = yield from self._send_batches(batches, len(items))
        for lease, code in zip(leases, codes, strict=True):
            if code:
                lease.renewed_at = sent
                if new_ttl is not None:
                    lease.ttl = new_ttl
                lease.term = lease.ttl
        return [bool(c) for c in codes]

    def _tick(self, leases: list[Lease]) -> Flow[None]:
        """One tick of the background refresher."""
        try:
            alive = yield from self._renew(leases, None)
        except HiLokError as exc:
            log.warning("could not refresh %d lease(s): %s", len(leases), exc)
            alive = None
        for lease in self._refresher.schedule.lost(leases, alive, time.monotonic()):
            report_lost(lease)

    def _release(self, leases: Sequence[Lease]) -> Flow[list[int]]:
        """Release ``leases``; the release script's code for each one not released before
        (1 released, 2 had run out, 0 not held)."""
        self._check_leases(leases, "release")
        todo = [lease for lease in leases if not lease.released]
        for lease in todo:
            self._refresher.discard(lease)
        if not todo:
            return []
        items = [(lease.handle, lease.request) for lease in todo]
        requests = [lease.request for lease in todo]
        lean = self._lean(requests) and not any(lease.contended for lease in todo)
        batches = self._protocol.release_batches(items, self._cluster, lean)
        # Once asked for, a release is carried out even if the caller is cancelled meanwhile
        # (else the locks would stay held until their ttl): see Execute.shield.
        codes = yield from self._send_batches(batches, len(todo), shield=True)
        again = [i for i, code in enumerate(codes) if code == RELEASE_ASK_FULL]
        if again:  # somebody waits there after all: those go in full (nothing was done yet)
            self._note_busy(requests[i] for i in again)
            batches = self._protocol.release_batches([items[i] for i in again], self._cluster)
            redone = yield from self._send_batches(batches, len(again), shield=True)
            for i, code in zip(again, redone, strict=True):
                codes[i] = code
        lost: list[Lease] = []
        freed: list[tuple[Lease, bool]] = []  # what this call released, and if it ran out
        for lease, code in zip(todo, codes, strict=True):
            lease.released = True
            # LockLost needs evidence that the lease ran out: Redis saw it expire (2), or
            # a refresh of this lease found it gone. Otherwise a grant found not held (0)
            # was released already (through another Lease of the same grant, or by this
            # very release whose reply was lost and resent) and a release twice is fine.
            ran_out = code == 2 or (code == 0 and lease.lost)
            if ran_out:
                found_lost(lease, "release")
                lost.append(lease)
            if code or ran_out:
                freed.append((lease, ran_out))
        if metrics._observers and freed:
            metrics.released([lease for lease, _ in freed], [ran_out for _, ran_out in freed])
        if lost:
            raise LockLost(f"released a lease that had run out: {_describe(lost)}")
        return codes

    def _release_quietly(self, leases: Sequence[Lease]) -> Flow[None]:
        try:
            yield from self._release(leases)
        except HiLokError as exc:
            log.warning("releasing %s: %s", _describe(leases), exc)

    # -- looking ----------------------------------------------------------------------------

    def _status(self, path: str, chain: bool) -> Flow[Any]:
        lock_path = parse_path(path, self.separator)
        (reply,) = yield from self._send([self._protocol.status(lock_path)])
        nodes, queue = self._protocol.decode_status(lock_path, reply)
        if chain:
            return LockStatus.build_chain(lock_path, nodes, queue)
        return LockStatus.build(lock_path, nodes, queue)
