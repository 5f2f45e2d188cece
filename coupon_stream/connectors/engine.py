"""The one boundary to Faust and to aiokafka's internals.

No other module imports `faust` or reaches into a private attribute of Faust or aiokafka
(`make lint` checks the imports). What the service needs of them is offered here in its own
words, each with the contract it relies on, and `tests/unit/connectors/test_engine.py` runs
every one against the real objects: an upgrade that renames one fails there, by name. The
versions this was checked against are pinned in `pyproject.toml`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeGuard, cast

import faust
import rocksdict
from faust.stores.rocksdb import RocksDBOptions
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP, EventT, StreamT
from rocksdict import WriteBatch

from coupon_stream.connectors import clients
from coupon_stream.foundation.logs import logging_config
from coupon_stream.foundation.settings import Settings

__all__ = ["TP", "App", "Event", "Stream"]

Event = EventT[Any]
Stream = StreamT[bytes]

# Bits a key of each SST file's whole-key filter; and the share of a memtable's size
# given to a filter over its keys.
FILTER_BITS_PER_KEY = 10
MEMTABLE_FILTER_RATIO = 0.1
# How long a broker may hold a fetch of Faust's consumer that finds no records (Faust
# hard-codes 1500 ms): an offsets lookup waits behind it (`_ReadCommittedThread`), and an
# idle consumer sends a fetch to each broker this often.
FETCH_MAX_WAIT_MS = 100
# How long Faust's recovery looks again at a changelog's end that is before the local copy's
# persisted offset (a commit's markers on their way: `BulkRecovery._build_highwaters`).
MARKER_WAIT_S = 10.0
MARKER_POLL_S = 0.1


class _ReadCommittedThread(faust_kafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, whose aiokafka consumer reads committed records only.

    The changelogs are written in transactions (`kafka.ChangelogWriter`): a fenced owner's
    aborted records stay in the log, and Faust's recovery must not apply them. Read
    committed, its end offsets are the last stable offsets, which the bulk restore reads to.

    Its fetches wait at most `FETCH_MAX_WAIT_MS` for records. aiokafka keeps a fetch in
    flight on its one connection to each broker for the assigned partitions without
    buffered records (Faust pauses only its own reading, so during recovery the changelogs
    and the paused streams are fetched too), and a broker answers a connection's requests
    in order: each offsets lookup of Faust's recovery (highwaters, then earliest offsets,
    on every rebalance) waits until the idle fetch ahead of it is answered.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Both read by its Fetcher, built at start.
        consumer._isolation_level = "read_committed"
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(faust_kafka.Consumer):
    def _new_consumer_thread(self) -> faust_kafka.AIOKafkaConsumerThread:
        return _ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)


class App(faust.App):
    """Faust's app, with the read-committed consumer (`_ReadCommittedThread`)."""

    def _new_transport(self) -> Any:
        transport = super()._new_transport()
        transport.Consumer = _Consumer  # type: ignore[misc]  # this transport's only
        return transport


def build_app(settings: Settings, *, store: str) -> App:
    """The Faust app of one worker: its consumer group, tables, web port and clients."""
    s = settings
    return App(
        s.app_id,
        broker=s.broker,
        broker_credentials=broker_credentials(s),
        store=store,
        datadir=str(s.data_dir),
        topic_partitions=s.partitions,
        web_port=s.web_port,
        web_bind=s.web_host,
        web_host=s.web_host,
        # The port serves operators: /metrics and /health only. Faust's views would show
        # any buyer's kept orders (/table) and the assignment (/router) to anyone.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        table_standby_replicas=s.standby_replicas,
        topic_replication_factor=s.replication_factor,
        broker_session_timeout=s.session_timeout,
        broker_heartbeat_interval=max(0.5, s.session_timeout / 10),
        logging_config=logging_config(s.log_format, s.log_level),
        Worker=Worker,
        Table=StateTable,
        TableManager=Tables,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
    )


def broker_credentials(s: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's form of `clients.kafka_auth`: its consumer, producer and admin connect alike."""
    auth = clients.kafka_auth(s)
    protocol = auth["security_protocol"]
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(auth["ssl_context"])
    return faust.SASLCredentials(
        username=auth["sasl_plain_username"],
        password=auth["sasl_plain_password"],
        mechanism=auth["sasl_mechanism"],
        ssl_context=auth.get("ssl_context"),
    )


def rocksdb_options(s: Settings) -> dict[str, Any]:
    """RocksDB sizes per table partition.

    Faust's defaults (a 2 GiB block cache and up to 3 x 64 MiB memtables) are per partition,
    so a worker holding 8 partitions could grow past 17 GiB; these settings bound it.
    """
    mib = 1024 * 1024
    return {
        "driver": "rocksdict",
        "write_buffer_size": s.rocksdb_write_buffer_mb * mib,
        "block_cache_size": s.rocksdb_block_cache_mb * mib,
    }


# -- wiring: what the app registers -------------------------------------------------------------


def state_table(
    app: faust.App,
    name: str,
    *,
    options: dict[str, Any] | None,
    help: str,
    on_restored: Callable[[Event], Awaitable[None]],
) -> StateTable:
    """A bytes -> bytes table partitioned like the by-buyer topic, RocksDB-tuned."""
    table = cast(
        StateTable,
        app.Table(
            name,
            partitions=app.conf.topic_partitions,
            options=options,
            help=help,
            key_type=bytes,
            value_type=bytes,
            on_changelog_event=on_restored,
        ),
    )
    return table


def manual_acks(stream: Stream) -> Stream:
    """The stream with acknowledgement left to the caller (`ack`, or `release`)."""
    acked: Stream = cast(Any, stream).noack()
    return acked


def every(app: faust.App, seconds: float, fn: Callable[[], Awaitable[None]]) -> None:
    app.timer(interval=seconds)(fn)


def on_assigned(app: faust.App, fn: Callable[[set[TP]], Awaitable[None]]) -> None:
    """Run `fn` with the newly assigned partitions after every rebalance."""

    async def assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
        await fn(assigned)

    app.on_partitions_assigned.connect(assigned)  # type: ignore[arg-type]


def on_revoked(app: faust.App, fn: Callable[[set[TP]], Awaitable[None]]) -> None:
    """Run `fn` with the revoked partitions at the start of every rebalance."""

    async def revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        await fn(revoked)

    app.on_partitions_revoked.connect(revoked)  # type: ignore[arg-type]


def on_before_shutdown(app: faust.App, fn: Callable[[], Awaitable[None]]) -> None:
    """Run `fn` once the consumers have stopped, before the worker exits."""

    async def before_shutdown(sender: Any, **kwargs: Any) -> None:
        await fn()

    app.on_before_shutdown.connect(before_shutdown)  # type: ignore[arg-type]


# -- the consumer: offsets, acknowledgements, assignment --------------------------------------


def consumer_committed(app: faust.App, tp: TP) -> int | None:
    """The offset Faust's consumer last committed or sought to for `tp` (its own view)."""
    offset: int | None = _consumer(app)._committed_offset.get(tp)
    return offset


async def commit(app: faust.App, offsets: Mapping[TP, int]) -> set[TP]:
    """Commit explicit offsets; return the partitions whose offsets were committed.

    Faust commits only partitions still assigned: a revoked one is left out (its next
    owner replays from the offset committed before, which the state reads as of). So the
    result is exactly what Kafka holds now; a partition missing from it was not committed.
    """
    consumer = _consumer(app)
    committable = {tp: o for tp, o in offsets.items() if tp in consumer.assignment()}
    if not committable or not await consumer._commit_offsets(committable):
        return set()
    return set(committable)


def is_event(token: object) -> TypeGuard[Event]:
    """Whether a checkpoint token is a consumer event (else a `state_stage.ReadBack`)."""
    return isinstance(token, EventT)


def release(app: faust.App, event: Event) -> None:
    """Forget an event without acknowledging it, so no rebalance commits past it.

    Faust waits for acknowledgements before it hands partitions over, and acknowledged
    events are committed on the way; an event whose checkpoint was not committed must be
    neither: it is dropped from the consumer's unacknowledged set instead.
    """
    _consumer(app)._unacked_messages.discard(event.message)


def _consumer(app: faust.App) -> Any:
    """Faust's consumer, whose private attributes its type does not declare."""
    return app.consumer


def highwater(app: faust.App, tp: TP) -> int | None:
    """The end offset of an assigned partition as of the last fetch, or None if not known."""
    try:
        end: int | None = app.consumer.highwater(tp)
    except Exception:  # noqa: BLE001 - not known yet right after assignment
        return None
    return end


def assignment(app: faust.App) -> set[TP]:
    return set(app.consumer.assignment())


class Membership(NamedTuple):
    """What this worker's consumer knows of its place in the state group, now."""

    member: bool  # the group knows it: it has a member id, no rejoin is pending
    generation: int
    heartbeat_age: float | None  # seconds since the coordinator last answered a heartbeat


def membership(app: faust.App) -> Membership:
    """The consumer's standing in its group, for readiness.

    A worker that froze or lost the brokers past its session timeout still holds its member
    id until a heartbeat is answered: the age of the last answered one tells. aiokafka keeps
    that time to itself, so its heartbeat is wrapped here, once per coordinator.
    """
    consumer = getattr(_consumer(app)._thread, "_consumer", None)
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return Membership(False, -1, None)
    beat = getattr(coordinator, "coupon_heartbeat", None)
    if beat is None:
        beat = coordinator.coupon_heartbeat = _Heartbeats(coordinator)
    member = bool(coordinator.member_id) and not coordinator._rejoin_needed_fut.done()
    return Membership(member, int(coordinator.generation), beat.age())


class _Heartbeats:
    """When an aiokafka group coordinator last had a heartbeat (or a join) answered."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.generation = coordinator.generation
        self.answered = time.monotonic()
        original = coordinator._do_heartbeat

        async def heartbeat() -> bool:
            ok: bool = await original()
            if ok:
                self.answered = time.monotonic()
            return ok

        coordinator._do_heartbeat = heartbeat

    def age(self) -> float:
        if self.coordinator.generation != self.generation:  # joined again: answered then
            self.generation = self.coordinator.generation
            self.answered = time.monotonic()
        return time.monotonic() - self.answered


def recovered(app: faust.App) -> bool:
    """Whether the tables' recovery after the last assignment has completed."""
    tables: Any = app.tables
    return bool(tables.recovery.completed.is_set()) if tables else False


async def crash(app: faust.App, exc: BaseException) -> None:
    await app.crash(exc)


# -- tables and their local RocksDB ------------------------------------------------------------


class LookupTunedOptions(RocksDBOptions):
    """Faust's RocksDB options, with filters for what the state stage asks most: absent keys.

    Nearly every record looks up an entry that does not exist yet. Faust's default filter
    (3 bits a key, one per data block) still reads the index of every file for such a key;
    a whole-key filter per file and one over the memtables answer most of them without
    reading a block (docs/performance.md). Files written with the old filter stay readable.
    """

    @classmethod
    def like(cls, options: RocksDBOptions) -> LookupTunedOptions:
        given = {k: v for k, v in vars(options).items() if k != "extra_options"}
        return cls(**given, **options.extra_options)

    def as_options(self) -> Any:
        options = super().as_options()
        if self.use_rocksdict:
            table = rocksdict.BlockBasedOptions()
            table.set_bloom_filter(FILTER_BITS_PER_KEY, block_based=False)
            table.set_block_cache(rocksdict.Cache(self.block_cache_size))
            table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
            options.set_block_based_table_factory(table)
            options.set_memtable_prefix_bloom_ratio(MEMTABLE_FILTER_RATIO)
            options.set_memtable_whole_key_filtering(True)
        return options


class StateTable(faust.Table):  # type: ignore[type-arg]
    """Faust's table, with RocksDB filters tuned for lookups of absent keys."""

    def _new_store(self) -> Any:
        store: Any = super()._new_store()
        options = getattr(store, "rocksdb_options", None)
        if isinstance(options, RocksDBOptions):
            store.rocksdb_options = LookupTunedOptions.like(options)
        return store


def changelog_topic(table: faust.Table) -> str:  # type: ignore[type-arg]
    name: str = table.changelog_topic.get_topic_name()
    return name


def key_counts(table: faust.Table) -> dict[int, int]:  # type: ignore[type-arg]
    """RocksDB's estimate of the keys in each open partition of a table (active, standby)."""
    counts = {}
    for partition, db in getattr(table.data, "_dbs", {}).items():
        try:
            counts[partition] = db.property_int_value("rocksdb.estimate-num-keys") or 0
        except Exception:  # noqa: BLE001 - not a rocksdict store
            continue
    return counts


class RocksStore:
    """The partitions of a Faust `rocksdb://` table store (rocksdict driver), in batches."""

    def __init__(self, faust_store: Any, changelog_topic: str) -> None:
        self._store = faust_store
        self._changelog_topic = changelog_topic

    def _db(self, partition: int) -> Any:
        return self._store._db_for_partition(partition)

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        values: list[bytes | None] = self._db(partition).get(list(keys))
        return values

    def write(self, partition: int, items: Mapping[bytes, bytes | None]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in items.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self._db(partition).write(batch)

    def items(self, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Keys in order, from `prefix` on while they start with it (Faust's own key left out)."""
        offset_key = self._store.offset_key
        for key, value in self._db(partition).items(from_key=prefix or None):
            if not key.startswith(prefix):
                return
            if key != offset_key:
                yield key, value

    def persist_offset(self, partition: int, offset: int) -> None:
        """Remember the changelog offset the local copy holds, so a restart reads only past it.

        Skipped once the partition has moved away (Faust closed its database).
        """
        if self.is_open(partition):
            self._store.set_persisted_offset(TP(self._changelog_topic, partition), offset)

    def persisted_offset(self, partition: int) -> int | None:
        offset: int | None = self._store.persisted_offset(TP(self._changelog_topic, partition))
        return offset

    def is_open(self, partition: int) -> bool:
        """Whether Faust opened this partition's database for this worker (active copies)."""
        return partition in self._store._dbs


# -- recovery: the bulk restore ahead of Faust's ---------------------------------------------

# Given the changelog partitions just assigned as active and as standby copies, starts their
# restore in the background and returns the event it sets once the actives are read.
Planner = Callable[[set[TP], set[TP]], asyncio.Event]


def on_restore(app: faust.App, planner: Planner) -> None:
    """Restore assigned table partitions with `planner` before Faust's recovery runs.

    Faust's recovery starts only once the event it returns is set, and then reads only what
    is left past the offsets the restore persisted (normally nothing). Standby copies are
    left to the planner entirely: Faust's consumer never fetches them.
    """
    cast(Tables, app.tables).planner = planner


class BulkRecovery(Recovery):
    """Faust's recovery, held back until the worker's own bulk restore has run.

    Faust applies changelogs a record at a time (~a queue wait and a task per record). Here
    the rebalance callback only hands the assigned changelog partitions to the planner and
    returns, so the consumer keeps heartbeating; Faust's recovery loop (outside the callback)
    then waits at its first step for the planner's event, re-reads the offsets the restore
    persisted, and reads the rest the usual way. A new rebalance interrupts the wait as it
    interrupts any step of Faust's recovery (its `signal_recovery_start`).
    """

    def __init__(self, app: Any, tables: Any, **kwargs: Any) -> None:
        super().__init__(app, tables, **kwargs)
        self._restored: asyncio.Event | None = None

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        planner = cast(Tables, self.tables).planner
        if planner is None or generation_id != self.app.consumer_generation_id:
            return  # no planner, or Faust ignored a stale rebalance
        standbys = set(self.standby_tps)
        # In place: Faust's recovery loops hold these very objects.
        for tp in standbys:
            self.standby_tps.discard(tp)
            self.standby_offsets.pop(tp, None)
            self.standby_highwaters.pop(tp, None)
        for tps in self.standbys_for_table.values():
            tps.difference_update(standbys)
        self._restored = planner(set(self.active_tps), standbys)

    async def _wait(self, coro: Any, timeout: Any = None) -> None:
        restored = self._restored
        if restored is not None:
            try:
                # No timeout: mode treats one as a stop and ends the recovery loop for good.
                await super()._wait(restored.wait(), timeout=None)
            except BaseException:
                if asyncio.iscoroutine(coro):
                    coro.close()
                raise
            if self._restored is restored:
                self._restored = None
                for tp in self.active_tps:  # where the restore left each active copy
                    offset = self.tp_to_table[tp].persisted_offset(tp)
                    if offset is not None:
                        self.active_offsets[tp] = offset
        await super()._wait(coro, timeout)

    async def _build_highwaters(
        self, consumer: Any, tps: set[TP], destination: Any, title: str
    ) -> None:
        """Faust's highwaters, looked up again while a local copy's persisted offset is past
        one, for up to `MARKER_WAIT_S`.

        Read committed, a changelog's end is its last stable offset. A transaction's commit
        returns once the coordinator has logged it; its markers reach the partition a moment
        later, and until then the last stable offset stays at the transaction's first
        record. A checkpoint persists its offset as the commit returns, so a rebalance right
        after one can find the local copy ahead of its changelog, and Faust's consistency
        check stops the worker (seen in CI). A copy still ahead after the wait is one, and
        the check stops the worker as before.
        """
        deadline = time.monotonic() + MARKER_WAIT_S
        while True:
            await super()._build_highwaters(consumer, tps, destination, title)
            ahead = {
                tp: offset
                for tp in tps
                if (table := self.tp_to_table.get(tp)) is not None
                and (offset := table.persisted_offset(tp)) is not None
                and offset > destination[tp]
            }
            if not ahead or time.monotonic() >= deadline:
                return
            behind = ", ".join(
                f"{tp.topic}[{tp.partition}] {destination[tp]} < {o}" for tp, o in ahead.items()
            )
            self.log.info(
                "changelog ends before the local copy's persisted offset (a commit's markers "
                "not written yet?): %s; looking again",
                behind,
            )
            await asyncio.sleep(MARKER_POLL_S)


class Tables(TableManager):
    """Faust's table manager with the bulk restore's recovery (`BulkRecovery`)."""

    planner: Planner | None = None

    async def on_start(self) -> None:
        """Faust's start, without its 1 s sleep first.

        Faust sleeps so tables defined while the app starts are still taken in. The worker
        defines all of its tables with the app (`state_table`), before it starts; one added
        later is still refused by Faust ("Too late to add tables"), not missed. The sleep
        would only hold back the consumer's subscription (it waits for the tables), and so
        the first join.
        """
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = BulkRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


# -- the worker process ------------------------------------------------------------------------


class Worker(faust.Worker):
    """Faust's worker without its terminal spinner.

    At a log level of WARN or above, Faust ticks a spinner on every log record and to get
    them sets the root logger to DEBUG: every debug call of Faust, aiokafka and mode then
    built a LogRecord and ran the handlers (about 7% of a worker's CPU while restoring a
    changelog). Here the root logger takes the worker's `--loglevel` (from
    `COUPON_LOG_LEVEL` unless given) and nothing below it is ever built.
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        super().on_setup_root_logger(logger, level)
        if level:
            logger.setLevel(level)


# -- aiokafka ----------------------------------------------------------------------------------


async def topic_partitions(consumer: Any, topics: Sequence[str]) -> dict[str, set[int]]:
    """Each topic's partitions from fresh metadata of all topics (none named: naming one
    could auto-create it on a broker with auto.create.topics.enable); a missing topic: {}."""
    client = consumer._client
    await client.force_metadata_update()
    return {t: set(client.cluster.partitions_for_topic(t) or ()) for t in topics}
