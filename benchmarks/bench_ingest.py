"""Benchmark stage ``ingest`` on a full-resolution CT, from NIfTI and from DICOM, on one core.

Makes a synthetic chest volume (default 512×512×600 int16 at 0.65×0.65×0.6 mm, the size of a
COPDGene scan) with ``tests/ct_fixtures.py``, writes it once as ``.nii.gz`` (stored RAS, as
dcm2niix does) and once as a DICOM series (one file per slice), then ingests each to isotropic
``--spacing`` mm in a fresh child process pinned to one CPU with one ITK/OpenMP thread. Each
child reports its wall time (read → resample → write, Python start-up excluded) and its peak
RSS (``ru_maxrss``, which includes the interpreter and imported libraries).

    .venv/bin/python benchmarks/bench_ingest.py                 # full size, ~2 GB of scratch disk
    .venv/bin/python benchmarks/bench_ingest.py --shape 150 160 160 --voxel 1.6 1.6 1.6   # quick

Results go to ``benchmarks/out/ingest.json``. Target (docs/DESIGN.md): the whole
preprocessing chain (ingest → patches) ≤ 30 s and ≤ 4 GB per subject on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, resource, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import SimpleITK as sitk
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
from pipeline.config import validate_section
from pipeline.ingest import ingest_subject
image, fmt, out, spacing = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
start = time.perf_counter()
qc = ingest_subject("bench", image, fmt, out, **validate_section("ingest", {"spacing_mm": spacing, "min_slices": 1}))
wall = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mb": round(peak_mb, 1), "qc": qc}))
"""


def _ingest_in_child(image: Path, fmt: str, out: Path, spacing: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", CHILD, str(image), fmt, str(out), str(spacing)],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"ingest of {fmt} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _import_seconds(repeats: int = 3) -> float:
    """Best-of wall time of ``python -c "import pipeline.ingest"`` (interpreter start included)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import pipeline.ingest"], cwd=ROOT, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        best = min(best, time.perf_counter() - start)
    return round(best, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(600, 512, 512), metavar=("NZ", "NY", "NX"))
    parser.add_argument("--voxel", type=float, nargs=3, default=(0.65, 0.65, 0.6), metavar=("SX", "SY", "SZ"),
                        help="input voxel size (x, y, z) in mm")
    parser.add_argument("--spacing", type=float, default=1.0, help="output isotropic spacing in mm")
    parser.add_argument("--formats", nargs="+", choices=("nifti", "dicom"), default=("nifti", "dicom"))
    parser.add_argument("--scratch", help="directory for the inputs (default: a temporary directory)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "ingest.json"))
    args = parser.parse_args(argv)

    from pipeline.files import write_json
    from tests.ct_fixtures import phantom_hu, write_dicom_series, write_nifti

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_ingest_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        volume = phantom_hu(tuple(args.shape), seed=0, padding=True)
        origin = (-(args.shape[2] - 1) / 2 * args.voxel[0], -(args.shape[1] - 1) / 2 * args.voxel[1], -300.0)
        inputs = {}
        if "nifti" in args.formats:
            inputs["nifti"] = write_nifti(scratch / "raw.nii.gz", volume, args.voxel, origin, code="RAS")
        if "dicom" in args.formats:
            inputs["dicom"] = write_dicom_series(scratch / "dicom", volume, args.voxel, origin, code="LPS",
                                                 extra_files=False)
        del volume
        print(f"inputs written in {time.perf_counter() - start:.1f} s to {scratch}", file=sys.stderr)

        results = {}
        for fmt, image in inputs.items():
            results[fmt] = _ingest_in_child(image, fmt, scratch / f"ct_{fmt}.nii.gz", args.spacing)
            print(f"{fmt}: {results[fmt]['wall_s']} s, peak RSS {results[fmt]['peak_rss_mb']} MB", file=sys.stderr)
        report = {
            "benchmark": "ingest",
            "command": "python benchmarks/bench_ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "input_shape_zyx": list(args.shape),
            "input_voxel_xyz_mm": list(args.voxel),
            "output_spacing_mm": args.spacing,
            "threads": 1,
            "import_pipeline_ingest_s": _import_seconds(),
            "results": results,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)},
            "note": "wall time excludes Python start-up; peak RSS includes interpreter and libraries",
        }
        write_json(args.out, report)
        print(json.dumps({k: report[k] for k in ("import_pipeline_ingest_s", "results")}, indent=1, default=str)[:2000])
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
