"""Small pieces the benchmark scripts share: machine facts, the JSON result, the markdown table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU count, platform and the load average now (timings on a loaded machine are pessimistic)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A right-aligned markdown table of ``rows`` with ``columns`` given as (key, header) pairs."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
