"""The worker's Kafka helpers, where no broker is needed to see what they do."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError

from coupon_stream.connectors.kafka import PartitionReader
from coupon_stream.foundation.settings import Settings


async def test_a_reader_whose_start_failed_starts_again_on_the_next_call():
    """A broker restart made the first start fail; the half-made consumer was kept and every
    later read raised AttributeError, which stopped the worker."""
    reader = PartitionReader(Settings(broker="kafka://127.0.0.1:1"))  # nothing listens there
    for _ in range(2):
        with pytest.raises(KafkaConnectionError):
            await reader.end_offsets("by-buyer", [0])
    await reader.stop()
