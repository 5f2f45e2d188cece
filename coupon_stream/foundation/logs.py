"""Log setup: plain text for people, one JSON object per line for log pipelines."""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def logging_config(fmt: str, level: str) -> dict[str, Any]:
    """A dictConfig for Faust's `logging_config` setting."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if fmt == "json"
        else {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "default"},
        },
        "root": {"handlers": ["console"], "level": level.upper()},
    }


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
