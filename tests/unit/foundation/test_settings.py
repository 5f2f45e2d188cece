import logging
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from coupon_stream.foundation.settings import Settings

README = Path(__file__).resolve().parents[3] / "README.md"


def test_every_setting_is_documented_in_the_readme_table():
    names = {f"COUPON_{name.upper()}" for name in Settings.model_fields}
    documented = set(re.findall(r"^\| `(COUPON_[A-Z_]+)` \|", README.read_text(), re.M))
    assert names == documented


def test_env_prefix_and_secret_masking(monkeypatch, caplog):
    monkeypatch.setenv("COUPON_DB_URL", "mysql+asyncmy://u:s3cret@db:3306/coupons")
    monkeypatch.setenv("COUPON_BROKER", "k1:9092")
    monkeypatch.setenv("COUPON_PARTITIONS", "12")
    s = Settings()
    assert s.partitions == 12
    assert s.bootstrap_servers == "k1:9092"
    assert "s3cret" not in repr(s) and "s3cret" not in s.db_url_safe
    assert s.db_url_safe == "mysql+asyncmy://u:***@db:3306/coupons"
    logging.getLogger("x").info("settings %s", s)
    assert "s3cret" not in caplog.text


def test_invalid_values_are_clear_errors(monkeypatch):
    monkeypatch.setenv("COUPON_PARTITIONS", "0")
    with pytest.raises(ValidationError, match="partitions"):
        Settings()


def test_every_metric_is_documented_in_the_readme():
    from prometheus_client.metrics import MetricWrapperBase

    from coupon_stream.foundation import metrics

    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
        for family in m.describe()
    }
    documented = set(re.findall(r"^\| `(coupon_[a-z_]+)` \|", README.read_text(), re.M))
    assert exported == documented


# -- secured connections ------------------------------------------------------------------


@pytest.fixture
def pems(tmp_path):
    from tests import certs

    return certs.make(tmp_path)


@pytest.mark.parametrize(
    ("values", "said"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_username": "u"},
            "SASL_SSL needs COUPON_KAFKA_SASL_MECHANISM, COUPON_KAFKA_PASSWORD",
        ),
        (
            {"kafka_username": "u", "kafka_password": "hunter2"},
            "COUPON_KAFKA_USERNAME, COUPON_KAFKA_PASSWORD given, but "
            "COUPON_KAFKA_SECURITY_PROTOCOL=PLAINTEXT sends no credentials",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_sasl_mechanism": "PLAIN"},
            "COUPON_KAFKA_SASL_MECHANISM given, but COUPON_KAFKA_SECURITY_PROTOCOL=SSL",
        ),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_mechanism": "PLAIN",
                "kafka_username": "u",
                "kafka_password": "hunter2",
                "kafka_ca_file": "ca.pem",
            },
            "COUPON_KAFKA_CA_FILE given, but COUPON_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT "
            "does not use TLS",
        ),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
        ({"kafka_username": ""}, "kafka_username\n  String should have at least 1 character"),
    ],
)
def test_kafka_security_that_could_not_work_is_refused(monkeypatch, values, said):
    for name, value in values.items():
        monkeypatch.setenv(f"COUPON_{name.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert said in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_certificate_files_are_checked_by_setting_name(tmp_path, pems):
    tls: dict[str, Any] = {"kafka_security_protocol": "SSL"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kafka_ca_file": tmp_path / "missing.pem"}, "COUPON_KAFKA_CA_FILE=.*cannot read it"),
        ({"kafka_ca_file": pems["ca"].key}, "COUPON_KAFKA_CA_FILE=.*not a PEM file with a CERT"),
        (
            {"kafka_cert_file": pems["client"].cert, "kafka_key_file": pems["server"].key},
            "COUPON_KAFKA_CERT_FILE=.* and COUPON_KAFKA_KEY_FILE=.*: not a certificate and its",
        ),
        ({"kafka_key_file": pems["client"].key}, "COUPON_KAFKA_KEY_FILE given without COUPON_"),
    ]
    for values, said in cases:
        with pytest.raises(ValidationError, match=said):
            Settings(**tls, **values)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValidationError, match="COUPON_KAFKA_CA_FILE=.*not a valid PEM"):
        Settings(**tls, kafka_ca_file=garbage)
    ok = Settings(
        **tls,
        kafka_ca_file=pems["ca"].cert,
        kafka_cert_file=pems["client"].cert,
        kafka_key_file=pems["client"].key,
    )
    assert ok.kafka_user == f"the client certificate {pems['client'].cert}"


def test_database_tls_needs_mysql_and_a_ca(pems):
    mysql = "mysql+asyncmy://coupons:pw@db:3306/coupons"
    with pytest.raises(ValidationError, match="need a mysql\\+asyncmy:// COUPON_DB_URL"):
        Settings(db_ca_file=pems["ca"].cert)
    with pytest.raises(ValidationError, match="COUPON_DB_CERT_FILE/COUPON_DB_KEY_FILE need COUP"):
        Settings(db_url=mysql, db_cert_file=pems["client"].cert, db_key_file=pems["client"].key)
    with pytest.raises(ValidationError, match="COUPON_DB_CA_FILE=.*cannot read it"):
        Settings(db_url=mysql, db_ca_file="/nonexistent/ca.pem")
    s = Settings(db_url=mysql, db_ca_file=pems["ca"].cert)
    context = s.db_tls()
    assert context is not None and context.check_hostname and len(context.get_ca_certs()) == 1
    assert Settings(db_url=mysql).db_tls() is None


def test_the_kafka_password_is_never_shown(monkeypatch, caplog):
    monkeypatch.setenv("COUPON_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("COUPON_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("COUPON_KAFKA_USERNAME", "coupon")
    monkeypatch.setenv("COUPON_KAFKA_PASSWORD", "hunter2")
    s = Settings()
    assert s.kafka_password is not None and s.kafka_password.get_secret_value() == "hunter2"
    logging.getLogger("x").info("settings %s %r", s, s)
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in caplog.text
    monkeypatch.setenv("COUPON_PARTITIONS", "0")  # any error: the inputs stay out of it
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "hunter2" not in str(refused.value)


def test_the_cli_names_the_refused_setting_and_nothing_else(monkeypatch, capsys):
    from coupon_stream.tools.cli import EXIT_CONFIG, load_settings

    monkeypatch.setenv("COUPON_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("COUPON_KAFKA_PASSWORD", "hunter2")
    monkeypatch.setenv("COUPON_PARTITIONS", "0")
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == EXIT_CONFIG
    assert capsys.readouterr().err.splitlines() == [
        "coupon-stream: configuration refused: COUPON_PARTITIONS: Input should be greater "
        "than or equal to 1",
    ]
    monkeypatch.delenv("COUPON_PARTITIONS")
    with pytest.raises(SystemExit):
        load_settings()
    assert capsys.readouterr().err == (
        "coupon-stream: configuration refused: Value error, COUPON_KAFKA_SECURITY_PROTOCOL="
        "SASL_SSL needs COUPON_KAFKA_SASL_MECHANISM, COUPON_KAFKA_USERNAME\n"
    )


def encrypted_copy(key: Path, password: bytes, to: Path) -> Path:
    """`key` as an `ENCRYPTED PRIVATE KEY` PEM (PKCS#8, as real estates keep them)."""
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    to.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    )
    return to


@pytest.mark.parametrize("side", ["kafka", "db"])
def test_an_encrypted_key_opens_with_its_password_and_is_never_prompted_for(
    tmp_path, pems, side, monkeypatch, capsys
):
    from coupon_stream.tools.cli import EXIT_CONFIG, load_settings

    key = encrypted_copy(pems["client"].key, b"key-s3cret", tmp_path / "encrypted.key")
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    setting = f"COUPON_{side.upper()}_KEY_PASSWORD"
    env = {
        f"COUPON_{side.upper()}_CA_FILE": str(pems["ca"].cert),
        f"COUPON_{side.upper()}_CERT_FILE": str(pems["client"].cert),
        f"COUPON_{side.upper()}_KEY_FILE": str(key),
    }
    env |= (
        {"COUPON_KAFKA_SECURITY_PROTOCOL": "SSL"}
        if side == "kafka"
        else {"COUPON_DB_URL": "mysql+asyncmy://coupons:pw@db:3306/coupons"}
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # No password: refused in one line naming the setting (OpenSSL would otherwise ask on
    # the terminal, or raise an OSError without one).
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == EXIT_CONFIG
    (line,) = capsys.readouterr().err.splitlines()
    assert f"the key is encrypted: set {setting}" in line
    monkeypatch.setenv(setting, "wrong")
    with pytest.raises(SystemExit):
        load_settings()
    (line,) = capsys.readouterr().err.splitlines()
    assert f"does not open with {setting}" in line and "wrong" not in line
    monkeypatch.setenv(setting, "key-s3cret")
    s = load_settings()
    context = s.kafka_tls() if side == "kafka" else s.db_tls()
    assert context is not None
    assert "key-s3cret" not in repr(s) and "key-s3cret" not in str(s)


def test_a_database_url_the_sink_cannot_drive_is_refused_at_start(monkeypatch, capsys):
    from coupon_stream.tools.cli import EXIT_CONFIG, load_settings

    monkeypatch.setenv("COUPON_DB_URL", "postgresql+asyncpg://u:hunter2@db/coupons")
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == EXIT_CONFIG
    (line,) = capsys.readouterr().err.splitlines()
    assert "scheme 'postgresql+asyncpg' is not supported" in line and "hunter2" not in line


@pytest.mark.parametrize(
    ("tiers", "version", "said"),
    [
        ("500:60,200:20", "1", "thresholds must ascend: 200 comes after 500"),
        ("200:20", "0", "the policy version must be 1..32767, not 0"),
        ("200:-5", "1", "a coupon amount must be positive, not -5"),
        ("200", "1", "COUPON_GRANT_TIERS: a tier is threshold:amount, not '200'"),
        ("", "3", "COUPON_GRANT_POLICY_VERSION is set but COUPON_GRANT_TIERS is not"),
    ],
)
def test_a_coupon_policy_that_cannot_work_is_refused_in_one_line(
    monkeypatch, capsys, tiers, version, said
):
    from coupon_stream.tools.cli import EXIT_CONFIG, load_settings

    monkeypatch.setenv("COUPON_GRANT_TIERS", tiers)
    monkeypatch.setenv("COUPON_GRANT_POLICY_VERSION", version)
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == EXIT_CONFIG
    (line,) = capsys.readouterr().err.splitlines()
    assert said in line and line.startswith("coupon-stream: configuration refused")


def test_no_policy_means_no_grants_and_a_policy_is_read_once_valid(monkeypatch):
    assert Settings().policy is None
    monkeypatch.setenv("COUPON_GRANT_TIERS", "200:20,500:60")
    monkeypatch.setenv("COUPON_GRANT_POLICY_VERSION", "2")
    policy = Settings().policy
    assert policy is not None and policy.version == 2 and policy.tier(499) == 1
