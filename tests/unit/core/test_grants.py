"""The coupon policy on its own: tiers, validation, the event a change of tier is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coupon_stream.core.grants import (
    MAX_POLICY_VERSION,
    Policy,
    Tier,
    change,
    parse_tiers,
    policy_problems,
    reconcile,
    version,
)

POLICY = Policy(3, (Tier(200, 20), Tier(500, 60)))


def test_a_day_reaches_the_highest_tier_its_total_meets():
    assert [POLICY.tier(t) for t in (None, -5, 0, 199, 200, 499, 500, 10**18)] == [
        0, 0, 0, 0, 1, 1, 2, 2
    ]  # fmt: skip
    assert [POLICY.amount(t) for t in (0, 1, 2)] == [0, 20, 60]


def test_tiers_are_parsed_and_a_bad_policy_is_refused_with_its_reason():
    assert parse_tiers(" 200:20, 500:60 ") == (Tier(200, 20), Tier(500, 60))
    for text in ("200", "200:x", "200:20;500:60"):
        with pytest.raises(ValueError, match="threshold:amount"):
            parse_tiers(text)
    assert policy_problems(1, (Tier(500, 60), Tier(200, 20))) == [
        "thresholds must ascend: 200 comes after 500"
    ]
    assert policy_problems(1, (Tier(0, 20),)) == ["a threshold must be positive, not 0"]
    assert policy_problems(1, (Tier(200, -1),)) == ["a coupon amount must be positive, not -1"]
    assert policy_problems(0, (Tier(200, 20),))[0].startswith("the policy version must be")
    with pytest.raises(ValueError, match="at least one tier"):
        Policy(1, ())


def test_a_change_of_tier_is_a_grant_or_a_revoke_and_nothing_else_is_an_event():
    assert change(POLICY, 7, 20261111, 150, 199, 10) is None  # below the first tier still
    assert change(POLICY, 7, 20261111, 210, 480, 10) is None  # tier 1 still
    up = change(POLICY, 7, 20261111, 150, 200, 10)  # exactly at the threshold
    assert up is not None and (up.kind, up.tier, up.tier_before, up.coupon_amount) == (
        "grant", 1, 0, 20
    )  # fmt: skip
    assert up.version == version(3, 10) and up.id == f"7:20261111:{up.version}"
    down = change(POLICY, 7, 20261111, 600, None, 11)  # refunded to zero: the row is gone
    assert down is not None and (down.kind, down.tier, down.tier_before, down.coupon_amount) == (
        "revoke", 0, 2, 0
    )  # fmt: skip
    same = change(POLICY, 7, 20261111, 300, 300, 12, reassert=True)
    assert same is not None and (same.kind, same.tier, same.tier_before) == ("grant", 1, 1)


@given(st.integers(1, MAX_POLICY_VERSION), st.integers(0, 2**48 - 1), st.integers(0, 2**48 - 1))
def test_versions_order_by_policy_then_position(policy_version, a, b):
    assert (version(policy_version, a) < version(policy_version, b)) == (a < b)
    if policy_version < MAX_POLICY_VERSION:
        assert version(policy_version, a) < version(policy_version + 1, 0)
    assert version(policy_version, a) < 2**63


def test_reconcile_sends_only_what_the_table_does_not_hold_and_then_nothing():
    new = Policy(4, (Tier(200, 25), Tier(500, 60)))
    totals = {(1, 20261111): 250, (2, 20261111): 600, (3, 20261111): 150, (4, 20261111): 700}
    granted = {
        (1, 20261111): (1, 20, 3),  # same tier, another coupon under the old policy
        (2, 20261111): (2, 60, 4),  # already as the new policy says
        (3, 20261111): (1, 10, 3),  # the new policy grants nothing at 150
        (5, 20261111): (1, 20, 3),  # no total any more: revoked
        (4, 20261111): (1, 20, 9),  # a newer policy's: left alone
    }
    grants = reconcile(new, totals, granted)
    got = {(g.buyer_id, g.kind, g.tier_before, g.tier, g.coupon_amount) for g in grants}
    assert got == {(1, "grant", 1, 1, 25), (3, "revoke", 1, 0, 0), (5, "revoke", 1, 0, 0)}
    assert {g.version for g in grants} == {version(4, 0)}
    applied = dict(granted)
    for g in grants:
        if g.tier:
            applied[(g.buyer_id, g.effect_time)] = (g.tier, g.coupon_amount, g.policy_version)
        else:
            applied.pop((g.buyer_id, g.effect_time))
    assert reconcile(new, totals, applied) == []  # idempotent
