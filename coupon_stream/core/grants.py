"""The coupon policy: the tier a day total reaches, and the event a change of tier is (no I/O).

A policy is a version and tiers of (threshold, coupon amount), thresholds ascending: a
(buyer, day) whose total is at least a tier's threshold reaches it (the highest one it
reaches counts). The checkpoint compares each touched day's tier as of its end with its
tier as of the checkpoint before (docs/design.md, "Coupon grants"); a change is one
`Grant` event, `grant` if the tier rose, `revoke` if it fell.

Events carry the tier reached (absolute), never a delta, and a `version` that grows with
the by-buyer log position they reflect: the same position always carries the same content,
so a consumer that keeps, per key, the event of the highest version converges to the
grants table whatever was replayed or emitted twice.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from coupon_stream.core.records import encode_json

# Bits of a version below the policy's: the log position (version base + by-buyer offset).
POSITION_BITS: Final = 48
MAX_POLICY_VERSION: Final = 2 ** (63 - POSITION_BITS) - 1


Granted = tuple[int, int, int]  # a grants table row: tier, coupon_amount, policy_version


class Tier(NamedTuple):
    threshold: int  # yuan, the day total at or above which the tier is reached
    amount: int  # yuan, the coupon the tier earns


@dataclass(frozen=True, slots=True)
class Policy:
    version: int
    tiers: tuple[Tier, ...]
    # The tiers' thresholds, built once: `tier` runs twice per touched day and checkpoint.
    thresholds: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = policy_problems(self.version, self.tiers)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "thresholds", tuple(t.threshold for t in self.tiers))

    def tier(self, total: int | None) -> int:
        """The tier a day total reaches: 0 for none, else its 1-based position."""
        if total is None:
            return 0
        return bisect.bisect_right(self.thresholds, total)

    def amount(self, tier: int) -> int:
        return 0 if tier == 0 else self.tiers[tier - 1].amount

    def granted(self, total: int | None) -> Granted | None:
        """The grants table's row for a day total, None below the first tier."""
        tier = self.tier(total)
        return (tier, self.amount(tier), self.version) if tier else None

    def describe(self) -> str:
        tiers = ", ".join(f"{t.threshold} -> {t.amount}" for t in self.tiers)
        return f"version {self.version}: {tiers}"


def policy_problems(version: int, tiers: tuple[Tier, ...]) -> list[str]:
    """Why a policy cannot be used, in words an operator can act on (empty: it can)."""
    problems = []
    if not 1 <= version <= MAX_POLICY_VERSION:
        problems.append(f"the policy version must be 1..{MAX_POLICY_VERSION}, not {version}")
    if not tiers:
        problems.append("a policy needs at least one tier")
    for before, after in zip(tiers, tiers[1:], strict=False):
        if after.threshold <= before.threshold:
            problems.append(
                f"thresholds must ascend: {after.threshold} comes after {before.threshold}"
            )
    for tier in tiers:
        if tier.threshold <= 0:
            problems.append(f"a threshold must be positive, not {tier.threshold}")
        if tier.amount <= 0:
            problems.append(f"a coupon amount must be positive, not {tier.amount}")
    return problems


def parse_tiers(text: str) -> tuple[Tier, ...]:
    """`"200:20,500:60"` (threshold:amount in yuan, comma-separated) as tiers."""
    tiers = []
    for part in text.split(","):
        threshold, sep, amount = part.strip().partition(":")
        if not sep:
            raise ValueError(f"a tier is threshold:amount, not {part.strip()!r}")
        try:
            tiers.append(Tier(int(threshold), int(amount)))
        except ValueError:
            raise ValueError(
                f"a tier is two integers threshold:amount, not {part.strip()!r}"
            ) from None
    return tuple(tiers)


def version(policy_version: int, position: int) -> int:
    """An event's version: the policy's, then the log position it reflects.

    A newer policy's events rank above an older one's, whatever their positions.
    """
    return (policy_version << POSITION_BITS) | position


class Grant(NamedTuple):
    """One change of a (buyer, day)'s tier, as the grants topic carries it."""

    buyer_id: int
    effect_time: int
    kind: str  # "grant" (the tier rose) or "revoke" (it fell, maybe to none)
    tier: int  # the tier reached, 0 for none
    tier_before: int
    coupon_amount: int  # of the tier reached, 0 for none
    policy_version: int
    version: int

    @property
    def id(self) -> str:
        """Key and version: the same position of the same key is the same event."""
        return f"{self.buyer_id}:{self.effect_time}:{self.version}"

    def key(self) -> bytes:
        """The grants topic's key: one key per (buyer, day)."""
        return encode_json((self.buyer_id, self.effect_time))

    def value(self) -> bytes:
        """The grants topic's value: a JSON object of every field and the id."""
        return encode_json({"id": self.id, **self._asdict()})


def change(
    policy: Policy,
    buyer_id: int,
    effect_time: int,
    before: int | None,
    after: int | None,
    position: int,
    reassert: bool = False,
) -> Grant | None:
    """The event for a day whose total went from `before` to `after` (None: no row), or None
    if its tier did not change, unless `reassert` (the tier again, as of `position`)."""
    tier_before, tier = policy.tier(before), policy.tier(after)
    if tier == tier_before and not reassert:
        return None
    return Grant(
        buyer_id,
        effect_time,
        "grant" if tier > tier_before or (tier == tier_before and tier > 0) else "revoke",
        tier,
        tier_before,
        policy.amount(tier),
        policy.version,
        version(policy.version, position),
    )


def reconcile(
    policy: Policy,
    totals: Mapping[tuple[int, int], int],
    granted: Mapping[tuple[int, int], Granted],
) -> list[Grant]:
    """What makes the grants table the policy applied to the day totals: one event per
    (buyer, day) whose row is not what the policy says (its tier, its coupon, its version).

    Each event's version is the policy's with position 0: above every event of an older
    policy, below every event a worker sends under this one, which reflects a later state
    of its day and so wins. A row of a newer policy is left alone.
    """
    out = []
    for buyer, day in sorted(totals.keys() | granted.keys()):
        tier = policy.tier(totals.get((buyer, day)))
        want = policy.granted(totals.get((buyer, day)))
        have = granted.get((buyer, day))
        if have == want or (have is not None and have[2] > policy.version):
            continue
        before = have[0] if have is not None else 0
        out.append(
            Grant(
                buyer,
                day,
                "grant" if tier > before or (tier == before and tier > 0) else "revoke",
                tier,
                before,
                policy.amount(tier),
                policy.version,
                version(policy.version, 0),
            )
        )
    return out
