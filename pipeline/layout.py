"""Where every file lives: the single source of truth for paths.

The Snakefile builds its input/output patterns from this class (passing ``"{sid}"`` etc. as
arguments, which yields Snakemake wildcards), and the stages use it to find each other's
files, so a path is spelled in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The atlas's two files, also the names in an atlas.reference directory and in a bundle's atlas/.
ATLAS_MASK_NAME = "atlas_lung.nii.gz"
GRID_NAME = "grid.npz"


@dataclass(frozen=True)
class Layout:
    """Paths under the work and results directories (see ../shared/DESIGN.md, "Data flow")."""

    work: Path = Path("work")
    results: Path = Path("results")

    def __post_init__(self):
        object.__setattr__(self, "work", Path(self.work))
        object.__setattr__(self, "results", Path(self.results))

    # ---- cohort-level -------------------------------------------------------------------
    def subjects(self) -> Path:
        """Screened manifest: sid, image, format (one row per accepted subject)."""
        return self.work / "subjects.tsv"

    def manifest_rejects(self) -> Path:
        """Manifest rows rejected before processing (unsafe or duplicate IDs, ...)."""
        return self.work / "qc" / "manifest_rejects.tsv"

    def status_dir(self, stage: str) -> Path:
        """Directory of one stage's per-subject status JSONs, named ``{sid}.json``."""
        return self.work / "qc" / stage

    def status(self, stage: str, sid: str) -> Path:
        """Per-subject status JSON of one stage (see :mod:`pipeline.status`)."""
        return self.status_dir(stage) / f"{sid}.json"

    def stage_table(self, stage: str) -> Path:
        """Cohort-level table of one stage's statuses (sid, status, failed_stage, reason).

        Aggregate rules depend on this one file instead of on thousands of status files, which
        keeps the Snakemake DAG fast at 10,000 subjects.
        """
        return self.work / "qc" / f"{stage}.tsv"

    def qc_table(self) -> Path:
        return self.results / "qc.tsv"

    # ---- preprocessing ------------------------------------------------------------------
    def ct(self, sid: str) -> Path:
        """Ingested CT: int16 HU, canonical orientation (identity direction, ITK LPS), isotropic spacing."""
        return self.work / "ct" / f"{sid}.nii.gz"

    def lung(self, sid: str) -> Path:
        """Lung label map on the CT grid: 0 background, 1 right, 2 left (uint8)."""
        return self.work / "lung" / f"{sid}.nii.gz"

    def density(self, sid: str) -> Path:
        """Densitometry JSON (LAA-950, LAA-910, Perc15, volume, mean HU; per lung and total)."""
        return self.work / "density" / f"{sid}.json"

    def atlas_mask(self) -> Path:
        return self.work / "atlas" / ATLAS_MASK_NAME

    def grid(self) -> Path:
        """Patch grid in atlas space: corners, normalised locations, adjacency edges/weights."""
        return self.work / "atlas" / GRID_NAME

    def transform(self, sid: str) -> Path:
        """Affine transform (SimpleITK .tfm) mapping atlas physical points to subject points."""
        return self.work / "transforms" / f"{sid}.tfm"

    def patches(self, sid: str) -> Path:
        """int16 [P, S, S, S] patches, memory-mappable .npy, rows ordered as the grid."""
        return self.work / "patches" / f"{sid}.npy"

    def patch_mask(self, sid: str) -> Path:
        """Bit-packed lung masks cut like the patches: uint8 [P, S, S, ceil(S/8)] (pipeline.patches.pack_masks)."""
        return self.work / "patches_lung" / f"{sid}.npy"

    # ---- training and embedding -----------------------------------------------------------
    def run_dir(self, run: str) -> Path:
        return self.work / "runs" / run

    def encoder(self, run: str) -> Path:
        return self.run_dir(run) / "encoder.pt"

    def checkpoint(self, run: str) -> Path:
        return self.run_dir(run) / "checkpoint.pt"

    def history(self, run: str) -> Path:
        return self.run_dir(run) / "history.tsv"

    def graph_model(self, run: str) -> Path:
        return self.run_dir(run) / "graph.pt"

    def graph_history(self, run: str) -> Path:
        return self.run_dir(run) / "graph_history.tsv"

    def embeddings_dir(self, run: str) -> Path:
        """Directory of a run's patch embeddings (the declared output of ``embed``)."""
        return self.run_dir(run) / "embeddings"

    def embedding(self, run: str, sid: str) -> Path:
        """float32 [P, D] pre-projection patch features."""
        return self.embeddings_dir(run) / f"{sid}.npy"

    def features(self, run: str, pooling: str) -> Path:
        """Subject-level features: one row per subject, columns sid, f0..f{D-1}."""
        return self.run_dir(run) / f"features_{pooling}.tsv"

    # ---- evaluation and report --------------------------------------------------------------
    def folds(self) -> Path:
        return self.work / "folds.tsv"

    def baseline_features(self, name: str) -> Path:
        """Feature tables of non-learned baselines (densitometry, oracle)."""
        return self.work / "baselines" / f"{name}.tsv"

    def eval_dir(self, run: str, pooling: str) -> Path:
        return self.results / run / pooling

    def metrics(self, run: str, pooling: str) -> Path:
        return self.eval_dir(run, pooling) / "metrics.tsv"

    def predictions(self, run: str, pooling: str) -> Path:
        return self.eval_dir(run, pooling) / "predictions.tsv"

    def readout(self, run: str, pooling: str) -> Path:
        """Out-of-fold R² of each latent factor from the features (synthetic cohorts only)."""
        return self.eval_dir(run, pooling) / "readout.tsv"

    def location_map(self, run: str) -> Path:
        """Per atlas location: out-of-fold R² of each target from that location's embedding alone
        (``location, target, r2, n``; stage ``locmap``)."""
        return self.results / run / "location_map.tsv"

    def report(self) -> Path:
        return self.results / "report.html"

    def logs(self, stage: str, name: str = "") -> Path:
        return self.work / "logs" / stage / (f"{name}.log" if name else f"{stage}.log")

    def benchmark(self, stage: str, name: str = "") -> Path:
        return self.work / "benchmarks" / stage / (f"{name}.tsv" if name else f"{stage}.tsv")
