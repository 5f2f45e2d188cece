"""The log's folding of repeated lines (`Repeats`)."""

from __future__ import annotations

import logging

from coupon_stream.foundation.logs import Repeats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, level: int = logging.ERROR, name: str = "aiokafka"):
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_line_said_again_within_the_window_is_counted_and_the_next_says_how_many():
    clock = Clock()
    repeats = Repeats(window=60, clock=clock)
    refused = "%s: Connect failed: Connection refused (after %dms in state CONNECT)"
    assert repeats.filter(record(refused, "b1", 0))
    for ms in (0, 3, 12):
        clock.now += 1
        assert not repeats.filter(record(refused, "b1", ms))  # the same but for its ms
    assert repeats.filter(record(refused, "b2", 0))  # another broker: another line
    assert repeats.filter(record("Unable to update metadata", level=logging.WARNING))
    assert repeats.filter(record(refused, "b1", 0, name="other"))  # another logger
    assert repeats.filter(record(refused, "b1", 0, level=logging.WARNING))  # another level
    clock.now = 61
    again = record(refused, "b1", 7)
    assert repeats.filter(again)
    assert again.getMessage() == (
        "b1: Connect failed: Connection refused (after 7ms in state CONNECT) "
        "(3 more like it folded in the 61 s before)"
    )
    clock.now = 62
    assert not repeats.filter(record(refused, "b1", 1))


def test_critical_and_lower_than_warning_lines_are_never_folded():
    repeats = Repeats(window=60, clock=Clock())
    for level in (logging.CRITICAL, logging.INFO, logging.DEBUG):
        assert all(repeats.filter(record("stopping", level=level)) for _ in range(3))
