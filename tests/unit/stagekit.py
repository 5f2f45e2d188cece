"""A state stage and its checkpoint on in-memory stores, with a changelog a test can cut short.

`World` is one partition's by-buyer log, the changelogs, the result table and the committed
offset; `World.worker()` is a worker that takes the partition over, restoring its tables
from the changelogs (as another worker would) or keeping a local copy (as a restart would).
The stand-ins record what would go to Kafka and MySQL; the integration tests run the real
ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coupon_stream.connectors.store import MemoryStore
from coupon_stream.core.records import Row, encode_rows
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.checkpoint import Checkpointer
from coupon_stream.pipeline.fencing import Claims
from coupon_stream.pipeline.state_stage import StateStage, TableCache
from tests.unit.fakes import FakeOut, FakeSink, LogReader


@dataclass
class Owner:
    """A worker's state stage, its checkpoint and its stores (not a process: that is
    `tests.integration.harness.Worker`)."""

    stage: StateStage
    checkpoint: Checkpointer
    stores: dict[str, MemoryStore]


@dataclass
class World:
    settings: Settings = field(default_factory=lambda: Settings(app_id="unit", partitions=1))
    log: list[bytes] = field(default_factory=list)
    out: FakeOut = field(default_factory=FakeOut)
    sink: FakeSink = field(default_factory=FakeSink)
    committed: int = 0
    received_ms: int = 1_794_096_000_000  # 2026-11-08
    reader: LogReader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = LogReader(self.received_ms)  # reads `log`, asks `committed`
        self.reader.changelogs = self.out.logs

    def append(self, rows: list[Row]) -> None:
        self.log.append(encode_rows(rows))
        self.reader.log[(0, len(self.log) - 1)] = self.log[-1]

    def changelog(self, table: str) -> str:
        return f"{table}-changelog"

    def worker(self, local: dict[str, MemoryStore] | None = None) -> Owner:
        """A worker that now owns the partition: its tables restored from the changelogs,
        on top of `local` (a restarted worker's own copy) if given."""
        stores = {}
        for name in STATE_TABLES:
            store = local[name] if local else MemoryStore()
            persisted = store.persisted_offset(0)
            log = self.out.logs[(self.changelog(name), 0)]
            start = 0 if persisted is None else persisted + 1
            for key, value in log[start:]:
                store.write(0, {key: value})
            if log:
                store.offsets[0] = len(log) - 1
            stores[name] = store
        entries = TableCache("entries", stores["entries"], self.changelog("entries"))
        days = TableCache("days", stores["days"], self.changelog("days"))
        changelogs = self.out.writer()

        async def confirm(partition, offset):
            return True

        stage = StateStage(
            self.settings,
            entries,
            days,
            self.reader,
            Claims(changelogs, self.sink),
            confirm=confirm,
        )

        async def commit(offsets):
            self.committed = self.reader.offsets[0] = max(self.committed, offsets[0])
            return True

        async def acknowledge(tokens, committed):
            pass

        checkpoint = Checkpointer(
            self.settings,
            stage,
            self.out,
            changelogs,
            self.sink,
            commit=commit,
            acknowledge=acknowledge,
        )
        return Owner(stage, checkpoint, stores)

    async def run(self, worker: Owner, every: int, upto: int | None = None) -> None:
        """Apply the log from the committed offset, a checkpoint every `every` messages."""
        end = len(self.log) if upto is None else upto
        for n, offset in enumerate(range(self.committed, end), 1):
            await worker.stage.add(
                self.log[offset], 0, offset, offset, self.committed, self.received_ms
            )
            if n % every == 0:
                await worker.checkpoint.run()
        await worker.checkpoint.run()


def r(order="o1", status="2", day=20261111, yuan=10, gc="2026-11-11 00:00:00",
      gm="2026-11-11 00:00:05", buyer=7):  # fmt: skip
    """A row: (buyer_id, biz_order_id, pay_status, effect_time, yuan, created, modified)."""
    return [buyer, order, status, day, yuan, gc, gm]
