"""The stored format: every key, value and mark the state tables hold, in bytes (no I/O).

The one encoder and decoder of what lives in RocksDB and the changelogs; the state stage,
the checkpoint, the restore, the rescale and the bench all go through here, and a test
round-trips each of them (tests/unit/core/test_stored.py). A change of layout is a new
`STATE_FORMAT` (docs/design.md, "Migrating state").

- Keys: entry keys `buyer + JSON [order, status]`, day keys `buyer + effect_time`, the buyer
  as a biased big-endian u64 so that keys sort (and prefix-scan) by buyer; the partition's
  marks are the `~`-keys of the days table, never 12 bytes long.
- Values: a `Versioned` JSON array `[sid, version, current, previous]`.
- Marks: the format (`~format`), the next by-buyer offset (`~next-offset`), the highest
  one ever written (`~high-mark`) and the grant versions' base (`~version-base`) as decimal
  ASCII; the watermark (`~watermark`) as a `Versioned` int, since it changes with records.
"""

from __future__ import annotations

import struct
from typing import Any, Final, NamedTuple

import orjson

from coupon_stream.core.records import encode_json

# The version of the layout below, kept in each partition's `~format` mark.
STATE_FORMAT = 2

FORMAT_KEY = b"~format"
WATERMARK_KEY = b"~watermark"
NEXT_OFFSET_KEY = b"~next-offset"  # the by-buyer offset after the last checkpoint
HIGH_MARK_KEY = b"~high-mark"  # the highest next-offset any checkpoint ever wrote
VERSION_BASE_KEY = b"~version-base"  # added to offsets in grant versions (a rescale's)
META_KEYS = frozenset({FORMAT_KEY, WATERMARK_KEY, NEXT_OFFSET_KEY, HIGH_MARK_KEY, VERSION_BASE_KEY})

_BUYER = struct.Struct(">Q")
BUYER_BYTES: Final = _BUYER.size  # every entry and day key starts with its buyer
_DAY_KEY = struct.Struct(">QI")
_BIAS = 2**63  # signed buyer ids as unsigned, so keys sort (and prefix-scan) by buyer
NO_SESSION = -1  # a reader that wrote nothing (a rescale): reads every value as committed


class StateFormatError(RuntimeError):
    """Local or changelog state written in a format this version cannot read."""


# -- keys -------------------------------------------------------------------------------------


def buyer_prefix(buyer_id: int) -> bytes:
    """The prefix every entry and day key of a buyer starts with."""
    return _BUYER.pack(buyer_id + _BIAS)


def buyer_of_key(key: bytes) -> int:
    """The buyer an entry or day key belongs to (every state key but the marks starts so)."""
    buyer: int = _BUYER.unpack_from(key)[0]
    return buyer - _BIAS


def entry_key(buyer_id: int, order: str, status: str) -> bytes:
    return _BUYER.pack(buyer_id + _BIAS) + encode_json((order, status))


def day_key(buyer_id: int, effect_time: int) -> bytes:
    return _DAY_KEY.pack(buyer_id + _BIAS, effect_time)


def parse_day_key(key: bytes) -> tuple[int, int]:
    buyer, day = _DAY_KEY.unpack(key)
    return buyer - _BIAS, day


def is_day_key(key: bytes) -> bool:
    return len(key) == _DAY_KEY.size and key not in META_KEYS


# -- values -----------------------------------------------------------------------------------


class Versioned(NamedTuple):
    """A stored value: the key's value as of by-buyer offset `version`, and before it.

    `current` is the value after every by-buyer message below `version` (the end of the
    checkpoint that wrote it); `previous` is its value at the partition's last committed
    offset when it was written. Replay is deterministic, so both are true statements about
    the log. A checkpoint a crash cut short leaves some keys at its end and others at its
    start; `as_of` reads each one back at the committed offset, so they agree again.
    """

    sid: int  # the session that wrote it (`state_stage.Session.sid`)
    version: int
    current: Any
    previous: Any

    def as_of(self, committed: int, sid: int) -> Any:
        """The value at by-buyer offset `committed`, as read by worker session `sid`."""
        if self.version > committed and self.sid != sid:
            return self.previous  # written by a checkpoint that was never committed
        return self.current

    def encode(self) -> bytes:
        return encode_value(*self)

    @classmethod
    def decode(cls, raw: bytes) -> Versioned:
        return cls(*orjson.loads(raw))


def encode_value(sid: int, version: int, current: Any, previous: Any) -> bytes:
    """`Versioned(...).encode()` without building the tuple (hot path)."""
    return encode_json((sid, version, current, previous))


def day_marker(effect_time: int) -> bytes:
    """Bytes that a stored entry's value holds if its current or previous copy is on
    `effect_time` (an entry begins with its day; JSON writes an int one way): a scan for one
    day's entries tests them before decoding a value. A value may hold them by chance too,
    so what is decoded is still checked."""
    return b"[%d," % effect_time


def read_value(raw: bytes, committed: int, sid: int = NO_SESSION) -> Any:
    """`Versioned.decode(raw).as_of(committed, sid)` without building the tuple (hot path;
    a test holds the two equal)."""
    writer, version, current, previous = orjson.loads(raw)
    return previous if version > committed and writer != sid else current


def read_superseded(raw: bytes, committed: int, sid: int) -> tuple[Any, bool]:
    """`read_value`, and whether the record was superseded: written past `committed` by a
    checkpoint of another session, which never committed. Such a record must be written
    again by the checkpoint that reads it, even with its value unchanged: once the
    committed offset passes its version, it would read as current."""
    writer, version, current, previous = orjson.loads(raw)
    if version > committed and writer != sid:
        return previous, True
    return current, False


def at_start(value: Any) -> bytes:
    """A value as an app's state before its first by-buyer message (offset 0, no session)."""
    return encode_value(0, 0, value, None)


def rebased(raw: bytes, committed: int) -> bytes | None:
    """A stored value as a new app's state before its first by-buyer message (`at_start`),
    or None (a delete) if the key is absent as of the committed offset.

    The usual value (version at or below the committed offset: read as `current`) only has
    its session and version replaced by 0, 0, as bytes: nothing else is decoded, and the
    `previous` it keeps is never read again (no offset is below 0).
    """
    _, version, rest = raw.split(b",", 2)
    if int(version) <= committed:
        return None if rest.startswith(b"null,") else b"[0,0," + rest
    value = read_value(raw, committed)
    return None if value is None else at_start(value)


# -- marks ------------------------------------------------------------------------------------


class Marks(NamedTuple):
    """A partition's marks as its state holds them (`read_marks`)."""

    next_offset: int | None  # None: no checkpoint yet
    high: int  # every checkpoint's events and writes up to here may be out already
    version_base: int


MARK_KEYS = [NEXT_OFFSET_KEY, FORMAT_KEY, HIGH_MARK_KEY, VERSION_BASE_KEY]
"""The raw marks `read_marks` reads, in its arguments' order."""


def marks(next_offset: int, high: int) -> dict[bytes, bytes]:
    """The marks a checkpoint writes with a partition's values."""
    return {
        NEXT_OFFSET_KEY: str(next_offset).encode(),
        FORMAT_KEY: str(STATE_FORMAT).encode(),
        HIGH_MARK_KEY: str(max(high, next_offset)).encode(),
    }


def start_marks(version_base: int) -> dict[bytes, bytes]:
    """A new app's marks before its first message (a rescale's)."""
    return {**marks(0, 0), VERSION_BASE_KEY: str(version_base).encode()}


def read_marks(
    partition: int,
    next_offset: bytes | None,
    fmt: bytes | None,
    high: bytes | None = None,
    version_base: bytes | None = None,
) -> Marks:
    """A partition's marks (`MARK_KEYS`, read raw).

    Refuses state of another format: reading it as this one would count wrong sums.
    """
    if fmt is not None and int(fmt) != STATE_FORMAT:
        raise StateFormatError(
            f"partition {partition} of the state holds format {int(fmt)}; this version "
            f"keeps format {STATE_FORMAT}. Start a new COUPON_APP_ID with an empty "
            "COUPON_DATA_DIR and replay the input (docs/design.md, 'Migrating state')"
        )
    offset = None if next_offset is None else int(next_offset)
    return Marks(
        offset,
        max(int(high or 0), offset or 0),
        int(version_base or 0),
    )
