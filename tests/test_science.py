"""The science benchmark (benchmarks/science.py): the ladder file, and --quick end to end on a tiny cohort."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import science


def test_every_rung_resolves_to_valid_run_settings():
    from pipeline.config import run_settings, validate_config

    rungs = science.load_rungs()
    assert {"densitometry", "patchstats", "airway", "random_init", "reference", "default", "supervised"} <= set(rungs)
    # extends: the child's train settings are the parent's with its own merged over them
    assert rungs["default_ifm_e0.5"]["train"]["input"] == rungs["default"]["train"]["input"]
    assert rungs["default_ifm_e0.5"]["train"]["loss"] == {"method": "ifm", "epsilon": 0.5}
    assert rungs["lung_window"]["train"]["augment"] == rungs["masked_aug"]["train"]["augment"]
    runs = {name: rung["train"] for name, rung in rungs.items() if rung["kind"] != "baseline"}
    config = validate_config({"runs": runs, "report": {"location_map_runs": []}})
    for name in runs:
        run_settings(config, name)  # raises on a key the schema does not know


def test_a_circular_or_unknown_parent_is_an_error(tmp_path):
    path = tmp_path / "rungs.yaml"
    path.write_text("a: {kind: ssl, extends: b}\nb: {kind: ssl, extends: a}\n")
    with pytest.raises(ValueError, match="unknown or circular"):
        science.load_rungs(path)
    path.write_text("a: {kind: learned}\n")
    with pytest.raises(ValueError, match="kind must be"):
        science.load_rungs(path)
    path.write_text("a: {kind: ssl, ladder: yes please}\n")
    with pytest.raises(ValueError, match="ladder must be"):
        science.load_rungs(path)


def test_the_ladder_holds_the_reference_rows_and_the_default():
    ladder = [name for name, rung in science.load_rungs().items() if rung["ladder"]]
    assert {"densitometry", "patchstats", "airway", "random_init", "default_two_window_histogram_direct",
            "direct_ifm_e0.5"} <= set(ladder)
    assert not {"supervised", "default_long"} & set(ladder)  # diagnostics run by name


def test_quick_mode_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(science, "OUT_DIR", tmp_path / "out")
    monkeypatch.setattr(science, "RESULTS_DIR", tmp_path / "results")
    results = tmp_path / "results" / "seed1002-quick"
    results.mkdir(parents=True)
    (results / "awt_probe.json").write_text('{"cohort_seed": 1002}')  # another benchmark's file: not a rung
    assert science.main(["--quick", "--rungs", "densitometry", "default", "supervised"]) == 0
    default = json.loads((results / "default.json").read_text())
    assert default["kind"] == "ssl" and default["quick"] and default["seconds"] > 0
    assert default["resolved"]["input"]["lung_mask"] and default["resolved"]["positives"]["neighbour_prob"] == 1.0
    keys = set(default["seeds"])
    assert {"s0", "s0/weighted", "s0/interior", "s0/+densitometry", "s0/interior/+densitometry"} <= keys
    for record in default["seeds"].values():
        for column in (*science.LATENT, "rot_z_deg", "lung_height_mm", "logFEV1pp"):
            assert np.isfinite(record[column]["mean"])
    for name in ("densitometry", "supervised"):
        record = json.loads((results / f"{name}.json").read_text())
        assert "cle" in next(iter(record["seeds"].values()))
    table = (results / "table.md").read_text().splitlines()
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert labels[:2] == ["densitometry", "default"] and "default (interior)" in labels and "supervised" in labels
    assert len(table[0].split("|")) == len(table[2].split("|")) and "awt_probe" not in labels
