"""Do the stored patches carry the disease, and in a form a CNN with mean pooling can express?

    python -m benchmarks.awt_probe [--cohort-seed 1002]

A diagnostic of the science benchmark. For every subject of its preprocessed cohort
(``benchmarks/out/science/seed<seed>/``), two hand-written feature sets of the stored patches
are read out against the truth (``cle``, ``pse``, ``awt``) with ``StandardScaler + RidgeCV``
(5-fold CV, 3 repeats):

- ``high_attenuation``: eight statistics of the *lung voxels* of all its patches (the share above
  -700, -500, -300 and -100 HU; the 85th, 90th, 95th and 99th HU percentiles);
- ``voxel_counts``: the share of *all* voxels of the lung-masked patches (non-lung voxels at the
  encoder's fill value, ``PatchInput.fill_hu`` = -850 HU) above eight thresholds from -950 to
  -100 HU. Each is a per-voxel step function averaged over the patch and then over the
  locations: what one convolution with a steep nonlinearity, global average pooling and mean
  pooling over locations can express.

A high R² means the information is in what the encoder sees, in a form its architecture can
hold; an encoder that cannot be *taught* it (the supervised rung) is then limited by training,
not by the patches or the architecture. The result goes to
``benchmarks/science/seed<seed>/awt_probe.json`` (docs/science.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.science import OUT_DIR, RESULTS_DIR
from models.intensity import PatchInput

THRESHOLDS_HU = (-700, -500, -300, -100)
PERCENTILES = (85, 90, 95, 99)
COUNT_THRESHOLDS_HU = (-950, -910, -850, -700, -600, -500, -300, -100)
FILL_HU = PatchInput.fill_hu  # what the encoder's lung masking sets non-lung voxels to
FACTORS = ("cle", "pse", "awt")


def subject_statistics(patches: np.ndarray, masks: np.ndarray) -> list[float]:
    """The eight statistics of the lung voxels of one subject's patches ``[P, S, S, S]`` (HU, bool masks)."""
    lung = patches[masks].astype(np.float32)
    return [float((lung > t).mean()) for t in THRESHOLDS_HU] + [float(v) for v in np.percentile(lung, PERCENTILES)]


def voxel_counts(patches: np.ndarray, masks: np.ndarray) -> list[float]:
    """Share of all voxels of the masked patches ``[P, S, S, S]`` above each of :data:`COUNT_THRESHOLDS_HU`."""
    masked = np.where(masks, patches.astype(np.float32), FILL_HU)
    return [float((masked > t).mean()) for t in COUNT_THRESHOLDS_HU]


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
    rows: dict[str, dict[str, list[float]]] = {"high_attenuation": {}, "voxel_counts": {}}
    for path in sorted((base / "work" / "patches").glob("*.npy")):
        if path.stat().st_size == 0:
            continue  # a tombstone: the subject failed preprocessing
        patches = np.load(path)
        masks = unpack_masks(np.load(base / "work" / "patches_lung" / path.name), patches.shape[-1]).astype(bool)
        rows["high_attenuation"][path.stem] = subject_statistics(patches, masks)
        rows["voxel_counts"][path.stem] = voxel_counts(patches, masks)
    result = {"cohort_seed": args.cohort_seed, "subjects": len(rows["voxel_counts"]),
              "thresholds_hu": THRESHOLDS_HU, "percentiles": PERCENTILES,
              "count_thresholds_hu": COUNT_THRESHOLDS_HU, "fill_hu": FILL_HU,
              "command": f"python -m benchmarks.awt_probe --cohort-seed {args.cohort_seed}"}
    for name, table in rows.items():
        features = pd.DataFrame.from_dict(table, orient="index")
        for factor in FACTORS:
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
            scores = cross_val_score(model, features, truth.loc[features.index, factor],
                                     cv=RepeatedKFold(n_splits=5, n_repeats=3, random_state=0), scoring="r2")
            result[f"{name}_{factor}_r2"] = [round(float(scores.mean()), 3), round(float(scores.std(ddof=1)), 3)]
    out = RESULTS_DIR / f"seed{args.cohort_seed}" / "awt_probe.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
