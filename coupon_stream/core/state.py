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

from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from coupon_stream.core.records import INT64_MAX, INT64_MIN, Row
from coupon_stream.core.stored import day_key, entry_key

# The state tables, both partitioned by buyer: kept copy per (buyer, order, pay_status) and
# running sums per (buyer, day); their layout in bytes is `stored`.
STATE_TABLES = ("entries", "days")

# Positions in an entry payload.
DAY, YUAN, CREATED, MODIFIED = range(4)
# Positions in a day payload.
SUM, COUNT, MIN_CREATED, MAX_MODIFIED = range(4)

Entry = list[Any]  # [effect_time, yuan, gmt_create, gmt_modified]
Day = list[Any]  # [cumulate_amount, entries, min gmt_create, max gmt_modified]


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


def _earlier(a: str | None, b: str | None) -> str | None:
    return b if a is None or (b is not None and b < a) else a


def _later(a: str | None, b: str | None) -> str | None:
    return b if a is None or (b is not None and b > a) else a


def day_row(buyer_id: int, effect_time: int, day: Day | None) -> ResultRow | None:
    """The result row of one day, or None when the table must not hold one (sum <= 0)."""
    if day is None or day[SUM] <= 0:
        return None
    return ResultRow(day[MIN_CREATED], day[MAX_MODIFIED], buyer_id, day[SUM], effect_time)


def extrema(entries: list[Entry]) -> tuple[str | None, str | None]:
    """MIN(gmt_create), MAX(gmt_modified) over a day's kept entries (the non-retractable part)."""
    created: str | None = None
    modified: str | None = None
    for e in entries:
        created = _earlier(created, e[CREATED])
        modified = _later(modified, e[MODIFIED])
    return created, modified


class StateView(Protocol):
    """What applying records needs from the tables: read and write one key's current value.

    `stale` collects the days whose MIN/MAX lost the entry that held it; the checkpoint
    recomputes them from the day's entries once, however many records touched them.
    """

    stale: set[bytes]

    def get_entry(self, key: bytes) -> Entry | None: ...
    def put_entry(self, key: bytes, value: Entry | None) -> None: ...
    def get_day(self, key: bytes) -> Day | None: ...
    def put_day(self, key: bytes, value: Day | None) -> None: ...


@dataclass(slots=True)
class Applied:
    outcome: Outcome
    days: tuple[int, ...]  # the effect_times whose rows the record touched
    reason: str = ""


def _fits(total: int) -> bool:
    return INT64_MIN <= total <= INT64_MAX


def apply_row(view: StateView, row: Row) -> Applied:
    """Dedup one record against its kept copy and move the day sums with it.

    docs/semantics.md, steps 2 and 3.

    Every record, duplicates included, touches its day: if a crash came between the state
    write and the MySQL write, the replay of that record re-sends the current row.
    """
    buyer, order, status, new_day, yuan, created, modified = row
    ekey = entry_key(buyer, order, status)
    old = view.get_entry(ekey)
    if old is not None and not generated_before(modified, old[MODIFIED]):
        return Applied(Outcome.DUPLICATE, (new_day,))
    new: Entry = [new_day, yuan, created, modified]
    new_key = day_key(buyer, new_day)
    if old is None:
        day = view.get_day(new_key) or [0, 0, None, None]
        total = day[SUM] + yuan
        if not _fits(total):
            return _overflow(new_day, total)
        view.put_day(new_key, _with(day, total, day[COUNT] + 1, created, modified))
        view.put_entry(ekey, new)
        return Applied(Outcome.NEW, (new_day,))
    old_day = old[DAY]
    old_key = day_key(buyer, old_day)
    if old_day == new_day:
        day = view.get_day(new_key) or [0, 0, None, None]
        total = day[SUM] - old[YUAN] + yuan
        if not _fits(total):
            return _overflow(new_day, total)
        if day[COUNT] == 1:  # the day's only entry: the copy's times are the day's MIN/MAX
            view.put_day(new_key, [total, 1, created, modified])
        else:
            updated = _without(view, new_key, day, old, total, day[COUNT])
            view.put_day(new_key, _with(updated, total, day[COUNT], created, modified))
        view.put_entry(ekey, new)
        return Applied(Outcome.REPLACED, (new_day,))
    left = view.get_day(old_key) or [0, 1, None, None]
    joined = view.get_day(new_key) or [0, 0, None, None]
    left_total = left[SUM] - old[YUAN]
    joined_total = joined[SUM] + yuan
    if not _fits(joined_total):
        return _overflow(new_day, joined_total)
    if not _fits(left_total):
        return _overflow(old_day, left_total)
    count = left[COUNT] - 1
    view.put_day(old_key, _without(view, old_key, left, old, left_total, count) if count else None)
    view.put_day(new_key, _with(joined, joined_total, joined[COUNT] + 1, created, modified))
    view.put_entry(ekey, new)
    return Applied(Outcome.REPLACED, (old_day, new_day))


def _with(day: Day, total: int, count: int, created: str | None, modified: str | None) -> Day:
    """The day with a copy's contribution in: MIN and MAX fold it in, SUM is `total`."""
    return [total, count, _earlier(day[MIN_CREATED], created), _later(day[MAX_MODIFIED], modified)]


def _without(view: StateView, key: bytes, day: Day, old: Entry, total: int, count: int) -> Day:
    """The day with `old` taken out; MIN/MAX cannot be, so a lost extremum marks it stale."""
    if (old[CREATED] is not None and old[CREATED] == day[MIN_CREATED]) or (
        old[MODIFIED] is not None and old[MODIFIED] == day[MAX_MODIFIED]
    ):
        view.stale.add(key)
    return [total, count, day[MIN_CREATED], day[MAX_MODIFIED]]


def _overflow(effect_time: int, total: int) -> Applied:
    return Applied(
        Outcome.OVERFLOW,
        (),
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
