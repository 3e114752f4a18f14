"""Benchmark: host memory of `copdssl train` does not grow with the cohort size.

For each cohort size a ``work/`` directory of random int16 patch files is written
(``benchmarks.bench_train.make_work_dir``), then the real stage (``copdssl train``) runs the
same number of steps on it in a child process; its peak RSS (``ru_maxrss`` via ``os.wait4``) is
recorded. Patches are memory-mapped, so the peak should be flat in the number of subjects: only
the patches of the batches actually drawn are paged in.

    python -m benchmarks.bench_rss [--subjects 100 1000] [--locations 128] [--patch-size 16] [--steps 100]

Writes ``benchmarks/out/rss.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, markdown_table, write_result

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = Path(__file__).resolve().parent / "out"


def train_settings(steps: int, batch_size: int) -> str:
    from pipeline.config import run_settings, validate_config

    config = validate_config({"train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": batch_size,
                                        "device": "cpu", "moco": {"queue_size": 64}},
                              "runs": {"rss": {}}})
    return json.dumps(run_settings(config, "rss"))


def peak_rss_of(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process."""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: the child can never block on it
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} failed:\n{errors.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--locations", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "rss.json")
    args = parser.parse_args(argv)

    from benchmarks.bench_train import make_work_dir

    settings = train_settings(args.steps, args.batch_size)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    rows = []
    for n in args.subjects:
        with tempfile.TemporaryDirectory(prefix=f"copdssl-rss-{n}-") as tmp:
            work = Path(tmp) / "work"
            make_work_dir(work, n, args.locations, args.patch_size)
            cohort_mb = sum(p.stat().st_size for p in (work / "patches").iterdir()) / 2**20
            wall, rss = peak_rss_of([sys.executable, "-m", "pipeline", "train", "--run", "rss",
                                     "--subjects", str(work / "subjects.tsv"), "--work", str(work),
                                     "--settings", settings], env)
        rows.append({"subjects": n, "patch_files_mb": round(cohort_mb, 1), "train_peak_rss_mb": round(rss, 1),
                     "wall_s": round(wall, 1)})
        print(f"{n} subjects ({cohort_mb:.0f} MB of patches): peak RSS {rss:.0f} MB, {wall:.1f} s", flush=True)

    write_result(args.out, {"benchmark": "copdssl train host RSS vs cohort size", "steps": args.steps,
                            "batch_size": args.batch_size, "locations": args.locations,
                            "patch_size": args.patch_size, "rows": rows, "machine": machine()})
    print("\n" + markdown_table(rows, [("subjects", "subjects"), ("patch_files_mb", "patch files (MB)"),
                                       ("train_peak_rss_mb", "train peak RSS (MB)"), ("wall_s", "wall (s)")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
