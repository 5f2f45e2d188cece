"""Prometheus metrics: what the on-call engineer reads to see what the worker is doing."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_CONSUMED = Counter("coupon_messages_consumed_total", "Source messages consumed", ["topic"])
RECORDS = Counter(
    "coupon_records_total",
    "Valid records applied to state, by outcome (new, replaced, duplicate, overflow)",
    ["outcome"],
)
DEAD_LETTERS = Counter(
    "coupon_dead_letters_total", "Messages sent to the dead-letter topic", ["reason"]
)
ROWS_UPSERTED = Counter("coupon_rows_upserted_total", "Result rows upserted")
ROWS_DELETED = Counter("coupon_rows_deleted_total", "Result row keys deleted (total <= 0)")
SINK_STATEMENTS = Counter("coupon_sink_statements_total", "SQL statements sent by the sink")
SINK_RETRIES = Counter(
    "coupon_sink_retries_total", "Failed database attempts that were retried, deadlocks included"
)
SINK_PENDING = Gauge("coupon_sink_pending_rows", "Result rows waiting to be committed")
SINK_AVAILABLE = Gauge(
    "coupon_sink_available",
    "1 unless the database is failing (a deadlock with another worker's write does not count)",
)
SINK_WRITE_SECONDS = Histogram(
    "coupon_sink_write_seconds",
    "Time to commit one batch of result rows, retries included",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SINK_BATCH_ROWS = Histogram(
    "coupon_sink_batch_rows",
    "Result rows per committed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
STATE_WRITES = Counter(
    "coupon_state_writes_total",
    "State keys written by checkpoints (entries and days; one changelog record each)",
    ["table"],
)
STATE_EXTREMA_RECOMPUTED = Counter(
    "coupon_state_extrema_recomputed_total",
    "Days whose MIN(gmt_create)/MAX(gmt_modified) lost its entry to a replacement and were "
    "recomputed from the day's entries",
)
CHECKPOINT_SECONDS = Histogram(
    "coupon_checkpoint_seconds",
    "Time of one checkpoint: changelog, local RocksDB, MySQL and the offset commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CHECKPOINT_STEP_SECONDS = Histogram(
    "coupon_checkpoint_step_seconds",
    "Time of each step a checkpoint took (derive: snapshot and derive; changelog; "
    "local: RocksDB; sink: MySQL; offsets: the commit): where a row's wait to be visible goes",
    ["step"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REBALANCES = Counter(
    "coupon_rebalances_total", "Partition assignments this worker received (one per rebalance)"
)
PARTITION_STALLED = Gauge(
    "coupon_partition_stalled",
    "1 while an assigned partition has lag and committed nothing for COUPON_STALL_SECONDS",
    ["partition"],
)
STATE_EXPIRED = Counter(
    "coupon_state_expired_records_total", "Dedup entries dropped by state retention"
)
CONSUMER_LAG = Gauge(
    "coupon_consumer_lag",
    "Messages behind the end of each assigned partition (standby copies: changelog records "
    "not yet mirrored)",
    ["topic", "partition"],
)
STATE_ENTRIES = Gauge(
    "coupon_state_entries",
    "Kept records (entries) per partition, counted at the last retention sweep",
    ["partition"],
)
STATE_RESTORED = Counter(
    "coupon_state_restored_records_total",
    "Changelog records read into local state (recovery after assignment, standby replicas)",
)
STATE_BULK_RESTORED = Counter(
    "coupon_state_bulk_restored_records_total",
    "Of those, records read in bulk (the restore on assignment and the standby mirror); "
    "its rate is the restore's speed",
)
STATE_RESTORE_REMAINING = Gauge(
    "coupon_state_restore_remaining_records",
    "Changelog records an assigned active partition still has to read before it processes",
    ["table", "partition"],
)
STATE_KEYS = Gauge(
    "coupon_state_keys",
    "Keys in the local RocksDB state per table and partition (RocksDB's estimate, every 10 s)",
    ["table", "partition"],
)
SKIPPED_REAPPLIED = Counter(
    "coupon_state_skipped_messages_reapplied_total",
    "By-buyer messages the consumer did not deliver in order, read back from Kafka and applied",
)
INTAKE_RETRIES = Counter(
    "coupon_intake_retries_total", "Intake batches Kafka refused and that were sent again"
)
SINK_ABANDONED = Counter(
    "coupon_sink_abandoned_rows_total",
    "Rows given up because the database was down during a rebalance; the partitions' next "
    "owner replays their messages and writes them",
)
CHANGELOG_RETRIES = Counter(
    "coupon_changelog_retries_total",
    "State changelog batches Kafka refused and that were sent again with the keys' current values",
)
SINK_REJECTED = Counter(
    "coupon_sink_rejected_rows_total",
    "Result rows the database refused as data (a permanent error), set aside alone and sent to "
    "the dead-letter topic while the rest of their batch was written",
)
DEAD_LETTERS_TRUNCATED = Counter(
    "coupon_dead_letters_truncated_total",
    "Dead letters Kafka refused as too large, sent again with the value cut to 64 KiB "
    "(header coupon.value.truncated holds the original length)",
)
GRANT_EVENTS = Counter(
    "coupon_grant_events_total",
    "Changes of a (buyer, day)'s coupon tier, as committed to the grants topic: grant (the "
    "tier rose) or revoke (it fell), by the tier reached (0: none); replays count again",
    ["kind", "tier"],
)
GRANT_YUAN = Counter(
    "coupon_grant_yuan_total",
    "Coupon yuan those changes granted (kind=grant) or took back (kind=revoke)",
    ["kind"],
)


def grant_series(tiers: int) -> None:
    """Every grant series at 0 from the start, so that their rates are right at once."""
    for kind in ("grant", "revoke"):
        GRANT_YUAN.labels(kind)
        for tier in range(tiers + 1):
            GRANT_EVENTS.labels(kind, str(tier))


CHECKPOINTS_FENCED = Counter(
    "coupon_checkpoints_fenced_total",
    "Checkpoints dropped because a store refused them: `fenced` when a newer owner had claimed "
    "a partition (docs/design.md, 'Fencing'), `not held` when this worker's claim was lost "
    "(a changelog transaction neither committed nor aborted), `offsets` when the group did "
    "not take its offsets (a rebalance); their messages are replayed",
    ["why"],
)
