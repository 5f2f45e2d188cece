"""The latency bench's pure part (bench/latency.py): percentiles and the probes' key range."""

from __future__ import annotations

import argparse

import pytest

from bench.latency import HALF, Probes, half_capacity, percentile, rate_arg, summary_ms


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.9) == 90
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7
    assert percentile([1.0, 2.0], 0.5) == 1
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_summary_in_milliseconds() -> None:
    assert summary_ms([0.3, 0.1, 0.2, 1.0]) == {
        "count": 4,
        "p50_ms": 200.0,
        "p90_ms": 1000.0,
        "p99_ms": 1000.0,
        "max_ms": 1000.0,
    }
    assert summary_ms([]) == {"count": 0}


def test_the_range_starts_at_the_oldest_unseen_probe_and_ends_at_the_newest_sent() -> None:
    probes = Probes(first_buyer=1000, amount=100)
    assert probes.key_range() is None  # nothing sent
    assert [probes.send(at) for at in (0.0, 0.1, 0.2, 0.3)] == [1000, 1001, 1002, 1003]
    assert probes.key_range() == (1000, 1004)

    # Seen out of order: the range still starts at the oldest unseen.
    assert probes.observe([(1001, 100), (1003, 100)], at=0.5) == 2
    assert probes.key_range() == (1000, 1004)
    assert probes.observe([(1000, 100), (1001, 100)], at=0.6) == 1  # 1001 already seen
    assert probes.key_range() == (1002, 1004)

    probes.send(0.4)
    assert probes.key_range() == (1002, 1005)
    assert probes.observe([(1002, 100), (1004, 100)], at=0.9) == 2
    assert probes.key_range() is None
    assert probes.oldest_unseen == 5

    # From send to the poll that first returned the row, in the order sent.
    assert probes.latencies() == pytest.approx([0.6, 0.4, 0.7, 0.2, 0.5])


def test_a_row_with_another_amount_or_outside_the_probes_is_not_seen() -> None:
    probes = Probes(first_buyer=1000, amount=100)
    probes.send(0.0)
    probes.send(0.0)
    assert probes.observe([(1000, 99), (999, 100), (1002, 100), (1001, 100)], at=1.0) == 1
    assert probes.wrong == 1
    assert probes.key_range() == (1000, 1002)
    assert probes.observe([(1000, 100)], at=2.0) == 1
    assert probes.latencies() == [2.0, 1.0]
    assert probes.key_range() is None


def test_rate_argument_and_half_capacity() -> None:
    assert rate_arg("15000") == 15000
    assert rate_arg("half") == HALF
    with pytest.raises(argparse.ArgumentTypeError):
        rate_arg("0")
    with pytest.raises(ValueError):
        rate_arg("fast")
    assert half_capacity(30_001) == 15_000
    assert half_capacity(1) == 1


def test_latencies_of_a_slice_of_the_probes() -> None:
    probes = Probes(first_buyer=0, amount=1)
    for at in (0.0, 1.0, 2.0, 3.0):
        probes.send(at)
    probes.observe([(0, 1), (1, 1), (3, 1)], at=5.0)
    assert probes.latencies(stop=2) == [5.0, 4.0]  # a warm-up
    assert probes.latencies(start=2) == [2.0]  # probe 2 not seen
    assert probes.latencies() == [5.0, 4.0, 2.0]
