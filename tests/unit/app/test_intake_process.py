"""The intake process's readiness: what /health/ready answers."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition as Partition

from coupon_stream.app.intake_process import readiness
from coupon_stream.connectors.sources import SourceConsumer
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.intake import Intake
from tests.unit.fakes import FakeLibrdkafka, FakeOut


def test_ready_only_as_a_member_of_the_group_whose_batches_go_out():
    intake = Intake(Settings(app_id="unit", orders_topic="o"), FakeOut())
    assert readiness(intake, running=True)["ready"] is False  # not started
    consumer = intake.consumer = SourceConsumer(
        intake.settings, ["o"], group_id="g", session_timeout_ms=1, heartbeat_interval_ms=1
    )
    fake: Any = FakeLibrdkafka({("o", 0): 0}, 0)
    assert readiness(intake, running=True) == {
        "ready": False,
        "member": False,
        "source_partitions": 0,
        "forward_error": None,
        "sending_s": None,
    }
    consumer._on_assign(fake, [])  # a member holding nothing: more intakes than partitions
    assert readiness(intake, running=True)["ready"] is True
    consumer._on_assign(fake, [Partition("o", 0)])
    assert readiness(intake, running=True)["ready"] is True
    assert readiness(intake, running=False)["ready"] is False  # the intake task ended
    intake.forward_error = "KafkaTimeoutError()"
    assert readiness(intake, running=True)["ready"] is False
    intake.forward_error = None
    # A batch in flight: nothing polls the consumer meanwhile, which would learn of a lost
    # session only then; past the session timeout it counts as lost.
    intake.sending_since = 100.0
    timeout = intake.settings.session_timeout
    assert readiness(intake, running=True, now=100.0 + timeout)["ready"] is True
    stuck = readiness(intake, running=True, now=101.0 + timeout)
    assert stuck["ready"] is False and stuck["member"] is True
    assert stuck["sending_s"] == round(1.0 + timeout, 1)
    intake.sending_since = None
    consumer._on_revoke(fake, [Partition("o", 0)])  # the session timed out, or a rebalance
    assert readiness(intake, running=True)["member"] is False
    assert readiness(intake, running=True)["ready"] is False
