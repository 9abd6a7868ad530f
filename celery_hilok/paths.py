"""Lock paths: parse, validate, normalise, and name their Redis keys.

A path such as ``"tenants/42/invoices/7"`` is split on the separator and empty segments are
dropped, so ``"/a/b"``, ``"a/b/"`` and ``"a//b"`` are the same path; each segment is put in
Unicode normal form C, so canonically equivalent spellings of a name are the same path too.
Its first segment names the *tree*: every key of a tree carries the tree's Redis Cluster
hash tag, so one script can touch the whole ancestor chain atomically.

Keys are built here, on the client, from percent-encoded segments, and always reach Redis as
``KEYS``; scripts never build key names from user strings. Key layout under namespace ``ns``
(``<p>`` is the canonical path, segments percent-encoded and joined by ``/``)::

    ns:{<root>}:<p>:is|ix|s|x        sorted sets of the marks on node <p>, one per mark
    ns:{<root>}:<p>:wis|wix|ws|wx    the wait marks of waiting requests on node <p>
    ns:{<root>}::n                   the tree's last fencing token (also numbers tickets)
    ns:{<root>}::q / ::qx / ::qc     the tree's waiting requests: ticket / entry expiry /
                                     wake-up channel, nonce, ttl and size of the request
    ns:{<root>}::hl:<handle>         one holder's grants in the tree (fencing token, lease
                                     expiry, acquire nonce per grant; "@": the latest expiry)
    ns:{<root>}::h / ::hx            grants a release handed over, until their holders renew
                                     them into their own hash (and a note per handle) /
                                     when entries go
    ns:w:<client id>                 a client's pub/sub channel for wake-ups (not a key)
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Final
from urllib.parse import quote, unquote

from .errors import InvalidArgument

__all__ = [
    "MAX_DEPTH",
    "MAX_PATH_LENGTH",
    "KeySpace",
    "LockPath",
    "parse_path",
    "validate_separator",
]

MAX_DEPTH: Final = 32
"""Most segments a path may have."""
MAX_PATH_LENGTH: Final = 1024
"""Most characters a path may have, separators included."""

# Characters kept readable in key names; everything else, notably ``/ : { } %`` and
# whitespace, is percent-encoded so that key names and members parse unambiguously.
_SAFE: Final = "@+=,!*'()$&;~"
_NAMESPACE_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True, slots=True)
class LockPath:
    """A normalised lock path.

    ``text`` is the path as users see it (segments joined by the separator); ``canonical``
    is its separator-independent form used in keys and messages exchanged with Redis;
    ``chain`` holds the canonical form of every ancestor, root first, ending with the path.
    """

    segments: tuple[str, ...]
    separator: str
    text: str
    canonical: str
    chain: tuple[str, ...]

    @property
    def depth(self) -> int:
        return len(self.segments)

    @property
    def tree(self) -> str:
        """The canonical first segment: the lock tree this path belongs to."""
        return self.chain[0]

    def is_ancestor_or_self_of(self, other: LockPath) -> bool:
        n = len(self.segments)
        return n <= len(other.segments) and other.segments[:n] == self.segments

    def __str__(self) -> str:
        return self.text


def parse_path(path: object, separator: str = "/") -> LockPath:
    """Return the normalised :class:`LockPath` of ``path``.

    Each segment is put in Unicode normal form C (NFC), so canonically equivalent
    spellings of a name (``"caf\u00e9"`` and ``"cafe\u0301"``) are one lock.

    Raises :class:`InvalidArgument` when ``path`` is not a string, holds a lone surrogate
    (it cannot be encoded as UTF-8), has no segment left after dropping empty ones, has
    more than :data:`MAX_DEPTH` segments or more than :data:`MAX_PATH_LENGTH` characters
    (before or after normalisation), or when ``separator`` is not a valid one.
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"lock path must be a str, got {type(path).__name__}: {path!r}")
    if not isinstance(separator, str) or not separator:
        validate_separator(separator)  # raises
    return _parse(path, separator)


def validate_separator(separator: object) -> str:
    if not isinstance(separator, str) or not separator:
        raise InvalidArgument(f"separator must be a non-empty str, got {separator!r}")
    _check_text(separator, "separator")
    return separator


def _check_text(text: str, what: str) -> None:
    """Refuse a string that is not valid Unicode text: one holding a lone surrogate, as
    ``os.fsdecode`` makes of a file name that is not valid UTF-8 (``surrogateescape``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{what} {text[:40]!r} is not valid Unicode text: it holds the lone surrogate "
            f"{text[exc.start]!r} at position {exc.start} (a file name decoded with "
            "'surrogateescape'?); decode it with its real encoding, or name the lock by "
            "something printable, such as the name's bytes in hex"
        ) from None


def _too_long(path: str, length: int, when: str = "") -> InvalidArgument:
    return InvalidArgument(
        f"lock path is {length} characters long{when}, more than {MAX_PATH_LENGTH}: "
        f"{path[:40]!r}..."
    )


@lru_cache(maxsize=4096)
def _parse(path: str, separator: str) -> LockPath:
    if len(path) > MAX_PATH_LENGTH:
        raise _too_long(path, len(path))
    _check_text(separator, "separator")
    _check_text(path, "lock path")
    segments = tuple(_nfc(s) for s in path.split(separator) if s)
    if not segments:
        raise InvalidArgument(f"lock path {path!r} has no segment (separator {separator!r})")
    if len(segments) > MAX_DEPTH:
        raise InvalidArgument(
            f"lock path {path[:80]!r} has {len(segments)} segments, more than {MAX_DEPTH}"
        )
    text = separator.join(segments)
    if len(text) > MAX_PATH_LENGTH:
        raise _too_long(path, len(text), " once normalised (NFC)")
    if any(separator in s for s in segments):
        # only with a separator that a segment's normal form composes into: the text
        # would split differently when parsed again (a lease unpickled, a status line)
        raise InvalidArgument(
            f"lock path {path[:80]!r} has a segment that holds the separator "
            f"{separator!r} once normalised (NFC)"
        )
    encoded = [quote(s, safe=_SAFE) for s in segments]
    chain = tuple("/".join(encoded[: i + 1]) for i in range(len(encoded)))
    return LockPath(segments, separator, text, chain[-1], chain)


def _nfc(segment: str) -> str:
    if segment.isascii():  # the common case, already in every normal form
        return segment
    return unicodedata.normalize("NFC", segment)


def decode_canonical(canonical: str, separator: str = "/") -> str:
    """Turn a canonical path (as found in keys and members) back into user text."""
    return separator.join(unquote(s) for s in canonical.split("/"))


def validate_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidArgument(
            f"namespace must be 1-64 characters of letters, digits, '_', '.', '-': {namespace!r}"
        )
    return namespace


_NODE_SUFFIXES: Final = ("is", "ix", "s", "x", "wis", "wix", "ws", "wx")


class KeySpace:
    """Builds every Redis key name of one namespace (see the module docstring)."""

    __slots__ = ("_node_cache", "namespace")

    def __init__(self, namespace: str) -> None:
        self.namespace = validate_namespace(namespace)
        self._node_cache: dict[str, tuple[str, ...]] = {}

    def tree_prefix(self, tree: str) -> str:
        return f"{self.namespace}:{{{tree}}}:"

    def node_keys(self, tree: str, canonical: str) -> tuple[str, ...]:
        """The four mark sets of one node, in the order the scripts expect: IS, IX, S, X."""
        return self.node_block(tree, canonical)[:4]

    def node_block(self, tree: str, canonical: str) -> tuple[str, ...]:
        """All eight sets of one node: the marks IS, IX, S, X, then the wait marks."""
        keys = self._node_cache.get(canonical)
        if keys is None:
            base = f"{self.namespace}:{{{tree}}}:{canonical}:"
            keys = tuple(base + suffix for suffix in _NODE_SUFFIXES)
            if len(self._node_cache) > 16384:
                self._node_cache.clear()
            self._node_cache[canonical] = keys
        return keys

    def tree_keys(self, tree: str) -> tuple[str, str, str, str, str, str]:
        """Token counter, waiting requests (tickets, expiry, channels) and table of grants a
        release handed over (entries, their expiry) of one tree."""
        p = self.tree_prefix(tree)
        return (p + ":n", p + ":q", p + ":qx", p + ":qc", p + ":h", p + ":hx")

    def holder_key(self, tree: str, handle: str) -> str:
        """One holder's hash in a tree: the entries of its grants there."""
        return f"{self.tree_prefix(tree)}:hl:{handle}"

    def channel(self, client_id: str) -> str:
        """The wake-up channel of one client (releases tell its waiters there)."""
        return f"{self.namespace}:w:{client_id}"

    def tree_pattern(self) -> str:
        """A SCAN pattern matching every key of the namespace."""
        return f"{self.namespace}:{{*"
