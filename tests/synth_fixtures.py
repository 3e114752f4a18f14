"""Helpers for tests that need small synthetic subjects (also usable by other stages' tests).

``small_settings()`` gives a ``synthetic`` config section whose subjects are 96x96x80 voxels
(about 3.5 x 3.5 x 4.3 mm, the whole chest), which renders in well under a second.
``write_small_cohort(tmp_path)`` writes a complete little cohort directory (tables, NIfTI and
DICOM images, labels), e.g. as input for ingest/lung tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.synth.plan import Grid, SubjectPlan, plan_cohort

SMALL_SHAPE_XYZ = [96, 96, 80]


def small_settings(**overrides: Any) -> dict[str, Any]:
    """A complete ``synthetic`` section for small, fast subjects."""
    settings = {"out_dir": "data/synthetic", "n_subjects": 4, "seed": 7, "resolution": "demo",
                "spacing_mm": None, "shape": list(SMALL_SHAPE_XYZ), "dicom_fraction": 0.25,
                "reoriented_fraction": 0.25, "preview_subjects": 2}
    settings.update(overrides)
    return settings


def small_plan(index: int = 1, seed: int = 7, **replace: Any) -> SubjectPlan:
    """Subject ``index`` of a small cohort, with fields replaced (e.g. ``cle=0.2``)."""
    plan = plan_cohort(small_settings(n_subjects=index, seed=seed))[index - 1]
    return dataclasses.replace(plan, **replace) if replace else plan


def box_grid(centre_lps, shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]) -> Grid:
    """An axis-aligned grid of ``shape_zyx`` voxels centred on the world point ``centre_lps`` (x, y, z)."""
    origin = tuple(c - (n - 1) * s / 2.0 for c, n, s in zip(centre_lps, shape_zyx[::-1], spacing_zyx[::-1]))
    return Grid(tuple(shape_zyx), tuple(spacing_zyx), origin)


def write_small_cohort(out_dir: str | Path, n_subjects: int = 3, **overrides: Any) -> Path:
    """Write tables, images and labels of a small cohort to ``out_dir``; returns ``out_dir``."""
    from pipeline.synth.cohort import write_subjects, write_tables

    out_dir = Path(out_dir)
    plans = plan_cohort(small_settings(n_subjects=n_subjects, **overrides))
    write_tables(plans, out_dir)
    failures = write_subjects(plans, out_dir, threads=1)
    if failures:
        raise RuntimeError(f"could not write the small cohort: {failures[0]}")
    return out_dir
