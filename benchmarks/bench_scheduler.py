"""Benchmark Snakemake's own cost of scheduling the per-subject preprocessing DAG, per scheduler.

A toy workflow with the shape of ours (four per-subject rules in a chain, ingest → lung →
register → patches, with a ``benchmark:`` file per job, then one aggregate rule) and jobs that
only sleep ``--job-seconds`` and ``touch`` their output, so what is left is Snakemake's own work:
the main process's CPU time (``RUSAGE_SELF`` of the process that runs Snakemake in-process) and
the wall time. Each setting runs in a fresh directory with ``--cores 2``, as on the 2-core
machine. Snakemake re-runs its scheduler each time a job ends and, by its default
``--max-jobs-per-timespan 100/1s``, once a second besides; each round looks at every ready job.

    .venv/bin/python -m benchmarks.bench_scheduler --subjects 400                     # scheduling alone
    .venv/bin/python -m benchmarks.bench_scheduler --subjects 100 --job-seconds 0.5   # with waiting

Writes ``benchmarks/out/scheduler.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "lung", "register", "patches")

# The child runs Snakemake in-process and reports its own CPU time (not its jobs').
CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from snakemake.cli import main
    started = time.perf_counter()
    try:
        main(sys.argv[1:])
    except SystemExit as stop:
        code = stop.code
    else:
        code = 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"exit": code, "wall_s": round(time.perf_counter() - started, 1),
                      "snakemake_cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}), file=sys.stderr)
""")


# name -> the Snakemake options of a setting (the last one is profiles/local's).
SETTINGS = {
    "ilp (Snakemake's default)": ["--scheduler", "ilp"],
    "greedy": ["--scheduler", "greedy"],
    "greedy, rounds every 10 s": ["--scheduler", "greedy", "--max-jobs-per-timespan", "1000/10s"],
}


def snakefile(n_subjects: int, job_seconds: float) -> str:
    """A chain of ``STAGES`` per subject and one aggregate rule over the last stage."""
    rules = [f"SIDS = [f'S{{i:05d}}' for i in range({n_subjects})]\n",
             "rule all:\n    input: 'table.tsv'\n"]
    previous = None
    for stage in STAGES:
        source = f"    input: '{previous}/{{sid}}.txt'\n" if previous else ""
        rules.append(f"rule {stage}:\n{source}    output: '{stage}/{{sid}}.txt'\n"
                     f"    benchmark: 'benchmarks/{stage}/{{sid}}.tsv'\n"
                     f"    shell: 'sleep {job_seconds:g}; touch {{output}}'\n")
        previous = stage
    rules.append(f"rule table:\n    input: expand('{previous}/{{sid}}.txt', sid=SIDS)\n    output: 'table.tsv'\n"
                 "    shell: 'touch {output}'\n")
    return "\n".join(rules)


def run_once(n_subjects: int, job_seconds: float, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_scheduler_") as scratch:
        workdir = Path(scratch)
        (workdir / "Snakefile").write_text(snakefile(n_subjects, job_seconds))
        command = [sys.executable, "-c", CHILD, "--snakefile", str(workdir / "Snakefile"), "--directory",
                   str(workdir), "--cores", "2", *SETTINGS[name], "--quiet", "all"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
        report = json.loads(result.stderr.strip().splitlines()[-1])
        if report["exit"] not in (0, None):
            raise RuntimeError(f"snakemake failed with {name}:\n{result.stderr[-2000:]}")
    return {"setting": name, "options": " ".join(SETTINGS[name]), "jobs": n_subjects * len(STAGES) + 1, **report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=400, help="subjects of the toy DAG (default: %(default)s)")
    parser.add_argument("--job-seconds", type=float, default=0.0, help="each job sleeps this long (default: %(default)s)")
    parser.add_argument("--out", help="JSON to write (default: benchmarks/out/scheduler_<subjects>x<seconds>s.json)")
    args = parser.parse_args(argv)
    rows = [run_once(args.subjects, args.job_seconds, name) for name in SETTINGS]
    import snakemake

    record = {"subjects": args.subjects, "job_seconds": args.job_seconds, "snakemake": snakemake.__version__, "machine": platform.machine(),
              "python": platform.python_version(), "rows": rows}
    out = Path(args.out or ROOT / "benchmarks" / "out" / f"scheduler_{args.subjects}x{args.job_seconds:g}s.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.subjects} subjects, {rows[0]['jobs']} jobs of `sleep {args.job_seconds:g}; touch`, --cores 2, "
          f"Snakemake {snakemake.__version__}\n")
    print("| setting | options | wall (s) | Snakemake's own CPU (s) |\n|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | `{row['options']}` | {row['wall_s']} | {row['snakemake_cpu_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
