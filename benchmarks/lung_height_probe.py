"""Where does the lung-height read-out come from, and how low can it go?

    python -m benchmarks.lung_height_probe [--cohort-seed 1002] [--run default_two_window_histogram_direct]

A diagnostic of the science benchmark's lung-height target (read-out <= 0.3; docs/science.md).
The generator couples lung height to inspiration: ``lung_height = 250 + 14 e - 12 female -
0.5 density_shift_hu`` (docs/synthetic_cohort.md), so any feature set that reads the inspiration
level (every one does, densitometry at 0.86) reads part of lung height with it. The probe
measures, on the preprocessed cohort (``benchmarks/out/science/seed<seed>/``):

- ``inspiration_floor``: the R² of lung height on the true ``density_shift_hu`` alone (in-sample
  OLS on ``truth.tsv``): what a perfect reader of inspiration and nothing else reads;
- for each feature set, the out-of-fold read-out (``StandardScaler + RidgeCV``, 5-fold CV,
  3 repeats) of cle, awt, density shift, lung height, and ``lung_height_beyond_inspiration``
  (the residual of lung height after OLS on the true density shift): lung size the features read
  that inspiration does not explain.

Feature sets, all mean-pooled over the locations:

- ``bins_whole_patch``: the encoder's histogram bins as it computes them (``SoftHistogram`` of
  the run's lung-masked, windowed input, non-lung voxels at ``fill_hu``). Checked against the bins
  stored in the run's embeddings (their last ``C x K`` columns) before anything is read out;
- ``bins_lung_only``: the same bins counting only lung voxels (``SoftHistogram`` weighted by the
  lung mask): what a mask-aware histogram would give;
- ``lung_fraction``: the share of lung voxels of every location's patch (one column per
  location);
- ``densitometry`` and the run's ``features_mean.tsv`` (learned; CNN features + bins), whole and
  split into its CNN features and its bins.

With ``--deformable N``, the probe also asks whether a better fit removes the lung-size
signature of the patch boxes: for the first N subjects it cuts the per-location lung fractions
with the stored affine transforms and again after the optional B-spline refinement
(``register.deformable`` at its schema defaults, :func:`pipeline.register.refine_deformable`),
and reads lung height out of each at those N subjects; and it cuts the same grid boxes in atlas
space (the subject's lungs resampled onto the atlas grid through the affine), where a box scales
with the subject's lungs.

The result goes to ``benchmarks/science/seed<seed>/lung_height_probe.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import read_out_factors
from benchmarks.science import OUT_DIR, RESULTS_DIR, rung_settings

FACTORS = ("cle", "awt", "density_shift_hu", "lung_height_mm", "lung_height_beyond_inspiration")


def subject_features(patches: np.ndarray, masks: np.ndarray, patch_input, histogram) -> dict[str, np.ndarray]:
    """One subject's probe features.

    Args:
        patches: int16 HU ``[P, S, S, S]``.
        masks: bool lung masks ``[P, S, S, S]``.
        patch_input: the run's :class:`models.intensity.PatchInput` (lung masking and windows).
        histogram: the run's :class:`models.histogram.SoftHistogram` (C channels, K bins).

    Returns:
        ``bins_per_location`` ``[P, C * K]`` (whole patch, as the encoder computes them),
        ``bins_whole_patch`` and ``bins_lung_only`` ``[C * K]`` (means over the locations),
        ``lung_fraction`` ``[P]``.
    """
    import torch

    mask = torch.from_numpy(masks)
    with torch.no_grad():
        x = patch_input(torch.from_numpy(patches), mask)  # P x C x S x S x S
        whole = histogram(x)  # P x CK
        lung_only = histogram(x, mask.unsqueeze(1).to(torch.float32))  # P x CK
    return {"bins_per_location": whole.numpy(), "bins_whole_patch": whole.mean(0).numpy(),
            "bins_lung_only": lung_only.mean(0).numpy(),
            "lung_fraction": masks.reshape(len(masks), -1).mean(axis=1)}


def lung_fractions(args: tuple[str, str, str, str]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray,
                                                              dict[str, float]]:
    """Per-location lung fractions ``[P]`` of one subject: in the patch boxes (fixed size in mm)
    under its stored affine and under the refined fit, and in the grid's boxes in atlas space.

    Args:
        args: ``(sid, lung labels path, stored transform path, work directory)``.

    Returns:
        (sid, affine fractions, refined fractions, atlas-space fractions, the refinement's
        soft-Dice info).
    """
    import SimpleITK as sitk

    from pipeline.config import validate_section
    from pipeline.ct_io import read_volume
    from pipeline.grid import read_grid
    from pipeline.patches import extract_patches, patch_corners
    from pipeline.register import read_transform, refine_deformable

    sid, lung_path, transform_path, work = args
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    settings = validate_section("register", {})
    grid = read_grid(f"{work}/atlas/grid.npz", "centers_mm", "corners", "patch_size")
    lung = read_volume(lung_path, sid, "probe")
    atlas = read_volume(f"{work}/atlas/atlas_lung.nii.gz", sid, "probe")
    affine = read_transform(transform_path, sid, "probe")
    refined, info = refine_deformable(atlas, lung, affine, grid_spacing_mm=settings["deformable"]["grid_spacing_mm"],
                                      iterations=settings["deformable"]["iterations"],
                                      working_spacing_mm=settings["working_spacing_mm"])
    size = int(grid["patch_size"])
    labels = sitk.GetArrayViewFromImage(lung) > 0
    fractions = []
    for transform in (affine, refined):
        inside, _ = extract_patches(labels, patch_corners(grid["centers_mm"], transform, lung, size), size, False)
        fractions.append(inside.reshape(len(inside), -1).mean(axis=1))
    # the same boxes in atlas space: the subject's lungs resampled onto the atlas grid through the
    # affine, so that a box scales with the subject's lungs instead of keeping its size in mm
    in_atlas = sitk.GetArrayViewFromImage(sitk.Resample(lung, atlas, affine, sitk.sitkNearestNeighbor, 0)) > 0
    inside, _ = extract_patches(in_atlas, grid["corners"], size, False)
    fractions.append(inside.reshape(len(inside), -1).mean(axis=1))
    return sid, *fractions, {k: info[k] for k in ("soft_dice_affine", "soft_dice")}


def deformable_comparison(base, truth, n_subjects: int, workers: int) -> dict:
    """Lung height read out of per-location lung fractions, affine vs refined, at the first N subjects."""
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd
    from tqdm import tqdm

    work = base / "work"
    sids = [p.stem for p in sorted((work / "transforms").glob("*.tfm")) if p.stat().st_size > 0][:n_subjects]
    jobs = [(sid, str(work / "lung" / f"{sid}.nii.gz"), str(work / "transforms" / f"{sid}.tfm"), str(work))
            for sid in sids]
    tables: dict[str, dict[str, np.ndarray]] = {"lung_fraction_affine": {}, "lung_fraction_deformable": {},
                                                 "lung_fraction_atlas_space": {}}
    dice = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for sid, affine, refined, atlas_space, info in tqdm(pool.map(lung_fractions, jobs), total=len(jobs),
                                                            desc="affine vs deformable", unit="subject"):
            tables["lung_fraction_affine"][sid], tables["lung_fraction_deformable"][sid] = affine, refined
            tables["lung_fraction_atlas_space"][sid] = atlas_space
            dice.append([info["soft_dice_affine"], info["soft_dice"]])
    dice = np.asarray(dice)
    return {"subjects": len(sids), "median_soft_dice_affine": round(float(np.median(dice[:, 0])), 4),
            "median_soft_dice_deformable": round(float(np.median(dice[:, 1])), 4),
            "read_out": {name: read_out_factors(pd.DataFrame.from_dict(table, orient="index"), truth, FACTORS)
                         for name, table in tables.items()}}


def beyond_inspiration(truth) -> tuple[np.ndarray, float]:
    """Lung height's residual after OLS on the true density shift, and that OLS fit's R²."""
    shift = truth["density_shift_hu"].to_numpy(float)
    height = truth["lung_height_mm"].to_numpy(float)
    design = np.column_stack([np.ones_like(shift), shift])
    coef, *_ = np.linalg.lstsq(design, height, rcond=None)
    residual = height - design @ coef
    return residual, float(1.0 - residual.var() / height.var())


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    from tqdm import tqdm

    from models.encoder import histogram_columns, input_channels
    from models.histogram import SoftHistogram
    from models.intensity import PatchInput
    from pipeline.evaluate import read_feature_table
    from pipeline.patches import unpack_masks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-seed", type=int, default=1002)
    parser.add_argument("--run", default="default_two_window_histogram_direct",
                        help="science rung whose seed-0 run's bins and features are compared")
    parser.add_argument("--deformable", type=int, default=0, metavar="N",
                        help="also compare affine and B-spline-refined lung fractions on the first N subjects")
    parser.add_argument("--workers", type=int, default=2, help="processes for --deformable")
    args = parser.parse_args(argv)
    base = OUT_DIR / f"seed{args.cohort_seed}"
    run_dir = base / "work" / "runs" / f"{args.run}.s0"
    truth = pd.read_csv(base / "data" / "truth.tsv", sep="\t").set_index("sid")
    truth["lung_height_beyond_inspiration"], floor = beyond_inspiration(truth)
    settings = rung_settings(args.cohort_seed, args.run)  # the run's windows and bins, as it trained
    patch_input = PatchInput.from_settings(settings["input"])
    histogram = SoftHistogram(input_channels(settings), int(settings["encoder"]["histogram_bins"]))
    n_bins = histogram_columns(settings)  # the embeddings' last C x K columns are the bins

    tables: dict[str, dict[str, np.ndarray]] = {"bins_whole_patch": {}, "bins_lung_only": {}, "lung_fraction": {}}
    largest_bin_difference = 0.0
    paths = [p for p in sorted((base / "work" / "patches").glob("*.npy")) if p.stat().st_size > 0]  # no tombstones
    for path in tqdm(paths, desc="lung-height probe", unit="subject"):
        patches = np.load(path)
        masks = unpack_masks(np.load(base / "work" / "patches_lung" / path.name), patches.shape[-1])
        features = subject_features(patches, masks, patch_input, histogram)
        stored = np.load(run_dir / "embeddings" / path.name)[:, -n_bins:]
        largest_bin_difference = max(largest_bin_difference,
                                     float(np.abs(stored - features["bins_per_location"]).max()))
        for name in tables:
            tables[name][path.stem] = features[name]
    if largest_bin_difference > 1e-4:
        raise SystemExit(f"the probe's bins differ from {run_dir}'s stored bins by {largest_bin_difference:.2g}: "
                         "it would not measure what the encoder computes")

    feature_sets = {name: pd.DataFrame.from_dict(table, orient="index") for name, table in tables.items()}
    feature_sets["densitometry"] = read_feature_table(base / "work" / "baselines" / "densitometry.tsv")
    learned = read_feature_table(run_dir / "features_mean.tsv")
    feature_sets[f"{args.run}.s0"] = learned
    feature_sets[f"{args.run}.s0 CNN features only"] = learned.iloc[:, :-n_bins]
    feature_sets[f"{args.run}.s0 bins only"] = learned.iloc[:, -n_bins:]
    result = {"cohort_seed": args.cohort_seed, "subjects": len(paths), "run": f"{args.run}.s0",
              "windows_hu": patch_input.windows, "bins": histogram.bins, "inspiration_floor_r2": round(floor, 3),
              "largest_bin_difference_to_the_embeddings": largest_bin_difference,
              "command": f"python -m benchmarks.lung_height_probe --cohort-seed {args.cohort_seed} --run {args.run}",
              "read_out": {name: read_out_factors(features, truth, FACTORS) for name, features in feature_sets.items()}}
    if args.deformable:
        result["deformable"] = deformable_comparison(base, truth, args.deformable, args.workers)
        result["command"] += f" --deformable {args.deformable}"
    out = RESULTS_DIR / f"seed{args.cohort_seed}" / "lung_height_probe.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
