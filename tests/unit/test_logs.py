"""Log setup: the worker's root logger keeps the asked level."""

from __future__ import annotations

import logging

from faust.utils import terminal

from coupon_stream.foundation.logs import Worker


def test_worker_root_logger_takes_the_log_level_and_gets_no_spinner():
    # Faust's own worker would add a spinner handler and set the root logger to DEBUG here.
    worker = Worker.__new__(Worker)
    worker.spinner = terminal.Spinner()
    logger = logging.Logger("root-under-test")
    logger.addHandler(logging.StreamHandler())
    worker.on_setup_root_logger(logger, logging.WARNING)
    assert logger.level == logging.WARNING
    assert not logger.isEnabledFor(logging.DEBUG)
    assert [type(h) for h in logger.handlers] == [logging.StreamHandler]
