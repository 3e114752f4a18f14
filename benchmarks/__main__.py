"""Run every benchmark and collect their tables into one summary (``make bench``).

    python -m benchmarks [--quick] [--only synth preprocess ...]

Each benchmark runs in its own process (so start-up, memory and threads are its own) and
writes its JSON under ``benchmarks/out/``; this runner captures the markdown table each one
prints and writes ``benchmarks/out/summary.md`` with the commands, the machine and the tables.
BENCHMARKS.md quotes that file. ``--quick`` uses small sizes (a smoke test, not the figures).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import describe_machine

OUT_DIR = Path(__file__).resolve().parent / "out"

# name -> (module, full arguments, quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "synth": ("benchmarks.bench_synth", ["--full"], []),
    "preprocess": ("benchmarks.bench_preprocess", [],
                   ["--resolution", "demo", "--patch-size", "16", "--step", "13", "--spacing", "2.0"]),
    "augment": ("benchmarks.bench_augment", [], ["--sizes", "16", "--rounds", "2"]),
    "train": ("benchmarks.bench_train", ["--device", "auto"], ["--device", "cpu", "--patch-size", "16", "--steps", "3"]),
    "rss": ("benchmarks.bench_rss", [], ["--subjects", "40", "80", "--steps", "10"]),
    "dag": ("benchmarks.bench_dag", [], ["--subjects", "200"]),
    "heads": ("benchmarks.bench_heads", [], ["--n", "1000", "--d", "32"]),
}


def table_of(stdout: str) -> str:
    """The markdown table lines a benchmark printed (the last table if several)."""
    lines = stdout.splitlines()
    blocks, current = [], []
    for line in lines:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return "\n".join("\n".join(block) for block in blocks) if blocks else "(no table printed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the suite")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    args = parser.parse_args(argv)

    sections = [f"# copdssl benchmark summary\n\n{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
                f"{describe_machine()}; load average at start {os.getloadavg()[0]:.2f}.\n"]
    failed = []
    for name in args.only or list(BENCHMARKS):
        module, full, quick = BENCHMARKS[name]
        command = [sys.executable, "-m", module, *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        sys.stdout.write(result.stdout[-4000:])
        if result.returncode != 0:
            failed.append(name)
            sys.stderr.write(result.stderr[-4000:])
        status = "" if result.returncode == 0 else f" **FAILED (exit {result.returncode})**"
        sections.append(f"## {name}{status}\n\n`python -m {module} {' '.join(command[3:])}` ({seconds:.0f} s)\n\n"
                        f"{table_of(result.stdout)}\n")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    summary = OUT_DIR / ("summary_quick.md" if args.quick else "summary.md")
    summary.write_text("\n".join(sections))
    print(f"wrote {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
