"""`coupon-stream intake`: the intake alone, in a process of its own.

A worker runs its intake and its state stage on one event loop, so on one core: decoding,
validating and routing every source message takes a quarter of it (docs/performance.md).
With `COUPON_INTAKE=false` the workers leave the intake to these processes, which join the
same intake group (`<app_id>-intake`) and split the source partitions among them; the
by-buyer topic between the two is the one it always was, so nothing else changes: offsets,
replays and dead letters are the intake's as in a worker.

It serves `/metrics`, `/health/live` and `/health/ready` on `COUPON_WEB_PORT` (`Intake.health`),
exports its lag every 5 s, and stops on SIGTERM or SIGINT; an error no retry can fix ends
the process with one CRITICAL line and a non-zero exit, as in a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from aiohttp import web
from prometheus_client import generate_latest

from coupon_stream.app.observe import METRICS_CONTENT_TYPE
from coupon_stream.connectors.kafka import KafkaOut
from coupon_stream.foundation import metrics
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.intake import Intake

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0


async def run(settings: Settings) -> None:
    """Run the intake until a signal stops it (or an error it cannot retry ends it)."""
    out = KafkaOut(settings)
    intake = Intake(settings, out)
    task = asyncio.create_task(intake.run(), name="intake")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)

    async def ready(request: web.Request) -> web.Response:
        body = intake.health()
        return web.json_response(body, status=200 if body["ready"] else 503)

    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.web_host, settings.web_port).start()
    lag = asyncio.create_task(_export_lag(intake), name="intake-lag")
    log.info("intake running (group %s), web port %d", settings.intake_group, settings.web_port)
    try:
        await task
    except asyncio.CancelledError:
        log.info("intake stopped by a signal")
    finally:
        lag.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lag
        await out.stop()  # what was sent is delivered; the batch in hand is replayed
        await runner.cleanup()


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive", "time": time.time()})


async def _export_lag(intake: Intake) -> None:
    while True:
        await asyncio.sleep(LAG_EVERY_S)
        for tp, n in intake.lag().items():
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(n)
