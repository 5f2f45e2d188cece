"""Produce-to-visible latency: the probes' bookkeeping, and the latency part run on its own.

The probe (`bench.run.latency`) sends one order per new buyer, buyer `first_buyer + i` for
the i-th, all on one day, so each probe's result row has a known key (buyer_id, day) and
a known cumulate_amount, and the keys increase in the order they were sent. The poller
reads only the key range from the oldest probe not seen yet to the newest sent, an indexed
range of the primary key (buyer_id, effect_time): its cost follows the probes in flight,
not the size of the table. The poll that first returns a probe's row with the expected
amount makes it visible; its latency is the time that poll returned minus the time the
probe was handed to the producer (an upper bound: the row appeared at most one poll
period plus one poll's own time earlier).

The rate issue 28 asks for is half of one worker's capacity: half of the events/s of one
worker on the skewed default input (`python -m bench.run --latency-rate half` takes it from
the same run). On its own: python -m bench.latency --rate R [--seconds S] [--warmup W]
[--partitions P],
results in bench/results/latency-<ts>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

HALF = "half"  # --latency-rate: half of the same run's one-worker skewed events/s


def rate_arg(value: str) -> int | str:
    """`--latency-rate`: events/s, or "half" (of the same run's one-worker skewed events/s)."""
    if value == HALF:
        return HALF
    rate = int(value)
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be positive, not {rate}")
    return rate


def half_capacity(events_per_s: float) -> int:
    """The rate issue 28 measures latency at: half of one worker's events/s."""
    return max(1, round(events_per_s / 2))


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of values sorted in increasing order."""
    if not ordered:
        raise ValueError("no values")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary_ms(values: Iterable[float]) -> dict[str, Any]:
    """Count, p50, p90, p99 and max of durations in seconds, in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    out: dict[str, Any] = {"count": len(ordered)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        out[f"{name}_ms"] = round(percentile(ordered, q) * 1000, 1)
    out["max_ms"] = round(ordered[-1] * 1000, 1)
    return out


@dataclass
class Probes:
    """Probe i is buyer `first_buyer + i`, sent at `sent[i]`, seen at `seen[i]` once read.

    `oldest_unseen` only moves forward, past every probe seen; the range to read is from
    it to the newest probe sent.
    """

    first_buyer: int
    amount: int  # the cumulate_amount a probe's row holds
    sent: list[float] = field(default_factory=list)
    seen: dict[int, float] = field(default_factory=dict)
    oldest_unseen: int = 0
    wrong: int = 0  # rows of a probe read with another amount (each read counted)

    def send(self, at: float) -> int:
        """Record the next probe as sent at `at`; its buyer_id."""
        self.sent.append(at)
        return self.first_buyer + len(self.sent) - 1

    def key_range(self) -> tuple[int, int] | None:
        """The buyer_ids to read, [low, high), or None when every probe sent was seen."""
        if self.oldest_unseen >= len(self.sent):
            return None
        return self.first_buyer + self.oldest_unseen, self.first_buyer + len(self.sent)

    def observe(self, rows: Iterable[tuple[int, int]], at: float) -> int:
        """Rows (buyer_id, cumulate_amount) read by a poll that returned at `at`; new ones."""
        new = 0
        for buyer, amount in rows:
            i = buyer - self.first_buyer
            if not 0 <= i < len(self.sent) or i in self.seen:
                continue
            if amount != self.amount:
                self.wrong += 1
                continue
            self.seen[i] = at
            new += 1
        while self.oldest_unseen < len(self.sent) and self.oldest_unseen in self.seen:
            self.oldest_unseen += 1
        return new

    def latencies(self, start: int = 0, stop: int | None = None) -> list[float]:
        """Seconds from send to visible of the probes seen among the `start`-th to the one
        before the `stop`-th (all by default), in the order they were sent."""
        end = len(self.sent) if stop is None else stop
        return [self.seen[i] - self.sent[i] for i in range(start, end) if i in self.seen]


def main() -> None:
    parser = argparse.ArgumentParser(description="The latency part of bench.run alone.")
    parser.add_argument(
        "--rate",
        type=int,
        required=True,
        help="events/s; issue 28 asks for half of one worker's skewed events/s",
    )
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds not counted first (2)")
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    from bench.run import ROOT, latency, latency_lines, machine, save_results  # imports this

    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = ROOT / ".local" / "bench" / f"latency-{stamp}"
    tmp.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    lat = asyncio.run(
        latency(f"bench-{stamp}-lat", args.partitions, args.rate, args.seconds, tmp, args.warmup)
    )
    out = {
        "machine": machine(),
        "command": f"python -m bench.latency --rate {args.rate} --seconds {args.seconds:g} "
        f"--warmup {args.warmup:g} --partitions {args.partitions}",
        "seconds": round(time.perf_counter() - began),
        "latency": lat,
    }
    lines = [f"Command: `{out['command']}` (took {out['seconds']} s)", *latency_lines(lat)]
    save_results(f"latency-{stamp}", out, "\n".join(lines))


if __name__ == "__main__":
    main()
