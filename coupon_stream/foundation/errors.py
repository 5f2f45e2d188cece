"""The exceptions the layers raise and catch, free of any driver.

Which driver errors are worth retrying, and the retry loop itself, are
`coupon_stream.connectors.faults`: only `connectors` imports a driver.
"""

from __future__ import annotations


class AccessRefused(Exception):
    """Kafka or the database refused the service's identity or access, for good.

    A wrong password, a certificate that does not verify, a missing ACL or grant: no retry
    can change it, and no record is to blame, so the worker stops with one CRITICAL line
    (this message: who refused whom, and what) instead of retrying while not ready.
    """


class GivenUp(Exception):
    """A retry stopped because what it was doing is no longer wanted (a rebalance)."""


class NotHeld(Exception):
    """This worker does not hold a by-buyer partition's stores any more: it must not write.

    Never retried: the checkpoint is dropped, and the partition is claimed again (`Fenced`:
    by a newer owner, which replays the checkpoint from the committed offset).
    """

    def __init__(self, partition: int, why: str) -> None:
        super().__init__(f"partition {partition}: {why}")
        self.partition = partition


class Fenced(NotHeld):
    """A newer owner has claimed the partition; `what` refused the write, and `epoch` is the
    newer owner's where that store knows it."""

    def __init__(self, partition: int, what: str, epoch: int | None = None) -> None:
        newer = "a newer owner" if epoch is None else f"a newer owner (epoch {epoch})"
        super().__init__(partition, f"{what} are held by {newer}")
        self.what = what
        self.epoch = epoch
