"""Error classification: one test per class of error, built from the real exception types."""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time

import pytest
from aiokafka import errors as kafka
from asyncmy import errors as asyncmy
from sqlalchemy import exc as sa

from coupon_stream.connectors.faults import (
    Backoff,
    Fault,
    classify,
    is_deadlock,
    is_too_large,
    reason,
    refusal,
    retry,
)
from coupon_stream.foundation.errors import GivenUp


def mysql(code: int, message: str, cls: type = asyncmy.OperationalError) -> sa.DBAPIError:
    """A driver error as SQLAlchemy hands it to the sink (`exc.orig` is asyncmy's)."""
    orig = cls(code, message)
    error: sa.DBAPIError = sa.DBAPIError.instance("INSERT INTO t ...", {}, orig, asyncmy.Error)
    return error


@pytest.mark.parametrize(
    "error",
    [
        kafka.KafkaConnectionError("connection refused"),
        kafka.KafkaTimeoutError(),  # retriable=False in aiokafka, yet the archetype of transient
        kafka.NotLeaderForPartitionError(),
        kafka.LeaderNotAvailableError(),
        kafka.RequestTimedOutError(),
        kafka.NodeNotReadyError(),
        kafka.NoBrokersAvailable(),
        kafka.NotEnoughReplicasError(),
        kafka.UnknownTopicOrPartitionError(),  # a topic being created
        kafka.KafkaStorageError(),
        kafka.BrokerNotAvailableError(),
        kafka.GroupCoordinatorNotAvailableError(),
        kafka.RebalanceInProgressError(),
        kafka.CommitFailedError("rebalanced"),
    ],
    ids=type,
)
def test_kafka_unreachable_timeout_and_leader_change_are_transient(error: Exception) -> None:
    assert classify(error) is Fault.TRANSIENT


@pytest.mark.parametrize(
    "error",
    [
        kafka.MessageSizeTooLargeError("1048700 bytes"),
        kafka.RecordTooLargeError(),
        kafka.RecordListTooLargeError(),
        kafka.InvalidTopicError(),
        kafka.TopicAuthorizationFailedError(),
        kafka.ClusterAuthorizationFailedError(),
        kafka.UnsupportedVersionError(),
        kafka.UnsupportedForMessageFormatError(),
        kafka.PolicyViolationError(),
        kafka.InvalidRequiredAcksError(),
        kafka.ProducerFenced(),
        kafka.KafkaConfigurationError("bad option"),
    ],
    ids=type,
)
def test_kafka_refusals_of_the_request_itself_are_permanent(error: Exception) -> None:
    assert classify(error) is Fault.PERMANENT


def test_an_unknown_kafka_error_is_transient_whatever_its_retriable_flag() -> None:
    """A false permanent loses data or crash-loops; a false transient only stalls, visibly."""

    class Unheard(kafka.KafkaError):
        retriable = False

    assert classify(Unheard()) is Fault.TRANSIENT
    assert classify(kafka.UnknownError()) is Fault.TRANSIENT


def test_the_too_large_kafka_errors_are_told_apart_from_other_permanent_ones() -> None:
    assert is_too_large(kafka.MessageSizeTooLargeError())
    assert is_too_large(kafka.RecordTooLargeError())
    assert not is_too_large(kafka.TopicAuthorizationFailedError())
    assert not is_too_large(OSError())


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (1213, "Deadlock found when trying to get lock; try restarting transaction"),
        (1205, "Lock wait timeout exceeded; try restarting transaction"),
        (2002, "Can't connect to local MySQL server through socket"),
        (2003, "Can't connect to MySQL server on '127.0.0.1'"),
        (2006, "MySQL server has gone away"),
        (2013, "Lost connection to MySQL server during query"),
        (2055, "Lost connection to MySQL server at 'reading initial communication packet'"),
        (1040, "Too many connections"),
        (1053, "Server shutdown in progress"),
        (1146, "Table 'coupons.tddl_output' doesn't exist"),  # unknown code: recreated, retried
    ],
)
def test_mysql_deadlock_timeout_and_connection_errors_are_transient(
    code: int, message: str
) -> None:
    assert classify(mysql(code, message)) is Fault.TRANSIENT
    assert classify(asyncmy.OperationalError(code, message)) is Fault.TRANSIENT  # unwrapped


@pytest.mark.parametrize(
    ("code", "message", "cls"),
    [
        (1264, "Out of range value for column 'cumulate_amount' at row 1", asyncmy.DataError),
        (1406, "Data too long for column 'gmt_create' at row 1", asyncmy.DataError),
        (1366, "Incorrect string value: '\\xF0\\x9F' for column", asyncmy.OperationalError),
        (1292, "Truncated incorrect DOUBLE value: 'x'", asyncmy.OperationalError),
        (1048, "Column 'cumulate_amount' cannot be null", asyncmy.IntegrityError),
        (1690, "BIGINT value is out of range in '`cumulate_amount` + 1'", asyncmy.OperationalError),
        (
            3988,
            "Conversion from collation utf8mb4 into latin1 impossible",
            asyncmy.OperationalError,
        ),
        (1300, "Invalid utf8mb4 character string: 'F09F'", asyncmy.OperationalError),
        (4025, "CONSTRAINT `c` failed for `coupons`.`t`", asyncmy.OperationalError),
    ],
)
def test_mysql_data_errors_are_permanent(code: int, message: str, cls: type) -> None:
    """asyncmy files several of these (1690, 1366, 4025) under OperationalError: the code
    decides, not the class."""
    assert classify(mysql(code, message, cls)) is Fault.PERMANENT
    assert classify(cls(code, message)) is Fault.PERMANENT


def test_an_unknown_mysql_code_is_permanent_only_if_its_sqlstate_says_data() -> None:
    data = asyncmy.OperationalError(1999, "something about a value")
    data.sqlstate = "22003"
    assert classify(sa.OperationalError("stmt", {}, data)) is Fault.PERMANENT
    other = asyncmy.OperationalError(1999, "something else")
    other.sqlstate = "HY000"
    assert classify(sa.OperationalError("stmt", {}, other)) is Fault.TRANSIENT


def test_a_deadlock_is_recognised_wrapped_or_not() -> None:
    assert is_deadlock(mysql(1213, "Deadlock found"))
    assert is_deadlock(sa.OperationalError("stmt", {}, Exception(1213, "Deadlock found")))
    assert is_deadlock(asyncmy.OperationalError(1213, "Deadlock found"))
    assert not is_deadlock(mysql(1205, "Lock wait timeout"))
    assert not is_deadlock(OSError(1213, "an errno that happens to be 1213"))


def test_sqlite_constraint_failures_are_permanent_and_a_locked_database_transient() -> None:
    check = sqlite3.IntegrityError("CHECK constraint failed: cumulate_amount < 1000000")
    assert classify(sa.IntegrityError("stmt", {}, check)) is Fault.PERMANENT
    assert classify(check) is Fault.PERMANENT
    assert classify(sqlite3.DataError("string or blob too big")) is Fault.PERMANENT
    locked = sqlite3.OperationalError("database is locked")
    assert classify(sa.OperationalError("stmt", {}, locked)) is Fault.TRANSIENT
    assert classify(locked) is Fault.TRANSIENT


@pytest.mark.parametrize(
    "error",
    [
        OSError("network unreachable"),
        TimeoutError(),
        ConnectionError(),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(),
        sa.TimeoutError("QueuePool limit reached"),  # SQLAlchemy's pool, not a DBAPI error
    ],
    ids=type,
)
def test_os_and_timeout_errors_are_transient(error: Exception) -> None:
    assert classify(error) is Fault.TRANSIENT


def test_our_own_errors_and_cancellation_are_permanent() -> None:
    """A ValueError or a bug does the same on every run; a cancellation is never retried."""
    assert classify(ValueError("bad value")) is Fault.PERMANENT
    assert classify(TypeError()) is Fault.PERMANENT
    assert classify(asyncio.CancelledError()) is Fault.PERMANENT
    assert classify(KeyboardInterrupt()) is Fault.PERMANENT


def test_reason_is_the_database_s_own_words_on_one_line() -> None:
    error = mysql(1264, "Out of range value for column 'cumulate_amount' at row 1")
    assert reason(error) == "1264: Out of range value for column 'cumulate_amount' at row 1"
    check = sqlite3.IntegrityError("CHECK constraint failed: x\nmore")
    assert reason(sa.IntegrityError("stmt", {}, check)) == "CHECK constraint failed: x"
    assert reason(kafka.KafkaTimeoutError()) == "KafkaTimeoutError"


async def test_backoff_doubles_up_to_its_maximum() -> None:
    backoff = Backoff(0.01, 0.03)
    started = time.perf_counter()
    assert [await backoff.sleep() for _ in range(4)] == [0.01, 0.02, 0.03, 0.03]
    assert time.perf_counter() - started >= 0.09
    with pytest.raises(ValueError):
        Backoff(1.0, 0.5)


def _failing(*errors: BaseException, result: str = "done"):
    calls: list[int] = []

    async def call() -> str:
        calls.append(len(calls))
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return call, calls


async def test_retry_runs_a_transient_failure_again_and_says_so_between_attempts() -> None:
    call, calls = _failing(kafka.KafkaTimeoutError(), TimeoutError())
    told: list[tuple[str, float]] = []
    backoff = Backoff(0.001, 0.002)
    assert await retry(
        call, backoff=backoff, failed=lambda e, d: told.append((type(e).__name__, d))
    )
    assert told == [("KafkaTimeoutError", 0.001), ("TimeoutError", 0.002)] and len(calls) == 3


async def test_retry_raises_a_permanent_error_at_once() -> None:
    call, calls = _failing(kafka.TopicAuthorizationFailedError({"t"}))
    with pytest.raises(kafka.TopicAuthorizationFailedError):
        await retry(call, failed=lambda e, d: pytest.fail("a permanent error is not retried"))
    assert calls == [0]


async def test_retry_gives_up_when_no_longer_wanted_and_after_its_timeout() -> None:
    call, calls = _failing(*[kafka.KafkaTimeoutError()] * 10)
    with pytest.raises(GivenUp) as given_up:
        await retry(call, backoff=Backoff(0.001, 0.001), wanted=lambda: len(calls) < 3)
    assert isinstance(given_up.value.__cause__, kafka.KafkaTimeoutError) and len(calls) == 3
    call, calls = _failing(*[kafka.KafkaTimeoutError()] * 1000)
    with pytest.raises(kafka.KafkaTimeoutError):
        await retry(call, backoff=Backoff(0.001, 0.001), timeout=0.02)
    assert 3 <= len(calls) < 1000


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (
            kafka.SaslAuthenticationFailed("Authentication failed during authentication"),
            "authentication failed",
        ),
        (kafka.UnsupportedSaslMechanismError("SCRAM-SHA-256 not enabled"), "authentication failed"),
        (kafka.TopicAuthorizationFailedError({"orders"}), "on topic orders"),
        (kafka.GroupAuthorizationFailedError("app-intake"), "on group app-intake"),
        (kafka.ClusterAuthorizationFailedError(), "on cluster"),
        (mysql(1045, "Access denied for user 'coupons'@'127.0.0.1'"), "1045: Access denied"),
        (mysql(1142, "INSERT command denied to user 'coupons'"), "1142: INSERT command denied"),
        (asyncmy.OperationalError(4151, "Access denied, this account is locked"), "4151"),
    ],
)
def test_refused_access_is_permanent_and_says_what_was_refused(exc, said) -> None:
    assert said in (refusal(exc) or "")
    assert classify(exc) is Fault.PERMANENT


def test_a_certificate_that_does_not_verify_is_refused_even_when_wrapped() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    wrapped = asyncmy.OperationalError(2003, "Can't connect to MySQL server")
    wrapped.__cause__ = verify
    assert refusal(wrapped) == (
        "the server's certificate did not verify: unable to get local issuer certificate"
    )
    assert classify(wrapped) is Fault.PERMANENT
    assert classify(ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")) is (
        Fault.PERMANENT
    )


@pytest.mark.parametrize(
    "exc",
    [
        kafka.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),  # a connection cut short
    ],
)
def test_an_unreachable_peer_is_no_refusal(exc) -> None:
    assert refusal(exc) is None
    assert classify(exc) is Fault.TRANSIENT
