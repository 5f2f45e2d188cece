"""Before/after: the workers of each code tree in turn, on one loaded input, several rounds.

    python -m bench.interleave --orders 300000 --rounds 3 [--workers 1] TREE [TREE ...]

A TREE is a checkout's directory (a `git worktree add --detach <dir> <rev>` of the code to
compare), optionally followed by `@NAME=VALUE` to set one environment variable for its
runs (e.g. `.@COUPON_FLUSH_INTERVAL=0.5`). Each worker imports the tree's `coupon_stream`
through `PYTHONPATH`; everything else (the bench, the venv, the input) is this checkout's.
The input is one of `make bench`'s (`--skew`, skewed by default), loaded once; each run is
`bench.run.run_workers` with `--workers` workers (one by default), timed as `make bench`
times it. Runs of one tree move by up to a tenth on a shared machine: compare trees within
a round, and medians over the rounds.
Results: `bench/results/interleave-<timestamp>.{md,json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, get_args

from bench.run import ROOT, delete_topics, load, machine, raw_floor, run_workers, save_results
from coupon_stream.tools.dataset import Skew


def _tree(spec: str) -> tuple[str, dict[str, str]]:
    path, _, assignment = spec.partition("@")
    name, _, value = assignment.partition("=")
    return str(Path(path).resolve()), {name: value} if assignment else {}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("trees", nargs="+", help="checkout directories, each [@NAME=VALUE]")
    parser.add_argument("--orders", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="workers per run")
    parser.add_argument(
        "--skew", choices=get_args(Skew), default="zipf", help="the input's buyers (make bench's)"
    )
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    topics = f"interleave-{stamp}"
    tmp = ROOT / ".local" / "bench" / topics
    tmp.mkdir(parents=True, exist_ok=True)
    total = await load(topics, args.partitions, args.orders, args.skew)
    floor = await raw_floor(topics, total)
    print(f"{total} messages loaded; raw floor {round(floor)} events/s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in args.trees}
    saved = dict(os.environ)
    try:
        for n in range(args.rounds):
            for i, spec in enumerate(args.trees):
                path, env = _tree(spec)
                os.environ.clear()
                os.environ.update(saved, PYTHONPATH=path, **env)
                r = await run_workers(
                    f"{topics}-{n}-{i}", topics, args.partitions, args.workers, total, tmp
                )
                runs[spec].append(r)
                print(f"round {n + 1}: {spec}: {r['events_per_s']} events/s", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    rows = [
        "| tree | events/s per round | median | CPU µs per event per round |",
        "| --- | --- | --- | --- |",
    ]
    for spec, rs in runs.items():
        rates = [r["events_per_s"] for r in rs]
        cpu = [r["cpu_s_per_million"] for r in rs]
        rows.append(
            f"| {spec} | {'; '.join(map(str, rates))} | {statistics.median(rates):.0f} | "
            f"{'; '.join(map(str, cpu))} |"
        )
    result = {
        "machine": machine(),
        "orders": args.orders,
        "skew": args.skew,
        "messages": total,
        "raw_floor_events_per_s": round(floor),
        "command": "python -m bench.interleave " + " ".join(sys.argv[1:]),
        "runs": runs,
    }
    md = "\n".join(
        [
            f"{total} messages ({args.orders} orders, {args.skew}), {args.partitions} partitions, "
            f"{args.workers} worker(s) a run, "
            f"raw floor {round(floor)} events/s. Command: `{result['command']}`.",
            "",
            *rows,
        ]
    )
    save_results(f"interleave-{stamp}", result, md + "\n")
    await delete_topics(topics)
    print(md)


if __name__ == "__main__":
    asyncio.run(main())
