"""StallWatch: which partitions are stuck, judged with a fake clock."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from coupon_stream.foundation.stalls import StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def watch(clock: Clock):
    w = StallWatch(60, clock=clock)
    w.assigned([0, 1, 2])
    yield w
    w.revoked()


def gauge(partition: int) -> float | None:
    return REGISTRY.get_sample_value("coupon_partition_stalled", {"partition": str(partition)})


def test_not_stalled_while_committing(watch, clock):
    for _ in range(10):
        clock.now += 30
        watch.committed(0)
        assert watch.check({0: 500}) == []
    assert gauge(0) == 0


def test_stalled_after_stall_seconds_with_lag(watch, clock):
    clock.now += 59
    assert watch.check({1: 5}) == []
    clock.now += 1
    assert watch.check({1: 5}) == [1]
    assert watch.stalled == {1}
    assert gauge(1) == 1
    assert gauge(0) == 0


def test_stall_counts_from_last_commit(watch, clock):
    clock.now += 50
    watch.committed(2)
    clock.now += 50
    assert watch.check({2: 5}) == []
    clock.now += 10
    assert watch.check({2: 5}) == [2]


def test_not_stalled_with_zero_lag(watch, clock):
    clock.now += 3600
    assert watch.check({0: 0, 1: 0}) == []
    assert watch.stalled == frozenset()


def test_idle_partition_that_gets_a_message_is_not_stalled_at_once(watch, clock):
    clock.now += 3600
    assert watch.check({0: 0}) == []
    clock.now += 1
    assert watch.check({0: 1}) == []
    clock.now += 60
    assert watch.check({0: 1}) == [0]


def test_recovery_by_commit(watch, clock, caplog):
    clock.now += 61
    assert watch.check({0: 5}) == [0]
    watch.committed(0)
    with caplog.at_level(logging.WARNING, logger="coupon_stream.foundation.stalls"):
        assert watch.check({0: 3}) == []
    assert gauge(0) == 0
    assert watch.stalled == frozenset()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "partition 0" in warnings[0].getMessage()


def test_recovery_by_lag_gone(watch, clock):
    clock.now += 61
    assert watch.check({0: 5}) == [0]
    assert watch.check({0: 0}) == []
    assert gauge(0) == 0


def test_log_names_partition_and_last_error_once(watch, clock, caplog):
    watch.failed(1, "MessageSizeTooLargeError: value of 2 MiB")
    watch.failed(None, "database unreachable")
    clock.now += 75
    with caplog.at_level(logging.ERROR, logger="coupon_stream.foundation.stalls"):
        watch.check({1: 42, 2: 7})
        clock.now += 10
        watch.check({1: 42, 2: 7})  # still stalled: no second line
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 2
    one = next(line for line in lines if "partition 1 " in line)
    assert "MessageSizeTooLargeError" in one and "lag 42" in one and "75 s" in one
    two = next(line for line in lines if "partition 2 " in line)
    assert "database unreachable" in two  # no error of its own: the worker-wide one


def test_commit_clears_the_old_error(watch, clock, caplog):
    watch.failed(0, "boom")
    watch.committed(0)
    clock.now += 61
    with caplog.at_level(logging.ERROR, logger="coupon_stream.foundation.stalls"):
        assert watch.check({0: 1}) == [0]
    assert "boom" not in caplog.text
    assert "last commit 61 s ago" in caplog.text


def test_revoked_forgets_and_clears_gauge(watch, clock):
    clock.now += 61
    assert watch.check({0: 5}) == [0]
    watch.revoked()
    assert gauge(0) is None
    assert watch.check({0: 5}) == []


def test_reassignment_restarts_the_clock(watch, clock):
    clock.now += 61
    assert watch.check({0: 5}) == [0]
    watch.assigned([0])
    assert watch.stalled == frozenset()
    assert watch.check({0: 5}) == []


def test_unassigned_partitions_are_not_judged(watch, clock):
    clock.now += 61
    assert watch.check({7: 5}) == []
