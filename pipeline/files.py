"""Atomic file output: write to a temporary file in the target directory, then rename.

Readers never see a half-written file, and an interrupted stage leaves the previous
output (or nothing) in place.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffix (``.nii.gz``, ``.npy``...) so that libraries
    choosing a format from the extension behave the same. On error the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; outputs follow the umask
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as pretty-printed JSON (numpy scalars are converted)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write a ``.npy`` file (memory-mappable with ``np.load(mmap_mode='r')``)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Atomically write an uncompressed ``.npz`` archive."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def write_tsv(path: str | os.PathLike, table, columns: Sequence[str] | None = None) -> None:
    """Atomically write a tab-separated file with a header line.

    Args:
        table: a pandas DataFrame (written without its index, floats as ``%.6g``) or a sequence
            of row dicts (values written as ``str`` would; a key a row lacks is an empty cell).
        columns: for row dicts, the column order; keys not named here follow in order of first
            appearance. Ignored for a DataFrame.
    """
    if hasattr(table, "to_csv"):
        with atomic_path(path, suffix=".tsv") as tmp:
            table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        return
    header = list(columns or [])
    for row in table:
        header += [key for key in row if key not in header]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, delimiter="\t", lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(table)
    write_text(path, buffer.getvalue())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
