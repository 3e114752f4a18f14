"""Stage ``report``: the self-contained HTML outcome report (``results/report.html``).

Sections: the main table (rows = feature sets, columns = outcome metrics, mean ± sd over CV
repeats, in the layout of Table 2 of Robinson et al. 2021), figures (training curves, predicted vs
observed per regression outcome, confusion matrix per ordinal outcome, the patch grid on one
subject, the read-out heatmap), "Where the signal is" (per mapped run, the per-location read-out R² of
each target on the atlas, from ``results/<run>/location_map.tsv``), the latent-factor read-out
table (synthetic cohorts), QC exclusions and subjects per outcome, and provenance (config hash,
package versions, run time per stage, date). Figures are also written to ``results/figures/<name>.png``.

Anything missing (a run without gnn pooling, no truth table, no QC table yet...) is left out with a
note; the report never fails because a piece is absent.

Modules: :mod:`.tables` (numbers), :mod:`.figures` (matplotlib), :mod:`.html` (rendering).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.grid import read_grid
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--results", default="results", help="results directory (default: %(default)s)")
    parser.add_argument("--out", required=True, help="HTML file to write (results/report.html)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings

    config = stage_settings(args, None)  # the whole config (--settings JSON or --config FILE)
    build_report(config, Layout(work=Path(args.work), results=Path(args.results)), Path(args.out))
    return 0


def build_report(config: Mapping[str, Any], layout: Layout, out: Path) -> Path:
    """Write the HTML report to ``out`` and the figures to ``<results>/figures/``; return ``out``."""
    from pipeline.files import write_text
    from pipeline.feature_sets import feature_sets
    from pipeline.report import html, tables

    sets = feature_sets(config)
    outcomes = config["evaluate"]["outcomes"]
    columns = tables.metric_columns(outcomes)
    metrics = tables.load_results(layout, sets, "metrics")
    predictions = tables.load_results(layout, sets, "predictions")
    readouts = tables.load_results(layout, sets, "readout")
    main = tables.main_table(sets, metrics, columns)
    prov = tables.provenance(config)
    figures_dir = layout.results / "figures"

    sections = [
        ("results", "Outcome prediction", _results_section(config, sets, main)),
        ("figures", "Figures", _figures_section(config, layout, main, predictions, readouts, sets, figures_dir)),
    ]
    sections.append(("locmap", "Where the signal is", _location_map_section(config, layout, figures_dir)))
    if config["cohort"]["truth"]:
        sections.append(("readout", "Latent-factor read-out", _readout_section(sets, readouts)))
    sections.append(("qc", "Quality control", _qc_section(config, layout, metrics, outcomes, figures_dir)))
    sections.append(("provenance", "Provenance", _provenance_section(layout, prov)))
    title = config["report"]["title"]
    document = html.page(title, prov["date"], prov["config_sha256"],
                         [(anchor, name, html.section(anchor, name, parts)) for anchor, name, parts in sections])
    write_text(out, document)
    log.info("report: %d feature sets with metrics, %d figures -> %s", len(main.rows),
             len(list(figures_dir.glob("*.png"))), out)
    return out


def _scope(config) -> str:
    """What a synthetic-cohort report can and cannot show (empty for real data)."""
    if config["cohort"]["source"] != "synthetic":
        return ""
    train = config["train"]
    steps = int(train["epochs"]) * int(train["steps_per_epoch"])
    n_subjects = config["synthetic"]["n_subjects"]
    pairs = f"{steps * int(train['batch_size']):,} patch pairs per run" if steps else "the whole grid per epoch"
    return ("This report is on the embedded synthetic cohort "
            f"({n_subjects} subjects; training: {train['epochs']} epoch(s), {pairs}). The demo's small cohort "
            "and short training, sized to run on a laptop CPU in minutes, show that every stage works end to "
            "end and how the rows compare on the same folds. They do not measure what the representation can "
            "learn: few subjects make the heads' R² noisy, and the encoders are far from converged. The full "
            "measurement (400 subjects, 3 training seeds, a held-out generator seed, every setting's read-out "
            "of the true disease and nuisance factors) is docs/science.md.")


def _results_section(config, sets, main) -> list[str]:
    from pipeline.report import html

    parts = [html.paragraph(_scope(config))] if _scope(config) else []
    parts += [html.paragraph(
        "Out-of-fold performance of supervised heads on each subject-level feature set, with the same "
        "folds for every row (layout of Table 2 in Robinson et al., NeurIPS 2021). Cells are mean ± sd over "
        f"{config['evaluate']['repeats']} repeat(s) of {config['evaluate']['n_folds']}-fold cross-validation; "
        "the best value per column (oracle excluded) is in bold. " + html.column_legend(main.columns) + "."
        + (" Rows '<baseline> + <run>' join the baseline's features to the run's (same subjects, same folds); "
           "the number in brackets is the change from the baseline alone, i.e. what the learned features add "
           "to it (percentage points for accuracies)." if any(s.kind == "combined" for s in main.rows) else ""))]
    if main.rows:
        parts.append(html.main_table(main))
    else:
        parts.append(html.note("No evaluation results were found yet (results/<run>/<pooling>/metrics.tsv)."))
    missing = [s for s in sets if s not in main.rows]
    for s in missing:
        parts.append(html.note(f"{s.label}: no metrics found (results/{s.name}/{s.pooling}/metrics.tsv); row omitted."))
    if not any(s.pooling == "gnn" for s in sets):
        parts.append(html.note("No gnn pooling rows: gnn pooling is not configured or no run has its graph stage enabled."))
    if not any(s.kind == "oracle" for s in sets):
        parts.append(html.note("No oracle row: the cohort has no truth table (or the oracle baseline is not configured)."))
    return parts


def _figures_section(config, layout, main, predictions, readouts, sets, figures_dir) -> list[str]:
    from pipeline.report import figures, html, tables

    mapped = set(figures.location_map_names(config)) | set(figures.QC_FIGURES)  # drawn in their own sections
    wanted = [name for name in figures.figure_names(config) if name not in mapped]
    outcomes = config["evaluate"]["outcomes"]
    drawn: dict[str, tuple[Any, str]] = {}

    # training curves
    histories = {}
    for run in config["runs"]:
        history = tables.read_tsv(layout.history(run))
        if history is not None and {"epoch", "loss"} <= set(history.columns) and not history.empty:
            histories[run] = history
    if histories:
        drawn["training_curves"] = (figures.training_curves(histories),
                                    "Training curves per run: loss (IFM term dashed) and contrastive top-1 accuracy.")
    else:
        drawn["training_curves"] = (figures.placeholder("training curves", "no training history found"),
                                    "No training history found (work/runs/<run>/history.tsv).")

    # scatter (regression) and confusion (ordinal) of the best run
    by_key = {s.key: s for s in sets}
    for name, spec in outcomes.items():
        if spec["kind"] == "regression":
            best = tables.best_run(main, tables.Column(name, "r2"))
            panels = []
            for s in ([best] if best else []) + [by_key.get("densitometry/lung")]:
                if s is not None and s.key in predictions:
                    frame = predictions[s.key]
                    frame = frame[(frame["outcome"] == name) & (frame["repeat"] == frame["repeat"].min())]
                    if not frame.empty:
                        panels.append((s.label, frame))
            if panels:
                drawn[f"scatter_{name}"] = (figures.scatter(name, panels),
                                            f"{name}: out-of-fold predicted vs observed (repeat 0), "
                                            f"best run by R² and densitometry.")
            else:
                drawn[f"scatter_{name}"] = (figures.placeholder(name, "no predictions found"),
                                            f"{name}: no out-of-fold predictions found.")
        else:
            best = tables.best_run(main, tables.Column(name, "acc"))
            frame = predictions.get(best.key) if best else None
            frame = frame[frame["outcome"] == name] if frame is not None else None
            if frame is not None and not frame.empty:
                drawn[f"confusion_{name}"] = (figures.confusion(name, best.label, frame, spec.get("levels")),
                                              f"{name}: confusion matrix of the best run by accuracy ({best.label}), "
                                              "counts summed over CV repeats.")
            else:
                drawn[f"confusion_{name}"] = (figures.placeholder(name, "no predictions of a run found"),
                                              f"{name}: no out-of-fold predictions of a run found.")

    drawn["patch_grid"] = _patch_grid_figure(config, layout, figures)

    if "readout" in wanted:
        table = tables.readout_table(sets, readouts)
        if not table.empty:
            drawn["readout"] = (figures.readout_heatmap(table),
                                "Out-of-fold R² of a linear read-out of each latent factor from each feature set.")
        else:
            drawn["readout"] = (figures.placeholder("read-out", "no read-out results found"),
                                "No read-out results found (results/<run>/<pooling>/readout.tsv).")

    parts = []
    preview = figures_dir / "synthetic_preview.png"
    if preview.is_file() and preview.stat().st_size:
        parts.append(html.figure(preview.read_bytes(), "synthetic cohort preview",
                                 "A few phantoms of the synthetic cohort (axial and coronal mid-slices)."))
    for name in wanted:
        figure, caption = drawn[name]
        data = figures.save_png(figure, figures_dir / f"{name}.png")
        parts.append(html.figure(data, name, caption))
    return parts


def _patch_grid_figure(config, layout, figures) -> tuple[Any, str]:
    """The patch grid drawn on one subject, or a placeholder saying why it could not be drawn."""
    import numpy as np

    from pipeline.errors import CopdsslError
    from pipeline.status import OK, read_status

    sid = config["report"]["overlay_subject"]
    try:
        if not sid:
            from pipeline.manifest import read_subjects

            candidates = [s.sid for s in read_subjects(layout.subjects())] if layout.subjects().is_file() else []
            sid = next((s for s in candidates if layout.status("patches", s).is_file()
                        and read_status(layout.status("patches", s)).get("status") == OK), None)
        if not sid:
            raise FileNotFoundError("no subject passed the patches stage")
        ct_path, tfm_path, grid_path = layout.ct(sid), layout.transform(sid), layout.grid()
        for path in (ct_path, tfm_path, grid_path):
            if not path.is_file() or path.stat().st_size == 0:
                raise FileNotFoundError(f"{path} is missing or empty")
        import SimpleITK as sitk

        ct = sitk.ReadImage(str(ct_path))
        transform = sitk.ReadTransform(str(tfm_path))
        grid = read_grid(grid_path, "centers_mm", "patch_size", "spacing_mm")
        centers, half = grid["centers_mm"], 0.5 * grid["patch_size"] * grid["spacing_mm"]
        figure = figures.patch_grid(sid, ct, transform, centers, half)
        return figure, (f"Patch grid of the atlas mapped through subject {sid}'s affine transform, on its axial and "
                        "coronal mid-slices; each box is the patch cut there (axis-aligned, at the mapped centre).")
    except (OSError, KeyError, RuntimeError, ValueError, CopdsslError) as error:
        reason = " ".join(str(error).split())
        log.warning("report: patch grid figure not drawn: %s", reason)
        return figures.placeholder("patch grid", f"not drawn: {reason}"), f"Patch grid not drawn: {reason}."


def _location_map_section(config, layout, figures_dir) -> list[str]:
    """Per mapped run, the per-location read-out R² (``results/<run>/location_map.tsv``) on the atlas."""
    import math

    import numpy as np

    from pipeline.config import location_map_runs
    from pipeline.report import figures, html, tables

    runs = location_map_runs(config)
    if not runs:
        return [html.note("No run is mapped: report.location_map_runs is empty, or no run trains (epochs > 0).")]
    evaluate = config["evaluate"]
    if config["cohort"]["truth"]:
        what = "each latent factor of the synthetic cohort (cle, pse, awt)"
    else:
        names = [name for name, spec in evaluate["outcomes"].items() if spec["kind"] == "regression"]
        what = "each regression outcome (" + ", ".join(names) + ")"
    maps = {}
    for run in runs:
        frame = tables.read_tsv(layout.location_map(run))
        if frame is not None and {"location", "target", "r2", "n"} <= set(frame.columns) and not frame.empty:
            maps[run] = frame
    top = max((float(np.nanmax(frame["r2"].to_numpy(float))) for frame in maps.values()), default=0.0)
    vmax = max(0.1, math.ceil(np.nan_to_num(top) * 10) / 10)  # one colour scale for every run and target
    atlas, reason = _atlas_for_map(layout)
    parts = [html.paragraph(
        f"For every atlas grid location, the out-of-fold R² of {what} predicted from that location's patch "
        "embedding alone, one figure per run: the read-out's head (StandardScaler + ridge, penalty chosen by inner "
        f"{evaluate['inner_folds']}-fold CV) with the shared folds of the main table ({evaluate['n_folds']}-fold "
        "CV, repeat 0 only). Each filled square is a patch location whose box crosses the drawn slice of the "
        "atlas lung (white outline): left an axial slice (patient right on the left), right a coronal slice "
        "(superior up), each through the middle of the patch layer nearest the lung centroid. One colour scale "
        f"for every panel and run, from 0 (R² ≤ 0: nothing beyond the mean) to {vmax:g}. A factor that lives in "
        "one region shows as bright squares there: upper-zone centrilobular emphysema (cle) high in the coronal "
        "slice, airway wall thickness (awt) in the airway-rich central lung.")]
    for run in runs:
        name = f"locmap_{run}"
        frame = maps.get(run)
        if frame is None:
            figure = figures.placeholder(f"location map {run}", "no location map found")
            caption = f"{run}: no location map found ({layout.location_map(run)})."
        elif atlas is None:
            figure = figures.placeholder(f"location map {run}", reason)
            caption = f"{run}: the atlas could not be read ({reason})."
        else:
            mask, corners, patch_size, spacing = atlas
            values = {}
            for target, group in frame.groupby("target", sort=False):
                r2 = np.full(corners.shape[0], np.nan)
                locations = group["location"].to_numpy(int)
                keep = (locations >= 0) & (locations < corners.shape[0])
                r2[locations[keep]] = group["r2"].to_numpy(float)[keep]
                values[target] = r2
            figure = figures.location_map(run, mask, corners, patch_size, values, vmax=vmax, spacing=spacing)
            best = "; ".join(f"{target} {np.nanmax(r2):.2f} at location {int(np.nanargmax(r2))}"
                             for target, r2 in values.items() if np.isfinite(r2).any())
            caption = (f"{run}: out-of-fold R² per location, n = {int(frame['n'].max())} subjects; best location "
                       f"per target: {best}.")
        data = figures.save_png(figure, figures_dir / f"{name}.png")
        parts.append(html.figure(data, name, caption))
    return parts


def _atlas_for_map(layout):
    """(atlas labels [Z, Y, X], grid corners [P, 3], patch size, spacing (z, y, x)), or None and why."""
    import numpy as np

    try:
        for path in (layout.atlas_mask(), layout.grid()):
            if not path.is_file() or path.stat().st_size == 0:
                raise FileNotFoundError(f"{path} is missing or empty")
        import SimpleITK as sitk

        image = sitk.ReadImage(str(layout.atlas_mask()))
        grid = read_grid(layout.grid(), "corners", "patch_size")
        corners, patch_size = grid["corners"], grid["patch_size"]
        return (sitk.GetArrayFromImage(image), corners, patch_size, tuple(image.GetSpacing())[::-1]), ""
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        reason = " ".join(str(error).split())
        log.warning("report: location maps: %s", reason)
        return None, f"atlas unreadable: {reason}"


def _readout_section(sets, readouts) -> list[str]:
    from pipeline.report import html, tables

    table = tables.readout_table(sets, readouts)
    if table.empty:
        return [html.note("No read-out results found (results/<run>/<pooling>/readout.tsv).")]
    return [html.paragraph(
        "Out-of-fold R² of a ridge read-out of each latent factor of the synthetic cohort from each feature set "
        "(mean ± sd over repeats): which factors a representation keeps and which it suppresses. The oracle row "
        "reads the factors from themselves (its cle, pse and awt are the features)."), html.readout_table(table)]


def _qc_section(config, layout, metrics, outcomes, figures_dir) -> list[str]:
    import pandas as pd

    from pipeline.qc import FLAGGED, KEPT
    from pipeline.report import figures, html, tables

    parts = []
    qc, counts = tables.qc_summary(layout)
    register = config["register"]
    if qc is None:
        parts.append(html.note(f"No QC table found ({layout.qc_table()})."))
        figure = figures.placeholder("registration Dice", "no QC table found")
    else:
        parts.append(html.paragraph("Subjects per status: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                                    + ". Flagged subjects are kept; failed, incomplete and rejected ones are not used."))
        figure = figures.registration_dice(qc, register["min_dice"], register["flag_dice"])
        columns = [c for c in ("sid", "status", "failed_stage", "reason", "flag_reason") if c in qc.columns]
        flagged = qc.loc[qc["status"] == FLAGGED, ["sid", "flag_reason"]] if "flag_reason" in qc.columns else None
        excluded = qc.loc[~qc["status"].isin(KEPT), [c for c in columns if c != "flag_reason"]]
        if flagged is not None and not flagged.empty:
            parts.append("<h3>Flagged subjects (kept)</h3>")
            parts.append(html.dataframe(flagged.reset_index(drop=True), text_columns=list(flagged.columns)))
        if excluded.empty:
            parts.append(html.paragraph("No subject was excluded."))
        else:
            parts.append("<h3>Excluded subjects</h3>")
            parts.append(html.dataframe(excluded.reset_index(drop=True), text_columns=list(excluded.columns)))
    data = figures.save_png(figure, figures_dir / f"{figures.REGISTRATION_DICE}.png")
    parts.append(html.figure(data, "registration Dice", (
        f"Registration Dice of every kept subject; flagged ones in orange. Below register.min_dice "
        f"({register['min_dice']:g}) a subject fails; below register.flag_dice ({register['flag_dice']:g}) or "
        f"{register['flag_mad']:g} MAD below the cohort median it is kept and flagged for review.")))
    per_outcome = tables.outcome_counts(metrics, list(outcomes))
    if per_outcome:
        frame = pd.DataFrame([{"outcome": name, "column": outcomes[name]["column"],
                               "subjects": f"{lo}" if lo == hi else f"{lo}–{hi}"}
                              for name, (lo, hi) in per_outcome.items()])
        parts.append("<h3>Subjects per outcome</h3>")
        parts.append(html.paragraph("Subjects with features, folds and a non-missing value of the outcome."))
        parts.append(html.dataframe(frame, text_columns=["outcome", "column"]))
    return parts


def _provenance_section(layout, prov) -> list[str]:
    from pipeline.report import html, tables

    parts = [html.key_values({"config sha256": prov["config_sha256"], "date": prov["date"],
                              "python": prov["python"], "platform": prov["platform"]}),
             "<h3>Package versions</h3>", html.key_values(prov["versions"])]
    runtimes = tables.stage_runtimes(layout)
    parts.append("<h3>Run time per stage</h3>")
    if runtimes.empty:
        parts.append(html.note(f"No Snakemake benchmark files found under {layout.work / 'benchmarks'}."))
    else:
        parts.append(html.paragraph("Summed from Snakemake benchmark files (wall seconds over all jobs of the stage)."))
        parts.append(html.dataframe(runtimes, text_columns=["stage"], formats={"seconds": ".1f", "max_rss_mb": ".0f"}))
    return parts
