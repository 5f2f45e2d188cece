"""Coupon grants on real Kafka and MariaDB: the grants table is the policy applied to the
reference table (checked by `Pipeline.table_rows` in every integration test), the grants
topic reduced per key is the grants table, and a policy change is reconciled once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import orjson

from coupon_stream.core.grants import Policy, parse_tiers
from coupon_stream.tools.dataset import generate
from tests import reference
from tests.integration.harness import Pipeline
from tests.reference import policy_applied


async def grants_cli(p: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "coupon_stream.tools.cli", "grants", *args],
        env=p.env(0, 0),
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_grants_follow_the_table_and_a_policy_change_is_reconciled_once(pipeline):
    p = pipeline
    await p.create_topics(orders=3, refunds=2)
    data = generate(4000, seed=27)
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    await p.produce(messages)
    worker = p.start_worker(0)
    await p.wait_quiescent()
    expected = reference.evaluate(data.orders, data.refunds)
    assert await p.table_rows() == expected  # and the grants table is the policy applied
    granted = await p.grants()
    assert granted and len({tier for tier, _, _ in granted.values()}) > 1, "tiers exercised"
    await p.assert_grants_agree()

    (buyer, day), (tier, coupon, _) = next(iter(sorted(granted.items())))
    shown = await grants_cli(p, "--buyer", str(buyer))
    assert shown.returncode == 0, shown.stderr
    assert f"buyer {buyer}; policy version 1" in shown.stdout
    assert any(
        line.startswith(str(day)) and line.split()[2:4] == [str(tier), str(coupon)]
        for line in shown.stdout.splitlines()
    ), shown.stdout
    assert " grant " in shown.stdout

    # A new policy: the workers restart with it; the days already granted are re-judged by
    # `grants reconcile`, once.
    p.kill(worker, signal.SIGTERM)
    tiers = "150:15,400:45,800:90"
    p.extra_env |= {"COUPON_GRANT_TIERS": tiers, "COUPON_GRANT_POLICY_VERSION": "2"}
    new = Policy(2, parse_tiers(tiers))
    worker = p.start_worker(0)
    await p.wait_ready(worker)
    listed = await grants_cli(p, "reconcile", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert "to change" in listed.stdout and await p.grants() == granted  # nothing written
    done = await grants_cli(p, "reconcile")
    assert done.returncode == 0, done.stderr
    assert "events to" in done.stdout, done.stdout
    assert await p.grants() == policy_applied(new, expected)
    again = await grants_cli(p, "reconcile")
    assert "0 to change (none)" in again.stdout, again.stdout
    await p.assert_grants_agree()

    # New input under the new policy: workers' events outrank the reconcile's.
    more = generate(1500, seed=28, buyers=1000)  # the same buyers, more days and orders
    await p.produce([(p.orders_topic, None, orjson.dumps(o)) for o in more.orders])
    await p.wait_quiescent()
    everything = reference.evaluate(data.orders + more.orders, data.refunds)
    assert await p.table_rows() == everything
    await p.assert_grants_agree()
