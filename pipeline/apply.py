"""``copdssl apply``: embed new scans with a bundle (``copdssl export``), no training.

    copdssl apply --bundle BUNDLE --manifest scans.tsv --out embedded/

Every subject of the manifest goes through the project's own stage functions with the bundle's
settings: ingest → lung → register to the bundle's atlas → patches; then the bundle's encoder
embeds every subject whose patches are ok and the embeddings are pooled. Outputs under ``--out``:

- ``features_mean.tsv`` (and ``features_gnn.tsv`` when the bundle has a graph encoder): one row
  per kept subject (``sid, f0 ... f{D-1}``);
- ``qc.tsv``: one graded row per manifest row (ok / flagged / failed / rejected, with reasons);
- ``work/``: the per-subject files and statuses (``work/runs/<run>/embeddings/{sid}.npy`` are the
  per-location embeddings ``[P, D]``).

A subject that fails a stage is recorded and the others go on, as in the workflow.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def apply_bundle(bundle_dir, manifest, out, *, device: str = "cpu", batch_size: int = 512) -> dict[str, Any]:
    """Embed and pool the manifest's scans with a bundle.

    Returns:
        summary: ``run``, ``subjects`` (accepted by the manifest), ``embedded``, QC ``counts``,
        ``features`` (pooling -> path).
    """
    import shutil

    from models.embed import embed_cohort
    from pipeline.grid import read_grid
    from pipeline.bundle import read_bundle, write_checkpoints
    from pipeline.files import write_tsv
    from pipeline.ingest import run_ingest
    from pipeline.layout import Layout
    from pipeline.logs import progress
    from pipeline.lung import run_lung
    from pipeline.patches import run_patches
    from pipeline.pool import load_embedding, make_pooler, pool_subjects
    from pipeline.qc import qc_rows, write_qc_table
    from pipeline.register import run_register
    from pipeline.status import passed_subjects
    from pipeline.subjects import read_manifest

    bundle = read_bundle(bundle_dir)
    config, run = bundle.config, bundle.run
    out = Path(out)
    layout = Layout(work=out / "work", results=out)
    subjects, rejects = read_manifest(manifest)
    for source, target in ((bundle.atlas_mask, layout.atlas_mask()), (bundle.grid, layout.grid())):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    masked = bool(config["patches"]["lung_mask"])
    for subject in progress(subjects, desc=f"apply {run}: preprocessing", unit="subject"):
        sid = subject.sid
        run_ingest(sid=sid, image=subject.image, fmt=subject.format, out=layout.ct(sid),
                   status_path=layout.status("ingest", sid), settings=config["ingest"])
        run_lung(sid=sid, ct_path=layout.ct(sid), out=layout.lung(sid), density_path=layout.density(sid),
                 status_path=layout.status("lung", sid), upstream=[layout.status("ingest", sid)],
                 **config["lung"])
        run_register(sid=sid, lung_path=layout.lung(sid), atlas_path=layout.atlas_mask(), out=layout.transform(sid),
                     status_path=layout.status("register", sid), upstream=[layout.status("lung", sid)],
                     settings=config["register"])
        run_patches(sid=sid, ct_path=layout.ct(sid), transform_path=layout.transform(sid), grid_path=layout.grid(),
                    out=layout.patches(sid), status_path=layout.status("patches", sid),
                    upstream=[layout.status("register", sid)], lung_path=layout.lung(sid),
                    mask_out=layout.patch_mask(sid) if masked else None, clip_hu=config["patches"]["clip_hu"])
    sids = [s.sid for s in subjects]
    ok = passed_subjects(layout, sids, "patches", missing="skip")
    write_checkpoints(bundle, layout)
    grid = read_grid(layout.grid(), "locations")
    counts = embed_cohort(layout.encoder(run), layout, run, sids, ok, grid["locations"], batch_size=batch_size,
                          device=device)
    features = {}
    for pooling in ["mean"] + (["gnn"] if bundle.graph is not None else []):
        table = pool_subjects(ok, lambda sid: load_embedding(layout.embedding(run, sid), sid, len(grid["locations"])),
                              make_pooler(pooling, layout, run, device=device), desc=f"apply {run}: {pooling} pooling")
        features[pooling] = out / f"features_{pooling}.tsv"
        write_tsv(features[pooling], table)
    status_counts = write_qc_table(out / "qc.tsv", qc_rows(sids, rejects, layout,
                                                           flag_mad=config["register"]["flag_mad"]))
    log.info("apply %s: %d subjects embedded; QC %s -> %s", run, counts["embedded"],
             ", ".join(f"{n} {k}" for k, n in sorted(status_counts.items())), out)
    return {"run": run, "subjects": len(sids), "embedded": counts["embedded"], "counts": status_counts,
            "features": {k: str(v) for k, v in features.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory written by `copdssl export`")
    parser.add_argument("--manifest", required=True, help="TSV of sid, image[, format] (relative paths: to the TSV)")
    parser.add_argument("--out", required=True, help="output directory (features_*.tsv, qc.tsv, work/)")
    parser.add_argument("--device", default="cpu", help="torch device for embedding (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    apply_bundle(args.bundle, args.manifest, args.out, device=args.device)
    return 0
