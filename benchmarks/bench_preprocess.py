"""Benchmark the per-subject preprocessing chain ingest → lung → register → patches on one core.

A full-resolution subject of the synthetic cohort (``pipeline.synth``, resolution ``full``:
512×512×~600 voxels at ~0.65 mm) is written as NIfTI. A second subject, rendered straight onto
a ``--spacing`` mm grid and segmented, is the atlas (patch grid S=32, T=26 by default); building
it happens once per cohort and is reported separately, outside the per-subject total.

Each stage then runs through the real CLI (``copdssl <stage> ...``, as the Snakemake rules call
it) in its own child process, pinned to one CPU with one ITK/OpenMP/BLAS thread. For every stage
the parent records the process wall time (interpreter start-up and imports included), the time
spent inside the stage (reported by the child) and the child's peak RSS (``ru_maxrss`` from
``os.wait4``, so each stage is measured on its own). Linux carries a parent's high-water RSS
into a forked child, so the inputs are generated in a separate child process and the parent
stays small; the RSS of an empty interpreter started the same way is reported as the floor.

    .venv/bin/python benchmarks/bench_preprocess.py                       # full size
    .venv/bin/python benchmarks/bench_preprocess.py --resolution demo --patch-size 16 --step 13   # quick

Writes ``benchmarks/out/preprocess.json`` and prints a markdown table. Targets
(../shared/DESIGN.md): ≤ 30 s total wall and ≤ 4 GB peak memory per subject.
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

TARGET_TOTAL_S = 30.0
TARGET_PEAK_MB = 4096.0

# Runs one CLI stage: one CPU, one thread everywhere; prints the in-process stage time as JSON.
CHILD = r"""
import json, os, sys, time
cpus = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpus[int(os.environ.get("BENCH_CPU", "0")) % len(cpus)]})
import SimpleITK as sitk
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
from pipeline.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "stage_s": round(time.perf_counter() - start, 3)}))
"""

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}


def run_stage(argv: list[str]) -> dict:
    """Run ``copdssl <argv>`` in a child; returns wall, in-stage time and the child's own peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **ENV)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = child.stdout.read(), child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0 or not stdout.strip():
        raise SystemExit(f"stage {argv[0]} failed (exit {child.returncode}):\n{stderr[-3000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        raise SystemExit(f"stage {argv[0]} returned {report['code']}:\n{stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "stage_s": round(report["stage_s"], 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def child_rss_floor_mb() -> float:
    """Peak RSS of ``python -c pass`` started like a stage (what every child measures at least)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"], cwd=ROOT)
    _, _, usage = os.wait4(child.pid, 0)
    return round(usage.ru_maxrss / 1024, 1)


def make_inputs(scratch: Path, resolution: str, spacing: float, patch_size: int, step: int, seed: int) -> dict:
    """Write the benchmark subject (raw NIfTI) and the atlas (mask + grid); returns paths and sizes."""
    import SimpleITK as sitk

    from pipeline.atlas import GridSpec, build_grid, crop_atlas
    from pipeline.config import validate_config, validate_section
    from pipeline.ct_io import write_volume
    from pipeline.files import write_npz
    from pipeline.lung import segment_lungs
    from pipeline.synth.cohort import write_subject
    from pipeline.synth.plan import Grid, plan_cohort
    from pipeline.synth.render import render_subject

    settings = validate_config({"synthetic": {"n_subjects": 2, "seed": seed, "resolution": resolution,
                                              "dicom_fraction": 0.0, "reoriented_fraction": 0.0}})["synthetic"]
    subject, atlas_plan = plan_cohort(settings)
    started = time.perf_counter()
    write_subject(subject, scratch / "raw")
    generate_s = time.perf_counter() - started

    started = time.perf_counter()
    g = atlas_plan.grid
    extent = [n * s for n, s in zip(g.shape_zyx, g.spacing_zyx)]
    shape = tuple(int(round(e / spacing)) for e in extent)
    origin = tuple(o - s / 2 + spacing / 2 for o, s in zip(g.origin_lps, g.spacing_zyx[::-1]))
    rendered = render_subject(atlas_plan, Grid(shape, (spacing,) * 3, origin))
    ct = sitk.GetImageFromArray(rendered.hu)
    ct.SetSpacing((spacing,) * 3)
    ct.SetOrigin(origin)
    del rendered
    render_s = time.perf_counter() - started
    started = time.perf_counter()
    spec = GridSpec.from_settings(validate_section("atlas", {"patch_size": patch_size, "step": step}))
    atlas = crop_atlas(segment_lungs(ct, sid=atlas_plan.sid).labels, spec.margin)
    grid = build_grid(atlas, spec)
    write_volume(atlas, scratch / "work" / "atlas" / "atlas_lung.nii.gz")
    write_npz(scratch / "work" / "atlas" / "grid.npz", **grid)
    atlas_s = time.perf_counter() - started
    return {
        "subject": subject.sid, "image": str(scratch / "raw" / subject.image),
        "raw_shape_zyx": list(subject.grid.shape_zyx),
        "raw_spacing_zyx": [round(s, 4) for s in subject.grid.spacing_zyx],
        "atlas_subject": atlas_plan.sid, "patches_in_grid": int(len(grid["corners"])),
        "setup_s": {"generate_subject": round(generate_s, 1), "render_atlas_subject": round(render_s, 1),
                    "atlas_once": round(atlas_s, 2)},
        "atlas_shape_zyx": [int(n) for n in sitk.GetArrayViewFromImage(atlas).shape],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", choices=("full", "demo"), default="full", help="synthetic resolution preset")
    parser.add_argument("--spacing", type=float, default=1.0, help="ingest spacing in mm (default %(default)s)")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--step", type=int, default=26)
    parser.add_argument("--seed", type=int, default=2021, help="synthetic cohort seed")
    parser.add_argument("--scratch", help="working directory (default: a temporary directory, removed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "preprocess.json"))
    parser.add_argument("--prepare-only", metavar="JSON", help=argparse.SUPPRESS)  # internal: child that makes inputs
    args = parser.parse_args(argv)

    if args.prepare_only:
        inputs = make_inputs(Path(args.scratch), args.resolution, args.spacing, args.patch_size, args.step, args.seed)
        Path(args.prepare_only).write_text(json.dumps(inputs))
        return 0

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        prepared = scratch / "inputs.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--resolution", args.resolution,
                        "--spacing", str(args.spacing), "--patch-size", str(args.patch_size), "--step", str(args.step),
                        "--seed", str(args.seed), "--scratch", str(scratch), "--prepare-only", str(prepared)],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
        inputs = json.loads(prepared.read_text())
        sid, w = "BENCH", scratch / "work"
        settings = {
            "ingest": {"spacing_mm": args.spacing, "spacing_tolerance": 0.05, "min_slices": 16},
            "lung": {"threshold_hu": -400.0, "min_lung_volume_ml": 500.0},
            "register": {"iterations": 200, "shrink_factors": [4, 2, 1]},
            "patches": {"clip_hu": [-1024, 240]},
        }
        status = {stage: str(w / "qc" / stage / f"{sid}.json") for stage in settings}
        stages = {
            "ingest": ["ingest", "--sid", sid, "--image", inputs["image"], "--format", "nifti",
                       "--out", str(w / "ct" / f"{sid}.nii.gz"), "--status", status["ingest"]],
            "lung": ["lung", "--sid", sid, "--ct", str(w / "ct" / f"{sid}.nii.gz"), "--upstream", status["ingest"],
                     "--out", str(w / "lung" / f"{sid}.nii.gz"), "--density", str(w / "density" / f"{sid}.json"),
                     "--status", status["lung"]],
            "register": ["register", "--sid", sid, "--lung", str(w / "lung" / f"{sid}.nii.gz"),
                         "--atlas", str(w / "atlas" / "atlas_lung.nii.gz"), "--upstream", status["lung"],
                         "--out", str(w / "transforms" / f"{sid}.tfm"), "--status", status["register"]],
            "patches": ["patches", "--sid", sid, "--ct", str(w / "ct" / f"{sid}.nii.gz"),
                        "--transform", str(w / "transforms" / f"{sid}.tfm"), "--grid", str(w / "atlas" / "grid.npz"),
                        "--lung", str(w / "lung" / f"{sid}.nii.gz"), "--upstream", status["register"],
                        "--out", str(w / "patches" / f"{sid}.npy"), "--status", status["patches"]],
        }
        results = {}
        floor = child_rss_floor_mb()
        for stage, command in stages.items():
            results[stage] = run_stage([*command, "--settings", json.dumps(settings[stage]),
                                        "--log", str(w / "logs" / f"{stage}.log")])
            qc = json.loads(Path(status[stage]).read_text())
            if qc["status"] != "ok":
                raise SystemExit(f"stage {stage} did not succeed: {qc.get('reason')}")
            results[stage]["qc"] = {k: v for k, v in qc.items() if k not in ("sid", "stage", "status")}
        total_wall = round(sum(r["wall_s"] for r in results.values()), 2)
        total_stage = round(sum(r["stage_s"] for r in results.values()), 2)
        peak = max(r["peak_rss_mb"] for r in results.values())
        report = {
            "command": " ".join(["python", "benchmarks/bench_preprocess.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_1m": round(os.getloadavg()[0], 2)},
            "settings": {"resolution": args.resolution, "spacing_mm": args.spacing, "patch_size": args.patch_size,
                         "step": args.step, **settings},
            "inputs": inputs,
            "stages": results,
            "total": {"wall_s": total_wall, "stage_s": total_stage, "peak_rss_mb": peak},
            "empty_interpreter_rss_mb": floor,
            "targets": {"total_wall_s": TARGET_TOTAL_S, "peak_rss_mb": TARGET_PEAK_MB,
                        "met": bool(total_wall <= TARGET_TOTAL_S and peak <= TARGET_PEAK_MB)},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"Subject {inputs['subject']}: raw {'×'.join(map(str, inputs['raw_shape_zyx'][::-1]))} voxels at "
          f"{inputs['raw_spacing_zyx'][::-1]} mm → {args.spacing} mm; grid of {inputs['patches_in_grid']} patches "
          f"(S={args.patch_size}, T={args.step}); atlas built once in {inputs['setup_s']['atlas_once']} s\n")
    print("| stage | wall (s, incl. start-up) | in stage (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for stage, r in results.items():
        print(f"| {stage} | {r['wall_s']:.2f} | {r['stage_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    print(f"| **total** | **{total_wall:.2f}** | **{total_stage:.2f}** | **{peak:.0f}** (max) |")
    print(f"\n(an empty interpreter started the same way peaks at {floor:.0f} MB)")
    print(f"targets: ≤ {TARGET_TOTAL_S:.0f} s, ≤ {TARGET_PEAK_MB:.0f} MB -> "
          f"{'met' if report['targets']['met'] else 'NOT met'}; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
