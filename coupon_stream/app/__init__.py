"""Faust wiring: intake task -> by-buyer topic -> state agent -> checkpoint -> result sink.

Data flow (one way):

    orders, refunds --intake (librdkafka, group <app_id>-intake)--> <app_id>-payments-by-buyer
        --state agent (Faust, group <app_id>)--> `entries` and `days` tables (RocksDB +
        changelogs) --checkpoint--> ResultSink (MySQL/SQLite)

Intake sends each batch's valid records as one message per owning partition, so every state
event holds records of one partition only: the partition of the tables (and of their
changelogs) that holds those buyers. Faust owns the tables' assignment; their restore and
standby copies are read in bulk by the `Restorer` (`rebalance.py`), and the state stage and
the checkpoint read and write them a batch at a time. The rooms: `rebalance.py` (partitions
moving), `tail_repair.py` (messages the consumer skipped), `observe.py` (gauges, /health).
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from collections.abc import Mapping
from typing import Any

from coupon_stream.app.observe import Observe
from coupon_stream.app.rebalance import Rebalances, Restorer
from coupon_stream.app.tail_repair import TailRepair
from coupon_stream.connectors import clients, engine
from coupon_stream.connectors.engine import TP, Event, Stream
from coupon_stream.connectors.faults import retry
from coupon_stream.connectors.kafka import ChangelogWriter, KafkaOut, PartitionReader
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.connectors.restore import ChangelogReader
from coupon_stream.connectors.store import MemoryStore, PartitionStore
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.core.stored import StateFormatError
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import AccessRefused, NotHeld
from coupon_stream.foundation.settings import Settings
from coupon_stream.foundation.stalls import StallWatch
from coupon_stream.pipeline.checkpoint import Checkpointer, every
from coupon_stream.pipeline.fencing import Claims
from coupon_stream.pipeline.intake import Intake
from coupon_stream.pipeline.state_stage import StateStage, TableCache, Token

log = logging.getLogger(__name__)

TABLE_HELP = {
    "entries": "kept copy of each (buyer_id, biz_order_id, pay_status)",
    "days": "running cumulate_amount, MIN(gmt_create), MAX(gmt_modified) per (buyer_id, day)",
}


class CouponStream:
    """The Faust app with its topics, table and agents, built from one Settings."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: str = "rocksdb://",
        sink: ResultSink | None = None,
        out: KafkaOut | None = None,
        reader: PartitionReader | None = None,
        restore_reader: ChangelogReader | None = None,
        changelogs: ChangelogWriter | None = None,
    ) -> None:
        s = self.settings = settings
        self.app = engine.build_app(s, store=store)
        self.out = out or KafkaOut(s)
        self.sink = sink or ResultSink.of(s)
        self._sink_started = False
        self._acker: Stream | None = None
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.by_buyer = self.app.topic(
            s.by_buyer_topic, partitions=s.partitions, internal=True, **raw
        )
        rocks = store.startswith("rocksdb")
        self.caches: dict[str, TableCache] = {}
        self.tables: dict[str, engine.StateTable] = {}
        for name in STATE_TABLES:
            table = self.tables[name] = engine.state_table(
                self.app,
                name,
                options=engine.rocksdb_options(s) if rocks else None,
                help=TABLE_HELP[name],
                on_restored=self._on_restored,
            )
            changelog = engine.changelog_topic(table)
            partitions: PartitionStore = (
                engine.RocksStore(table.data, changelog) if rocks else MemoryStore()
            )
            self.caches[name] = TableCache(name, partitions, changelog)
        self.reader = reader or PartitionReader(s)
        self.restore_reader = restore_reader or PartitionReader(s)
        self.changelogs = changelogs or ChangelogWriter(s)
        self.stage = StateStage(
            s,
            self.caches["entries"],
            self.caches["days"],
            self.reader,
            Claims(self.changelogs, self.sink),
            confirm=self._confirm,
            rebalance_count=self._rebalance_count,
        )
        self.stalls = StallWatch(s.stall_seconds)
        self.checkpointer = Checkpointer(
            s,
            self.stage,
            self.out,
            self.changelogs,
            self.sink,
            commit=self.commit_partitions,
            acknowledge=self._acknowledge,
            stalls=self.stalls,
        )
        self.intake = Intake(s, self.out)
        self.state_agent = self.app.agent(self.by_buyer, name="state")(self._apply)
        if s.intake:  # else `coupon-stream intake` processes run it (`app.intake_process`)
            self.app.task(self._run_intake)
        self.app.task(self._on_dump_signal)
        engine.on_before_shutdown(self.app, self._stop_out)
        topic = self.by_buyer.get_topic_name()
        self.restorer = Restorer(
            {c.changelog_topic: (name, c.store) for name, c in self.caches.items()},
            self.restore_reader,
        )
        self.rebalances = Rebalances(
            s,
            self.app,
            self.stage,
            self.stalls,
            self.restorer,
            release=lambda tokens: self._acknowledge(tokens, False),
        )
        self.tail_repair = TailRepair(
            self.app, self.stage, self.reader, topic, consuming=lambda: self._acker is not None
        )
        self.observe = Observe(
            self.app, topic, self.tables, self.sink, self.stalls, self.intake, self.restorer
        )
        for room in (self.rebalances, self.tail_repair, self.observe):
            room.register()

    def _rebalance_count(self) -> int | None:
        """Rebalances so far (None during one): work begun before the latest is void."""
        return None if self.app.rebalancing else int(self.app.rebalancing_count)

    async def _on_restored(self, event: Event) -> None:
        """Counts changelog records Faust's own recovery read (what the bulk restore left)."""
        metrics.STATE_RESTORED.inc()

    async def _on_dump_signal(self) -> None:
        """`kill -USR1 <pid>` logs the stack of every task of the worker: what it waits for."""

        def dump() -> None:
            tasks = asyncio.all_tasks()
            log.warning("SIGUSR1: %d tasks", len(tasks))
            for task in tasks:
                out = io.StringIO()
                task.print_stack(limit=30, file=out)
                log.warning("task %s:\n%s", task.get_name(), out.getvalue())

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)

    async def _run_intake(self) -> None:
        try:
            await self.intake.run()
        except Exception as exc:
            await self.stop_worker("the intake", exc)
            raise

    async def stop_worker(self, what: str, exc: BaseException) -> None:
        """Stop the worker for an error no retry can fix, with one CRITICAL line saying why.

        Faust's supervisor would restart a failed agent or task for ever while the worker
        looks healthy; an operator must see it instead. A refused access (credentials,
        certificates, ACLs, grants) is said as such: who refused whom, and what.
        """
        refused = exc if isinstance(exc, AccessRefused) else None
        refused = refused or clients.kafka_refused(self.settings, exc, f"running {what}")
        if refused is not None:
            log.critical("access refused, stopping the worker: %s", refused)
        else:
            log.critical("%s failed for good, stopping the worker: %r", what, exc)
        await engine.crash(self.app, refused or exc)

    async def _stop_out(self) -> None:
        """After the consumers stopped: deliver what is still in flight, then close."""
        await self.restorer.cancel()
        await self.changelogs.release()
        await self.out.stop()
        await self.reader.stop()
        await self.restore_reader.stop()

    # -- state stage --------------------------------------------------------------------------

    async def _apply(self, stream: Stream) -> None:
        try:
            await self.start_sink()
        except Exception as exc:
            await self.stop_worker("the result sink", exc)
            raise
        self._acker = manual = engine.manual_acks(stream)
        periodic = asyncio.ensure_future(every(self.settings.flush_interval, self.checkpoint))
        try:
            async for event in manual.events():
                msg = event.message
                try:
                    await self.stage.add(
                        event.value,
                        msg.partition,
                        msg.offset,
                        event,
                        engine.consumer_committed(self.app, msg.tp),  # Faust's, after its seek
                        received_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                    )
                except StateFormatError as exc:
                    log.critical("%s", exc)
                    await engine.crash(self.app, exc)
                    return
                except NotHeld as exc:
                    # A session this worker may not begin: the message is left to the
                    # partition's owner in the group's current generation.
                    log.warning("%s: message %s@%d left to its owner", exc, msg.tp, msg.offset)
                    await self._acknowledge([event], False)
                    continue
                except Exception as exc:
                    await self.stop_worker("the state agent", exc)
                    raise
                if self.stage.pending.rows() >= self.settings.max_pending_rows:
                    await self.checkpoint()  # backpressure: consume no more until it is done
        finally:
            periodic.cancel()

    async def checkpoint(self) -> None:
        """One checkpoint (see `checkpoint`); one that fails for good stops the worker.

        It only raises for an error that no retry can fix, and carrying on would leave the
        worker up but committing nothing.
        """
        try:
            await self.checkpointer.run()
        except Exception as exc:
            await self.stop_worker("a checkpoint", exc)
            raise

    async def _acknowledge(self, tokens: list[Token], committed: bool) -> None:
        """Acknowledge the events of a checkpoint, or release them if it was not committed.

        We commit offsets ourselves (Faust's ack-based commit can skip a message it never
        delivered, or stall behind it for good); the events are still acknowledged so that
        Faust's rebalance, which waits for acks, goes on. Acknowledged without a commit,
        Faust would commit them as it hands the partitions over: those are released.
        """
        for token in tokens:
            if not engine.is_event(token):
                continue  # a ReadBack: applied from Kafka, no event to acknowledge
            if committed and self._acker is not None:
                await self._acker.ack(token)
            else:
                engine.release(self.app, token)

    async def commit_partitions(self, offsets: Mapping[int, int]) -> bool:
        """Commit by-buyer offsets, retrying what can succeed; False once not ours."""
        topic = self.by_buyer.get_topic_name()
        try:
            return await retry(
                lambda: self.commit({TP(topic, p): o for p, o in offsets.items()}),
                wanted=lambda: not self.app.rebalancing,
                failed=lambda exc, _: self.stalls.failed(None, f"offset commit failed: {exc!r}"),
            )
        except Exception as exc:  # noqa: BLE001 - permanent, or given up in a rebalance
            log.warning("offset commit failed, the messages will be replayed: %r", exc)
            return False

    async def _confirm(self, partition: int, offset: int) -> bool:
        """Commit the group's own offset of a partition again: whether Kafka took it, i.e.
        whether this worker owns the partition in the group's current generation."""
        return await self.commit_partitions({partition: offset})

    async def commit(self, offsets: dict[TP, int]) -> bool:
        """Whether any partition's offset was committed.

        A partial commit (some partitions revoked meanwhile) counts as committed: the
        revoked partitions' events are acknowledged too, but Faust commits only what it is
        assigned, and their next owner replays them from the offset committed before, which
        the state reads as of (docs/design.md, "The checkpoint").
        """
        return bool(await engine.commit(self.app, offsets))

    async def start_sink(self) -> None:
        if not self._sink_started:
            await self.sink.start()
            self._sink_started = True
            log.info(
                "result table %s ready at %s", self.settings.result_table, self.settings.db_url_safe
            )
