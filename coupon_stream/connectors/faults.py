"""Driver errors, classified once: retry it (transient) or set its cause aside.

The one place that knows the drivers' (aiokafka's, librdkafka's, asyncmy's, SQLAlchemy's)
exception types (librdkafka's become aiokafka's classes, `from_librdkafka`): intake, the
changelog and the sink ask `classify` what an exception means and wait with `Backoff`
between attempts (`retry`), so they agree on what is worth retrying.

The rule is the same for Kafka and the database: an error is PERMANENT only when it is
known to be caused by the data sent (too large, out of range, invalid) or by configuration
that no retry can change (authorization, unsupported version, a fenced producer); everything
else from Kafka or the database, known or not, is TRANSIENT. The two mistakes cost
differently: a transient error taken for permanent loses data (a valid record dead-lettered,
a row set aside) or crash-loops a worker, whereas a permanent error taken for transient
stalls its partition visibly (retries logged and counted, `/health/ready` 503) until an
operator looks. aiokafka's own `retriable` flag cannot decide alone: it is False on
`KafkaTimeoutError`, the archetype of a transient error.

Code above `connectors` catches Kafka's errors by the names re-exported here, so that
only `connectors` imports a driver (import-linter).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from aiokafka import errors as kafka
from aiokafka.errors import CommitFailedError as CommitFailedError
from aiokafka.errors import ConsumerStoppedError as ConsumerStoppedError
from aiokafka.errors import KafkaError as KafkaError
from aiokafka.errors import for_code as for_code
from asyncmy import errors as asyncmy
from confluent_kafka import KafkaError as LibrdkafkaError
from sqlalchemy import exc as sa

from coupon_stream.foundation.errors import AccessRefused, GivenUp

T = TypeVar("T")


class Fault(StrEnum):
    """What a failure says about the operation that raised it."""

    TRANSIENT = "transient"  # the same operation may work later: retry it
    PERMANENT = "permanent"  # it never will: set its cause aside, or stop loudly


# Kafka: the request itself (its size, its topic, its format) or the client's standing
# (authorization, version, a fenced transactional producer) is refused.
KAFKA_PERMANENT: tuple[type[kafka.KafkaError], ...] = (
    kafka.MessageSizeTooLargeError,
    kafka.RecordTooLargeError,
    kafka.RecordListTooLargeError,
    kafka.OffsetMetadataTooLargeError,
    kafka.InvalidTopicError,
    kafka.InvalidRequiredAcksError,
    kafka.InvalidTimestampError,
    kafka.InvalidRequestError,
    kafka.InvalidConfigurationError,
    kafka.InvalidPartitionsError,
    kafka.InvalidReplicationFactorError,
    kafka.InvalidReplicationAssignmentError,
    kafka.PolicyViolationError,
    kafka.TopicAuthorizationFailedError,
    kafka.GroupAuthorizationFailedError,
    kafka.ClusterAuthorizationFailedError,
    kafka.TransactionalIdAuthorizationFailed,
    kafka.AuthenticationFailedError,
    kafka.AuthenticationMethodNotSupported,
    kafka.SaslAuthenticationFailed,
    kafka.UnsupportedSaslMechanismError,
    kafka.IllegalSaslStateError,
    kafka.UnsupportedVersionError,
    kafka.UnsupportedForMessageFormatError,
    kafka.UnsupportedCodecError,
    kafka.IncompatibleBrokerVersion,
    kafka.UnrecognizedBrokerVersion,
    kafka.KafkaConfigurationError,
    kafka.IllegalArgumentError,
    kafka.IllegalStateError,
    kafka.ProducerFenced,
    kafka.InvalidProducerEpoch,
    kafka.InvalidTxnState,
)

# Kafka refusing who the service is (credentials) or what it may touch (ACLs): with the
# resource it names in its args.
KAFKA_AUTHENTICATION: tuple[type[kafka.KafkaError], ...] = (
    kafka.AuthenticationFailedError,
    kafka.AuthenticationMethodNotSupported,
    kafka.SaslAuthenticationFailed,
    kafka.UnsupportedSaslMechanismError,
    kafka.IllegalSaslStateError,
)
KAFKA_AUTHORIZATION: dict[type[kafka.KafkaError], str] = {
    kafka.TopicAuthorizationFailedError: "topic",
    kafka.GroupAuthorizationFailedError: "group",
    kafka.ClusterAuthorizationFailedError: "cluster",
    kafka.TransactionalIdAuthorizationFailed: "transactional id",
}

# MySQL/MariaDB error codes (`exc.orig.args[0]`).
DEADLOCK = 1213
MYSQL_TRANSIENT = frozenset(
    {
        DEADLOCK,
        1205,  # lock wait timeout exceeded
        1040,  # too many connections
        1053,  # server shutdown in progress
        1317,  # query execution was interrupted
        1927,  # connection was killed (MariaDB)
        2002,  # can't connect through the socket
        2003,  # can't connect to the server
        2006,  # server has gone away
        2013,  # lost connection during query
        2055,  # lost connection at reading (system error)
    }
)
MYSQL_PERMANENT = frozenset(
    {
        1048,  # column cannot be null
        1062,  # duplicate entry
        1264,  # out of range value for column
        1265,  # data truncated for column
        1292,  # truncated incorrect value
        1300,  # invalid character string
        1364,  # field doesn't have a default value
        1366,  # incorrect string/integer value
        1406,  # data too long for column
        1690,  # BIGINT value is out of range
        3819,  # check constraint violated (MySQL)
        3988,  # conversion from collation impossible (invalid character)
        4025,  # CONSTRAINT failed (MariaDB's check constraint)
    }
)
# The database refusing the service's account or a privilege of it.
MYSQL_REFUSED = frozenset(
    {
        1044,  # access denied for user to database
        1045,  # access denied for user (password)
        1142,  # command denied to user for table
        1143,  # command denied to user for column
        1227,  # access denied, you need a privilege
        1698,  # access denied (no password allowed, e.g. unix_socket auth)
        3159,  # connections using insecure transport are prohibited (MySQL)
        4151,  # access denied: the account requires SSL (MariaDB)
    }
)
# SQLSTATE classes: 22 data exception, 23 integrity constraint violation.
_DATA_SQLSTATE = ("22", "23")
# PEP 249's classes for errors in the data processed, as SQLAlchemy and the drivers name them
# (SQLite's CHECK and NOT NULL failures are IntegrityError; "database is locked" is not).
_DATA_CLASSES = (
    sa.DataError,
    sa.IntegrityError,
    sqlite3.DataError,
    sqlite3.IntegrityError,
    asyncmy.DataError,
    asyncmy.IntegrityError,
)


def refusal(exc: BaseException) -> str | None:
    """What was refused, when `exc` (or what caused it) refuses the service's access."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, AccessRefused):
            return str(e)
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"the server's certificate did not verify: {e.verify_message or e}"
        if isinstance(e, ssl.SSLError) and _TLS_ALERTS.search(str(e)):
            alert = getattr(e, "reason", None) or e
            return (
                f"the server refused the TLS handshake ({alert}): a client certificate it "
                "requires is missing, or not one it trusts"
            )
        if isinstance(e, KAFKA_AUTHENTICATION):
            return f"authentication failed: {str(e) or type(e).__name__}"
        for kind, resource in KAFKA_AUTHORIZATION.items():
            if isinstance(e, kind):
                names = ", ".join(map(str, _flat(e.args))) or "?"
                return f"not authorized ({type(e).__name__}) on {resource} {names}"
        if mysql_code(e) in MYSQL_REFUSED:
            return reason(e)
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return None


# The server's alerts about the client's certificate (mutual TLS), as OpenSSL words them.
_TLS_ALERTS = re.compile(
    r"CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|"
    r"certificate required|bad certificate|unknown ca|HANDSHAKE_FAILURE",
    re.IGNORECASE,
)


def _flat(args: tuple[object, ...]) -> list[object]:
    out: list[object] = []
    for a in args:
        out += _flat(tuple(a)) if isinstance(a, list | tuple | set | frozenset) else [a]
    return out


def classify(exc: BaseException) -> Fault:
    """Whether retrying the operation that raised `exc` can ever succeed (see the module)."""
    if not isinstance(exc, Exception):
        return Fault.PERMANENT  # a cancellation or an exit: never to be retried as a failure
    if refusal(exc) is not None:
        return Fault.PERMANENT
    if isinstance(exc, kafka.KafkaError):
        return Fault.PERMANENT if isinstance(exc, KAFKA_PERMANENT) else Fault.TRANSIENT
    if isinstance(exc, sa.DBAPIError):
        return _database(exc.orig, exc)
    if isinstance(exc, asyncmy.MySQLError | sqlite3.Error):
        return _database(exc, exc)
    if isinstance(exc, sa.SQLAlchemyError | OSError):
        # Pool timeouts, disconnects, OSError's TimeoutError and ConnectionError: the other
        # side may come back.
        return Fault.TRANSIENT
    # Anything else is our own code refusing a value or a bug: running it again does the same.
    return Fault.PERMANENT


def _database(orig: BaseException | None, exc: BaseException) -> Fault:
    code = mysql_code(orig)
    if code in MYSQL_PERMANENT:
        return Fault.PERMANENT
    if code in MYSQL_TRANSIENT:
        return Fault.TRANSIENT
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_DATA_SQLSTATE):
        return Fault.PERMANENT
    if isinstance(orig, _DATA_CLASSES) or isinstance(exc, _DATA_CLASSES):
        return Fault.PERMANENT
    return Fault.TRANSIENT


def from_librdkafka(err: LibrdkafkaError, *names: str | None) -> kafka.KafkaError:
    """librdkafka's error as the aiokafka class of the same meaning, so it is classified once.

    A broker's error keeps its Kafka error code, and so its class; `names` are the resources
    it is about (a topic, a group), which an authorization error must name. librdkafka's
    own errors (negative codes): a failed login is an authentication error, a fatal one
    is permanent, and the rest (transport, timeouts, brokers down) stay transient.
    """
    code, text = err.code(), err.str()
    if code > 0:
        return for_code(code)(*([n for n in names if n] or [text]))
    if err.name() == "_AUTHENTICATION":
        return kafka.AuthenticationFailedError(text)
    if err.fatal():
        return kafka.IllegalStateError(f"librdkafka fatal error: {text}")
    if err.name() in _LIBRDKAFKA_LINK:
        return kafka.KafkaConnectionError(text)
    return kafka.KafkaError(text)


# librdkafka's own errors (names of negative codes) about the link to the brokers.
_LIBRDKAFKA_LINK = frozenset({"_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_SSL", "_RESOLVE"})


def is_too_large(exc: BaseException) -> bool:
    """Kafka refused a message or batch for its size (client-side or broker-side check)."""
    return isinstance(
        exc,
        kafka.MessageSizeTooLargeError | kafka.RecordTooLargeError | kafka.RecordListTooLargeError,
    )


def mysql_code(exc: BaseException | None) -> int | None:
    """The MySQL error code of a driver error (`args[0]`), or None."""
    if exc is None or isinstance(exc, OSError):
        return None  # OSError's args[0] is an errno, not a server code
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def is_deadlock(exc: BaseException) -> bool:
    """InnoDB rolled this transaction back to break a lock cycle: a conflict, not an outage."""
    return mysql_code(getattr(exc, "orig", None) or exc) == DEADLOCK


def reason(exc: BaseException) -> str:
    """The database's or broker's own words for `exc`, on one line (for logs and dead letters)."""
    orig = getattr(exc, "orig", None) or exc
    code = mysql_code(orig)
    args: tuple[object, ...] = getattr(orig, "args", ())
    if code is not None and len(args) > 1:
        text = f"{code}: {args[1]}"
    else:
        text = str(orig) or type(orig).__name__
    return (text.splitlines() or [type(orig).__name__])[0][:500]


class Backoff:
    """Exponential backoff between attempts of one operation: first, 2x, 4x ... up to maximum."""

    def __init__(self, first: float = 0.1, maximum: float = 2.0) -> None:
        if not 0 <= first <= maximum:
            raise ValueError(f"backoff needs 0 <= first <= maximum, got {first}, {maximum}")
        self.first = first
        self.maximum = maximum
        self.delay = first

    async def sleep(self) -> float:
        """Sleep the current delay, then double it (up to maximum); return the delay slept."""
        delay = self.delay
        await asyncio.sleep(delay)
        self.delay = min(delay * 2, self.maximum)
        return delay


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff | None = None,
    timeout: float | None = None,
    wanted: Callable[[], bool] | None = None,
    failed: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Run `call` until it works: the one retry loop, for every stage and tool.

    A permanent error (`classify`) raises at once. After a transient one, `wanted()` false
    raises `GivenUp` (from that error), as does nothing else; past `timeout` seconds the
    error itself is raised; otherwise `failed(error, delay)` is told, then the next attempt
    follows after `delay`. Callers say only what they do between attempts.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    backoff = backoff or Backoff()
    while True:
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - classified here
            if classify(exc) is Fault.PERMANENT:
                raise
            if deadline is not None and time.monotonic() > deadline:
                raise
            if wanted is not None and not wanted():
                raise GivenUp(f"given up after {exc!r}") from exc
            if failed is not None:
                failed(exc, backoff.delay)
            await backoff.sleep()
