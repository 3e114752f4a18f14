"""Logging and progress bars shared by every subcommand.

Each subcommand logs to ``--log FILE`` (the Snakemake ``log:`` file) and to stderr. Progress
bars (tqdm) are shown only when stderr is an interactive terminal, i.e. when a person runs
the stage by hand; under Snakemake the log file gets one line per completed step instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(log_file: str | os.PathLike | None = None, verbose: bool = False) -> None:
    """Send log records to stderr and, when given, to ``log_file`` (appended)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT,
                        handlers=handlers, force=True)
    logging.captureWarnings(True)


def interactive() -> bool:
    """True when stderr is a terminal (a person is watching)."""
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a tqdm bar when interactive; otherwise log progress about every 10%."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if interactive():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True)
        return
    logger = logging.getLogger("copdssl.progress")
    step = max(1, (total or 0) // 10)
    done = 0
    for item in items:
        yield item
        done += 1
        if total and (done % step == 0 or done == total):
            logger.info("%s: %d/%d %s", desc, done, total, unit)
