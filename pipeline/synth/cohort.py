"""Write the synthetic cohort: tables, images (NIfTI or DICOM) and true lung labels.

Layout under ``out_dir`` (paths in the tables are relative to it)::

    subjects.tsv  phenotypes.tsv  truth.tsv
    images/{sid}.nii.gz  or  images/{sid}/*.dcm
    labels/{sid}.nii.gz

Every file (and every DICOM directory) is written atomically, so a subject that fails to
write leaves the others, and its own previous files, intact.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from pipeline.errors import SubjectError
from pipeline.synth.plan import (PHENOTYPE_COLUMNS, SubjectPlan, phenotype_table, subjects_table,
                                 truth_table)

log = logging.getLogger(__name__)

TABLES = ("subjects.tsv", "phenotypes.tsv", "truth.tsv")


def write_tables(plans: list[SubjectPlan], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``subjects.tsv``, ``phenotypes.tsv`` and ``truth.tsv``; returns their paths."""
    import pandas as pd

    from pipeline.files import write_tsv

    out_dir = Path(out_dir)
    frames = {
        "subjects.tsv": pd.DataFrame(subjects_table(plans), columns=["sid", "image", "format"]),
        "phenotypes.tsv": pd.DataFrame(phenotype_table(plans), columns=list(PHENOTYPE_COLUMNS)),
        "truth.tsv": pd.DataFrame(truth_table(plans)),
    }
    paths = []
    for name, frame in frames.items():
        write_tsv(out_dir / name, frame)
        paths.append(out_dir / name)
    return paths


def write_subject(plan: SubjectPlan, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Render ``plan`` and write its image and label map.

    Returns:
        ``{"sid", "seconds", "right_l", "left_l"}`` (timing and lung volumes, for the log).
    """
    from pipeline.synth.dicom import write_dicom_series
    from pipeline.synth.nifti import write_nifti
    from pipeline.synth.render import lung_volume_litres, render_subject

    start = time.perf_counter()
    out_dir = Path(out_dir)
    rendered = render_subject(plan)
    if plan.format == "dicom":
        write_dicom_series(out_dir / plan.image, rendered.hu, rendered.grid, plan)
        write_nifti(out_dir / plan.label, rendered.labels, rendered.grid)
    else:
        write_nifti(out_dir / plan.image, rendered.hu, rendered.grid, plan.axes, plan.flips)
        write_nifti(out_dir / plan.label, rendered.labels, rendered.grid, plan.axes, plan.flips)
    volumes = lung_volume_litres(rendered)
    return {"sid": plan.sid, "seconds": time.perf_counter() - start,
            "right_l": volumes["right"], "left_l": volumes["left"]}


def _worker_init() -> None:
    """One BLAS/OpenMP thread per worker process: parallelism comes from the processes."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass


def _write_one(plan: SubjectPlan, out_dir: str) -> dict[str, Any]:
    try:
        return write_subject(plan, out_dir)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - reported per subject; the others go on
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        return {"sid": plan.sid, "error": reason}


def write_subjects(plans: list[SubjectPlan], out_dir: str | os.PathLike, threads: int = 1) -> list[SubjectError]:
    """Write the images and labels of ``plans`` with ``threads`` worker processes.

    Returns:
        One :class:`SubjectError` per subject that could not be written (others are complete).
    """
    from pipeline.logs import progress

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    out_dir = str(out_dir)
    failures: list[SubjectError] = []

    def record(result: dict[str, Any]) -> None:
        if "error" in result:
            failure = SubjectError(result["sid"], result["error"], stage="synth")
            failures.append(failure)
            log.error("%s", failure)
        else:
            log.debug("%s written in %.2f s (lungs %.2f + %.2f L)", result["sid"], result["seconds"],
                      result["right_l"], result["left_l"])

    if threads == 1 or len(plans) == 1:
        _worker_init()
        for plan in progress(plans, desc="synthetic subjects", unit="subject"):
            record(_write_one(plan, out_dir))
        return failures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=threads, mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(_write_one, plan, out_dir) for plan in plans]
        for future in progress(as_completed(futures), desc="synthetic subjects", total=len(futures), unit="subject"):
            record(future.result())
    failures.sort(key=lambda f: f.sid)
    return failures
