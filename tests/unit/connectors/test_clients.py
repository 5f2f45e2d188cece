"""One place builds every Kafka client's security arguments; Faust's clients get the same."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from coupon_stream.connectors import clients
from coupon_stream.connectors.engine import broker_credentials
from coupon_stream.foundation.errors import AccessRefused
from coupon_stream.foundation.settings import Settings
from tests import certs

SASL = {"kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_username": "coupon"}


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, certs.Pem]:
    return certs.make(tmp_path)


def settings(protocol: str, pems: dict[str, certs.Pem], **extra: object) -> Settings:
    values: dict[str, Any] = {"kafka_security_protocol": protocol, **extra}
    if protocol.startswith("SASL_"):
        values |= {**SASL, "kafka_password": "s3cret"}
    if protocol.endswith("SSL"):
        values["kafka_ca_file"] = pems["ca"].cert
    return Settings(**values)


def test_plaintext_is_the_default_and_sends_nothing_else() -> None:
    assert clients.kafka_auth(Settings()) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_tls_verifies_the_certificate_and_the_hostname(protocol, pems) -> None:
    context = clients.kafka_auth(settings(protocol, pems))["ssl_context"]
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "coupon-stream test CA"),),)
    ]


def test_sasl_sends_the_user_over_tls_or_plaintext(pems) -> None:
    auth = clients.kafka_auth(settings("SASL_SSL", pems))
    assert {k: v for k, v in auth.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "coupon",
        "sasl_plain_password": "s3cret",
    }
    plain = clients.kafka_auth(settings("SASL_PLAINTEXT", pems))
    assert plain["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in plain


def test_without_a_ca_file_the_system_trust_store_is_used() -> None:
    context = clients.kafka_auth(Settings(kafka_security_protocol="SSL"))["ssl_context"]
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats() == ssl.create_default_context().cert_store_stats()


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_clients_get_the_same_arguments(protocol, pems) -> None:
    s = settings(protocol, pems)
    ours = clients.kafka_auth(s)
    theirs = dict(credentials_to_aiokafka_auth(broker_credentials(s)))
    if "ssl_context" in ours:
        assert theirs.pop("ssl_context").check_hostname
        ours.pop("ssl_context")
    assert {k: v for k, v in theirs.items() if v is not None} == ours


def test_no_kafka_client_is_constructed_anywhere_else() -> None:
    package = Path(clients.__file__).parents[1]
    constructors = ("AIOKafkaConsumer(", "AIOKafkaProducer(", "AIOKafkaAdminClient(")
    elsewhere = [
        f"{path.relative_to(package)}: {name}"
        for path in package.rglob("*.py")
        if path.name != "clients.py"
        for name in constructors
        if name in path.read_text()
    ]
    assert elsewhere == []


@pytest.fixture
async def tls_server(pems, request) -> AsyncIterator[str]:
    """host:port of a TLS listener with the test server certificate (it speaks no Kafka)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pems["server"].cert, pems["server"].key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    host = getattr(request, "param", "127.0.0.1")
    server = await asyncio.start_server(serve, host, 0, ssl=context)
    yield f"{host}:{server.sockets[0].getsockname()[1]}"
    server.close()


async def test_a_broker_whose_certificate_does_not_verify_is_refused(tls_server, tmp_path):
    other = certs.make(tmp_path / "other", ca_name="another CA")
    s = Settings(
        broker=tls_server,
        kafka_security_protocol="SSL",
        kafka_ca_file=other["ca"].cert,
    )
    with pytest.raises(AccessRefused) as refused:
        await clients.check_kafka_access(s, timeout=5)
    assert str(refused.value) == (
        f"Kafka {tls_server} (SSL) refused ANONYMOUS while connecting to {tls_server}: the "
        "server's certificate did not verify: unable to get local issuer certificate"
    )


@pytest.mark.parametrize("tls_server", ["127.0.0.2"], indirect=True)
async def test_a_broker_under_another_name_is_refused(tls_server, pems):
    # The certificate names 127.0.0.1 and localhost only.
    s = Settings(broker=tls_server, kafka_security_protocol="SSL", kafka_ca_file=pems["ca"].cert)
    with pytest.raises(AccessRefused, match="IP address mismatch"):
        await clients.check_kafka_access(s, timeout=5)


async def test_a_broker_that_does_not_answer_is_left_to_the_retries(caplog) -> None:
    s = Settings(broker="127.0.0.1:1")  # nothing listens there
    await clients.check_kafka_access(s, timeout=5)
    assert "did not answer" in caplog.text


def test_an_acl_refusal_names_what_the_worker_needs() -> None:
    from aiokafka import errors

    s = Settings(app_id="shop", orders_topic="orders")
    refused = clients.kafka_refused(
        s, errors.TopicAuthorizationFailedError({"orders"}), "running the intake"
    )
    assert str(refused) == (
        "Kafka 127.0.0.1:9092 (PLAINTEXT) refused ANONYMOUS while running the intake: not "
        "authorized (TopicAuthorizationFailedError) on topic orders; the worker needs READ, "
        "DESCRIBE on topic orders (README, ACLs)"
    )
    group = clients.kafka_refused(
        s, errors.GroupAuthorizationFailedError("shop-intake"), "running the intake"
    )
    assert "the worker needs READ, DESCRIBE on group shop-intake (README" in str(group)
    topic = clients.kafka_refused(
        s, errors.TopicAuthorizationFailedError({"shop-payments-by-buyer"}), "checkpointing"
    )
    assert "READ, WRITE, CREATE, DESCRIBE, DESCRIBE_CONFIGS on topics prefixed shop-" in str(topic)
    fence = clients.kafka_refused(
        s, errors.TransactionalIdAuthorizationFailed("shop-changelog-3"), "claiming"
    )
    assert "WRITE, DESCRIBE on transactional ids prefixed shop-changelog-" in str(fence)
    assert clients.kafka_refused(s, errors.KafkaConnectionError("down"), "x") is None


async def test_a_broker_that_refuses_our_client_certificate_is_a_refusal(pems, tmp_path):
    """TLS 1.3: the refusal comes after our side of the handshake, as a closed connection."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pems["ca"].cert)
    context.load_cert_chain(pems["server"].cert, pems["server"].key)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only clients the test CA signed
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        # A blocking server, like the broker: it sends the alert before it closes.
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.settimeout(3)
                        tls.recv(1)  # a client it accepted: wait for a request
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    broker = f"127.0.0.1:{listener.getsockname()[1]}"
    rogue = certs.make(tmp_path / "rogue", ca_name="rogue CA")["client"]

    def mtls(cert: certs.Pem | None) -> Settings:
        return Settings(
            broker=broker,
            kafka_security_protocol="SSL",
            kafka_ca_file=pems["ca"].cert,
            kafka_cert_file=cert.cert if cert else None,
            kafka_key_file=cert.key if cert else None,
        )

    try:
        for cert in (None, rogue):
            with pytest.raises(AccessRefused, match="the server refused the TLS handshake"):
                await clients.check_kafka_access(mtls(cert), timeout=5)
        await clients.check_kafka_access(mtls(pems["client"]), timeout=3)  # not refused
    finally:
        done.set()
        thread.join()
        listener.close()
