"""Benchmark: cross-validated outcome heads at cohort scale.

One CV repeat (5 folds) of the ``evaluate`` stage's heads on a synthetic feature table of
``--n`` subjects x ``--d`` features with the 5 default outcomes (2 regression: RidgeHead;
3 ordinal with 6, 3 and 5 levels: OrdinalHead with the PCA-component search). The issue's
target is 10,000 x 128 in at most 60 s on 2 cores.

    python -m benchmarks.bench_heads [--n 10000] [--d 128] [--jobs 1]

Writes ``benchmarks/out/heads.json`` and ``benchmarks/out/heads.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np

OUT_DIR = Path(__file__).resolve().parent / "out"
GOAL_S = 60.0

SETTINGS = MappingProxyType({
    "n_folds": 5, "seed": 7, "repeats": 1, "stratify": "Emph_Severity", "inner_folds": 3,
    "ridge_alphas": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], "pca_components": [2, 4, 8, 16],
    "outcomes": {
        "logFEV1pp": {"column": "FEV1pp_utah", "kind": "regression", "transform": "log"},
        "logFEV1FVC": {"column": "FEV1_FVC_utah", "kind": "regression", "transform": "log"},
        "CLE": {"column": "Emph_Severity", "kind": "ordinal", "levels": 6},
        "Paraseptal": {"column": "Emph_Paraseptal", "kind": "ordinal", "levels": 3},
        "mMRC": {"column": "MMRCDyspneaScor", "kind": "ordinal", "levels": 5},
    },
})


def synthetic_cohort(n: int, d: int, seed: int = 0):
    """Features ``[n, d]`` driven by 3 latent factors, and COPDGene-like phenotypes from them."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 3))  # cle, pse, awt
    X = latent @ rng.standard_normal((3, d)) + 2.0 * rng.standard_normal((n, d))
    lung = latent @ np.array([-0.6, -0.3, -0.5])

    def ordinal(z, cuts):
        return np.digitize(z + rng.logistic(size=n) * 0.6, cuts).astype(float)

    sids = [f"B{i:05d}" for i in range(n)]
    phenotypes = pd.DataFrame({
        "FEV1pp_utah": np.exp(4.3 + 0.15 * lung + 0.12 * rng.standard_normal(n)),
        "FEV1_FVC_utah": np.exp(-0.35 + 0.08 * lung + 0.06 * rng.standard_normal(n)),
        "Emph_Severity": ordinal(latent[:, 0], [-1.0, -0.3, 0.3, 0.9, 1.5]),
        "Emph_Paraseptal": ordinal(latent[:, 1], [0.0, 1.0]),
        "MMRCDyspneaScor": ordinal(-lung, [-0.5, 0.2, 0.8, 1.4]),
    }, index=pd.Index(sids, name="sid"))
    return sids, X, phenotypes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="subjects (default: %(default)s)")
    parser.add_argument("--d", type=int, default=128, help="features (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes for the fits (default: %(default)s; 2 workers pay their start-up)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)

    from pipeline.evaluate import cross_validate, outcome_values, outcomes_from_settings, score
    from pipeline.files import write_json, write_text
    from pipeline.folds import make_folds

    sids, X, phenotypes = synthetic_cohort(args.n, args.d)
    outcomes = outcomes_from_settings(SETTINGS)
    targets = {o.name: (o.kind, outcome_values(phenotypes, o, sids)) for o in outcomes}

    start = time.perf_counter()
    folds = make_folds(sids, phenotypes["Emph_Severity"].tolist(), n_folds=5, repeats=1, seed=SETTINGS["seed"])
    predictions = cross_validate(sids, X, folds, targets, SETTINGS, n_jobs=args.jobs, desc="bench heads")
    metrics = score(predictions, {name: kind for name, (kind, _) in targets.items()})
    total = time.perf_counter() - start

    # per-kind timing of single outer-fold fits with one BLAS thread (as in the joblib workers)
    from threadpoolctl import threadpool_limits

    from pipeline.evaluate import make_head

    train = folds.index[folds["fold"] != 0].to_numpy()
    per_fit = {}
    for kind, name in (("regression", "logFEV1pp"), ("ordinal", "CLE")):
        y = targets[name][1].to_numpy()
        with threadpool_limits(1):
            make_head(kind, SETTINGS).fit(X[train[:200]], y[train[:200]])  # warm-up: lazy imports
            t0 = time.perf_counter()
            make_head(kind, SETTINGS).fit(X[train], y[train])
            per_fit[kind] = time.perf_counter() - t0

    result = {
        "n_subjects": args.n, "n_features": args.d, "outcomes": len(outcomes), "folds": 5, "repeats": 1,
        "jobs": args.jobs, "wall_s": round(total, 2), "goal_s": GOAL_S, "within_goal": total <= GOAL_S,
        "single_fit_s": {k: round(v, 3) for k, v in per_fit.items()},
        "metrics": {f"{r.outcome}/{r.metric}": round(float(r.value), 4) for r in metrics.itertuples()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / "heads.json", result)
    lines = [
        "# Outcome heads benchmark", "",
        f"`python -m benchmarks.bench_heads --n {args.n} --d {args.d} --jobs {args.jobs}`", "",
        "| subjects | features | outcomes | folds x repeats | jobs | wall (s) | goal (s) |",
        "|---|---|---|---|---|---|---|",
        f"| {args.n} | {args.d} | {len(outcomes)} | 5 x 1 | {args.jobs} | {total:.1f} | {GOAL_S:.0f} |", "",
        f"One outer-fold fit (8,000 rows, one BLAS thread): RidgeHead {per_fit['regression']:.2f} s, "
        f"OrdinalHead {per_fit['ordinal']:.2f} s. Load average at the end: {result['load_average_1min']} "
        f"on {result['cpu_count']} cores (other processes share the machine: figures are contended).", "",
        "| outcome/metric | value |", "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in result["metrics"].items()], "",
    ]
    write_text(args.out_dir / "heads.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
