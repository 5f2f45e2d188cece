"""Every Kafka client of the service and its CLI, built here from one Settings.

The security settings (SASL, TLS: README, "Connecting to a secured Kafka and MySQL") reach
every client only through `kafka_auth` (librdkafka's consumer: `librdkafka_auth`), so no
client can speak PLAINTEXT to a cluster that wants TLS because one constructor forgot them.
Faust's own clients get the same arguments through its credentials
(`coupon_stream.connectors.engine.broker_credentials`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer as AIOKafkaConsumer
from aiokafka import AIOKafkaProducer as AIOKafkaProducer
from aiokafka import ConsumerRebalanceListener
from aiokafka import TopicPartition as TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn

from coupon_stream.connectors.faults import KAFKA_AUTHORIZATION, refusal
from coupon_stream.foundation.errors import AccessRefused
from coupon_stream.foundation.settings import Settings

log = logging.getLogger(__name__)

# The `X as X` imports above re-export the clients' types and the struct that names a
# partition, for the code above `connectors` that holds a client or a partition: only
# `connectors` imports aiokafka (import-linter).


class RebalanceListener(ConsumerRebalanceListener):
    """What a subscribed consumer calls when its partitions move; subclass it to listen.

    aiokafka's own listener, named here so that a subclass above `connectors` does not
    import aiokafka: `subscribe(topics, listener=...)` accepts only its instances.
    Override `on_partitions_revoked` and `on_partitions_assigned` (each given a set of
    TopicPartition).
    """


def kafka_auth(settings: Settings) -> dict[str, Any]:
    """The security arguments aiokafka's clients take, for the configured protocol."""
    s = settings
    auth: dict[str, Any] = {"security_protocol": s.kafka_security_protocol}
    context = s.kafka_tls()
    if context is not None:
        auth["ssl_context"] = context
    if s.kafka_security_protocol.startswith("SASL_"):
        assert s.kafka_password is not None  # Settings refuses SASL without one
        auth.update(
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_username,
            sasl_plain_password=s.kafka_password.get_secret_value(),
        )
    return auth


def librdkafka_auth(settings: Settings) -> dict[str, str]:
    """`kafka_auth` for librdkafka (the intake's consumer, `connectors.sources`): the same
    settings as its properties, the same checks of the broker's certificate and name."""
    s = settings
    conf: dict[str, str] = {"security.protocol": s.kafka_security_protocol}
    if s.kafka_security_protocol.endswith("SSL"):
        conf["ssl.endpoint.identification.algorithm"] = "https"
        # No CA file: the system's trust store, as `tls_context` uses it.
        conf["ssl.ca.location"] = str(s.kafka_ca_file) if s.kafka_ca_file else "probe"
        if s.kafka_cert_file is not None:
            conf["ssl.certificate.location"] = str(s.kafka_cert_file)
            conf["ssl.key.location"] = str(s.kafka_key_file or s.kafka_cert_file)
        if s.kafka_key_password is not None:
            conf["ssl.key.password"] = s.kafka_key_password.get_secret_value()
    if s.kafka_security_protocol.startswith("SASL_"):
        assert s.kafka_password is not None  # Settings refuses SASL without one
        conf["sasl.mechanism"] = s.kafka_sasl_mechanism or "PLAIN"
        conf["sasl.username"] = s.kafka_username or ""
        conf["sasl.password"] = s.kafka_password.get_secret_value()
    return conf


def consumer(settings: Settings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics, bootstrap_servers=settings.bootstrap_servers, **kafka_auth(settings), **options
    )


def producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, **kafka_auth(settings), **options
    )


def admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, **kafka_auth(settings), **options
    )


def kafka_refused(
    settings: Settings, exc: BaseException, doing: str, *, worker: bool = True
) -> AccessRefused | None:
    """`exc` as an AccessRefused naming the brokers, the user and what was refused, or None.

    `doing` says what was being done, e.g. "running the intake"; for the worker (`worker`)
    an ACL refusal also names the operations the worker needs on the refused resource.
    """
    what = refusal(exc)
    if what is None:
        return None
    if worker and isinstance(exc, tuple(KAFKA_AUTHORIZATION)):
        resources = [str(a) for a in exc.args if isinstance(a, str)]
        resources += [str(t) for a in exc.args if isinstance(a, list | set) for t in a]
        needs = sorted({needed(settings, r) for r in resources})
        if needs:
            what += "; the worker needs " + "; ".join(needs) + " (README, ACLs)"
    return AccessRefused(
        f"Kafka {settings.bootstrap_servers} ({settings.kafka_security_protocol}) refused "
        f"{settings.kafka_user} while {doing}: {what}"
    )


def needed(settings: Settings, resource: str) -> str:
    """The operations one worker needs on a topic, group or transactional id (README, "ACLs"),
    and no more: the prefixes end with a delimiter, so they match no other app's names."""
    s = settings
    if resource in (s.orders_topic, s.refunds_topic):
        return f"READ, DESCRIBE on topic {resource}"
    if resource == s.dlq_topic:
        return f"WRITE, DESCRIBE, CREATE on topic {resource}"
    if resource in (s.app_id, s.intake_group):
        return f"READ, DESCRIBE on group {resource}"
    if resource.startswith(f"{s.app_id}-changelog-"):
        return f"WRITE, DESCRIBE on transactional ids prefixed {s.app_id}-changelog-"
    if resource.startswith(f"{s.app_id}-"):
        return f"READ, WRITE, CREATE, DESCRIBE, DESCRIBE_CONFIGS on topics prefixed {s.app_id}-"
    return f"nothing on {resource}: check the COUPON_*_TOPIC settings"


async def check_kafka_access(settings: Settings, timeout: float = 15.0) -> None:
    """Connect to the bootstrap brokers once, as every client will: raise if refused.

    aiokafka's clients log a refused handshake (a wrong password, a certificate that does
    not verify) as "Unable to bootstrap" and retry it like an outage, for ever; this asks
    the same question once, before anything starts, and tells the two apart. A broker that
    does not answer is left to the clients' retries.
    """
    auth = kafka_auth(settings)
    refused: AccessRefused | None = None
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **auth),
                timeout,
            )
        except Exception as exc:  # noqa: BLE001 - a refusal raises below, the rest is an outage
            if refusal(exc) is None and "ssl_context" in auth:
                exc = await _tls_refusal(host, int(port), auth["ssl_context"], timeout) or exc
            refused = kafka_refused(settings, exc, f"connecting to {server}") or refused
            if refused is None:
                log.warning("Kafka broker %s did not answer: %r", server, exc)
            continue
        conn.close()
        return
    if refused is not None:
        raise refused


async def _tls_refusal(
    host: str, port: int, context: ssl.SSLContext, timeout: float
) -> ssl.SSLError | None:
    """The alert of a broker that refused our client certificate, if that is what happened.

    With TLS 1.3 a broker that wants a client certificate refuses it after the handshake
    has completed on our side, so aiokafka only sees the connection closed, as in an
    outage. A handshake of our own, then a short read, receives the alert itself.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError):
        return None
    try:
        async with asyncio.timeout(2):
            await reader.read(1)  # a broker that accepted us waits for a request: times out
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    return None
