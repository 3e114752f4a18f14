"""Small cohorts for the evaluation-side tests (folds, pool, baseline, evaluate, report).

:func:`make_eval_cohort` writes what those stages read from ``work/`` and the cohort files: a
subjects table, ``patches`` statuses (some failed), densitometry JSONs, per-run patch embeddings
``[P, D]`` that carry a known mixture of the latent factors, the atlas grid (lattice locations,
adjacency, physical centres), phenotypes with COPDGene column names generated from the latent
factors (with some missing values) and a truth table. :func:`make_subject_image` adds a small CT
and an affine transform for the patch-grid figure. :func:`write_results` writes hand-made
``metrics/predictions/readout`` files with chosen means so the report can be checked exactly.

Everything is seeded and tiny; nothing is downloaded.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import validate_config
from pipeline.files import write_json, write_npy, write_npz, write_text, write_tsv
from pipeline.layout import Layout
from pipeline.qc import stage_rows

LATTICE = (2, 2, 3)  # grid shape -> P = 12 locations
PATCH_SIZE = 4  # voxels
ATLAS_SPACING = 5.0  # mm


def eval_config(**sections: Any) -> dict[str, Any]:
    """A validated config with three runs (untrained, MoCo, IFM) and both poolings; ``sections``
    replace whole top-level sections."""
    config = {
        "cohort": {"source": "manifest", "manifest": "manifest.tsv", "phenotypes": "phenotypes.tsv",
                   "truth": "truth.tsv"},
        "runs": {"random_init": {"epochs": 0}, "moco": {"loss": {"method": "none", "epsilon": 0.0}},
                 "ifm_e0.1": {"loss": {"method": "ifm", "epsilon": 0.1}}},
        "pool": {"methods": ["mean", "gnn"]},
        "evaluate": {"n_folds": 3, "repeats": 2, "seed": 3, "pca_components": [2, 4]},
        "report": {"title": "test report <copdssl>"},
    }
    config.update(sections)
    return validate_config(config)


def lattice(shape=LATTICE):
    """Grid arrays: locations ``[P, 3]``, edges ``[2, E]`` (6-neighbours, both ways), weights ``[E]``,
    physical centres ``[P, 3]`` (x, y, z mm) of patches of ``PATCH_SIZE`` voxels at ``ATLAS_SPACING`` mm."""
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)  # (z, y, x)
    span = np.maximum(np.array(shape) - 1, 1)
    locations = (coords / span * 2 - 1).astype(np.float32)
    pairs = [(i, j) for i in range(len(coords)) for j in range(len(coords)) if np.abs(coords[i] - coords[j]).sum() == 1]
    edges = np.array(pairs, dtype=np.int64).T
    weights = np.full(edges.shape[1], 0.5, dtype=np.float32)
    step_mm = PATCH_SIZE * ATLAS_SPACING
    extent_xyz = (np.array(shape[::-1]) - 1) * step_mm
    centers = (coords[:, ::-1] * step_mm + 80.0 - extent_xyz / 2).astype(np.float64)  # (x, y, z), centred at 80 mm
    return locations, edges, weights, centers


@dataclass(frozen=True)
class EvalCohort:
    root: Path
    layout: Layout
    subjects_tsv: Path
    phenotypes: Path
    truth: Path
    sids: list[str]
    ok_sids: list[str]
    failed: dict[str, str]  # sid -> reason
    latent: pd.DataFrame  # cle, pse, awt per sid
    runs: dict[str, np.ndarray]  # run -> mixing matrix [3, D]
    dim: int


def make_eval_cohort(root: Path, n_subjects: int = 60, dim: int = 6, seed: int = 0,
                     failed: dict[int, str] | None = None, tombstone: dict[str, int] | None = None,
                     runs: tuple[str, ...] = ("random_init", "moco", "ifm_e0.1")) -> EvalCohort:
    """Write a cohort under ``root`` (``work/`` + ``phenotypes.tsv`` + ``truth.tsv``).

    Args:
        failed: subject index -> reason of a failed ``patches`` stage (default: 2 subjects).
        tombstone: run -> index of a subject whose embedding is an empty tombstone.
        runs: runs to write embeddings for; each mixes the latent factors differently.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    layout = Layout(work=root / "work", results=root / "results")
    failed = {3: "no lungs found: 2 ml of air inside the body", 7: "registration Dice 0.41 < 0.85"} \
        if failed is None else failed
    tombstone = tombstone or {}
    sids = [f"S{i:03d}" for i in range(n_subjects)]
    locations, edges, weights, centers = lattice()
    write_npz(layout.grid(), locations=locations, edges=edges, edge_weight=weights, centers_mm=centers,
              corners=np.zeros((len(locations), 3), np.int32), lung_fraction=np.linspace(0.3, 1.0, len(locations)).astype(np.float32),
              patch_size=np.int64(PATCH_SIZE), step=np.int64(PATCH_SIZE), spacing_mm=np.float64(ATLAS_SPACING))
    with open(layout.subjects(), "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["sid", "image", "format"])
        writer.writerows([sid, f"images/{sid}.nii.gz", "nifti"] for sid in sids)

    latent = pd.DataFrame(rng.standard_normal((n_subjects, 3)), columns=["cle", "pse", "awt"], index=sids)
    latent.index.name = "sid"
    # each run keeps a different subset of the factors (the IFM run keeps all three)
    mixing = {"random_init": np.zeros((3, dim)), "moco": np.zeros((3, dim)), "ifm_e0.1": np.zeros((3, dim))}
    mixing["moco"][0, 0], mixing["moco"][1, 1] = 1.0, 1.0
    mixing["ifm_e0.1"][0, 0], mixing["ifm_e0.1"][1, 1], mixing["ifm_e0.1"][2, 2] = 1.0, 1.0, 1.0
    mixing = {run: mixing.get(run, rng.standard_normal((3, dim))) for run in runs}
    P = len(locations)
    for i, sid in enumerate(sids):
        status = {"sid": sid, "stage": "patches", "status": "ok"}
        if i in failed:
            status.update(status="failed", failed_stage="patches", reason=failed[i])
        write_json(layout.status("patches", sid), status)
        z = latent.loc[sid].to_numpy()
        write_json(layout.density(sid), {region: {"laa950": 5.0 + 3 * z[0] ** 2 + i * 0.01, "laa910": 20.0 + z[0],
                                                  "perc15": -930.0 - 5 * z[0], "volume_l": 5.0 + 0.1 * z[1],
                                                  "mean_hu": -850.0 + 2 * z[1]}
                                         for region in ("total", "right", "left")})
        for run, mix in mixing.items():
            path = layout.embedding(run, sid)
            if i in failed:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
                continue
            if tombstone.get(run) == i:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
                continue
            patch_noise = 0.3 * rng.standard_normal((P, dim))
            write_npy(path, (z @ mix + patch_noise + 0.05 * rng.standard_normal(dim)).astype(np.float32))
    write_tsv(layout.stage_table("patches"), stage_rows(sids, "patches", layout))  # what `copdssl qc --stage` writes

    lung = (-0.5 * latent["cle"] - 0.3 * latent["pse"] - 0.4 * latent["awt"]).to_numpy()
    cle, pse = latent["cle"].to_numpy(), latent["pse"].to_numpy()
    noise = rng.standard_normal((n_subjects, 5))
    phenotypes = pd.DataFrame({
        "sid": sids,
        "FEV1pp_utah": np.exp(4.3 + 0.2 * lung + 0.1 * noise[:, 0]),
        "FEV1_FVC_utah": np.exp(-0.4 + 0.1 * lung + 0.05 * noise[:, 1]),
        "Emph_Severity": np.clip(np.round(1.5 + 1.2 * cle + 0.4 * noise[:, 2]), 0, 5),
        "Emph_Paraseptal": np.clip(np.round(1 + 0.8 * pse + 0.3 * noise[:, 3]), 0, 2),
        "MMRCDyspneaScor": np.clip(np.round(2 - 1.5 * lung + 0.5 * noise[:, 4]), 0, 4),
        "finalGold": rng.integers(-1, 5, n_subjects),
        "age": rng.integers(45, 80, n_subjects), "gender": rng.integers(1, 3, n_subjects),
        "ATS_PackYears": rng.uniform(10, 80, n_subjects).round(1), "ccenter": rng.choice(["A", "B"], n_subjects),
        "kernel": rng.choice(["smooth", "sharp"], n_subjects),
    })
    phenotypes.loc[[i for i in (0, 5) if i < n_subjects], "FEV1pp_utah"] = np.nan  # missing FEV1 for two subjects
    phenotypes.loc[[i for i in (1,) if i < n_subjects], "Emph_Severity"] = np.nan
    phenotypes_path = root / "phenotypes.tsv"
    write_tsv(phenotypes_path, phenotypes)
    truth = latent.reset_index()
    truth["kernel"] = phenotypes["kernel"].to_numpy()
    truth["noise_hu"] = rng.uniform(10, 30, n_subjects).round(2)
    truth["density_shift_hu"] = rng.uniform(-20, 20, n_subjects).round(2)
    truth["site"] = rng.integers(0, 3, n_subjects)
    truth_path = root / "truth.tsv"
    write_tsv(truth_path, truth)
    ok = [sid for i, sid in enumerate(sids) if i not in failed]
    return EvalCohort(root, layout, layout.subjects(), phenotypes_path, truth_path, sids, ok,
                      {sids[i]: r for i, r in failed.items()}, latent, mixing, dim)


def make_subject_image(layout: Layout, sid: str, shift_mm=(6.0, -4.0, 3.0), scale: float = 1.05,
                       spacing: float = 4.0, size: int = 40) -> None:
    """A small CT (lungs as two dark boxes in a body) and an atlas -> subject affine transform."""
    import SimpleITK as sitk

    from pipeline.files import atomic_path

    array = np.full((size, size, size), -1000, dtype=np.int16)
    array[4:-4, 6:-6, 4:-4] = 40  # body
    array[8:-8, 10:-10, 8:18] = -850  # right lung (small x)
    array[8:-8, 10:-10, 22:32] = -850  # left lung
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing, spacing, spacing))
    image.SetOrigin((0.0, 0.0, 0.0))
    with atomic_path(layout.ct(sid)) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((scale, 0, 0, 0, scale, 0, 0, 0, scale))
    transform.SetTranslation(tuple(float(v) for v in shift_mm))
    with atomic_path(layout.transform(sid), suffix=".tfm") as tmp:
        sitk.WriteTransform(transform, str(tmp))


def write_results(layout: Layout, name: str, pooling: str, means: dict[tuple[str, str], float], repeats: int = 2,
                  sids: list[str] | None = None, readout: dict[str, float] | None = None, seed: int = 0) -> None:
    """Hand-made evaluation outputs of one feature set.

    Args:
        means: (outcome, metric) -> mean over repeats; repeat values are mean ± 0.01.
        sids: subjects of the predictions (default 20 made-up IDs).
        readout: factor -> mean read-out R² (omitted: header-only readout.tsv).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for (outcome, metric), mean in means.items():
        for repeat in range(repeats):
            offset = 0.01 * (1 if repeat % 2 == 0 else -1) if repeats > 1 else 0.0
            rows.append((outcome, metric, repeat, mean + offset, 20))
    write_tsv(layout.metrics(name, pooling), pd.DataFrame(rows, columns=["outcome", "metric", "repeat", "value", "n"]))
    sids = sids or [f"S{i:03d}" for i in range(20)]
    predictions = []
    for outcome in dict.fromkeys(o for o, _ in means):
        ordinal = any(m == "acc" for (o, m) in means if o == outcome)
        for repeat in range(repeats):
            observed = rng.integers(0, 3, len(sids)).astype(float) if ordinal else rng.normal(4, 0.2, len(sids))
            predicted = np.clip(observed + rng.integers(-1, 2, len(sids)), 0, 2) if ordinal else \
                observed + rng.normal(0, 0.1, len(sids))
            predictions += [(s, outcome, repeat, o, p) for s, o, p in zip(sids, observed, predicted)]
    write_tsv(layout.predictions(name, pooling),
              pd.DataFrame(predictions, columns=["sid", "outcome", "repeat", "observed", "predicted"]))
    rows = [(f, r, v + (0.02 if r == 0 else -0.02)) for f, v in (readout or {}).items() for r in range(repeats)]
    write_tsv(layout.readout(name, pooling), pd.DataFrame(rows, columns=["factor", "repeat", "r2"]))


def write_history(layout: Layout, run: str, epochs: int = 3, ifm: bool = False) -> None:
    rows = [{"epoch": e, "loss": 5.0 - e, "loss_ifm": (4.0 - e) if ifm else 0.0, "acc1": 0.1 * e, "lr": 0.03,
             "pairs_per_s": 100.0, "seconds": 2.0} for e in range(1, epochs + 1)]
    write_tsv(layout.history(run), pd.DataFrame(rows))


# The QC table's one flagged (kept) subject and its reason (write_qc).
FLAGGED_REASON = "registration imperfect: Dice 0.820 (right 0.800, left 0.840) is below register.flag_dice 0.85"


def write_qc(layout: Layout, cohort: EvalCohort) -> None:
    rows = [{"sid": sid, "status": "failed" if sid in cohort.failed else "ok",
             "failed_stage": "patches" if sid in cohort.failed else "", "reason": cohort.failed.get(sid, ""),
             "flag_reason": "", "register_dice": 0.93 + 0.001 * i} for i, sid in enumerate(cohort.sids)]
    kept = [row for row in rows if row["status"] == "ok"]
    kept[0].update(status="flagged", flag_reason=FLAGGED_REASON, register_dice=0.82)
    rows.append({"sid": "DUP", "status": "rejected", "failed_stage": "manifest",
                 "reason": "duplicate subject ID: appears 2 times in the manifest"})
    write_tsv(layout.qc_table(), pd.DataFrame(rows))


def write_benchmarks(layout: Layout) -> None:
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for stage, name, seconds in (("ingest", "S000", 1.5), ("ingest", "S001", 2.5), ("train", "moco", 30.0)):
        write_text(layout.benchmark(stage, name), header + f"{seconds}\t0:00:0{int(seconds) % 10}\t120.5\t1\t1\t1\t0\t0\t50\t1\n")
