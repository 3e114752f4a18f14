"""Validation figures of a finished demo run (`make run`) against the synthetic ground truth.

    python -m benchmarks.check_demo [--work work] [--data data/synthetic]

Prints: lung-segmentation Dice against the generator's true labels (resampled to the ingested
CT grid with nearest neighbour), registration Dice from the register statuses, and the Spearman
correlation of LAA-950 with the true cle + pse over the cohort. Writes benchmarks/out/demo_checks.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out" / "demo_checks.json"


def lung_dice(lung_path: Path, truth_path: Path) -> float:
    """Dice of lung (labels > 0) against the true labels resampled onto the lung mask grid."""
    import SimpleITK as sitk

    lung = sitk.ReadImage(str(lung_path))
    truth = sitk.ReadImage(str(truth_path))  # NIfTI RAS affine -> ITK LPS geometry
    truth = sitk.Resample(truth, lung, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a, b = sitk.GetArrayViewFromImage(lung) > 0, sitk.GetArrayViewFromImage(truth) > 0
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    args = parser.parse_args(argv)

    import pandas as pd
    from scipy.stats import spearmanr

    truth = pd.read_csv(args.data / "truth.tsv", sep="\t").set_index("sid")
    rows = []
    for sid in truth.index:
        status = json.loads((args.work / "qc" / "register" / f"{sid}.json").read_text())
        if status["status"] != "ok":
            continue
        density = json.loads((args.work / "density" / f"{sid}.json").read_text())["total"]
        dice = lung_dice(args.work / "lung" / f"{sid}.nii.gz",
                         args.data / "labels" / f"{sid}.nii.gz")
        rows.append({"sid": sid, "lung_dice": dice, "register_dice": status["dice"], "laa950": density["laa950"],
                     "cle_pse": truth.loc[sid, "cle"] + truth.loc[sid, "pse"]})
    table = pd.DataFrame(rows)
    rho = spearmanr(table["laa950"], table["cle_pse"]).statistic
    result = {"subjects": len(table),
              "lung_dice": {"min": table.lung_dice.min(), "median": table.lung_dice.median()},
              "register_dice": {"min": table.register_dice.min(), "median": table.register_dice.median()},
              "spearman_laa950_vs_cle_plus_pse": rho}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"{len(table)} subjects: lung Dice min {table.lung_dice.min():.3f} median {table.lung_dice.median():.3f}; "
          f"registration Dice min {table.register_dice.min():.3f} median {table.register_dice.median():.3f}; "
          f"Spearman(LAA-950, cle+pse) {rho:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
