"""Each fence on the real store: a write holding an older claim is refused, nothing of it
is read, and the readers the service uses still reach each changelog's end.

The whole service under a frozen worker and a network cut: test_fencing.py.
"""

from __future__ import annotations

import pytest
from aiokafka.admin import NewTopic
from aiokafka.errors import ProducerFenced

from coupon_stream.connectors import clients
from coupon_stream.connectors.kafka import ChangelogWriter, PartitionReader
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.core.state import ResultRow
from coupon_stream.foundation.errors import Fenced

pytestmark = pytest.mark.integration


async def read_all(reader: PartitionReader, topic: str) -> tuple[list[tuple[bytes, bytes]], int]:
    """Every committed record of partition 0, and the position the read ended at."""
    (end,) = (await reader.end_offsets(topic, [0])).values()
    records: list[tuple[bytes, bytes]] = []
    reached = 0
    async for _, batch, position in reader.batches(topic, {0: (0, end)}):
        records += [(r.key, r.value) for r in batch]
        reached = position
    return records, reached


async def test_a_changelog_append_of_an_older_producer_is_fenced_and_never_read(pipeline):
    s = pipeline.settings
    entries, days = s.changelog_topics["entries"], s.changelog_topics["days"]
    admin = clients.admin(pipeline.admin)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in (entries, days)])
    finally:
        await admin.close()
    old, new, reader = ChangelogWriter(s), ChangelogWriter(s), PartitionReader(s)
    try:
        await old.claim(0)
        last = await old.append(0, {entries: {b"k": b"old-1"}, days: {b"d": b"old-1"}})
        assert last == {entries: 0, days: 0}
        await new.claim(0)  # the broker fences the old owner's producer

        with pytest.raises(Fenced) as fenced:  # the old owner wakes up and writes on
            await old.append(0, {entries: {b"k": b"old-2"}})
        assert fenced.value.partition == 0
        assert not old.holds(0)  # its producer is gone: only a new claim writes again
        await new.append(0, {entries: {b"k": b"new-1", b"j": None}})

        # Frozen in the middle of a transaction, its records sent: the claim aborts it.
        await new._producers[0].begin_transaction()
        await (await new._producers[0].send(entries, b"frozen", key=b"k", partition=0))
        newest = ChangelogWriter(s)
        await newest.claim(0)
        with pytest.raises(ProducerFenced):
            await new._producers[0].commit_transaction()
        await newest.append(0, {entries: {b"j": b"newest-1"}})
        await newest.release()

        records, position = await read_all(reader, entries)
        assert records == [(b"k", b"old-1"), (b"k", b"new-1"), (b"j", None), (b"j", b"newest-1")]
        (end,) = (await reader.end_offsets(entries, [0])).values()
        assert position == end  # past the abort and commit markers: a restore ends
        assert (await read_all(reader, days))[0] == [(b"d", b"old-1")]
    finally:
        await old.release()
        await new.release()
        await reader.stop()


async def test_a_result_write_with_an_older_epoch_is_refused_on_mariadb(pipeline):
    p = pipeline
    sink = ResultSink(p.db_url, p.table, app_id=p.name)
    await sink.start()
    row = ResultRow("2026-11-11 00:00:00", "2026-11-11 00:00:05", 1, 10, 20261111)
    try:
        old = await sink.claim(2)
        new = await sink.claim(2)
        assert new == old + 1
        with pytest.raises(Fenced) as fenced:
            await sink.write({(1, 20261111): row}, epochs={2: old, 3: 1})
        assert fenced.value.partition in (2, 3)
        assert await p.table_rows() == set()
        assert (await sink.write({(1, 20261111): row}, epochs={2: new})).written
        assert await p.table_rows() == {tuple(row)}
        with pytest.raises(Fenced) as fenced:  # a delete is refused alike
            await sink.write({(1, 20261111): None}, epochs={2: old})
        assert fenced.value.epoch == new
        assert await p.table_rows() == {tuple(row)}
    finally:
        await sink.stop()
