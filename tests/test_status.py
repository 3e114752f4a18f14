"""Failure isolation: a failing subject records its reason and tombstones, downstream skips it."""

import json
import logging

import numpy as np
import pytest

from pipeline.errors import SubjectError
from pipeline.files import atomic_path, write_json, write_npy
from pipeline.status import FAILED, OK, SKIPPED, first_problem, run_subject_stage


def test_ok_stage_records_metrics_and_keeps_outputs(tmp_path):
    out = tmp_path / "a.npy"
    status = run_subject_stage(sid="S1", stage="ingest", status_path=tmp_path / "s.json", outputs=[out],
                               work=lambda: (write_npy(out, np.arange(3)), {"n": 3})[1])
    assert status == {"sid": "S1", "stage": "ingest", "status": OK, "n": 3}
    assert json.loads((tmp_path / "s.json").read_text())["n"] == 3
    assert np.load(out).tolist() == [0, 1, 2]


def test_subject_error_is_recorded_with_tombstones(tmp_path, caplog):
    out1, out2 = tmp_path / "ct.nii.gz", tmp_path / "sub" / "x.json"

    def work():
        out1.write_bytes(b"partial")  # a stage that wrote something before failing
        raise SubjectError("S2", "truncated or corrupt NIfTI: unexpected end of file", "ingest")

    with caplog.at_level(logging.ERROR):
        status = run_subject_stage(sid="S2", stage="ingest", status_path=tmp_path / "s.json",
                                   outputs=[out1, out2], work=work)
    assert status["status"] == FAILED and status["failed_stage"] == "ingest"
    assert status["reason"] == "truncated or corrupt NIfTI: unexpected end of file"
    assert out1.stat().st_size == 0 and out2.stat().st_size == 0
    assert "subject S2 [ingest]: truncated or corrupt NIfTI" in caplog.text


def test_unexpected_exception_is_isolated(tmp_path):
    status = run_subject_stage(sid="S3", stage="lung", status_path=tmp_path / "s.json", outputs=[tmp_path / "o"],
                               work=lambda: 1 / 0)
    assert status["status"] == FAILED
    assert status["reason"].startswith("unexpected ZeroDivisionError")


def test_downstream_of_a_failure_is_skipped_without_running(tmp_path):
    write_json(tmp_path / "up.json", {"sid": "S4", "stage": "ingest", "status": FAILED,
                                      "failed_stage": "ingest", "reason": "modality MR is not CT"})
    ran = []
    status = run_subject_stage(sid="S4", stage="lung", status_path=tmp_path / "lung.json",
                               outputs=[tmp_path / "lung.nii.gz"], upstream=[tmp_path / "up.json"],
                               work=lambda: ran.append(1))
    assert not ran
    assert status["status"] == SKIPPED and status["failed_stage"] == "ingest"
    assert status["reason"] == "modality MR is not CT"
    # and the skip propagates with the original cause
    status2 = run_subject_stage(sid="S4", stage="register", status_path=tmp_path / "reg.json",
                                outputs=[tmp_path / "t.tfm"], upstream=[tmp_path / "lung.json"], work=lambda: {})
    assert status2["failed_stage"] == "ingest"


def test_status_helpers(tmp_path):
    paths = []
    for sid, state in [("A", OK), ("B", FAILED), ("C", OK)]:
        paths.append(tmp_path / f"{sid}.json")
        write_json(paths[-1], {"sid": sid, "status": state, "reason": "x" if state != OK else None})
    assert first_problem(paths)["sid"] == "B"
    assert first_problem([paths[0], paths[2]]) is None


def test_atomic_path_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "out.npy"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_passed_subjects_missing_status_is_an_error_or_skipped(tmp_path, caplog):
    from pipeline.layout import Layout
    from pipeline.status import passed_subjects

    layout = Layout(work=tmp_path)
    write_json(layout.status("patches", "A"), {"sid": "A", "status": OK})
    write_json(layout.status("patches", "B"), {"sid": "B", "status": FAILED, "reason": "x"})
    assert passed_subjects(layout, ["B", "A"], "patches") == ["A"]
    with pytest.raises(SubjectError, match="subject C .*no patches status file"):
        passed_subjects(layout, ["A", "C"], "patches")
    with caplog.at_level(logging.WARNING):
        assert passed_subjects(layout, ["C", "A"], "patches", missing="skip") == ["A"]
    assert "subject C: no patches status" in caplog.text


def test_aggregate_stages_read_the_stage_table(tmp_path):
    """passed_in_stage_table reads work/qc/<stage>.tsv (what `copdssl qc --stage` writes from the
    status files), in the order asked, and names a missing table or a subject it lacks."""
    from pipeline.errors import ConfigError
    from pipeline.files import write_tsv
    from pipeline.layout import Layout
    from pipeline.qc import stage_rows
    from pipeline.status import passed_in_stage_table

    layout = Layout(work=tmp_path)
    with pytest.raises(ConfigError, match=r"stage table .*patches.tsv does not exist; `copdssl qc --stage patches`"):
        passed_in_stage_table(layout, ["A"], "patches")
    write_json(layout.status("patches", "A"), {"sid": "A", "status": OK})
    write_json(layout.status("patches", "B"), {"sid": "B", "status": FAILED, "reason": "x"})
    write_json(layout.status("patches", "C"), {"sid": "C", "status": OK})
    write_tsv(layout.stage_table("patches"), stage_rows(["A", "B", "C"], "patches", layout))
    assert passed_in_stage_table(layout, ["C", "B", "A"], "patches") == ["C", "A"]
    # the table, not the status files, decides: a status file changed after the table is not seen
    write_json(layout.status("patches", "B"), {"sid": "B", "status": OK})
    assert passed_in_stage_table(layout, ["A", "B"], "patches") == ["A"]
    with pytest.raises(ConfigError, match="has no row for subject D: it is older than the subjects table"):
        passed_in_stage_table(layout, ["A", "D"], "patches")
