import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from coupon_stream.ops.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


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

    from coupon_stream.ops import metrics

    exported = {
        m._name + ("_total" if m._type == "counter" else "")
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    documented = set(re.findall(r"^\| `(coupon_[a-z_]+)` \|", README.read_text(), re.M))
    assert exported == documented
