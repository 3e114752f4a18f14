"""Benchmark: render + write one synthetic subject on ONE core (demo, and with --full full resolution).

    python -m benchmarks.bench_synth [--full] [--out benchmarks/out/synth.json]

Each case runs in a fresh subprocess with OMP/OpenBLAS/MKL threads set to 1. Like a worker of
the cohort rule, which renders many subjects, it first renders SYN0002 (reported separately as
the first render in the process: imports and first-call set-up), then times subject SYN0001
(NIfTI, and forced to DICOM): render, image and label writes to a temporary directory. The
peak resident memory (``ru_maxrss``) of that process is reported too.
Targets (docs/synthetic_cohort.md): demo <= 1 s, full resolution <= 20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _case(resolution: str, fmt: str) -> dict:
    """Run one case in this process (called in a subprocess) and return its timings."""
    import dataclasses
    import resource
    import time

    from pipeline.synth.dicom import write_dicom_series
    from pipeline.synth.nifti import write_nifti
    from pipeline.synth.plan import plan_cohort
    from pipeline.synth.render import render_subject

    warmup, plan = plan_cohort({"n_subjects": 2, "seed": 2021, "resolution": resolution})[::-1]
    plan = dataclasses.replace(plan, format=fmt, image=f"images/{plan.sid}" + ("" if fmt == "dicom" else ".nii.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        # The cohort rule's worker processes render many subjects each: time one subject in a
        # process that has already rendered another (imports and first-call set-up excluded).
        cold = time.perf_counter()
        render_subject(warmup)
        cold_s = time.perf_counter() - cold
        start = time.perf_counter()
        rendered = render_subject(plan)
        rendered_at = time.perf_counter()
        if fmt == "dicom":
            write_dicom_series(Path(tmp) / plan.image, rendered.hu, rendered.grid, plan)
        else:
            write_nifti(Path(tmp) / plan.image, rendered.hu, rendered.grid, plan.axes, plan.flips)
        image_at = time.perf_counter()
        write_nifti(Path(tmp) / plan.label, rendered.labels, rendered.grid, plan.axes, plan.flips)
        done = time.perf_counter()
    return {"resolution": resolution, "format": fmt, "shape_zyx": list(plan.grid.shape_zyx),
            "spacing_zyx": [round(s, 4) for s in plan.grid.spacing_zyx],
            "render_s": round(rendered_at - start, 3), "write_image_s": round(image_at - rendered_at, 3),
            "write_label_s": round(done - image_at, 3), "total_s": round(done - start, 3),
            "first_render_in_process_s": round(cold_s, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also benchmark a full-resolution subject")
    parser.add_argument("--out", default="benchmarks/out/synth.json", help="JSON result (default: %(default)s)")
    parser.add_argument("--case", nargs=2, metavar=("RESOLUTION", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # child process
        print(json.dumps(_case(*args.case)))
        return 0
    cases = [("demo", "nifti"), ("demo", "dicom")]
    if args.full:
        cases += [("full", "nifti"), ("full", "dicom")]
    env = {**os.environ, **SINGLE_THREAD_ENV}
    results = []
    for resolution, fmt in cases:
        cmd = [sys.executable, "-m", "benchmarks.bench_synth", "--case", resolution, fmt]
        if resolution == "full" or os.cpu_count() and os.cpu_count() > 1:
            cmd = ["taskset", "-c", "0", *cmd] if _has_taskset() else cmd
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report = {"command": "python -m benchmarks.bench_synth" + (" --full" if args.full else ""),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_1m": os.getloadavg()[0]},
              "threads": 1, "results": results}
    from pipeline.files import write_json

    write_json(args.out, report)
    print("| resolution | format | shape (z,y,x) | render s | write image s | write label s | total s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['resolution']} | {r['format']} | {'x'.join(map(str, r['shape_zyx']))} | {r['render_s']} | "
              f"{r['write_image_s']} | {r['write_label_s']} | {r['total_s']} | {r['peak_rss_mb']} |")
    print(f"\n(load average at the end: {report['machine']['load_avg_1m']:.2f}; written to {args.out})")
    return 0


def _has_taskset() -> bool:
    from shutil import which

    return which("taskset") is not None


if __name__ == "__main__":
    raise SystemExit(main())
