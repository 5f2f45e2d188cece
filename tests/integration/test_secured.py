"""A secured Kafka (SASL_SSL with SCRAM, mutual TLS, ACLs) and a TLS-only MariaDB.

The services come from `scripts/secure.sh` (`make secure-up`): Kafka 3.9 KRaft with
`StandardAuthorizer` and `allow.everyone.if.no.acl.found=false`, SCRAM-SHA-512 users made at
format time, and a MariaDB with `require_secure_transport=ON`. The worker's user gets only the
ACLs of the README's "ACLs" block, run as written there.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from coupon_stream.connectors import clients
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools.dataset import generate
from tests import reference
from tests.integration.harness import REPO, Pipeline, Worker, unavailable

pytestmark = pytest.mark.integration

SECURE = REPO / "scripts" / "secure.sh"


def _secure_env() -> dict[str, str]:
    out = subprocess.run(
        ["bash", str(SECURE), "env"], check=True, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"^export (\w+)=(.*)$", out, re.M))


@pytest.fixture(scope="session")
def secured() -> dict[str, str]:
    """The secured services' addresses, certificates and users; fail under CI if down."""
    env = _secure_env()
    admin = Settings(**_admin(env))
    problems: list[str] = []

    async def check() -> None:
        client = clients.admin(admin, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(client.start(), 10)
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            problems.append(f"secured Kafka at {admin.bootstrap_servers}: {exc!r}")
        finally:
            await client.close()
        try:
            await ResultSink.of(admin).check_access(timeout=5)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"TLS-only MariaDB: {exc}")

    asyncio.run(check())
    if problems:
        message = "secured services of `make secure-up` are not reachable: " + "; ".join(problems)
        unavailable(message)
    return env


def _admin(env: dict[str, str]) -> dict[str, Any]:
    certs = Path(env["COUPON_SECURE_CERTS"])
    return {
        "broker": env["COUPON_SECURE_BOOTSTRAP"],
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_username": env["COUPON_SECURE_ADMIN_USER"],
        "kafka_password": env["COUPON_SECURE_ADMIN_PASSWORD"],
        "kafka_ca_file": str(certs / "ca.pem"),
        "db_url": env["COUPON_SECURE_DB_URL"],
        "db_ca_file": str(certs / "ca.pem"),
    }


def worker_env(env: dict[str, str], **overrides: str) -> dict[str, str]:
    """The worker's own user: SCRAM-SHA-512 over TLS, the database over verified TLS."""
    certs = Path(env["COUPON_SECURE_CERTS"])
    values = {
        "COUPON_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "COUPON_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "COUPON_KAFKA_USERNAME": env["COUPON_SECURE_USER"],
        "COUPON_KAFKA_PASSWORD": env["COUPON_SECURE_PASSWORD"],
        "COUPON_KAFKA_CA_FILE": str(certs / "ca.pem"),
        "COUPON_DB_CA_FILE": str(certs / "ca.pem"),
        "COUPON_SESSION_TIMEOUT": "6",
        "COUPON_BULK_RESTORE_SECONDS": "1",
    }
    values.update(overrides)
    return values


def mtls_env(env: dict[str, str], cert: str) -> dict[str, str]:
    """The worker on the mutual-TLS listener, its identity the certificate `cert`.pem."""
    certs = env["COUPON_SECURE_CERTS"]
    values = worker_env(
        env,
        COUPON_BROKER=f"kafka://{env['COUPON_SECURE_MTLS_BOOTSTRAP']}",
        COUPON_KAFKA_SECURITY_PROTOCOL="SSL",
        COUPON_KAFKA_CERT_FILE=f"{certs}/{cert}.pem",
        COUPON_KAFKA_KEY_FILE=f"{certs}/{cert}.key",
    )
    for name in ("SASL_MECHANISM", "USERNAME", "PASSWORD"):
        del values[f"COUPON_KAFKA_{name}"]
    return values


@pytest.fixture
async def secure_pipeline(secured, tmp_path):
    env = secured
    p = Pipeline(
        tmp_path,
        partitions=4,
        bootstrap=env["COUPON_SECURE_BOOTSTRAP"],
        db_url=env["COUPON_SECURE_DB_URL"],
        admin_env={f"COUPON_{k.upper()}": v for k, v in _admin(env).items()},
        extra_env=worker_env(env),
        topic_prefix="in-",
    )
    yield p
    p.stop_all()
    await p.drop_table()
    # The ACLs name this pipeline's topics and prefix only; remove them with it.
    for line in readme_acls(p, env["COUPON_SECURE_USER"]):
        acl(["--remove", "--force", *line[line.index("--allow-principal") :]])


def acl(args: list[str]) -> None:
    subprocess.run(["bash", str(SECURE), "kafka-acls", *args], check=True, capture_output=True)


def readme_acls(p: Pipeline, user: str) -> list[list[str]]:
    """The README's `kafka-acls.sh` lines for this pipeline, without the connection flags."""
    section = (REPO / "README.md").read_text().split("### ACLs", 1)[1]
    block = section.split("```console", 1)[1].split("```", 1)[0]
    values = {
        "$APP": p.name,
        "$USER": user,
        "$ORDERS": p.orders_topic,
        "$REFUNDS": p.refunds_topic,
        "$DLQ": p.dlq_topic,
    }
    lines = []
    for line in block.strip().splitlines():
        words = shlex.split(re.sub(r"\$[A-Z]+", lambda m: values.get(m[0], m[0]), line))
        assert words[:5] == [
            "kafka-acls.sh",
            "--bootstrap-server",
            "$BROKER",
            "--command-config",
            "admin.properties",
        ], line
        lines.append(words[5:])
    return lines


def grant_readme_acls(p: Pipeline, user: str, *, except_topic: str | None = None) -> None:
    for args in readme_acls(p, user):
        if except_topic is not None and except_topic in args:
            i = args.index(except_topic)
            args = args[: i - 1] + args[i + 1 :]  # drop "--topic <it>"
        acl(args)


def wait_exit(worker: Worker, timeout: float = 60.0) -> tuple[int, float]:
    began = time.monotonic()
    try:
        code = worker.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{worker.tail(60)}") from None
    return code, time.monotonic() - began


def critical_lines(worker: Worker) -> list[str]:
    """The service's CRITICAL lines (Faust adds its own "We experienced a crash!" on exit)."""
    return [
        line for line in worker.log.read_text().splitlines() if "[CRITICAL] coupon_stream." in line
    ]


def refused_at_start(worker: Worker) -> tuple[str, float]:
    """The one CRITICAL line of a worker that refused to start (exit 3), and how soon."""
    code, took = wait_exit(worker)
    assert code == 3, worker.tail()
    [line] = critical_lines(worker)
    return line, took


def assert_no_password(worker: Worker, *secrets: str) -> None:
    text = worker.log.read_text(errors="replace")
    for secret in secrets:
        assert secret not in text


async def test_pipeline_with_the_readme_acls_equals_the_reference_through_kill_9(
    secure_pipeline, secured
):
    p = secure_pipeline
    await p.create_topics(orders=3, refunds=2)
    grant_readme_acls(p, secured["COUPON_SECURE_USER"])
    data = generate(3000, seed=17)
    orders, refunds = list(data.orders), list(data.refunds)
    half = len(orders) // 2
    await p.produce([(p.orders_topic, None, orjson.dumps(o)) for o in orders[:half]])
    first, second = p.start_worker(), p.start_worker()
    await p.wait_for_progress()
    p.kill(first)  # SIGKILL mid-stream: the other worker takes its partitions over
    await p.produce(
        [(p.orders_topic, None, orjson.dumps(o)) for o in orders[half:]]
        + [(p.refunds_topic, None, orjson.dumps(r)) for r in refunds]
        + [(p.orders_topic, None, b"not json")]  # one dead letter, written with the DLQ ACL
    )
    p.start_worker(0)  # a replacement on the killed worker's data dir
    await p.wait_quiescent()
    assert await p.table_rows() == reference.evaluate(orders, refunds)
    assert [value for value, _ in await p.dead_letters()] == [b"not json"]
    for w in p.workers:
        assert critical_lines(w) == []
        assert_no_password(w, secured["COUPON_SECURE_PASSWORD"])
    p.kill(second, signal.SIGTERM)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
async def test_a_wrong_password_stops_the_worker_saying_why(secure_pipeline, secured, mechanism):
    p = secure_pipeline
    p.extra_env["COUPON_KAFKA_SASL_MECHANISM"] = mechanism
    p.extra_env["COUPON_KAFKA_PASSWORD"] = "not-the-password"
    worker = p.start_worker()
    line, took = refused_at_start(worker)
    assert (
        f"access refused, not starting: Kafka {p.bootstrap} (SASL_SSL) refused coupon while "
        f"connecting to {p.bootstrap}: authentication failed: "
    ) in line
    assert_no_password(worker, "not-the-password", secured["COUPON_SECURE_PASSWORD"])
    print(f"wrong password: exit 3 after {took:.1f} s: {line}")


async def test_a_broker_ca_that_did_not_sign_its_certificate_is_refused(secure_pipeline, secured):
    p = secure_pipeline
    p.extra_env["COUPON_KAFKA_CA_FILE"] = f"{secured['COUPON_SECURE_CERTS']}/other-ca.pem"
    worker = p.start_worker()
    line, _ = refused_at_start(worker)
    assert "refused coupon while connecting" in line
    assert "the server's certificate did not verify" in line
    assert_no_password(worker, secured["COUPON_SECURE_PASSWORD"])


async def test_a_database_ca_that_did_not_sign_its_certificate_is_refused(secure_pipeline, secured):
    p = secure_pipeline
    await p.create_topics()
    grant_readme_acls(p, secured["COUPON_SECURE_USER"])
    p.extra_env["COUPON_DB_CA_FILE"] = f"{secured['COUPON_SECURE_CERTS']}/other-ca.pem"
    worker = p.start_worker()
    line, _ = refused_at_start(worker)
    assert (
        "access refused, not starting: database mysql+asyncmy://coupons:***@127.0.0.1:3307/"
        "coupons refused user coupons: the server's certificate did not verify"
    ) in line
    assert "coupons:coupons@" not in worker.log.read_text()
    with pytest.raises(Exception, match="doesn't exist"):
        await p.table_rows()  # nothing was written: not even the table


async def test_a_denied_input_topic_stops_the_worker_naming_it(secure_pipeline, secured):
    p = secure_pipeline
    await p.create_topics()
    grant_readme_acls(p, secured["COUPON_SECURE_USER"], except_topic=p.refunds_topic)
    await p.produce([(p.orders_topic, None, orjson.dumps(o)) for o in generate(50).orders])
    worker = p.start_worker()
    code, took = wait_exit(worker, timeout=90)
    assert code != 0, worker.tail()
    lines = critical_lines(worker)
    assert len(lines) == 1, lines
    assert (
        f"refused coupon while running the intake: not authorized "
        f"(TopicAuthorizationFailedError) on topic {p.refunds_topic}; the worker needs READ, "
        f"DESCRIBE on topic {p.refunds_topic} (README, ACLs)"
    ) in lines[0]
    print(f"denied topic: exit {code} after {took:.1f} s: {lines[0]}")


async def test_mutual_tls_on_a_second_listener(secure_pipeline, secured):
    """The client certificate (CN=coupon) is the identity; the README's ACLs apply to it."""
    p = secure_pipeline
    await p.create_topics()
    grant_readme_acls(p, secured["COUPON_SECURE_USER"])
    p.extra_env = mtls_env(secured, "client")
    data = generate(1000, seed=23)
    p.start_worker()
    await p.produce(
        [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
        + [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    )
    await p.wait_quiescent()
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    assert critical_lines(p.workers[0]) == []


async def test_a_client_certificate_the_broker_does_not_trust_is_refused(secure_pipeline, secured):
    p = secure_pipeline
    certs = secured["COUPON_SECURE_CERTS"]
    p.extra_env = mtls_env(secured, "rogue-client")  # CN=coupon, signed by another CA
    worker = p.start_worker()
    line, _ = refused_at_start(worker)
    assert (
        f"refused the client certificate {certs}/rogue-client.pem while connecting to "
        f"{secured['COUPON_SECURE_MTLS_BOOTSTRAP']}: the server refused the TLS handshake "
        "(SSLV3_ALERT_CERTIFICATE_UNKNOWN)"
    ) in line
