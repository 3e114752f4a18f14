"""What the trained CNN features carry apart from the histogram bins, per training seed.

    python -m benchmarks.feature_parts --cohort-seed 1002 \
        --runs default_two_window_histogram_direct direct_ifm_e0.5

A diagnostic of the science benchmark for rungs whose bins reach the features unchanged
(``encoder.feature_dim`` = the CNN's width + windows x bins, so the embedding is the CNN's
features followed by the bins; models/histogram.py). The bins have no parameters, so whatever
the training objective changes is in the CNN part: comparing two objectives (plain MoCo and IFM)
on the whole embedding mixes their difference with the identical bins. For every run
``<rung>.s<seed>`` of the cohort, the mean-pooled features (``features_mean.tsv``) are split
into the CNN part and the bins, and each part is read out against the truth with
``StandardScaler + RidgeCV`` (5-fold CV, 3 repeats, as benchmarks.awt_probe). The result (per
seed, and mean ± sd over seeds) goes to ``benchmarks/science/seed<seed>/feature_parts.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import read_out_factors
from benchmarks.science import OUT_DIR, RESULTS_DIR, rung_settings

FACTORS = ("cle", "pse", "awt", "noise_hu", "calibration_hu", "lung_height_mm")


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from models.encoder import histogram_columns
    from pipeline.evaluate import read_feature_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-seed", type=int, default=1002)
    parser.add_argument("--runs", nargs="+", required=True, help="science rungs whose bins bypass the feature layer")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    base = OUT_DIR / f"seed{args.cohort_seed}"
    truth = pd.read_csv(base / "data" / "truth.tsv", sep="\t").set_index("sid")
    result: dict = {"cohort_seed": args.cohort_seed, "factors": FACTORS,
                    "command": f"python -m benchmarks.feature_parts --cohort-seed {args.cohort_seed} "
                               f"--runs {' '.join(args.runs)}", "runs": {}}
    for rung in args.runs:
        n_bins = histogram_columns(rung_settings(args.cohort_seed, rung))
        if n_bins == 0:
            raise SystemExit(f"rung {rung} has no histogram bins to split off")
        per_seed = {}
        for seed in args.seeds:
            features = read_feature_table(base / "work" / "runs" / f"{rung}.s{seed}" / "features_mean.tsv")
            per_seed[f"s{seed}"] = {"cnn": read_out_factors(features.iloc[:, :-n_bins], truth, FACTORS),
                                    "bins": read_out_factors(features.iloc[:, -n_bins:], truth, FACTORS)}
        summary = {part: {factor: [round(float(np.mean([s[part][factor][0] for s in per_seed.values()])), 3),
                                   round(float(np.std([s[part][factor][0] for s in per_seed.values()], ddof=1)), 3)]
                          for factor in FACTORS} for part in ("cnn", "bins")}
        result["runs"][rung] = {"bins_columns": n_bins, "seeds": per_seed, "mean_sd_over_seeds": summary}
    out = RESULTS_DIR / f"seed{args.cohort_seed}" / "feature_parts.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({rung: r["mean_sd_over_seeds"] for rung, r in result["runs"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
