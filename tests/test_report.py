"""The HTML outcome report: every row and column, QC exclusions, embedded figures, valid offline HTML."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.report import build_report
from pipeline.report.figures import figure_names, grid_footprints
from pipeline.feature_sets import feature_sets
from pipeline.report.tables import config_hash
from tests.eval_fixtures import (FLAGGED_REASON, eval_config, make_eval_cohort, make_subject_image, write_benchmarks, write_history,
                                 write_qc, write_results)

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "wbr", "source"}
MEANS = {("logFEV1pp", "r2"): 0.30, ("logFEV1FVC", "r2"): 0.20, ("CLE", "acc"): 0.40, ("CLE", "acc1off"): 0.80,
         ("Paraseptal", "acc"): 0.50, ("Paraseptal", "acc1off"): 0.90, ("mMRC", "acc"): 0.30,
         ("mMRC", "acc1off"): 0.70}
RUN_SETS = [("random_init", "mean"), ("random_init", "gnn"), ("moco", "mean"), ("moco", "gnn"),
            ("ifm_e0.1", "mean"), ("ifm_e0.1", "gnn")]


class Checker(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.rows = [], [], [], []
        self.links = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "tr" and "data-key" in attrs:
            self.rows.append((attrs["data-key"], attrs.get("class")))
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def parse(text):
    checker = Checker()
    checker.feed(text)
    checker.close()
    return checker


def full_results(cohort, with_truth=True):
    layout = cohort.layout
    write_results(layout, "densitometry", "lung", MEANS, sids=cohort.ok_sids)
    for i, (run, pooling) in enumerate(RUN_SETS):
        # ifm_e0.1/gnn is best everywhere except CLE acc, where moco/mean is
        means = {k: v + 0.01 * i for k, v in MEANS.items()}
        if (run, pooling) == ("moco", "mean"):
            means[("CLE", "acc")] = 0.60
        write_results(layout, run, pooling, means, sids=cohort.ok_sids,
                      readout={"cle": 0.9, "pse": 0.8, "awt": 0.1 * i} if with_truth else None)
    if with_truth:
        write_results(layout, "oracle", "truth", {k: v + 0.3 for k, v in MEANS.items()}, sids=cohort.ok_sids,
                      readout={"cle": 1.0, "pse": 1.0, "awt": 1.0})
    for run in ("random_init", "moco", "ifm_e0.1"):
        write_history(layout, run, ifm=run.startswith("ifm"))
    write_qc(layout, cohort)
    write_benchmarks(layout)
    make_subject_image(layout, cohort.ok_sids[0])


def test_report_has_every_row_column_exclusion_and_figure(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=20)
    full_results(cohort)
    config = eval_config(cohort={"source": "synthetic"})
    out = tmp_path / "results" / "report.html"
    rc = main(["report", "--settings", json.dumps(config), "--work", str(cohort.layout.work),
               "--results", str(cohort.layout.results), "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    checker = parse(text)
    assert not checker.errors and not checker.stack  # well-formed
    assert text.startswith("<!DOCTYPE html>") and "<title>test report &lt;copdssl&gt;</title>" in text
    # a synthetic-cohort report says what its short training can and cannot show, and where the full measurement is
    assert "embedded synthetic cohort" in text and f"training: {config['train']['epochs']} epoch(s)" in text
    assert "docs/science.md" in text

    # rows in the IFM table order, with their kinds; method and epsilon from the run settings
    keys = [key for key, _ in checker.rows]
    assert keys == ["densitometry/lung", *[f"{r}/{p}" for r, p in RUN_SETS], "oracle/truth"]
    assert dict(checker.rows)["oracle/truth"] == "oracle"
    row = re.search(r'<tr class="run" data-key="ifm_e0.1/mean">(.*?)</tr>', text).group(1)
    assert '<td class="text">ifm</td><td class="text">0.1</td>' in row
    assert '<td class="text">moco</td><td class="text">0</td>' in re.search(
        r'data-key="moco/gnn">(.*?)</tr>', text).group(1)
    for label in ("logFEV1pp R²", "logFEV1FVC R²", "CLE acc", "CLE 1-off", "Paraseptal acc", "Paraseptal 1-off",
                  "mMRC acc", "mMRC 1-off"):
        assert f">{label}</th>" in text
    # cells: mean ± sd over the 2 repeats (values mean ± 0.01 -> sd 0.0141); accuracies in %
    assert "<td>0.300 ± 0.014</td>" in text and "<td>40.0 ± 1.4</td>" in text
    # best per column in bold, the oracle (higher everywhere) excluded
    best = re.findall(r'data-key="([^"]+)">((?:(?!</tr>).)*)</tr>', text)
    bold = {key: row.count('<td class="best"><b>') for key, row in best}
    assert bold["ifm_e0.1/gnn"] == 7 and bold["moco/mean"] == 1 and bold["oracle/truth"] == 0
    assert '<td class="best"><b>60.0 ± 1.4</b></td>' in text

    # QC exclusions with stage and reason, and subjects per outcome
    for sid, reason in cohort.failed.items():
        assert f"<td class=\"text\">{sid}</td>" in text
        assert reason.replace("<", "&lt;") in text
    assert "duplicate subject ID" in text and "Subjects per outcome" in text
    # a flagged subject is listed as kept, with its reason, and counted as flagged
    flagged = text[text.index("Flagged subjects (kept)"):text.index("Excluded subjects")]
    assert FLAGGED_REASON in flagged and "flagged: 1" in text

    # read-out table (synthetic): every run x pooling and the oracle, every factor
    readout = text[text.index('<table class="readout">'):]
    readout = readout[:readout.index("</table>")]
    assert readout.count("<tr><td") == len(RUN_SETS) + 1 and ">awt</th>" in readout and ">oracle</td>" in readout

    # figures: embedded as base64 PNG and written under results/figures with the declared names
    names = figure_names(config)
    assert set(names) == {"training_curves", "patch_grid", "scatter_logFEV1pp", "scatter_logFEV1FVC",
                          "confusion_CLE", "confusion_Paraseptal", "confusion_mMRC", "readout",
                          "locmap_moco", "locmap_ifm_e0.1",  # location maps: placeholders without their TSVs
                          "registration_dice"}
    for name in names:
        png = (cohort.layout.results / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
    assert len(checker.images) == len(names)
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)
    assert "not drawn" not in text  # the patch grid was drawn on the subject

    # offline: no script, no stylesheet link, no external URL
    assert "<script" not in text and "<link" not in text
    assert all(link.startswith(("data:", "#")) for link in checker.links)

    # provenance
    assert config_hash(config) in text and ">scikit-learn</th>" in text and ">statsmodels</th>" in text
    assert re.search(r"<td class=\"text\">ingest</td><td>2</td><td>4.0</td>", text)


def test_report_without_truth_gnn_qc_or_history_still_renders(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=10)
    config = eval_config(cohort={"source": "manifest", "manifest": "m.tsv", "phenotypes": "p.tsv", "truth": None},
                         pool={"methods": ["mean"]})
    write_results(cohort.layout, "densitometry", "lung", MEANS, sids=cohort.ok_sids)
    write_results(cohort.layout, "moco", "mean", MEANS, sids=cohort.ok_sids, repeats=1)
    out = tmp_path / "report.html"
    build_report(config, cohort.layout, out)
    assert "docs/science.md" not in out.read_text()  # real data: no synthetic-cohort caveat
    text = out.read_text()
    checker = parse(text)
    assert not checker.errors and not checker.stack
    assert [key for key, _ in checker.rows] == ["densitometry/lung", "moco/mean"]
    # one repeat: no sd; equal means are both best
    assert '<td class="best"><b>0.300</b></td>' in text and '<td class="best"><b>0.300 ± 0.014</b></td>' in text
    assert "No oracle row" in text and "No gnn pooling rows" in text
    assert "random_init / mean: no metrics found" in text and "ifm_e0.1 / mean: no metrics found" in text
    assert "No QC table found" in text and "No training history found" in text
    assert "Patch grid not drawn" in text
    assert 'id="readout"' not in text
    names = figure_names(config)
    assert "readout" not in names
    assert sorted(p.stem for p in (cohort.layout.results / "figures").glob("*.png")) == sorted(names)


def test_combined_rows_follow_the_runs_with_their_gain_over_the_baseline(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=10)
    config = eval_config(runs={"moco": {}}, pool={"methods": ["mean"]},
                         cohort={"source": "manifest", "manifest": "m.tsv", "phenotypes": "p.tsv", "truth": None})
    layout = cohort.layout
    write_results(layout, "densitometry", "lung", MEANS, sids=cohort.ok_sids)
    write_results(layout, "airway", "lung", {k: v + 0.02 for k, v in MEANS.items()}, sids=cohort.ok_sids)
    write_results(layout, "moco", "mean", {k: v - 0.05 for k, v in MEANS.items()}, sids=cohort.ok_sids)
    write_results(layout, "densitometry+moco", "mean", {k: v + 0.10 for k, v in MEANS.items()}, sids=cohort.ok_sids)
    out = tmp_path / "report.html"
    build_report(config, layout, out)
    text = out.read_text()
    checker = parse(text)
    assert not checker.errors and not checker.stack
    assert checker.rows == [("densitometry/lung", "baseline"), ("airway/lung", "baseline"), ("moco/mean", "run"),
                            ("densitometry+moco/mean", "combined")]
    assert "patch statistics: no metrics found (results/patchstats/patches/metrics.tsv)" in text
    airway = re.search(r'data-key="airway/lung">(.*?)</tr>', text).group(1)
    assert '<td class="text">hand-crafted airway / high-attenuation</td>' in airway
    row = re.search(r'data-key="densitometry\+moco/mean">(.*?)</tr>', text).group(1)
    assert '<td class="text">densitometry + moco</td><td class="text">moco</td>' in row
    # the gain over densitometry alone: +0.100 R², +10.0 percentage points of accuracy; best in bold
    assert '<td class="best"><b>0.400 ± 0.014 <span class="gain">(+0.100)</span></b></td>' in row
    assert '50.0 ± 1.4 <span class="gain">(+10.0)</span>' in row
    assert "gain" not in re.search(r'data-key="moco/mean">(.*?)</tr>', text).group(1)
    assert "what the learned features add" in text


def test_feature_sets_follow_the_config():
    config = eval_config(runs={"moco": {}, "random_init": {"epochs": 0},
                               "ifm_only_e0.2": {"loss": {"method": "ifm_only", "epsilon": 0.2},
                                                 "graph": {"enabled": False}}})
    sets = feature_sets(config)
    runs = [("random_init", "mean", "random init", None), ("random_init", "gnn", "random init", None),
            ("moco", "mean", "moco", 0.0), ("moco", "gnn", "moco", 0.0),
            ("ifm_only_e0.2", "mean", "ifm_only", 0.2)]  # graph stage disabled: no gnn row
    assert [(s.name, s.pooling, s.method, s.epsilon) for s in sets] == [
        ("densitometry", "lung", "densitometry", None), ("patchstats", "patches", "patchstats", None),
        ("airway", "lung", "airway", None), *runs,
        *[(f"densitometry+{run}", pooling, method, epsilon) for run, pooling, method, epsilon in runs],
        ("oracle", "truth", "oracle", None)]
    assert [s.label for s in sets if s.name.startswith(("airway", "densitometry+moco"))] == [
        "hand-crafted airway / high-attenuation", "densitometry + moco / mean", "densitometry + moco / gnn"]
    assert {s.kind for s in sets if "+" in s.name} == {"combined"}
    sets = feature_sets(eval_config(evaluate={"baselines": ["densitometry"], "combine_with": []}, runs={"moco": {}},
                                    pool={"methods": ["mean"]}))
    assert [s.key for s in sets] == ["densitometry/lung", "moco/mean"]
    assert config_hash(config) == config_hash(json.loads(json.dumps(config)))
    assert config_hash(config) != config_hash(eval_config())


def test_grid_footprints_are_the_cut_patches_at_the_mapped_centres():
    import SimpleITK as sitk

    ct = sitk.Image(40, 40, 40, sitk.sitkInt16)
    ct.SetSpacing((2.0, 2.0, 2.0))
    ct.SetOrigin((-10.0, -10.0, -10.0))
    center = np.array([[30.0, 20.0, 10.0]])  # (x, y, z) mm -> index (20, 15, 10)
    identity = sitk.AffineTransform(3)
    (square,) = grid_footprints(ct, identity, center, 4.0, "axial", 10)
    np.testing.assert_allclose(square, [[18, 13], [22, 13], [22, 17], [18, 17]])  # half 4 mm = 2 voxels
    shifted = sitk.AffineTransform(3)
    shifted.SetTranslation((6.0, 0.0, 1.0))
    (square,) = grid_footprints(ct, shifted, center, 4.0, "coronal", 15)
    np.testing.assert_allclose(square, [[21, 8.5], [25, 8.5], [25, 12.5], [21, 12.5]])  # (i, k)
    assert grid_footprints(ct, identity, center, 4.0, "axial", 13) == []  # 3 voxels away: not cut
    rotated = sitk.Euler3DTransform()
    rotated.SetRotation(0.0, 0.0, 0.3)  # the cut patch stays axis-aligned at the rotated centre
    (square,) = grid_footprints(ct, rotated, center, 4.0, "axial", 10)
    u, v = square.mean(axis=0)
    np.testing.assert_allclose(square, [[u - 2, v - 2], [u + 2, v - 2], [u + 2, v + 2], [u - 2, v + 2]])
    x, y = 30.0 * np.cos(0.3) - 20.0 * np.sin(0.3), 30.0 * np.sin(0.3) + 20.0 * np.cos(0.3)
    np.testing.assert_allclose((u, v), ((x + 10) / 2, (y + 10) / 2), atol=1e-9)
    with pytest.raises(ValueError, match="'sagittal'"):
        grid_footprints(ct, identity, center, 4.0, "sagittal", 0)
