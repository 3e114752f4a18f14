"""Benchmark: how long `snakemake -n` takes to build the DAG for a large cohort.

A manifest of placeholder image files (empty, never read: a dry run only checks that inputs
exist) is generated for ``--subjects`` subjects, with the default config's runs, poolings and
baselines, and ``snakemake -n --quiet`` is timed in a fresh process (Python start-up and the
Snakefile's parse included), with the default (local) profile and, when the optional [slurm]
extra is installed, with ``--profile profiles/slurm``. No volumes are generated.

    python -m benchmarks.bench_dag [--subjects 1000 10000] [--profiles default slurm]

Writes ``benchmarks/out/dag.json`` and prints a markdown table. Goal: at most 60 s at 10,000
subjects.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import machine, markdown_table, write_result

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = Path(__file__).resolve().parent / "out"
GOAL_S = 60.0


def make_cohort(directory: Path, n_subjects: int) -> Path:
    """Placeholder images, a manifest and a config (default runs, manifest source); returns the config."""
    images = directory / "images"
    images.mkdir(parents=True)
    rows = ["sid\timage\tformat"]
    for i in range(n_subjects):
        sid = f"S{i:06d}"
        (images / f"{sid}.nii.gz").touch()
        rows.append(f"{sid}\timages/{sid}.nii.gz\tnifti")
    (directory / "manifest.tsv").write_text("\n".join(rows) + "\n")
    (directory / "phenotypes.tsv").write_text("sid\tFEV1pp_utah\n")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.pop("synthetic", None)
    config["cohort"] = {"source": "manifest", "manifest": str(directory / "manifest.tsv"),
                        "phenotypes": str(directory / "phenotypes.tsv"), "truth": None}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def time_dry_run(directory: Path, config: Path, profile: str = "default") -> dict:
    """Wall time, CPU time and peak RSS of one `snakemake -n` in a child process.

    ``profile`` "default" is the workflow profile Snakemake loads by itself (profiles/local);
    any other name is passed as ``--profile profiles/<name>``.
    """
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(directory),
               "--configfile", str(config), "-n", "--quiet", "all"]
    if profile != "default":
        command += ["--profile", str(ROOT / "profiles" / profile)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"snakemake -n failed:\n{result.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
            "peak_rss_mb": round(after.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--profiles", nargs="+", default=None,
                        help="default: 'default', plus 'slurm' when the SLURM executor plugin is installed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "dag.json")
    args = parser.parse_args(argv)

    profiles = args.profiles or ["default"] + (["slurm"] if importlib.util.find_spec("snakemake_executor_plugin_slurm")
                                               else [])
    rows = []
    for n in args.subjects:
        with tempfile.TemporaryDirectory(prefix=f"copdssl-dag-{n}-") as tmp:
            config = make_cohort(Path(tmp), n)
            for profile in profiles:
                row = {"subjects": n, "profile": profile, **time_dry_run(Path(tmp), config, profile)}
                rows.append(row)
                print(f"{n} subjects, {profile} profile: {row['wall_s']} s wall, {row['cpu_s']} s CPU, "
                      f"{row['peak_rss_mb']} MB", flush=True)

    write_result(args.out, {"benchmark": "snakemake -n DAG build", "goal_s_at_10000": GOAL_S, "rows": rows,
                            "machine": machine()})
    columns = [("subjects", "subjects"), ("profile", "profile"), ("wall_s", "wall (s)"), ("cpu_s", "CPU (s)"),
               ("peak_rss_mb", "peak RSS (MB)")]
    print("\n" + markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
