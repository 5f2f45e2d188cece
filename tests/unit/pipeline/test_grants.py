"""Coupon grants through the state stage and its checkpoint, against a brute-force fold of
the policy over the spec's table, through crashes (docs/design.md, "Coupon grants")."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coupon_stream.core.grants import Policy
from coupon_stream.foundation import metrics
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools.dataset import generate
from tests.reference import policy_applied
from tests.unit.fakes import Crash
from tests.unit.pipeline.test_checkpoint import load, rows_of, run_with_crashes, spec_oracle
from tests.unit.stagekit import World, r

TIERS = "100:10,300:30,600:80"
Key = tuple[int, int]
STATE = ("buyer_id", "effect_time", "tier", "coupon_amount", "policy_version", "version")


def world() -> World:
    return World(
        settings=Settings(app_id="unit", partitions=1, grant_tiers=TIERS, grant_policy_version=1)
    )


def policy_of(w: World) -> Policy:
    policy = w.settings.policy
    assert policy is not None
    return policy


def folded(w: World, rows: list[Any]) -> dict[Key, tuple[int, int, int]]:
    """The policy applied to the spec's table: what the grants table must hold."""
    return policy_applied(policy_of(w), spec_oracle(rows))


def events(w: World) -> list[dict[str, Any]]:
    return [orjson.loads(v or b"") for _, v in w.out.logs[(w.settings.grants_topic, 0)]]


def reduced(w: World) -> dict[Key, tuple[int, int, int]]:
    """The grants topic as a consumer keeps it: per key, the event of the highest version."""
    best: dict[Key, dict[str, Any]] = {}
    by_id: dict[str, dict[str, Any]] = {}
    for e in events(w):
        # One id, one state: the tier reached as of that position. `tier_before` and `kind`
        # say what this worker saw at its last checkpoint, which a replay may place elsewhere.
        seen = by_id.setdefault(e["id"], e)
        assert [seen[f] for f in STATE] == [e[f] for f in STATE], "one id, one state"
        key = (e["buyer_id"], e["effect_time"])
        if key not in best or e["version"] > best[key]["version"]:
            best[key] = e
    return {
        k: (e["tier"], e["coupon_amount"], e["policy_version"])
        for k, e in best.items()
        if e["tier"]
    }


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), messy=st.booleans(), crashes=st.integers(0, 4))
async def test_grants_table_and_reduced_events_equal_the_policy_through_crashes(
    seed, messy, crashes
):
    rnd = random.Random(seed)
    data = generate(50, seed=seed, buyers=8)
    rows = rows_of(data, rnd, messy)
    w = world()
    load(w, rows, rnd)
    await run_with_crashes(w, rnd, crashes)
    assert w.sink.rows() == spec_oracle(rows)
    assert w.sink.granted == folded(w, rows)
    assert reduced(w) == w.sink.granted


async def run_each(w: World, messages: list[list[Any]], every: int) -> None:
    for rows in messages:
        w.append(rows)
    await w.run(w.worker(), every=every)


async def test_a_total_that_crosses_and_comes_back_within_a_checkpoint_emits_nothing():
    w = world()
    await run_each(w, [[r("o1", yuan=90)], [r("o2", yuan=50)], [r("o2", status="4", yuan=-50)]], 3)
    assert events(w) == [] and w.sink.granted == {}
    assert w.sink.table[(7, 20261111)].cumulate_amount == 90


async def test_exactly_at_the_threshold_is_granted_and_a_refund_to_zero_revokes():
    w = world()
    await run_each(w, [[r("o1", yuan=100)], [r("o1", status="4", yuan=-100)]], 1)
    assert [(e["kind"], e["tier"], e["tier_before"], e["coupon_amount"]) for e in events(w)] == [
        ("grant", 1, 0, 10),
        ("revoke", 0, 1, 0),
    ]
    assert (7, 20261111) not in w.sink.table and w.sink.granted == {}
    first, second = events(w)
    assert first["version"] < second["version"]


async def test_a_late_earlier_copy_that_replaces_the_kept_one_changes_the_tier():
    w = world()
    kept = r("o1", yuan=250, gm="2026-11-11 00:00:05")
    earlier = r("o1", yuan=350, gm="2026-11-11 00:00:01")  # generated before: it wins
    await run_each(w, [[kept], [earlier]], 1)
    assert [(e["kind"], e["tier"], e["tier_before"]) for e in events(w)] == [
        ("grant", 1, 0),
        ("grant", 2, 1),
    ]
    assert w.sink.granted == {(7, 20261111): (2, 30, 1)}


async def test_grant_then_higher_then_revoke_then_higher_again_ends_granted():
    """grant 1 -> grant 2 -> revoke to 1 -> grant 2: an id of (key, tier, kind) would drop
    the last grant as a duplicate; the version keeps it."""
    w = world()
    steps = [
        [r("o1", yuan=150)],
        [r("o2", yuan=200)],
        [r("o2", status="4", yuan=-200)],
        [r("o3", yuan=200)],
    ]
    await run_each(w, steps, 1)
    assert [(e["kind"], e["tier"]) for e in events(w)] == [
        ("grant", 1),
        ("grant", 2),
        ("revoke", 1),
        ("grant", 2),
    ]
    assert len({e["id"] for e in events(w)}) == 4
    assert reduced(w) == w.sink.granted == {(7, 20261111): (2, 30, 1)}


async def test_no_policy_no_grants():
    w = World()
    await run_each(w, [[r("o1", yuan=10_000)]], 1)
    assert (w.settings.grants_topic, 0) not in w.out.logs and w.sink.granted == {}


async def test_a_replay_re_asserts_what_a_checkpoint_that_never_committed_sent():
    """The first owner's checkpoint reached Kafka and the table, not the offsets; the next
    owner replays with other boundaries, where the tier never changes: without re-asserting
    the replayed days, the grant sent before would stand for good."""
    w = world()
    w.append([r("o1", yuan=150)])
    w.append([r("o1", status="4", yuan=-150)])
    first = w.worker()
    w.sink.crash_at(0, after=True)
    with pytest.raises(Crash):
        await w.run(first, every=1, upto=1)
    assert w.sink.granted == {(7, 20261111): (1, 10, 1)} and w.committed == 0
    await w.run(w.worker(), every=2)  # both messages in one checkpoint: 0 -> 0
    assert (7, 20261111) not in w.sink.table
    assert w.sink.granted == {} == reduced(w)
    assert [(e["tier"], e["tier_before"]) for e in events(w)] == [(1, 0), (0, 0)]


async def test_a_checkpoint_a_former_owner_committed_after_the_restore_is_re_asserted():
    """B restores the partition; A, frozen until then, commits a checkpoint (changelogs,
    events, rows) before B claims it. B's local copy has no high mark of A's: it reads the
    changelog's tail past its copy after the claim, and re-asserts."""
    w = world()
    w.append([r("o1", yuan=150)])
    w.append([r("o1", status="4", yuan=-150)])
    b = w.worker()  # restored now: nothing yet
    a = w.worker()
    w.sink.crash_at(0, after=True)  # A's checkpoint lands, its offsets never commit
    with pytest.raises(Crash):
        await w.run(a, every=1, upto=1)
    assert w.sink.granted == {(7, 20261111): (1, 10, 1)}
    await w.run(b, every=2)
    assert (7, 20261111) not in w.sink.table
    assert w.sink.granted == {} == reduced(w)


def grant_counts() -> dict[tuple[str, ...], float]:
    """The grant metrics as they stand: events per (kind, tier), yuan per kind."""
    counts: dict[tuple[str, ...], float] = {}
    for name, metric in (("events", metrics.GRANT_EVENTS), ("yuan", metrics.GRANT_YUAN)):
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[(name, *sample.labels.values())] = sample.value
    return counts


async def test_the_grant_metrics_count_each_committed_change_once():
    """Two buyers reach one tier in one checkpoint: the series counts both."""
    w = world()
    before = grant_counts()
    await run_each(
        w,
        [
            [r("o1", yuan=100), r("o2", buyer=8, yuan=350), r("o5", buyer=10, yuan=150)],
            [r("o3", yuan=250), r("o4", buyer=9, yuan=700)],
            [r("o1", status="4", yuan=-100), r("o2", buyer=8, status="4", yuan=-350)],
        ],
        1,
    )
    policy = policy_of(w)
    expected: Counter[tuple[str, ...]] = Counter()
    for e in events(w):
        assert e["tier"] != e["tier_before"]  # no replay: no re-assertion
        expected[("events", e["kind"], str(e["tier"]))] += 1
        expected[("yuan", e["kind"])] += abs(
            policy.amount(e["tier"]) - policy.amount(e["tier_before"])
        )
    after = grant_counts()
    assert len(events(w)) >= 5
    assert {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} == expected
