"""Dedup and aggregate state, and how one record changes it (no I/O).

Two tables, both partitioned by buyer (docs/design.md, "State"):

- `entries`: the kept copy of each (buyer_id, biz_order_id, pay_status), as
  `[effect_time, yuan, gmt_create, gmt_modified]`;
- `days`: the running aggregate of each (buyer_id, effect_time), as
  `[cumulate_amount, kept entries, MIN(gmt_create), MAX(gmt_modified)]`.

A record changes its entry and at most two days, so applying it costs the same whatever its
buyer's history. Their keys and values in bytes are `stored`'s; a stored value is a
`stored.Versioned`, which is what makes a checkpoint that a crash cut in half harmless.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from enum import StrEnum
from typing import Any, Final, NamedTuple, Protocol

from coupon_stream.core.records import INT64_MAX, INT64_MIN, Row
from coupon_stream.core.stored import day_key, entry_key

# The state tables, both partitioned by buyer: kept copy per (buyer, order, pay_status) and
# running sums per (buyer, day); their layout in bytes is `stored`.
STATE_TABLES = ("entries", "days")

# Positions in an entry payload.
DAY, YUAN, CREATED, MODIFIED = range(4)
# Positions in a day payload.
SUM, COUNT, MIN_CREATED, MAX_MODIFIED = range(4)
# How many of its extreme values a day that lost one keeps in memory (`Extremes`): it
# loses its MIN or MAX again only when a run of replacements empties a list.
KEPT = 4

Entry = list[Any]  # [effect_time, yuan, gmt_create, gmt_modified]
Day = list[Any]  # [cumulate_amount, entries, min gmt_create, max gmt_modified]
Extremes = list[list[str]]
"""A day's KEPT smallest gmt_create values and KEPT largest gmt_modified values, both
ascending: kept in memory only (`StateView.extremes`), for days recomputed once."""

Cell = list[Any]
"""One key's place in a table while records are applied: a list whose item CURRENT is the
key's value now (None: absent). Its other items are the holder's (`state_stage.Slot`)."""
CURRENT: Final = 1

# Read-only stand-ins for an absent day: one without entries, and the day a moving copy
# leaves, should it be absent (it holds the copy, so it never is).
_NO_DAY: Final[tuple[Any, ...]] = (0, 0, None, None)
_LEFT_DAY: Final[tuple[Any, ...]] = (0, 1, None, None)


class Outcome(StrEnum):
    NEW = "new"  # first copy of its key: counted
    REPLACED = "replaced"  # an earlier-generated copy took the kept one's place
    DUPLICATE = "duplicate"  # a later or equal copy: changes nothing
    OVERFLOW = "overflow"  # would take a day's sum outside BIGINT: dead-lettered


class ResultRow(NamedTuple):
    """One row of the result table: the seed's `ads_tb_trd_and_rfd_pay_ri` for one key.

    A tuple in the table's column order, so the sink hands it to the driver as it is.
    """

    gmt_create: str | None
    gmt_modified: str | None
    buyer_id: int
    cumulate_amount: int
    effect_time: int


def generated_before(new_modified: str | None, old_modified: str | None) -> bool:
    """True if a copy modified at `new_modified` was generated strictly before the kept one.

    A null gmt_modified sorts after every timestamp, so the copy SQL's MIN picks wins;
    ties keep the copy that arrived first (docs/semantics.md, step 2).
    """
    if new_modified is None:
        return False
    return old_modified is None or new_modified < old_modified


def day_row(buyer_id: int, effect_time: int, day: Day | None) -> ResultRow | None:
    """The result row of one day, or None when the table must not hold one (sum <= 0)."""
    if day is None or day[SUM] <= 0:
        return None
    return ResultRow(day[MIN_CREATED], day[MAX_MODIFIED], buyer_id, day[SUM], effect_time)


def recomputed(day: Day, entries: list[Entry]) -> tuple[Day, Extremes]:
    """The day with MIN(gmt_create) and MAX(gmt_modified) taken again from its kept entries
    (after `_without` lost one: `StateView.stale`), and the extremes it keeps from then on."""
    created = sorted(e[CREATED] for e in entries if e[CREATED] is not None)
    modified = sorted(e[MODIFIED] for e in entries if e[MODIFIED] is not None)
    lows, highs = created[:KEPT], modified[-KEPT:]
    low, high = (lows[0] if lows else None), (highs[-1] if highs else None)
    return [day[SUM], day[COUNT], low, high], [lows, highs]


class StateView(Protocol):
    """The cells of the keys a message's records touch, and what they leave to the checkpoint.

    `entries` and `days` hold a cell for every entry and day key of the records being applied
    (plain dicts: a record reads and writes its keys in place, with no call per access); a
    day outside them (the old day of a copy that moves days) comes from `day_cell`.

    `stale` collects the days whose MIN/MAX lost the entry that held it; the checkpoint
    recomputes them from the day's entries once, however many records touched them.
    `touched` collects the (buyer, effect_time) of the result rows the records touched.
    `extremes` holds the `Extremes` of days recomputed once, by day key: only in memory, so
    that the stored state does not depend on when a day was recomputed; a day without them
    is recomputed when it loses an extremum, and then has them.
    """

    stale: set[bytes]
    touched: set[tuple[int, int]]
    extremes: dict[bytes, Extremes]

    @property
    def entries(self) -> Mapping[bytes, Cell]: ...
    @property
    def days(self) -> Mapping[bytes, Cell]: ...

    def day_cell(self, key: bytes) -> Cell: ...


class Applied(NamedTuple):
    """What applying one record did; its days go to `StateView.touched`."""

    outcome: Outcome
    reason: str = ""  # why a record was refused (OVERFLOW)


# One object per outcome that has no reason: applying a record allocates no result, and a
# caller counts a message's outcomes by identity (`COUNTED`, `list.count`), never hashing
# an Outcome (an Enum's hash is a Python call).
_NEW: Final = Applied(Outcome.NEW)
_REPLACED: Final = Applied(Outcome.REPLACED)
_DUPLICATE: Final = Applied(Outcome.DUPLICATE)
COUNTED: Final = (_NEW, _REPLACED, _DUPLICATE)
"""The result of every record that was not refused: `apply_row` returns these very objects."""


def apply_row(
    view: StateView, row: Row, ekey: bytes | None = None, new_key: bytes | None = None
) -> Applied:
    """Dedup one record against its kept copy and move the day sums with it.

    docs/semantics.md, steps 2 and 3. `ekey` and `new_key` are the row's entry key and day
    key, when the caller built them already (to load them); else they are built here.

    Every record, duplicates included, touches its day: if a crash came between the state
    write and the MySQL write, the replay of that record re-sends the current row.
    """
    buyer, order, status, new_day, yuan, created, modified = row
    if ekey is None:
        ekey = entry_key(buyer, order, status)
    if new_key is None:
        new_key = day_key(buyer, new_day)
    entry = view.entries[ekey]
    old = entry[CURRENT]
    if old is not None and not generated_before(modified, old[MODIFIED]):
        view.touched.add((buyer, new_day))
        return _DUPLICATE
    if old is None:
        cell = view.days[new_key]
        day = cell[CURRENT] or _NO_DAY
        total = day[SUM] + yuan
        if not INT64_MIN <= total <= INT64_MAX:
            return _overflow(new_day, total)
        kept = view.extremes.get(new_key)
        cell[CURRENT] = _with(day, total, day[COUNT] + 1, created, modified, kept)
        entry[CURRENT] = [new_day, yuan, created, modified]
        view.touched.add((buyer, new_day))
        return _NEW
    old_day = old[DAY]
    if old_day == new_day:
        cell = view.days[new_key]
        day = cell[CURRENT] or _NO_DAY
        total = day[SUM] - old[YUAN] + yuan
        if not INT64_MIN <= total <= INT64_MAX:
            return _overflow(new_day, total)
        if day[COUNT] == 1:  # the day's only entry: the copy's times are the day's MIN/MAX
            cell[CURRENT] = [total, 1, created, modified]
            view.extremes.pop(new_key, None)
        else:  # the copy in first: an extremum it reaches again is not lost
            kept = view.extremes.get(new_key)
            folded = _with(day, total, day[COUNT] + 1, created, modified, kept)
            count = day[COUNT]
            cell[CURRENT] = _without(view, new_key, folded, old, total, count, created, modified)
        entry[CURRENT] = [new_day, yuan, created, modified]
        view.touched.add((buyer, new_day))
        return _REPLACED
    old_key = day_key(buyer, old_day)
    left_cell = view.days.get(old_key) or view.day_cell(old_key)
    joined_cell = view.days[new_key]
    left = left_cell[CURRENT] or _LEFT_DAY
    joined = joined_cell[CURRENT] or _NO_DAY
    left_total = left[SUM] - old[YUAN]
    joined_total = joined[SUM] + yuan
    if not INT64_MIN <= joined_total <= INT64_MAX:
        return _overflow(new_day, joined_total)
    if not INT64_MIN <= left_total <= INT64_MAX:
        return _overflow(old_day, left_total)
    count = left[COUNT] - 1
    if count:
        left_cell[CURRENT] = _without(view, old_key, left, old, left_total, count)
    else:
        left_cell[CURRENT] = None
        view.extremes.pop(old_key, None)
    kept = view.extremes.get(new_key)
    joined_cell[CURRENT] = _with(joined, joined_total, joined[COUNT] + 1, created, modified, kept)
    entry[CURRENT] = [new_day, yuan, created, modified]
    view.touched.add((buyer, old_day))
    view.touched.add((buyer, new_day))
    return _REPLACED


def _with(
    day: Sequence[Any],
    total: int,
    count: int,
    created: str | None,
    modified: str | None,
    kept: Extremes | None = None,
) -> Day:
    """The day with a copy's contribution in: MIN and MAX fold it in (nulls ignored), SUM is
    `total`. The one fold of MIN/MAX; inline, as it runs for every record.

    The day's `kept` extremes, if any, stay exact (in place: they are this worker's alone):
    a list holds the smallest (largest) values of the day's entries, as many as it holds, so
    a value goes in if it is within the list's range, or if the list holds every entry's
    value (as many values as the day had entries).
    """
    low, high = day[MIN_CREATED], day[MAX_MODIFIED]
    if created is not None and (low is None or created < low):
        low = created
    if modified is not None and (high is None or modified > high):
        high = modified
    if kept is not None:
        lows, highs = kept
        n = day[COUNT]
        if created is not None and (not lows or len(lows) >= n or created <= lows[-1]):
            insort(lows, created)
            del lows[KEPT:]
        if modified is not None and (not highs or len(highs) >= n or modified >= highs[0]):
            insort(highs, modified)
            del highs[:-KEPT]
    return [total, count, low, high]


def _without(
    view: StateView,
    key: bytes,
    day: Sequence[Any],
    old: Entry,
    total: int,
    count: int,
    created: str | None = None,
    modified: str | None = None,
) -> Day:
    """The day with `old` taken out; `day` holds already the copy that takes its place, if
    any, whose times are `created` and `modified`.

    A day with extremes kept takes `old`'s out of its lists, whose ends are then the MIN and
    MAX. Any other day loses the MIN or MAX that `old` held, unless the copy reaches it
    again (a late copy usually keeps the first one's gmt_create). A day that lost one is
    marked stale: the checkpoint recomputes it from its entries, and from then on keeps its
    extremes (`recomputed`), so that a hot day is not read again and again.
    """
    low, high = day[MIN_CREATED], day[MAX_MODIFIED]
    gone_low, gone_high = old[CREATED], old[MODIFIED]
    kept = view.extremes.get(key)
    if kept is not None:
        lows, highs = kept
        if gone_low is not None and lows and gone_low <= lows[-1]:
            if _taken(lows, gone_low):
                low = lows[0]
            else:
                view.stale.add(key)
        if gone_high is not None and highs and gone_high >= highs[0]:
            if _taken(highs, gone_high):
                high = highs[-1]
            else:
                view.stale.add(key)
    elif (gone_low is not None and gone_low == low and created != gone_low) or (
        gone_high is not None and gone_high == high and modified != gone_high
    ):
        view.stale.add(key)
    return [total, count, low, high]


def _taken(kept: list[str], value: str) -> bool:
    """Take one `value` out of a kept list; False if that empties it, or if the value is
    missing (only a stale day's list, inexact until its recompute, can miss one)."""
    try:
        kept.remove(value)
    except ValueError:
        return False
    return bool(kept)


def _overflow(effect_time: int, total: int) -> Applied:
    return Applied(
        Outcome.OVERFLOW,
        f"cumulate_amount would overflow BIGINT: the day {effect_time} would sum to {total}",
    )


def retention_cutoff(watermark: int, days: int) -> int:
    """The first effect_time still kept when the newest day seen is `watermark` (yyyyMMdd).

    Never raises: a cutoff before 0001-01-01 is 0001-01-01.
    """
    newest = date(watermark // 10000, watermark // 100 % 100, watermark % 100)
    try:
        first = newest - timedelta(days=days)
    except OverflowError:
        first = date.min
    return first.year * 10000 + first.month * 100 + first.day


def latest_day(received_ms: int, tolerance_days: int) -> int:
    """The newest effect_time accepted from a message received at `received_ms` (epoch ms)."""
    received = date(1970, 1, 1) + timedelta(milliseconds=max(0, received_ms))
    try:
        last = received + timedelta(days=tolerance_days)
    except OverflowError:
        last = date.max
    return last.year * 10000 + last.month * 100 + last.day
