"""Every module of the package and the bench imports: nothing else runs the bench in CI."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for package in ("coupon_stream", "bench")
    for path in (ROOT / package).rglob("*.py")
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_the_bench_passes_its_settings_to_the_workers_it_starts(monkeypatch, tmp_path) -> None:
    """The bench's workers read their Settings back from the environment it builds."""
    from bench.run import env_of, settings_for
    from coupon_stream.foundation.settings import Settings

    wanted = settings_for("run", "topics", 4, tmp_path, 6100)
    for name, value in env_of(wanted).items():
        if name.startswith("COUPON_"):
            monkeypatch.setenv(name, value)
    assert Settings() == wanted
