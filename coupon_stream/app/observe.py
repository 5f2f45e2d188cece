"""What an operator sees of a worker: lag and state-size gauges, /metrics and /health."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import generate_latest

from coupon_stream.app.rebalance import Restorer
from coupon_stream.connectors import engine
from coupon_stream.connectors.engine import TP
from coupon_stream.connectors.kafka import behind
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.foundation import metrics
from coupon_stream.foundation.stalls import StallWatch
from coupon_stream.pipeline.intake import Intake

# aiohttp wants the charset apart from the content type; the exposition format is UTF-8.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"


class Observe:
    def __init__(
        self,
        app: engine.App,
        topic: str,
        tables: dict[str, engine.StateTable],
        sink: ResultSink,
        stalls: StallWatch,
        intake: Intake,
        restorer: Restorer,
    ) -> None:
        self.restorer = restorer
        self.app = app
        self.topic = topic
        self.tables = tables
        self.sink = sink
        self.stalls = stalls
        self.intake = intake
        self.session_timeout = float(app.conf.broker_session_timeout)

    def register(self) -> None:
        app = self.app
        engine.every(app, 5.0, self.export_lag)
        engine.every(app, 10.0, self.export_state_size)

        @app.page("/metrics")
        async def metrics_page(web: Any, request: Any) -> Any:
            return web.bytes(generate_latest(), content_type=METRICS_CONTENT_TYPE)

        @app.page("/health/live")
        async def live(web: Any, request: Any) -> Any:
            return web.json({"status": "alive", "time": time.time()})

        @app.page("/health/ready")
        async def ready(web: Any, request: Any) -> Any:
            status = await self.readiness()
            return web.json(status, status=200 if status["ready"] else 503)

    async def export_lag(self) -> None:
        """Messages behind each assigned partition's end: by-buyer, intake and standby."""
        app = self.app

        def export(tp: TP, done: int) -> int | None:
            end = engine.highwater(app, tp)
            if end is None:
                return None
            lag = behind(end, done)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
            return lag

        by_buyer: dict[int, int] = {}
        for tp in engine.assignment(app):
            if tp.topic != self.topic:
                continue
            lag = export(tp, engine.consumer_committed(app, tp) or 0)
            if lag is not None:
                by_buyer[tp.partition] = lag
        if not self.sink.available and self.sink.last_error:
            self.stalls.failed(None, self.sink.last_error)
        self.stalls.check(by_buyer)
        # A standby copy is as current as the last changelog offset its mirror applied.
        for tp, lag in self.restorer.standby_lag.items():
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
        for tp, n in self.intake.lag().items():
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(n)

    async def export_state_size(self) -> None:
        """Keys held in local RocksDB per table and partition (active and standby copies)."""
        for name in STATE_TABLES:
            for partition, keys in engine.key_counts(self.tables[name]).items():
                metrics.STATE_KEYS.labels(name, str(partition)).set(keys)

    def group(self) -> str | None:
        """Why this worker is not a member of its state group now, or None if it is.

        A worker that froze or lost the brokers past its session timeout has lost its
        partitions to the others, whatever it still believes: it is not ready until it has
        joined again (its writes are fenced meanwhile: docs/design.md, "Fencing").
        """
        member, generation, age = engine.membership(self.app)
        timeout = self.session_timeout
        if age is not None and age > timeout:
            return (
                f"no heartbeat answered for {age:.0f} s (session timeout {timeout:.0f} s): "
                "the group has handed this worker's partitions to others; it joins again "
                "once the brokers answer"
            )
        if not member:
            return "not a member of the state group (joining)"
        return None

    async def readiness(self) -> dict[str, Any]:
        """Ready when not rebalancing, tables restored, the database answers, and no
        partition is stalled (lag, and nothing committed for COUPON_STALL_SECONDS); and, if
        the worker runs the intake, while that is ready too (`Intake.health`): a worker whose
        intake lost its group, or cannot forward, feeds nothing new to the state stage.

        While tables restore, the body names each partition still restoring, with its
        records left and an estimate of the seconds to go at the restore's rate so far.
        """
        app = self.app
        recovered = engine.recovered(app)
        database = await self.sink.ping()
        rebalancing = bool(app.rebalancing)
        stalled = sorted(self.stalls.stalled)
        progress = self.restorer.progress
        restoring = progress.restoring()
        group = self.group()
        intake = self.intake.health() if self.intake.settings.intake else None
        fed = intake is None or bool(intake["ready"])
        ready = recovered and database and fed and not (rebalancing or stalled or group)
        return {
            "ready": ready,
            "out_of_group": group,
            "tables_recovered": recovered,
            "restoring": restoring,
            "restore_records_per_second": round(progress.rate()) if restoring else None,
            "database": database,
            "rebalancing": rebalancing,
            "stalled_partitions": stalled,
            "intake": intake,
        }
