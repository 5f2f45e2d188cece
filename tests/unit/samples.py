"""Metric values as Prometheus reads them: through the registry, not the metric objects."""

from __future__ import annotations

from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    """The value of the sample `name` (with `labels`) in the default registry, as /metrics
    exports it: a counter's name ends in `_total`."""
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"no sample {name} {labels}"
    return value
