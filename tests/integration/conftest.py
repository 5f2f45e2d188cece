"""Real Kafka and MariaDB from `make up`. Missing services fail under CI=true, else skip."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.integration.harness import BOOTSTRAP, MYSQL_URL, Pipeline, unavailable
from tests.integration.toxiproxy import Toxiproxy


async def _check_services() -> list[str]:
    problems = []
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(producer.start(), 10)
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        problems.append(f"Kafka at {BOOTSTRAP}: {exc!r}")
    finally:
        await producer.stop()
    engine = create_async_engine(MYSQL_URL, connect_args={"connect_timeout": 5})
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        problems.append(f"MariaDB: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        await engine.dispose()
    return problems


@pytest.fixture(scope="session")
def services() -> None:
    problems = asyncio.run(_check_services())
    if problems:
        message = "services from `make up` are not reachable: " + "; ".join(problems)
        unavailable(message)


@pytest.fixture
async def pipeline(services, tmp_path):
    p = Pipeline(tmp_path)
    yield p
    p.stop_all()
    await p.drop_table()


@pytest.fixture
def kafka_proxy(services):
    """Toxiproxy's proxy "kafka" (tests/integration/toxiproxy.py), enabled and without
    toxics, and again so after the test: clients bootstrapping at PROXIED_BOOTSTRAP reach
    Kafka only through it. From `make toxiproxy` (make test and make integration start it)."""
    client = Toxiproxy()
    problems = client.problems()
    if problems:
        message = "toxiproxy from `make toxiproxy` is not usable: " + "; ".join(problems)
        unavailable(message)
    proxy = client.kafka()
    yield proxy
    proxy.reset()


@pytest.fixture
def mysql_proxy(services):
    """Toxiproxy's proxy "mysql" (MYSQL_PROXY -> MariaDB's 127.0.0.1:3306), enabled and
    without toxics, and again so after the test: a worker given a COUPON_DB_URL at
    MYSQL_PROXY reaches the database only through it."""
    client = Toxiproxy()
    problems = client.problems()
    if problems:
        unavailable("toxiproxy from `make toxiproxy` is not usable: " + "; ".join(problems))
    proxy = client.mysql()
    yield proxy
    proxy.reset()
