"""Error types with one-line, user-facing messages.

A :class:`SubjectError` is a problem with one subject's data (corrupt file, no lungs, ...).
Stages catch it, record it in the subject's QC status and carry on with the other subjects.
A :class:`ConfigError` is a problem with the configuration and stops the run.
"""

from __future__ import annotations


class CopdsslError(Exception):
    """Base class for errors that are reported to the user as a single line."""


class ConfigError(CopdsslError, ValueError):
    """An invalid configuration value. The message names the offending key."""


class SubjectError(CopdsslError):
    """A problem with one subject's input or processing.

    Args:
        sid: subject identifier (may be ``None`` when unknown yet).
        reason: short human-readable cause, e.g. ``"truncated gzip stream"``.
        stage: pipeline stage where it happened (``ingest``, ``lung``, ...).
    """

    def __init__(self, sid: str | None, reason: str, stage: str | None = None):
        self.sid = sid
        self.reason = " ".join(str(reason).split())  # always one line
        self.stage = stage
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"subject {self.sid}" if self.sid else "subject ?"
        if self.stage:
            where += f" [{self.stage}]"
        return f"{where}: {self.reason}"
