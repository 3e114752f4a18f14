"""Shared pytest configuration.

Tests keep torch to few threads: CI has 2 cores and several test processes may run at once.
"""

import logging
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def restore_logging():
    """``copdssl`` subcommands reconfigure the root logger (``basicConfig(force=True)``) with a
    handler on pytest's captured stderr; put the previous handlers back after every test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
