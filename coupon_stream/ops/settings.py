"""All configuration, read once from `COUPON_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

# The state tables, both partitioned by buyer: kept copy per (buyer, order, pay_status) and
# running sums per (buyer, day). See coupon_stream.core.state.
STATE_TABLES = ("entries", "days")
STATE_FORMAT = 2


class Settings(BaseSettings):
    """Service configuration; every field maps to `COUPON_<NAME>` (see README)."""

    model_config = SettingsConfigDict(env_prefix="COUPON_", extra="ignore")

    broker: str = Field("kafka://127.0.0.1:9092", description="Kafka bootstrap URL(s)")
    db_url: SecretStr = Field(
        SecretStr("sqlite+aiosqlite:///coupon-stream.db"),
        description="SQLAlchemy async URL of the result database",
    )
    orders_topic: str = "dwd_tb_trd_pay_ri"
    refunds_topic: str = "dwd_tb_trd_rfd_ri"
    dlq_topic: str = "coupon_stream_dead_letters"
    result_table: str = "tddl_output"
    app_id: str = Field(
        "coupon-stream", description="Faust app id; names the consumer groups and topics"
    )
    partitions: int = Field(8, ge=1, description="partitions of the by-buyer topic and tables")
    data_dir: Path = Path("coupon-stream-data")
    flush_interval: float = Field(
        0.2, gt=0, description="seconds between flushes of coalesced rows to the database"
    )
    max_pending_rows: int = Field(
        20_000, ge=1, description="rows waiting for the database before consumption pauses"
    )
    intake_batch: int = Field(5000, ge=1, description="max source messages per intake batch")
    web_port: int = 6066
    web_host: str = Field(
        "127.0.0.1",
        description="address the web port binds to (the image sets 0.0.0.0 for its "
        "HEALTHCHECK and Prometheus)",
    )
    standby_replicas: int = Field(0, ge=0)
    session_timeout: float = Field(
        10.0, gt=0, description="seconds before the group drops a worker that stopped heartbeating"
    )
    bulk_restore_seconds: float = Field(
        3.0,
        ge=0,
        description="seconds an assignment may spend reading changelogs in bulk before Faust's "
        "recovery takes over (0 = off); at most a third of session_timeout",
    )
    replication_factor: int = Field(1, ge=1, description="for the topics the service creates")
    state_retention_days: int = Field(
        0, ge=0, description="drop state of days older than this many days (0 = keep forever)"
    )
    future_tolerance_days: int = Field(
        1,
        ge=0,
        description="with retention on, a pay_time more than this many days past the wall clock "
        "is dead-lettered instead of moving the watermark",
    )
    stall_seconds: float = Field(
        60.0,
        gt=0,
        description="a partition with lag that committed nothing for this long is reported "
        "stalled (/health/ready 503, coupon_partition_stalled)",
    )
    crash_point: str = Field(
        "",
        description="fault tests only: SIGKILL the worker at this point of a checkpoint "
        "(see coupon_stream.pipeline.checkpoint.CRASH_POINTS); empty = never",
    )
    rocksdb_write_buffer_mb: int = Field(
        16, ge=1, description="RocksDB memtable per table partition, MiB (up to 3 are kept)"
    )
    rocksdb_block_cache_mb: int = Field(
        64, ge=1, description="RocksDB block cache per table partition, MiB"
    )
    log_level: str = "info"
    log_format: str = Field("text", pattern="^(text|json)$")

    @field_validator("broker")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        return value if "://" in value else f"kafka://{value}"

    @model_validator(mode="after")
    def _bulk_restore_within_session(self) -> Settings:
        # It runs in the assignment callback, where no heartbeats are sent.
        if self.bulk_restore_seconds > self.session_timeout / 3:
            raise ValueError(
                f"bulk_restore_seconds ({self.bulk_restore_seconds}) must be at most a third of "
                f"session_timeout ({self.session_timeout}): the group sends no heartbeats "
                "while it runs"
            )
        return self

    @property
    def bootstrap_servers(self) -> str:
        """Broker list in the host:port form aiokafka wants."""
        return ",".join(part.split("://", 1)[-1] for part in self.broker.split(";"))

    @property
    def intake_group(self) -> str:
        """Consumer group of the intake; the state stage's group is `app_id` itself."""
        return f"{self.app_id}-intake"

    @property
    def by_buyer_topic(self) -> str:
        return f"{self.app_id}-payments-by-buyer"

    @property
    def changelog_topics(self) -> dict[str, str]:
        """Changelog of each state table, named as Faust names them: table -> topic."""
        return {t: f"{self.app_id}-{t}-changelog" for t in STATE_TABLES}

    @property
    def legacy_changelog_topic(self) -> str:
        """Changelog of the format-1 `buyers` table (one value per buyer), now refused."""
        return f"{self.app_id}-buyers-changelog"

    @property
    def db_url_safe(self) -> str:
        """The database URL with its password masked, for logs."""
        return make_url(self.db_url.get_secret_value()).render_as_string(hide_password=True)
