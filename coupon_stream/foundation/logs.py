"""Log setup: plain text for people, one JSON object per line for log pipelines."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

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


# What varies between lines that say the same: librdkafka's "(after 2944ms in state UP)".
_VARYING = re.compile(r"\d+ms\b")


class Repeats(logging.Filter):
    """Fold a warning or error said again within `window` seconds into a count.

    While a broker is down, aiokafka and librdkafka each log every reconnect attempt: a
    worker wrote over a hundred lines a second, the same few again and again. The first
    line of each kind is written at once; the same line (logger, level, and text but for
    millisecond counts) again within `window` seconds is counted instead, and the first
    one after that says how many were folded. Critical lines are never folded.
    """

    def __init__(self, window: float = 60.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key: [written at, folded]
        # librdkafka logs from its consumer's thread: a handler calls filters unlocked.
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.WARNING <= record.levelno < logging.CRITICAL:
            return True
        message = record.getMessage()
        key = (record.name, record.levelno, _VARYING.sub("#ms", message))
        with self._lock:
            now = self.clock()
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return False
            if len(self._seen) > 1000:  # forget the kinds not seen within the window
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
            self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            record.msg = f"{message} ({int(seen[1])} more like it folded in the "
            record.msg += f"{now - seen[0]:.0f} s before)"
            record.args = None
        return True


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
        "filters": {"repeats": {"()": Repeats}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["repeats"],
            },
        },
        "root": {"handlers": ["console"], "level": level.upper()},
    }
