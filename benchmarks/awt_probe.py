"""Do the stored patches carry airway-wall thickness (awt)? A diagnostic of the science benchmark.

    python -m benchmarks.awt_probe [--cohort-seed 1002]

For every subject of the science benchmark's preprocessed cohort
(``benchmarks/out/science/seed<seed>/``), it computes eight hand-written high-attenuation
statistics of the lung voxels of all its stored patches (the share of lung voxels above -700,
-500, -300 and -100 HU; the 85th, 90th, 95th and 99th HU percentiles), and reads the true ``awt``
from them with ``StandardScaler + RidgeCV`` (5-fold CV, 3 repeats). A high R² means the
information is in what the encoder sees, so an encoder that cannot be taught awt (the supervised
rung) is limited by itself, its input normalisation or its pooling, not by the patches.
The result goes to ``benchmarks/science/seed<seed>/awt_probe.json`` (docs/science.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.science import OUT_DIR, RESULTS_DIR

THRESHOLDS_HU = (-700, -500, -300, -100)
PERCENTILES = (85, 90, 95, 99)


def subject_statistics(patches: np.ndarray, masks: np.ndarray) -> list[float]:
    """The eight statistics of the lung voxels of one subject's patches ``[P, S, S, S]`` (HU, bool masks)."""
    lung = patches[masks].astype(np.float32)
    return [float((lung > t).mean()) for t in THRESHOLDS_HU] + [float(v) for v in np.percentile(lung, PERCENTILES)]


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import RepeatedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.patches import unpack_masks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-seed", type=int, default=1002)
    args = parser.parse_args(argv)
    base = OUT_DIR / f"seed{args.cohort_seed}"
    truth = pd.read_csv(base / "data" / "truth.tsv", sep="\t").set_index("sid")
    rows = {}
    for path in sorted((base / "work" / "patches").glob("*.npy")):
        if path.stat().st_size == 0:
            continue  # a tombstone: the subject failed preprocessing
        patches = np.load(path)
        masks = unpack_masks(np.load(base / "work" / "patches_lung" / path.name), patches.shape[-1]).astype(bool)
        rows[path.stem] = subject_statistics(patches, masks)
    features = pd.DataFrame.from_dict(rows, orient="index")
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    scores = cross_val_score(model, features, truth.loc[features.index, "awt"],
                             cv=RepeatedKFold(n_splits=5, n_repeats=3, random_state=0), scoring="r2")
    result = {"cohort_seed": args.cohort_seed, "subjects": len(features), "awt_r2_mean": round(float(scores.mean()), 3),
              "awt_r2_sd": round(float(scores.std(ddof=1)), 3), "thresholds_hu": THRESHOLDS_HU,
              "percentiles": PERCENTILES, "command": "python -m benchmarks.awt_probe"}
    out = RESULTS_DIR / f"seed{args.cohort_seed}" / "awt_probe.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
