"""Intake's size bounds and error handling, and the dead-letter fallback it relies on.

No broker: `FakeOut` records what intake would send, and `FakeProducer` stands in for
aiokafka's producer under a real `KafkaOut`, with its client-side and broker-side size checks.
Kept apart from test_app.py so that these run without Faust or the state stage.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError, TopicAuthorizationFailedError
from confluent_kafka import KafkaError as LibrdkafkaError
from confluent_kafka import TopicPartition as Partition

from coupon_stream.connectors import clients
from coupon_stream.connectors.faults import Fault, KafkaError, classify, from_librdkafka, refusal
from coupon_stream.connectors.kafka import (
    HEADER_VALUE_TRUNCATED,
    TRUNCATED_VALUE_BYTES,
    DeadLetter,
    KafkaOut,
    row_dead_letter,
)
from coupon_stream.connectors.sources import SourceConsumer
from coupon_stream.core.records import Row, Source, decode_rows, partition_for_buyer
from coupon_stream.core.state import ResultRow
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.intake import (
    MAX_MESSAGE_BYTES,
    MAX_RECORD_BYTES,
    Intake,
    route,
    split_rows,
)
from tests.unit.fakes import FakeLibrdkafka, FakeMessage, FakeOut, FakeProducer, Polled, fetched
from tests.unit.samples import sample


def order(i, buyer, order_id=None, **fields):
    return orjson.dumps(
        {
            "biz_order_id": order_id or f"o{i}",
            "pay_status": "2",
            "buyer_id": str(buyer),
            "pay_time": "2026-11-11 10:00:00",
            "div_idx_actual_total_fee": 12399,
            **fields,
        }
    )


def settings():
    return Settings(app_id="unit", partitions=4, orders_topic="orders")


def test_a_row_too_large_to_keep_in_state_is_dead_lettered_at_intake():
    huge = "x" * 20_000
    msgs = [
        Polled("orders", 0, order(0, 7)),
        Polled("orders", 1, order(1, 7, order_id=huge)),
        Polled("orders", 2, order(2, 7, order_id="y" * 5_000)),  # large, still below the bound
        Polled("orders", 3, order(3, 7, order_id="\x01" * 3_000)),  # 6 bytes a char: 18 KB
    ]
    routed = route(fetched(*msgs), {"orders": Source.ORDERS}, 4)
    (rows,) = routed.by_partition.values()
    assert [r[1] for r in rows] == ["o0", "y" * 5_000]
    assert [(d.offset, d.kind) for d in routed.dead] == [(1, "too_large"), (3, "too_large")]
    dead = routed.dead[0]
    assert dead.value == msgs[1].value and dead.topic == "orders"
    size = len(orjson.dumps([(7, huge, "2", 20261111, 123, None, None)]))
    assert dead.reason == (
        f"record too large to keep in state: {size} bytes of "
        f"biz_order_id/pay_status/timestamps (limit {MAX_RECORD_BYTES})"
    )


def test_by_buyer_messages_stay_within_the_bound_unless_one_row_is_larger():
    rows: list[Row] = [
        (i, "x" * (i * 37 % 16_000), "2", 20261111, 1, None, None) for i in range(300)
    ]
    assert all(len(orjson.dumps([r])) <= MAX_RECORD_BYTES for r in rows)
    values = split_rows(rows)
    assert len(values) > 1 and all(len(v) <= MAX_MESSAGE_BYTES for v in values)
    assert [tuple(r) for v in values for r in orjson.loads(v)] == rows
    big = (1, "x" * (MAX_MESSAGE_BYTES + 1), "2", 20261111, 1, None, None)
    assert [len(v) > MAX_MESSAGE_BYTES for v in split_rows([rows[0], big, rows[1]])] == [
        False,
        True,
        False,
    ]


async def test_a_row_too_large_is_dead_lettered_and_never_sent_on():
    s = settings()
    out = FakeOut()
    batch = [
        Polled("orders", 0, order(0, 1, order_id="z" * 20_000)),
        Polled("orders", 1, order(1, 1)),
    ]
    await Intake(s, out).forward(fetched(*batch))
    by_buyer = [orjson.loads(kw["value"]) for topic, kw in out.sent if topic == s.by_buyer_topic]
    assert [r[1] for rows in by_buyer for r in rows] == ["o1"]
    (kw,) = out.dead()
    value = kw["value"]
    assert value == batch[0].value
    assert b"record too large" in dict(kw["headers"])["coupon.error.reason"]


async def test_a_permanent_kafka_error_stops_intake_instead_of_looping():
    out = FakeOut(refuse=MessageSizeTooLargeError("refused"))
    intake = Intake(settings(), out)
    retries = sample("coupon_intake_retries_total")
    with pytest.raises(MessageSizeTooLargeError):
        await asyncio.wait_for(
            intake.forward_until_sent(fetched(Polled("orders", 0, order(0, 7)))),
            5,
        )
    assert out.attempts == 1
    assert sample("coupon_intake_retries_total") == retries


async def test_a_transient_kafka_error_is_retried_until_sent():
    out = FakeOut(refuse=OSError("connection reset"))
    intake = Intake(settings(), out)

    async def heal():
        while out.attempts < 2:
            await asyncio.sleep(0.01)
        assert intake.forward_error == "OSError('connection reset')"  # health says it
        out.refuse = None

    healing = asyncio.ensure_future(heal())
    await asyncio.wait_for(
        intake.forward_until_sent(fetched(Polled("orders", 0, order(0, 7)))),
        5,
    )
    await healing
    assert out.attempts >= 3 and len(out.sent) == 1
    assert intake.forward_error is None


@pytest.mark.parametrize(
    "producer",
    [
        FakeProducer(),  # the client refuses: over max_request_size
        FakeProducer(broker_limit=512 * 1024),  # the broker refuses: the topic's own limit
    ],
    ids=["client", "broker"],
)
async def test_a_dead_letter_too_large_for_kafka_is_sent_truncated(producer):
    s = settings()
    out = KafkaOut(s)
    out._producer = producer
    value = b"{" + b"x" * (1024 * 1024)  # not JSON, and over 1 MiB
    truncated = sample("coupon_dead_letters_truncated_total")
    await Intake(s, out).forward(fetched(Polled("orders", 9, value)))
    ((topic, sent, key, headers),) = producer.sent
    assert topic == s.dlq_topic and key == b"k"
    assert sent == value[:TRUNCATED_VALUE_BYTES]
    assert headers[HEADER_VALUE_TRUNCATED] == str(len(value)).encode()
    assert headers["coupon.source.offset"] == b"9"
    assert b"not valid UTF-8 JSON" in headers["coupon.error.reason"]
    assert sample("coupon_dead_letters_truncated_total") == truncated + 1


async def test_a_dead_letter_refused_for_another_reason_is_not_truncated():
    out = KafkaOut(settings())
    out._producer = FakeProducer(refuse=TopicAuthorizationFailedError())
    dead = DeadLetter(b"k", b"x" * 10, "orders", 0, 1, "bad", "json")
    with pytest.raises(TopicAuthorizationFailedError):
        await (await out.dead_letter(dead))
    assert out._producer.sent == []


def test_a_refused_result_row_becomes_a_dead_letter_of_its_columns():
    row = ResultRow("2026-11-11 00:00:01", None, 5, 2**63 - 1, 20261111)
    dead = row_dead_letter("tddl_output", row, "1264: Out of range value")
    assert dead.key is None and (dead.topic, dead.partition, dead.offset) == ("tddl_output", -1, -1)
    assert dead.kind == "sink_rejected" and dead.reason == "1264: Out of range value"
    assert dead.value is not None
    assert orjson.loads(dead.value) == {
        "gmt_create": "2026-11-11 00:00:01",
        "gmt_modified": None,
        "buyer_id": 5,
        "cumulate_amount": 2**63 - 1,
        "effect_time": 20261111,
    }
    deleted = row_dead_letter("tddl_output", None, "refused", key=(5, 20261111))
    assert deleted.value is not None
    assert orjson.loads(deleted.value) == {"buyer_id": 5, "effect_time": 20261111, "deleted": True}


async def test_intake_routes_by_buyer_partition_and_dead_letters():
    s = Settings(app_id="unit", partitions=4, orders_topic="orders")
    out = FakeOut()
    intake = Intake(s, out)
    batch = [Polled("orders", i, order(i, b)) for i, b in enumerate([1, 2, 3, 1, 99])]
    await intake.forward(fetched(*batch, Polled("orders", 5, b"{oops")))
    routed: dict[int, list[str]] = {}
    for topic, kw in out.sent:
        if topic != s.by_buyer_topic:
            continue
        for buyer, order_id, _, day, yuan, _, _ in decode_rows(kw["value"]):
            assert partition_for_buyer(buyer, 4) == kw["partition"]
            routed.setdefault(buyer, []).append(order_id)
            assert yuan == 123 and day == 20261111
    assert routed == {1: ["o0", "o3"], 2: ["o1"], 3: ["o2"], 99: ["o4"]}
    (dead,) = [kw for topic, kw in out.sent if topic == "dlq"]
    assert dead["value"] == b"{oops"
    headers = dict(dead["headers"])
    assert headers["coupon.source.offset"] == b"5"
    assert b"not valid UTF-8 JSON" in headers["coupon.error.reason"]


def test_route_keeps_arrival_order_within_a_partition():
    msgs = [Polled("r", i, order(i, 7)) for i in range(5)]
    routed = route(fetched(*msgs), {"r": Source.ORDERS}, 3)
    (rows,) = routed.by_partition.values()
    assert [r[1] for r in rows] == ["o0", "o1", "o2", "o3", "o4"]


async def test_intake_lag_counts_from_the_committed_offset_after_an_assignment():
    intake = Intake(Settings(app_id="unit", orders_topic="orders"), FakeOut())
    consumer = intake.consumer = SourceConsumer(
        intake.settings, ["orders"], group_id="g", session_timeout_ms=1, heartbeat_interval_ms=1
    )
    # partition 1 has no commit yet (-1001): the group starts it at the beginning of the log
    fake: Any = FakeLibrdkafka({("orders", 0): 40, ("orders", 1): -1001}, 100)
    consumer._consumer = fake
    assert intake.lag() == {}
    consumer._on_assign(fake, [Partition("orders", 0), Partition("orders", 1)])
    assert intake.lag() == {}  # no high water known before the first fetch
    assert await consumer.fetch(10, 0.01) == []
    assert intake.lag() == {TopicPartition("orders", 0): 60, TopicPartition("orders", 1): 100}
    consumer._on_revoke(fake, [Partition("orders", 0), Partition("orders", 1)])
    assert intake.lag() == {}


def test_a_librdkafka_error_is_classified_as_aiokafkas_of_the_same_code():
    denied = from_librdkafka(LibrdkafkaError(LibrdkafkaError.TOPIC_AUTHORIZATION_FAILED), "refunds")
    assert isinstance(denied, TopicAuthorizationFailedError) and denied.args == ("refunds",)
    assert classify(denied) is Fault.PERMANENT
    login = from_librdkafka(LibrdkafkaError(LibrdkafkaError._AUTHENTICATION))
    assert refusal(login) is not None
    down = from_librdkafka(LibrdkafkaError(LibrdkafkaError._ALL_BROKERS_DOWN))
    assert classify(down) is Fault.TRANSIENT
    rebalance = from_librdkafka(LibrdkafkaError(LibrdkafkaError.REBALANCE_IN_PROGRESS), "g")
    assert classify(rebalance) is Fault.TRANSIENT and refusal(rebalance) is None


def source_consumer(fake: Any) -> SourceConsumer:
    consumer = SourceConsumer(
        Settings(app_id="unit"),
        ["o", "r"],
        group_id="unit-intake",
        session_timeout_ms=1,
        heartbeat_interval_ms=1,
    )
    consumer._consumer = fake
    return consumer


async def test_a_fetch_comes_as_runs_by_partition_and_skips_a_transient_error(caplog):
    fake: Any = FakeLibrdkafka({}, 0)
    down = LibrdkafkaError(LibrdkafkaError._ALL_BROKERS_DOWN)
    fake.fetched = [
        FakeMessage("o", 0, 5, b"a"),
        FakeMessage("o", 0, 6, b"b"),
        FakeMessage(None, -1, -1, b"", error=down),
        FakeMessage("r", 0, 9, b"c"),
        FakeMessage("o", 1, 3, b"d"),
        FakeMessage("o", 0, 8, b"e"),  # offsets need not follow each other (transactions)
    ]
    runs = await source_consumer(fake).fetch(100, 0.01)
    assert [(r.tp, r.values, r.next_offset) for r in runs] == [
        (TopicPartition("o", 0), [b"a", b"b"], 7),
        (TopicPartition("r", 0), [b"c"], 10),
        (TopicPartition("o", 1), [b"d"], 4),
        (TopicPartition("o", 0), [b"e"], 9),
    ]
    assert "All broker connections are down (librdkafka retries it)" in caplog.text


async def test_brokers_that_do_not_answer_when_intake_starts_leave_it_waiting_not_stopped(caplog):
    intake = Intake(Settings(app_id="unit", orders_topic="o", refunds_topic="r"), FakeOut())
    fake: Any = FakeLibrdkafka({}, 0)
    consumer = source_consumer(fake)
    fake.metadata_error = LibrdkafkaError(LibrdkafkaError._TRANSPORT)
    await intake._check_topics(consumer)  # a warning, no error
    assert "intake could not list the topics yet" in caplog.text
    fake.metadata_error = LibrdkafkaError(LibrdkafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaError):
        await intake._check_topics(consumer)
    fake.metadata_error, fake.topics = None, {"o": None}
    await intake._check_topics(consumer)
    assert "input topic r does not exist" in caplog.text


@pytest.mark.parametrize(
    ("code", "topic", "needs"),
    [
        (LibrdkafkaError.TOPIC_AUTHORIZATION_FAILED, "r", "READ, DESCRIBE on topic r"),
        (LibrdkafkaError.GROUP_AUTHORIZATION_FAILED, None, "READ, DESCRIBE on group unit-intake"),
    ],
)
async def test_a_denied_topic_or_group_stops_the_fetch_naming_what_the_worker_needs(
    code, topic, needs
):
    fake: Any = FakeLibrdkafka({}, 0)
    fake.fetched = [FakeMessage(topic, 0, -1, b"", error=LibrdkafkaError(code))]
    with pytest.raises(KafkaError) as raised:
        await source_consumer(fake).fetch(100, 0.01)
    s = Settings(app_id="unit", orders_topic="o", refunds_topic="r")
    refused = clients.kafka_refused(s, raised.value, "running the intake")
    assert refused is not None and needs in str(refused)


def test_ready_only_as_a_running_member_of_the_group_whose_batches_go_out():
    intake = Intake(Settings(app_id="unit", orders_topic="o"), FakeOut())
    assert intake.health()["ready"] is False  # not started
    consumer = intake.consumer = SourceConsumer(
        intake.settings, ["o"], group_id="g", session_timeout_ms=1, heartbeat_interval_ms=1
    )
    intake.running = True
    fake: Any = FakeLibrdkafka({("o", 0): 0}, 0)
    assert intake.health() == {
        "ready": False,
        "member": False,
        "source_partitions": 0,
        "forward_error": None,
        "batch_s": None,
    }
    consumer._on_assign(fake, [])  # a member holding nothing: more intakes than partitions
    assert intake.health()["ready"] is True
    consumer._on_assign(fake, [Partition("o", 0)])
    assert intake.health()["ready"] is True
    intake.running = False  # the intake's loop ended
    assert intake.health()["ready"] is False
    intake.running = True
    intake.forward_error = "KafkaTimeoutError()"
    assert intake.health()["ready"] is False
    intake.forward_error = None
    # A batch in hand (forwarded, then committed): nothing polls the consumer meanwhile,
    # which would learn of a lost session only then; past the session timeout it counts as
    # lost.
    intake.batch_since = 100.0
    timeout = intake.settings.session_timeout
    assert intake.health(now=100.0 + timeout)["ready"] is True
    stuck = intake.health(now=101.0 + timeout)
    assert stuck["ready"] is False and stuck["member"] is True
    assert stuck["batch_s"] == round(1.0 + timeout, 1)
    intake.batch_since = None
    consumer._on_revoke(fake, [Partition("o", 0)])  # the session timed out, or a rebalance
    assert intake.health()["member"] is False
    assert intake.health()["ready"] is False
