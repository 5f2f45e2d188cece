"""Which partitions are stuck: lag that no commit has reduced for `COUPON_STALL_SECONDS`.

A record that fails forever (or a database that refuses a row) used to leave the worker
answering `/health/ready` 200 while nothing reached MySQL. The watch turns "has lag and
commits nothing" into a verdict per partition, a gauge and one log line naming the partition
and the last error seen, so an operator (and the readiness probe) sees it.

Pure bookkeeping: the caller reports assignments, commits and errors, and calls `check`
with the current lag; no I/O besides logging and the gauge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from coupon_stream.foundation.metrics import PARTITION_STALLED

log = logging.getLogger(__name__)


class StallWatch:
    """Decide, per assigned partition, whether it has stalled.

    A partition is stalled when it has lag and nothing was committed for it for
    `stall_seconds`. The clock starts at the latest of its assignment, its last commit and
    the last check that saw it without lag: a partition idle for an hour that just received
    a message has not been stuck for an hour.
    """

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._since: dict[int, float] = {}  # start of the stall clock
        self._last_commit: dict[int, float] = {}
        self._assigned_at: dict[int, float] = {}
        self._errors: dict[int, str] = {}
        self._worker_error: str | None = None
        self._stalled: set[int] = set()

    @property
    def stalled(self) -> frozenset[int]:
        """Partitions found stalled by the last `check` (for the readiness probe)."""
        return frozenset(self._stalled)

    def assigned(self, partitions: Iterable[int]) -> None:
        """(Re)start the clock: a newly assigned partition first restores its state."""
        now = self._clock()
        for p in partitions:
            self._since[p] = now
            self._assigned_at[p] = now
            self._last_commit.pop(p, None)
            self._errors.pop(p, None)
            self._stalled.discard(p)
            PARTITION_STALLED.labels(partition=str(p)).set(0)

    def revoked(self) -> None:
        """Forget every partition: the next owner judges them from its own assignment."""
        self._since.clear()
        self._last_commit.clear()
        self._assigned_at.clear()
        self._errors.clear()
        self._worker_error = None
        self._stalled.clear()
        PARTITION_STALLED.clear()

    def committed(self, partition: int) -> None:
        """A commit advanced `partition`: it is making progress, and its old error is over.

        Any commit also ends a worker-wide error (the database answered again).
        """
        now = self._clock()
        self._since[partition] = now
        self._last_commit[partition] = now
        self._errors.pop(partition, None)
        self._worker_error = None

    def failed(self, partition: int | None, error: str) -> None:
        """Remember the last error, to name it when the partition is reported stalled.

        `partition` None means the whole worker (for example the database is down).
        """
        if partition is None:
            self._worker_error = error
        else:
            self._errors[partition] = error

    def last_error(self, partition: int) -> str | None:
        """The partition's own last error, else the worker-wide one."""
        return self._errors.get(partition, self._worker_error)

    def check(self, lag: Mapping[int, int]) -> list[int]:
        """Stalled partitions, sorted; updates the gauge and logs changes of verdict.

        Only assigned partitions are judged; one missing from `lag` counts as no lag.
        """
        now = self._clock()
        stalled = []
        for p in sorted(self._since):
            behind = lag.get(p, 0)
            if behind <= 0:
                self._since[p] = now  # nothing to do is not being stuck
                self._set_stalled(p, False, lag=behind, now=now)
                continue
            is_stalled = now - self._since[p] >= self.stall_seconds
            self._set_stalled(p, is_stalled, lag=behind, now=now)
            if is_stalled:
                stalled.append(p)
        return stalled

    def _set_stalled(self, partition: int, stalled: bool, *, lag: int, now: float) -> None:
        PARTITION_STALLED.labels(partition=str(partition)).set(1 if stalled else 0)
        was = partition in self._stalled
        if stalled == was:
            return
        if stalled:
            self._stalled.add(partition)
            commit = self._last_commit.get(partition)
            if commit is None:
                since = now - self._assigned_at[partition]
                progress = f"no commit since its assignment {since:.0f} s ago"
            else:
                progress = f"last commit {now - commit:.0f} s ago"
            log.error(
                "partition %d stalled: lag %d, %s; last error: %s",
                partition,
                lag,
                progress,
                self.last_error(partition) or "none recorded",
            )
        else:
            self._stalled.discard(partition)
            log.warning("partition %d no longer stalled: lag %d", partition, lag)
