"""`make bench-peers`: the Pathway peer next to one coupon-stream worker, on the bench's input.

Loads the bench's default input into fresh topics exactly as `make bench` does
(`bench.run.load`: `dataset.generate(..., skew="zipf")` in chunks, no keys, random
partitions), measures the raw consume floor on it, then runs, `--runs` times each and
interleaved (service, Pathway, service, Pathway, ...), on the same topics:

- one coupon-stream worker (`bench.run.run_workers`, the `skewed` run of `make bench`):
  events/s from the worker's start to the first of two lag checks that found its group
  drained, with every result row in MariaDB; with COUPON_INTAKE=false in the environment,
  its intake runs in a `coupon-stream intake` process beside it (two processes, the CPU
  of both counted);
- the Pathway job (`bench/peers/pathway_job.py`) in its own process, PATHWAY_THREADS
  threads: events/s from the process's start (imports included, as the worker's start-up
  is) until the job reports `done`, that is, when its in-engine count of input rows has
  reached the number of messages loaded and its result table has been closed for that
  engine time (every row through every step); also from its call of `pw.run` (the
  imports and the graph's construction left out). CPU seconds (user + system, all
  threads) and peak RSS (VmHWM) are read from /proc/<pid> the moment `done` arrives;
  then it is stopped.

`--check` also asserts that Pathway's final table equals the seed SQL evaluated in SQLite
(tests/reference.py) over the same generated input; use it with a small `--orders`.
Results go to bench/results/peers-<timestamp>.{md,json}.

Usage: python -m bench.peers.run [--orders N] [--runs R] [--threads T] [--check]
       [--no-service]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.data import chunk_sizes
from bench.run import (
    BOOTSTRAP,
    ROOT,
    SEED,
    MachineCpu,
    _cpu_of,
    _row,
    load,
    machine,
    peak_rss_mb,
    raw_floor,
    rss,
    run_workers,
    save_results,
)
from coupon_stream.tools.dataset import Skew, generate

DEFAULT_ORDERS = 300_000
TIMEOUT_S = 1800


def _pathway_version() -> str:
    try:
        return version("pathway")
    except PackageNotFoundError:
        return "not installed"


def run_pathway(
    topics: str, total: int, threads: int, log: Path, dump: Path | None
) -> dict[str, Any]:
    """One run of the Pathway job on `topics`, from its process's start to `done`."""
    cmd = [
        sys.executable,
        "-m",
        "bench.peers.pathway_job",
        "--bootstrap",
        BOOTSTRAP,
        "--orders-topic",
        f"{topics}-orders",
        "--refunds-topic",
        f"{topics}-refunds",
        "--group",
        f"{topics}-pathway-{time.time_ns()}",
        "--total",
        str(total),
    ]
    if dump is not None:
        cmd += ["--dump", str(dump)]
    env = {**os.environ, "PATHWAY_THREADS": str(threads), "PATHWAY_PROCESSES": "1"}
    machine_cpu = MachineCpu()
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    done: dict[str, Any] | None = None
    built: dict[str, Any] | None = None
    cpu = peak = 0.0
    try:
        deadline = start + TIMEOUT_S
        for line in proc.stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pathway did not finish in {TIMEOUT_S} s, see {log}")
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("event") == "graph built":
                built = event
            elif event.get("event") == "done":
                cpu, peak = _cpu_of(proc.pid), peak_rss_mb(proc.pid)
                done = event
                if dump is None:
                    break
            elif event.get("event") == "dumped":
                break
        if done is None or built is None:
            proc.wait(30)
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pathway exited with {proc.returncode} before done:\n{tail}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = done["at"] - start
    from_run = done["at"] - built["at"]
    return {
        "threads": threads,
        "seconds": round(elapsed, 2),
        "events_per_s": round(total / elapsed),
        "start_to_run_s": round(built["at"] - start, 2),
        "seconds_from_run": round(from_run, 2),
        "events_per_s_from_run": round(total / from_run),
        "start_to_first_output_s": round(done["first_output"] - start, 2),
        "cpu_s_per_million": round(cpu / total * 1e6, 1),
        "peak_rss_mb": round(peak, 1),
        "input_rows": done["input_rows"],
        "result_rows": done["result_rows"],
        **machine_cpu.since_start(total, elapsed),
    }


def expected_table(orders: int, skew: Skew = "zipf") -> set[tuple[Any, ...]]:
    """The seed SQL (tests/reference.py, in SQLite) over the input `bench.run.load` sent."""
    from tests.reference import evaluate  # the project's yardstick; imported only to check

    buyers = max(1, orders // 4)
    all_orders: list[dict[str, Any]] = []
    all_refunds: list[dict[str, Any]] = []
    for k, size in enumerate(chunk_sizes(orders)):
        data = generate(size, seed=SEED + k, buyers=buyers, skew=skew)  # as bench.data does
        all_orders += data.orders
        all_refunds += data.refunds
    return evaluate(all_orders, all_refunds)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    floor = result["raw_floor_events_per_s"]
    lines = [
        f"Machine: {m['cores']} cores, {m['cpu']}; Python {m['python']}, Kafka {m['kafka']}, "
        f"MariaDB {m['mariadb']}, faust-streaming {m['faust-streaming']}, "
        f"aiokafka {m['aiokafka']}, pathway {result['pathway']}.",
        f"Input: {result['messages']} messages ({result['orders']} orders + copies + refunds, "
        f"buyers Zipf-like, as `make bench`'s default), {result['partitions']} partitions, "
        f"loaded before any run. Command: `{result['command']}`. Took "
        f"{result['bench_seconds']} s.",
        f"Raw consume floor (one aiokafka consumer reading and JSON-decoding the input): "
        f"{floor} events/s.",
        "",
        "| run | system | seconds | events/s from process start | events/s from `pw.run` "
        "| CPU µs per event | peak RSS MB (worker; intake process) | ratio to raw floor "
        "| machine busy % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        lines.append(
            _row(
                [
                    r["run"],
                    r["system"],
                    r["seconds"],
                    r["events_per_s"],
                    r.get("events_per_s_from_run"),
                    r["cpu_s_per_million"],
                    rss(r),
                    f"{r['ratio_to_raw_floor']:.3f}",
                    r.get("machine_busy_pct"),
                ]
            )
        )
    if result.get("service_over_pathway") is not None:
        lines.append(
            f"\nService / Pathway, best run of each, from process start: "
            f"{result['service_over_pathway']}."
        )
    if result.get("check"):
        lines.append(f"\nCheck against tests/reference.py: {result['check']}.")
    lines.append(
        "\ncoupon-stream: one worker, Kafka -> RocksDB -> MariaDB with its checkpoint "
        "protocol (durable), timed from its start to a drained group (bench/run.py). "
        "Pathway: one process, in-memory sink (`pw.io.subscribe` into a dict), no "
        "persistence, timed from its process start (and from its call of `pw.run`, after "
        "the imports and the graph's construction) until its in-engine count of input rows "
        "reached the messages loaded and the result table was closed for that time. CPU: "
        "user + system of the process, all threads, start-up included for both."
    )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--orders", type=int, default=DEFAULT_ORDERS)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2, help="runs of each system")
    parser.add_argument("--threads", type=int, default=1, help="PATHWAY_THREADS")
    parser.add_argument("--no-service", action="store_true", help="Pathway only")
    parser.add_argument(
        "--check", action="store_true", help="assert Pathway's table equals the seed SQL's"
    )
    args = parser.parse_args()
    began = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {what}", flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    topics = f"peers-{stamp}"
    tmp = ROOT / ".local" / "bench" / f"peers-{stamp}"
    tmp.mkdir(parents=True, exist_ok=True)
    say(f"loading {args.orders} orders, skew zipf, into {topics}-* ...")
    total = await load(topics, args.partitions, args.orders, "zipf")
    say(f"{total} messages loaded; raw floor ...")
    floor = await raw_floor(topics, total)
    say(f"raw floor {round(floor)} events/s")

    runs: list[dict[str, Any]] = []
    check = None
    for i in range(1, args.runs + 1):
        if not args.no_service:
            say(f"coupon-stream, 1 worker, run {i} ...")
            r = await run_workers(f"{topics}-w1-{i}", topics, args.partitions, 1, total, tmp)
            system = "coupon-stream, 1 worker"
            if r["intake_processes"]:  # COUPON_INTAKE=false: two processes, CPU of both
                system += " + 1 intake process"
            runs.append({"run": i, "system": system, **r})
            say(f"coupon-stream: {r['events_per_s']} events/s")
        say(f"pathway, {args.threads} thread(s), run {i} ...")
        dump = tmp / f"pathway-{i}.json" if args.check and i == 1 else None
        p = run_pathway(topics, total, args.threads, tmp / f"pathway-{i}.log", dump)
        runs.append(
            {"run": i, "system": f"Pathway {_pathway_version()}, {args.threads} thread(s)", **p}
        )
        say(
            f"pathway: {p['events_per_s']} events/s ({p['events_per_s_from_run']} "
            f"from pw.run), {p['result_rows']} result rows"
        )
        if dump is not None:
            say("checking against the seed SQL in SQLite ...")
            expected = expected_table(args.orders)
            actual = {tuple(row) for row in json.loads(dump.read_text())}
            same = actual == expected
            check = (
                f"{len(actual)} rows from Pathway, {len(expected)} from the seed SQL, "
                f"{'identical' if same else 'DIFFERENT'}"
            )
            say(check)
            if not same:
                missing, extra = sorted(expected - actual)[:5], sorted(actual - expected)[:5]
                raise SystemExit(f"Pathway's table differs: missing {missing}, extra {extra}")
    for r in runs:
        r["ratio_to_raw_floor"] = round(r["events_per_s"] / floor, 3)
    service = [r["events_per_s"] for r in runs if r["system"].startswith("coupon-stream")]
    peer = [r["events_per_s"] for r in runs if r["system"].startswith("Pathway")]
    result = {
        "machine": machine(),
        "pathway": _pathway_version(),
        "orders": args.orders,
        "messages": total,
        "partitions": args.partitions,
        "command": "make bench-peers PEERS_ARGS='" + " ".join(sys.argv[1:]) + "'",
        "raw_floor_events_per_s": round(floor),
        "runs": runs,
        "service_over_pathway": round(max(service) / max(peer), 3) if service and peer else None,
        "check": check,
        "bench_seconds": round(time.perf_counter() - began),
    }
    save_results(f"peers-{stamp}", result, markdown(result))


if __name__ == "__main__":
    asyncio.run(main())
