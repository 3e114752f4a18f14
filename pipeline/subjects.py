"""Subject identifiers and the image manifest.

A subject ID ends up in file names, so it must be safe: letters, digits, ``.``, ``_``, ``-``,
starting with a letter or digit, at most 64 characters. Manifest rows with an unsafe or
duplicated ID are rejected (all rows sharing a duplicated ID, since it is ambiguous which one
is meant) and reported in the QC table; the other subjects go on.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, SubjectError

SID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
IMAGE_FORMATS = ("nifti", "dicom")


@dataclass(frozen=True)
class Subject:
    """One row of the manifest: subject ID, path to its raw image and the image format."""

    sid: str
    image: str
    format: str


@dataclass(frozen=True)
class Rejection:
    """A manifest row that cannot be processed, with the reason."""

    sid: str
    reason: str


def check_sid(sid: str) -> str:
    """Return ``sid`` if it is safe to use in a file name, else raise :class:`SubjectError`."""
    if not isinstance(sid, str) or not SID_PATTERN.match(sid) or ".." in sid:
        if isinstance(sid, str) and ("/" in sid or "\\" in sid):
            cause = "contains a path separator"
        elif not sid:
            cause = "is empty"
        else:
            cause = "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} without '..'"
        raise SubjectError(repr(sid), f"unsafe subject ID: {cause}", stage="manifest")
    return sid


def guess_format(image: str) -> str:
    """``dicom`` for a directory, ``nifti`` for ``.nii``/``.nii.gz`` (by name only)."""
    name = image.lower().rstrip("/")
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    return "dicom"


def screen_subjects(rows: list[dict[str, str]], base_dir: str | os.PathLike = ".") -> tuple[list[Subject], list[Rejection]]:
    """Split manifest rows into accepted subjects and rejections.

    Args:
        rows: dicts with keys ``sid``, ``image`` and optionally ``format``.
        base_dir: directory that relative image paths are relative to.

    Returns:
        (subjects in manifest order, rejected rows with reasons)
    """
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("sid", "")] = counts.get(row.get("sid", ""), 0) + 1

    subjects: list[Subject] = []
    rejections: list[Rejection] = []
    for row in rows:
        sid = (row.get("sid") or "").strip()
        try:
            check_sid(sid)
        except SubjectError as error:
            rejections.append(Rejection(sid, error.reason))
            continue
        if counts[row.get("sid", "")] > 1:
            rejections.append(Rejection(sid, f"duplicate subject ID: appears {counts[row['sid']]} times in the manifest"))
            continue
        image = (row.get("image") or "").strip()
        if not image:
            rejections.append(Rejection(sid, "no image path in the manifest"))
            continue
        fmt = (row.get("format") or "").strip().lower() or guess_format(image)
        if fmt not in IMAGE_FORMATS:
            rejections.append(Rejection(sid, f"unknown image format {fmt!r} (expected nifti or dicom)"))
            continue
        if not os.path.isabs(image):
            image = os.path.normpath(os.path.join(base_dir, image))
        subjects.append(Subject(sid, image, fmt))
    return subjects, rejections


def read_manifest(path: str | os.PathLike) -> tuple[list[Subject], list[Rejection]]:
    """Read a tab-separated manifest (columns ``sid``, ``image``, optional ``format``).

    Relative image paths are taken relative to the manifest's directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"sid", "image"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"manifest {path} lacks column(s): {', '.join(sorted(missing))}")
        rows = list(reader)
    return screen_subjects(rows, base_dir=path.parent)
