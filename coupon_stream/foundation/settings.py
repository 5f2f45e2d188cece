"""All configuration, read once from `COUPON_*` environment variables."""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from coupon_stream.core.grants import Policy, parse_tiers, policy_problems
from coupon_stream.core.state import STATE_TABLES

APP_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")
# The result database's drivers: MySQL or MariaDB through asyncmy, SQLite for the demo.
DB_SCHEMES = ("mysql+asyncmy", "sqlite+aiosqlite")


class Settings(BaseSettings):
    """Service configuration; every field maps to `COUPON_<NAME>` (see README)."""

    # Inputs stay out of validation errors: they would print COUPON_KAFKA_PASSWORD.
    model_config = SettingsConfigDict(
        env_prefix="COUPON_", extra="ignore", hide_input_in_errors=True
    )

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
        0.2,
        gt=0,
        description="seconds from the start of one checkpoint (changelogs, local state, the "
        "result table, then the offsets) to the start of the next (at once if one took longer); "
        "the name is kept for existing deployments",
    )
    max_pending_rows: int = Field(
        20_000, ge=1, description="rows waiting for the database before consumption pauses"
    )
    intake_batch: int = Field(5000, ge=1, description="max source messages per intake batch")
    intake: bool = Field(
        True,
        description="run the intake in the worker; false where `coupon-stream intake` "
        "processes run it apart (each on a core of its own)",
    )
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
    grant_tiers: str = Field(
        "",
        description="coupon tiers as threshold:amount in yuan, thresholds ascending "
        '(e.g. "200:20,500:60"); empty: no grants, no grants table or topic',
    )
    grant_policy_version: int = Field(
        0, ge=0, description="version of the tiers, raised at each change (1 or more with tiers)"
    )
    grants_table: str = Field("coupon_grants", description="the tier each (buyer, day) reached")
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
    # -- connecting to a secured Kafka and database (README, "Connecting to a secured ...")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how every Kafka client of the service connects"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism; required with SASL_PLAINTEXT and SASL_SSL"
    )
    kafka_username: str | None = Field(None, min_length=1, description="SASL user of the service")
    kafka_password: SecretStr | None = Field(
        None, min_length=1, description="SASL password (a secret: never logged)"
    )
    kafka_ca_file: Path | None = Field(
        None,
        description="PEM file of the CA(s) that signed the brokers' certificates (SSL, "
        "SASL_SSL); the system trust store when unset. Hostnames are always verified",
    )
    kafka_cert_file: Path | None = Field(
        None, description="PEM client certificate for mutual TLS with the brokers"
    )
    kafka_key_file: Path | None = Field(
        None, description="PEM private key of kafka_cert_file (encrypted: give its password)"
    )
    kafka_key_password: SecretStr | None = Field(
        None, description="password of an encrypted kafka_key_file (a secret: never logged)"
    )
    db_ca_file: Path | None = Field(
        None,
        description="PEM file of the CA that signed the database's certificate: the "
        "connection is then TLS with the certificate and hostname verified",
    )
    db_cert_file: Path | None = Field(
        None, description="PEM client certificate for the database (needs db_ca_file)"
    )
    db_key_file: Path | None = Field(
        None, description="PEM private key of db_cert_file (encrypted: give its password)"
    )
    db_key_password: SecretStr | None = Field(
        None, description="password of an encrypted db_key_file (a secret: never logged)"
    )

    @field_validator("app_id")
    @classmethod
    def _app_id(cls, value: str) -> str:
        """It prefixes Kafka topics, groups and transactional ids: Kafka's characters only,
        short enough for `<app_id>-payments-by-buyer` and the changelogs' names."""
        if not APP_ID.fullmatch(value):
            raise ValueError(
                "must be 1 to 200 of the characters Kafka allows in a topic name: "
                "letters, digits, '.', '_' and '-'"
            )
        return value

    @field_validator("db_url")
    @classmethod
    def _db_scheme(cls, value: SecretStr) -> SecretStr:
        """Refuse at start a URL the sink has no driver for (not later, with a traceback)."""
        scheme = value.get_secret_value().partition("://")[0]
        if scheme not in DB_SCHEMES:
            raise ValueError(
                f"COUPON_DB_URL's scheme {scheme!r} is not supported: use "
                + " or ".join(f"{s}://" for s in DB_SCHEMES)
            )
        return value

    @field_validator("broker")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        return value if "://" in value else f"kafka://{value}"

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        """Refuse settings that could not connect, or that would silently go unused."""
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        tls = protocol.endswith("SSL")
        given = {
            "COUPON_KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism is not None,
            "COUPON_KAFKA_USERNAME": self.kafka_username is not None,
            "COUPON_KAFKA_PASSWORD": self.kafka_password is not None,
        }
        if sasl:
            missing = [name for name, present in given.items() if not present]
            if missing:
                raise ValueError(
                    f"COUPON_KAFKA_SECURITY_PROTOCOL={protocol} needs {', '.join(missing)}"
                )
        else:
            unused = [name for name, present in given.items() if present]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} given, but COUPON_KAFKA_SECURITY_PROTOCOL={protocol} "
                    "sends no credentials: use SASL_SSL (or SASL_PLAINTEXT), or remove them"
                )
        files = {
            "COUPON_KAFKA_CA_FILE": self.kafka_ca_file,
            "COUPON_KAFKA_CERT_FILE": self.kafka_cert_file,
            "COUPON_KAFKA_KEY_FILE": self.kafka_key_file,
            "COUPON_KAFKA_KEY_PASSWORD": self.kafka_key_password,
        }
        if not tls and any(files.values()):
            named = ", ".join(name for name, path in files.items() if path)
            raise ValueError(
                f"{named} given, but COUPON_KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                "TLS: use SSL or SASL_SSL, or remove them"
            )
        if tls:
            self.kafka_tls()  # refuses a missing or unreadable file by its name
        return self

    @model_validator(mode="after")
    def _policy(self) -> Settings:
        if not self.grant_tiers.strip():
            if self.grant_policy_version:
                raise ValueError("COUPON_GRANT_POLICY_VERSION is set but COUPON_GRANT_TIERS is not")
            return self
        try:
            tiers = parse_tiers(self.grant_tiers)
        except ValueError as exc:
            raise ValueError(f"COUPON_GRANT_TIERS: {exc}") from None
        problems = policy_problems(self.grant_policy_version, tiers)
        if problems:
            raise ValueError(f"COUPON_GRANT_TIERS / COUPON_GRANT_POLICY_VERSION: {problems[0]}")
        return self

    @model_validator(mode="after")
    def _db_tls(self) -> Settings:
        files = {
            "COUPON_DB_CA_FILE": self.db_ca_file,
            "COUPON_DB_CERT_FILE": self.db_cert_file,
            "COUPON_DB_KEY_FILE": self.db_key_file,
            "COUPON_DB_KEY_PASSWORD": self.db_key_password,
        }
        if not any(files.values()):
            return self
        if not self.db_url.get_secret_value().startswith("mysql"):
            raise ValueError("COUPON_DB_CA_FILE and its kin need a mysql+asyncmy:// COUPON_DB_URL")
        if self.db_ca_file is None:
            raise ValueError(
                "COUPON_DB_CERT_FILE/COUPON_DB_KEY_FILE need COUPON_DB_CA_FILE: a client "
                "certificate is only sent over TLS whose server certificate is verified"
            )
        self.db_tls()
        return self

    def kafka_tls(self) -> ssl.SSLContext | None:
        """The TLS context of every Kafka client, or None when the protocol has no TLS."""
        if not self.kafka_security_protocol.endswith("SSL"):
            return None
        return tls_context(
            ("COUPON_KAFKA_CA_FILE", self.kafka_ca_file),
            ("COUPON_KAFKA_CERT_FILE", self.kafka_cert_file),
            ("COUPON_KAFKA_KEY_FILE", self.kafka_key_file),
            ("COUPON_KAFKA_KEY_PASSWORD", self.kafka_key_password),
        )

    def db_tls(self) -> ssl.SSLContext | None:
        """The TLS context of the database connections, or None (plain, as the URL says)."""
        if self.db_ca_file is None:
            return None
        return tls_context(
            ("COUPON_DB_CA_FILE", self.db_ca_file),
            ("COUPON_DB_CERT_FILE", self.db_cert_file),
            ("COUPON_DB_KEY_FILE", self.db_key_file),
            ("COUPON_DB_KEY_PASSWORD", self.db_key_password),
        )

    @property
    def kafka_user(self) -> str:
        """Who the service is to Kafka, for error messages: the SASL user or the TLS client."""
        if self.kafka_username:
            return self.kafka_username
        if self.kafka_cert_file:
            return f"the client certificate {self.kafka_cert_file}"
        return "ANONYMOUS"

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
    def grants_topic(self) -> str:
        """One event per change of a (buyer, day)'s tier (docs/design.md, "Coupon grants")."""
        return f"{self.app_id}-grants"

    @property
    def policy(self) -> Policy | None:
        """The coupon policy, None when no tiers are set."""
        if not self.grant_tiers.strip():
            return None
        return Policy(self.grant_policy_version, parse_tiers(self.grant_tiers))

    @property
    def legacy_changelog_topic(self) -> str:
        """Changelog of the format-1 `buyers` table (one value per buyer), now refused."""
        return f"{self.app_id}-buyers-changelog"

    @property
    def db_url_safe(self) -> str:
        """The database URL with its password masked, for logs."""
        return make_url(self.db_url.get_secret_value()).render_as_string(hide_password=True)


def tls_context(
    ca: tuple[str, Path | None],
    cert: tuple[str, Path | None] = ("", None),
    key: tuple[str, Path | None] = ("", None),
    password: tuple[str, SecretStr | None] = ("", None),
) -> ssl.SSLContext:
    """A client TLS context that verifies the server's certificate and hostname, always.

    Each argument is (setting name, path or secret); a file that is missing or not the PEM
    it should be, or a key that does not open with the password given (none: it must not be
    encrypted), raises ValueError naming its setting. Never asks for a pass phrase on a
    terminal. No CA file means the system trust store.
    """
    (ca_name, ca_file), (cert_name, cert_file), (key_name, key_file) = ca, cert, key
    password_name, secret = password
    for name, path, kind in (
        (ca_name, ca_file, "CERTIFICATE"),
        (cert_name, cert_file, "CERTIFICATE"),
        (key_name, key_file, "PRIVATE KEY"),
    ):
        if path is None:
            continue
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{name}={path}: cannot read it: {exc.strerror}") from None
        if b"-----BEGIN " not in text or kind.encode() not in text:
            raise ValueError(f"{name}={path}: not a PEM file with a {kind}")
    if key_file is not None and cert_file is None:
        raise ValueError(f"{key_name} given without {cert_name}")
    if secret is not None and key_file is None:
        raise ValueError(f"{password_name} given without {key_name}")
    try:
        # With a CA file only that CA is trusted; without, the system's.
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except ssl.SSLError as exc:
        raise ValueError(f"{ca_name}={ca_file}: not a valid PEM certificate: {exc}") from None
    if cert_file is not None:
        # A callable, never None: OpenSSL would prompt on a terminal for an encrypted key.
        given = b"" if secret is None else secret.get_secret_value().encode()
        try:
            context.load_cert_chain(
                str(cert_file), str(key_file) if key_file else None, password=lambda: given
            )
        except (ssl.SSLError, OSError) as exc:
            encrypted = key_file is not None and b"ENCRYPTED" in key_file.read_bytes()
            if encrypted and secret is None:
                why = f"the key is encrypted: set {password_name}"
            elif encrypted:
                why = f"the key does not open with {password_name}"
            else:
                why = "not a certificate and its private key"
            raise ValueError(
                f"{cert_name}={cert_file} and {key_name}={key_file}: {why} ({exc})"
            ) from None
    return context
