"""Start-up checks on real Kafka: a worker refuses a deployment it would silently get wrong."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from coupon_stream.connectors import deployment
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools import status
from tests.integration.harness import BOOTSTRAP, WORKER, free_port, unavailable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kafka() -> None:
    """Only Kafka is needed here; like `services`, missing Kafka fails under CI=true."""

    async def reachable() -> str | None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(producer.start(), 10)
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            return f"Kafka at {BOOTSTRAP} from `make up` is not reachable: {exc!r}"
        finally:
            await producer.stop()
        return None

    problem = asyncio.run(reachable())
    if problem:
        unavailable(problem)


@pytest.fixture
async def admin(kafka) -> AsyncIterator[tuple[AIOKafkaAdminClient, list[str]]]:
    """An admin client and a list of topics to delete after the test."""
    client = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await client.start()
    made: list[str] = []
    try:
        yield client, made
    finally:
        try:
            if made:
                await client.delete_topics(made)
        finally:
            await client.close()


def app_id() -> str:
    return "startup-" + uuid.uuid4().hex[:10]


def settings_for(name: str, tmp: Path, partitions: int = 6) -> Settings:
    return Settings(
        app_id=name,
        partitions=partitions,
        broker=f"kafka://{BOOTSTRAP}",
        data_dir=tmp,
        db_url=f"sqlite+aiosqlite:///{tmp}/x.db",
    )


def run_worker(name: str, tmp: Path, partitions: int = 6) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        COUPON_APP_ID=name,
        COUPON_PARTITIONS=str(partitions),
        COUPON_BROKER=f"kafka://{BOOTSTRAP}",
        COUPON_DB_URL=f"sqlite+aiosqlite:///{tmp}/x.db",
        COUPON_DATA_DIR=str(tmp),
        COUPON_WEB_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    try:
        return subprocess.run(
            WORKER, env=env, capture_output=True, text=True, timeout=60, start_new_session=True
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stderr or b"")[-3000:]
        raise AssertionError(f"the worker did not refuse to start within 60 s:\n{out!r}") from exc


async def create(admin: tuple[AIOKafkaAdminClient, list[str]], topic: str, partitions: int) -> None:
    """Create a topic and wait until the broker's metadata lists all its partitions."""
    client, made = admin
    await client.create_topics([NewTopic(topic, partitions, 1)])
    made.append(topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
    await consumer.start()
    try:
        for _ in range(100):
            if len(await status.partitions_of(consumer, [topic])) == partitions:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{topic} not in the metadata after 10 s")
    finally:
        await consumer.stop()


async def test_worker_refuses_a_by_buyer_topic_with_another_partition_count(admin, tmp_path):
    name = app_id()
    topic = settings_for(name, tmp_path).by_buyer_topic
    await create(admin, topic, 3)

    result = await asyncio.to_thread(run_worker, name, tmp_path, 6)

    assert result.returncode == 2, result.stderr[-3000:]
    assert f"topic {topic} has 3 partitions" in result.stderr
    assert "COUPON_PARTITIONS is 6" in result.stderr
    assert "COUPON_PARTITIONS=3" in result.stderr
    assert "internal topics could not be" not in result.stderr  # refused, not retried


async def test_worker_refuses_a_legacy_changelog_with_records(admin, tmp_path):
    name = app_id()
    legacy = settings_for(name, tmp_path).legacy_changelog_topic
    await create(admin, legacy, 6)
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(legacy, key=b"buyer-1", value=b"{}", partition=0)
    finally:
        await producer.stop()

    result = await asyncio.to_thread(run_worker, name, tmp_path, 6)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "format 1" in result.stderr
    assert legacy in result.stderr
    assert "COUPON_APP_ID" in result.stderr


async def test_check_passes_on_matching_and_fresh_deployments(admin, tmp_path):
    fresh = settings_for(app_id(), tmp_path)
    await deployment.check_deployment(fresh)  # nothing exists yet

    name = app_id()
    settings = settings_for(name, tmp_path)
    await create(admin, settings.by_buyer_topic, 6)
    for topic in settings.changelog_topics.values():
        await create(admin, topic, 6)
    await create(admin, settings.legacy_changelog_topic, 6)  # exists, but empty
    await deployment.check_deployment(settings)


async def test_check_names_a_changelog_with_another_partition_count(admin, tmp_path):
    settings = settings_for(app_id(), tmp_path)
    await create(admin, settings.by_buyer_topic, 6)
    changelog = next(iter(settings.changelog_topics.values()))
    await create(admin, changelog, 4)

    with pytest.raises(deployment.DeploymentError) as info:
        await deployment.check_deployment(settings)

    message = str(info.value)
    assert f"topic {changelog} has 4 partitions" in message
    assert settings.by_buyer_topic not in message
    assert "COUPON_PARTITIONS=6" in message  # the by-buyer topic's count decides the advice
