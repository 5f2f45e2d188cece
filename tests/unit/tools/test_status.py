"""connectors/deployment.py: the start-up checks that refuse a deployment the worker gets wrong."""

from __future__ import annotations

import pytest

from coupon_stream.connectors.deployment import (
    DeploymentError,
    check_deployment,
    legacy_state_dirs,
)
from coupon_stream.foundation.settings import Settings


def test_legacy_state_dirs(tmp_path):
    assert legacy_state_dirs(tmp_path) == []
    tables = tmp_path / "v1" / "tables"
    tables.mkdir(parents=True)
    (tables / "entries-0.db").mkdir()
    (tables / "days-0.db").mkdir()
    assert legacy_state_dirs(tmp_path) == []
    (tables / "buyers-0.db").mkdir()
    (tables / "buyers-3.db").mkdir()
    assert legacy_state_dirs(tmp_path) == [tables / "buyers-0.db", tables / "buyers-3.db"]


async def test_check_deployment_refuses_local_legacy_state_without_kafka(tmp_path):
    (tmp_path / "v1" / "tables" / "buyers-0.db").mkdir(parents=True)
    # An unreachable broker: the local check must answer before Kafka is asked.
    settings = Settings(data_dir=tmp_path, broker="kafka://127.0.0.1:1")
    with pytest.raises(DeploymentError, match="format 1") as info:
        await check_deployment(settings)
    assert "buyers-0.db" in str(info.value) and "COUPON_APP_ID" in str(info.value)
