"""The Pathway peer of `make bench-peers`, through Kafka, as the bench runs it.

`bench.run.load` sends a small skewed input to fresh topics; `bench.peers.run.run_pathway`
runs the job (bench/peers/pathway_job.py) in its own process until it reports `done`, then
its in-memory table must equal the seed SQL over the same input (tests/reference.py), and
its count of input rows the messages sent. Run by `make bench-peers` (with `make up`'s Kafka)
before it measures; not part of `make test`, which does not install pathway.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path


def test_pathway_job_from_kafka_equals_the_seed_sql(tmp_path: Path) -> None:
    from bench.peers.run import expected_table, run_pathway
    from bench.run import load

    orders = 3_000
    topics = f"it-peers-{time.time_ns()}"
    total = asyncio.run(load(topics, 4, orders, "zipf"))
    dump = tmp_path / "pathway.json"
    result = run_pathway(topics, total, 1, tmp_path / "pathway.log", dump)
    assert result["input_rows"] == total
    actual = {tuple(row) for row in json.loads(dump.read_text())}
    expected = expected_table(orders)
    assert len(expected) > 500
    assert actual == expected
    assert result["result_rows"] == len(expected)
