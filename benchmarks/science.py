"""Science benchmark: what the learned features carry, measured against the synthetic cohort's truth.

    python -m benchmarks.science                       # the ladder (rungs marked ladder: true)
    python -m benchmarks.science --rungs all           # every rung of benchmarks/science_rungs.yaml
    python -m benchmarks.science --rungs reference masked --seeds 0 1 2
    python -m benchmarks.science --table               # only assemble the table and figure from saved rungs
    python -m benchmarks.science --quick               # a tiny cohort and a few steps: a smoke test (CI)

A synthetic cohort (``config/science.yaml``: 400 subjects at demo resolution, cohort seed 1002)
is generated and preprocessed once, with the project's own Snakemake workflow, under
``benchmarks/out/science/seed<N>/`` (git-ignored). Each *rung* (``benchmarks/science_rungs.yaml``)
is then run through the same workflow:

- ``kind: ssl``: its ``train`` overrides become runs ``<rung>.s<seed>`` (one per training seed);
  Snakemake trains, embeds, pools and evaluates them (``results/<run>/<pooling>/readout.tsv``:
  the out-of-fold R² of every latent and nuisance factor, and ``metrics.tsv``: the outcomes),
  and, with ``combine: true``, the "densitometry + run" feature sets;
- ``kind: baseline``: a non-learned feature table (densitometry, patch statistics, hand-crafted
  airway statistics, the oracle) evaluated the same way;
- ``kind: supervised``: the supervised upper bound (:mod:`benchmarks.supervised_bound`), whose
  out-of-fold predictions are evaluated by the ``evaluate`` stage.

A rung with ``preprocess`` overrides (e.g. HU calibration at ingest) gets its own work directory,
sharing the cohort. Each rung's result is a small JSON file kept in the repository
(``benchmarks/science/seed<N>/<rung>.json``: per training seed, the mean over CV repeats of
every read-out and outcome R², plus settings, wall time and machine), so the table can be
assembled from rungs run at different times (``--table``): ``benchmarks/science/seed<N>/table.md``
and the figure ``docs/img/science_readout.png``. Learned rows give mean ± sd over training seeds;
baseline rows give mean ± sd over the CV repeats.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import describe_machine
from pipeline.config import deep_merge, validate_config

ROOT = Path(__file__).resolve().parent.parent
RUNGS_FILE = Path(__file__).resolve().parent / "science_rungs.yaml"
RESULTS_DIR = Path(__file__).resolve().parent / "science"
OUT_DIR = Path(__file__).resolve().parent / "out" / "science"
FIGURE = ROOT / "docs" / "img" / "science_readout.png"
BASE_CONFIG = ROOT / "config" / "science.yaml"

# columns of the table: latent factors, nuisance factors (truth.tsv names), outcomes
LATENT = ("cle", "pse", "awt")
NUISANCE = ("density_shift_hu", "noise_hu", "kernel=smooth", "calibration_hu", "lung_height_mm", "scale",
            "rot_z_deg")
OUTCOMES = ("logFEV1pp", "logFEV1FVC")
QUICK = {"synthetic": {"n_subjects": 16}, "atlas": {"build_subjects": 6, "rounds": 1},
         "train": {"steps_per_epoch": 4, "batch_size": 8, "moco": {"queue_size": 16}},
         "evaluate": {"n_folds": 3, "repeats": 1, "inner_folds": 2}}


def load_rungs(path: Path = RUNGS_FILE) -> dict[str, dict[str, Any]]:
    """The ladder: rung name -> definition (kind, teaches, train / baseline / preprocess ...)."""
    rungs = yaml.safe_load(path.read_text())
    for name, rung in rungs.items():
        if rung.get("kind") not in ("ssl", "baseline", "supervised"):
            raise ValueError(f"rung {name}: kind must be ssl, baseline or supervised, got {rung.get('kind')!r}")
        if not isinstance(rung.setdefault("ladder", False), bool):
            raise ValueError(f"rung {name}: ladder must be true or false, got {rung['ladder']!r}")
    for name in rungs:
        rungs[name]["train"] = resolved_train(rungs, name)
    return rungs


def resolved_train(rungs: dict[str, dict[str, Any]], name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A rung's ``train`` overrides with those of the rungs it ``extends`` underneath (deep-merged)."""
    rung = rungs[name]
    parent = rung.get("extends")
    if parent is None:
        return dict(rung.get("train") or {})
    if parent not in rungs or parent in seen:
        raise ValueError(f"rung {name}: extends {parent!r}, which is unknown or circular")
    return deep_merge(resolved_train(rungs, parent, (*seen, name)), rung.get("train") or {})


def rung_settings(cohort_seed: int, rung: str) -> dict[str, Any]:
    """The full training settings its saved record (``benchmarks/science/seed<N>/<rung>.json``)
    gives a learned rung's runs."""
    path = RESULTS_DIR / f"seed{int(cohort_seed)}" / f"{rung}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no saved result {path}: run the rung first (--rungs {rung})")
    return json.loads(path.read_text())["resolved"]


class Cohort:
    """One synthetic cohort and its shared preprocessing, under ``OUT_DIR/seed<N>[-quick]``."""

    def __init__(self, cohort_seed: int, quick: bool):
        self.seed, self.quick = int(cohort_seed), quick
        self.root = OUT_DIR / (f"seed{self.seed}" + ("-quick" if quick else ""))
        base = yaml.safe_load(BASE_CONFIG.read_text())
        base = deep_merge(base, QUICK) if quick else base
        self.base = deep_merge(base, {"synthetic": {"seed": self.seed, "out_dir": str(self.root / "data")}})
        self.results = RESULTS_DIR / (f"seed{self.seed}" + ("-quick" if quick else ""))

    def work_name(self, preprocess: dict[str, Any] | None) -> str:
        if not preprocess:
            return "work"
        digest = hashlib.sha256(json.dumps(preprocess, sort_keys=True).encode()).hexdigest()[:8]
        return f"work-{digest}"

    def config(self, runs: dict[str, Any], preprocess: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full config of one Snakemake call (the cohort's, with ``runs`` and preprocessing overrides)."""
        name = self.work_name(preprocess)
        data = self.root / "data"
        config = deep_merge(self.base, preprocess or {})
        config = deep_merge(config, {
            "work_dir": str(self.root / name), "results_dir": str(self.root / f"results-{name}"),
            "cohort": {"source": "synthetic", "manifest": str(data / "subjects.tsv"),
                       "phenotypes": str(data / "phenotypes.tsv"), "truth": str(data / "truth.tsv")}})
        config["runs"] = runs or {"placeholder": {}}
        # Every key spelled out (schema defaults filled in): the workflow merges this over
        # config/config.yaml, and the demo's settings must not leak into the benchmark.
        return validate_config(config)

    def snakemake(self, config: dict[str, Any], targets: list[str], label: str) -> float:
        """Run the workflow for ``targets`` with ``config``; returns the wall time in seconds."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"config-{label}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        command = [sys.executable, "-m", "snakemake", *targets, "--configfile", str(path), "--cores",
                   str(os.cpu_count() or 1), "--rerun-incomplete", "--quiet"]
        started = time.perf_counter()
        print(f"[science] {label}: snakemake {len(targets)} target(s)", flush=True)
        result = subprocess.run(command, cwd=ROOT, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"snakemake failed for {label} (exit {result.returncode}); see the logs under "
                               f"{config['work_dir']}/logs")
        return time.perf_counter() - started


def _readout_and_metrics(results: Path, name: str, pooling: str) -> dict[str, Any]:
    """Mean and sd over CV repeats of each read-out factor and outcome of one evaluated feature set."""
    import pandas as pd

    directory = results / name / pooling
    readout = pd.read_csv(directory / "readout.tsv", sep="\t").groupby("factor")["r2"].agg(["mean", "std"])
    metrics = pd.read_csv(directory / "metrics.tsv", sep="\t")
    metrics = metrics[metrics["metric"] == "r2"].groupby("outcome")["value"].agg(["mean", "std"])
    out: dict[str, Any] = {}
    for table in (readout, metrics):
        for key, row in table.iterrows():
            out[str(key)] = {"mean": float(row["mean"]), "sd": float(row["std"]) if row["std"] == row["std"] else 0.0}
    return out


def run_rung(cohort: Cohort, name: str, rung: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Run one rung; returns its result record (also written to ``cohort.results/<name>.json``)."""
    from pipeline.baselines import BASELINE_POOLING, combined_name

    preprocess = rung.get("preprocess")
    work = cohort.work_name(preprocess)
    results = cohort.root / f"results-{work}"
    record: dict[str, Any] = {"rung": name, "kind": rung["kind"], "teaches": rung.get("teaches", ""),
                              "cohort_seed": cohort.seed, "quick": cohort.quick,
                              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": describe_machine(), "preprocess": preprocess or {}}
    if rung["kind"] == "baseline":
        baseline = rung["baseline"]
        pooling = BASELINE_POOLING[baseline]
        seconds = cohort.snakemake(cohort.config({}, preprocess), [str(results / baseline / pooling / "readout.tsv")],
                                   name)
        record.update(seconds=round(seconds, 1), seeds={"cv": _readout_and_metrics(results, baseline, pooling)})
    elif rung["kind"] == "ssl":
        poolings = rung.get("pooling", ["mean"])
        runs = {f"{name}.s{seed}": deep_merge(rung.get("train", {}), {"seed": seed}) for seed in seeds}
        config = cohort.config(runs, preprocess)
        config["pool"] = {"methods": poolings}
        targets = [str(results / run / p / "readout.tsv") for run in runs for p in poolings]
        if rung.get("combine"):
            targets += [str(results / combined_name("densitometry", run) / p / "readout.tsv")
                        for run in runs for p in poolings]
        seconds = cohort.snakemake(config, targets, name)
        from pipeline.config import run_settings

        record.update(seconds=round(seconds, 1), settings=rung.get("train", {}),
                      resolved=run_settings(config, next(iter(runs))), seeds={})
        for seed, run in zip(seeds, runs):
            for pooling in poolings:
                key = f"s{seed}" if pooling == "mean" else f"s{seed}/{pooling}"
                record["seeds"][key] = _readout_and_metrics(results, run, pooling)
                if rung.get("combine"):
                    record["seeds"][f"{key}/+densitometry"] = _readout_and_metrics(
                        results, combined_name("densitometry", run), pooling)
    else:
        record.update(_run_supervised(cohort, name, rung, seeds, preprocess))
    cohort.results.mkdir(parents=True, exist_ok=True)
    (cohort.results / f"{name}.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    return record


def _run_supervised(cohort: Cohort, name: str, rung: dict[str, Any], seeds: list[int],
                    preprocess: dict[str, Any] | None) -> dict[str, Any]:
    """Preprocessing and folds through Snakemake, then per seed the supervised bound and ``copdssl evaluate``."""
    from pipeline.config import run_settings

    config = cohort.config({"supervised": rung.get("train", {})}, preprocess)
    work = Path(config["work_dir"])
    results = Path(config["results_dir"])
    seconds = cohort.snakemake(config, [str(work / "folds.tsv")], f"{name}-prep")
    settings = run_settings(config, "supervised")
    steps = int(rung.get("steps", 600)) if not cohort.quick else 3
    evaluate = config["evaluate"]
    out: dict[str, Any] = {"settings": rung.get("train", {}), "steps": steps, "seeds": {}}
    started = time.perf_counter()
    for seed in seeds:
        features = work / "supervised" / f"{name}.s{seed}" / "features.tsv"
        subprocess.run([sys.executable, "-m", "benchmarks.supervised_bound", "--work", str(work),
                        "--truth", config["cohort"]["truth"], "--settings", json.dumps(settings), "--seed", str(seed),
                        "--steps", str(steps), "--out", str(features)], cwd=ROOT, check=True)
        out_dir = results / f"{name}.s{seed}" / "mean"
        subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--features", str(features),
                        "--folds", str(work / "folds.tsv"), "--phenotypes", config["cohort"]["phenotypes"],
                        "--truth", config["cohort"]["truth"], "--out-dir", str(out_dir),
                        "--settings", json.dumps(evaluate)], cwd=ROOT, check=True)
        out["seeds"][f"s{seed}"] = _readout_and_metrics(results, f"{name}.s{seed}", "mean")
    out["seconds"] = round(seconds + time.perf_counter() - started, 1)
    return out


# ------------------------------------------------------------------------------------ table
def summarise(record: dict[str, Any], column: str, suffix: str = "") -> tuple[float, float] | None:
    """(mean, sd) of one column of a rung: over training seeds (learned), or the CV repeats (baselines)."""
    import numpy as np

    cells = [values[column] for key, values in record["seeds"].items()
             if column in values and "/" + key.partition("/")[2] == (suffix or "/")]
    if not cells:
        return None
    if record["kind"] == "baseline":
        return cells[0]["mean"], cells[0]["sd"]
    means = np.array([c["mean"] for c in cells])
    return float(means.mean()), float(means.std(ddof=1)) if len(means) > 1 else 0.0


def rows_of(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """(label, record, key suffix) for every table row: each rung, plus its pooling variants and
    "+ densitometry" rows."""
    rows = []
    for record in records:
        suffixes = sorted({key.split("/", 1)[1] for key in record["seeds"] if "/" in key})
        rows.append((record["rung"], record, ""))
        rows += [(f"{record['rung']} ({suffix})", record, "/" + suffix) for suffix in suffixes]
    return rows


def assemble(results: Path) -> tuple[str, list]:
    """The markdown table of every saved rung of one cohort (in ladder order), and its rows."""
    rungs = load_rungs()
    records = (json.loads(p.read_text()) for p in sorted(results.glob("*.json")))
    saved = {record["rung"]: record for record in records if "rung" in record}  # not e.g. awt_probe.json
    order = [name for name in rungs if name in saved] + sorted(set(saved) - set(rungs))
    records = [saved[name] for name in order]
    columns = [*LATENT, *NUISANCE, *OUTCOMES]
    header = ["rung", "seeds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(columns)]
    rows = rows_of(records)
    for label, record, suffix in rows:
        n = len([k for k in record["seeds"] if "/" + k.partition("/")[2] == (suffix or "/")])
        cells = []
        for column in columns:
            value = summarise(record, column, suffix)
            cells.append("" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}")
        lines.append(f"| {label} | {'CV' if record['kind'] == 'baseline' else n} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def figure(rows, path: Path) -> None:
    """Heat map: read-out R² per factor (columns) per rung (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = [*LATENT, *NUISANCE, *OUTCOMES]
    values = np.full((len(rows), len(columns)), np.nan)
    for i, (_, record, suffix) in enumerate(rows):
        for j, column in enumerate(columns):
            cell = summarise(record, column, suffix)
            values[i, j] = np.nan if cell is None else cell[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(columns), 0.9 + 0.32 * len(rows)))
    image = ax.imshow(np.clip(values, 0, 1), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.axvline(len(LATENT) - 0.5, color="white", lw=2)
    ax.axvline(len(LATENT) + len(NUISANCE) - 0.5, color="white", lw=2)
    ax.set_title("Out-of-fold R² read from the subject features (latent | nuisance | outcomes)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rungs", nargs="+", help="run these rungs ('all': every rung; default: the ladder)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds of learned rungs")
    parser.add_argument("--cohort-seed", type=int, help="generator seed (default: config/science.yaml's)")
    parser.add_argument("--quick", action="store_true", help="a tiny cohort and a few steps (smoke test)")
    parser.add_argument("--table", action="store_true", help="only assemble the table and the figure")
    args = parser.parse_args(argv)

    base_seed = yaml.safe_load(BASE_CONFIG.read_text())["synthetic"]["seed"]
    cohort = Cohort(args.cohort_seed if args.cohort_seed is not None else base_seed, args.quick)
    rungs = load_rungs()
    if not args.table:
        if args.rungs == ["all"]:
            chosen = list(rungs)
        else:
            chosen = args.rungs or [name for name, rung in rungs.items() if rung["ladder"]]
        unknown = sorted(set(chosen) - set(rungs))
        if unknown:
            parser.error(f"unknown rung(s) {', '.join(unknown)}; known: {', '.join(rungs)}")
        seeds = args.seeds[:1] if args.quick else args.seeds
        for name in chosen:
            record = run_rung(cohort, name, rungs[name], seeds)
            print(f"[science] {name}: {record['seconds']:.0f} s", flush=True)
    table, rows = assemble(cohort.results)
    (cohort.results / "table.md").write_text(table + "\n")
    if not args.quick and rows:
        figure(rows, FIGURE)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
