"""The manifest stage and the QC table, run through the real CLI."""

import csv

from pipeline.cli import main
from pipeline.files import write_json
from pipeline.layout import Layout


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_manifest_then_qc_table(tmp_path):
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("sid\timage\nGOOD\tg.nii.gz\nBAD\tb.nii.gz\nDUP\td1.nii.gz\nDUP\td2.nii.gz\na/b\tx.nii.gz\n")
    work = tmp_path / "work"
    layout = Layout(work=work)
    rc = main(["manifest", "--manifest", str(manifest), "--out", str(layout.subjects()),
               "--rejects", str(layout.manifest_rejects())])
    assert rc == 0
    assert [r["sid"] for r in read_tsv(layout.subjects())] == ["GOOD", "BAD"]
    assert {r["sid"] for r in read_tsv(layout.manifest_rejects())} == {"DUP", "a/b"}

    for stage in ("ingest", "lung", "register", "patches"):
        write_json(layout.status(stage, "GOOD"), {"sid": "GOOD", "stage": stage, "status": "ok", "dice": 0.97})
    write_json(layout.status("ingest", "BAD"), {"sid": "BAD", "stage": "ingest", "status": "ok"})
    write_json(layout.status("lung", "BAD"), {"sid": "BAD", "stage": "lung", "status": "failed", "failed_stage": "lung",
                                             "reason": "no lungs found: 3 ml of air inside the body"})
    for stage in ("register", "patches"):
        write_json(layout.status(stage, "BAD"), {"sid": "BAD", "stage": stage, "status": "skipped",
                                                "failed_stage": "lung", "reason": "no lungs found: 3 ml of air inside the body"})
    out = tmp_path / "results" / "qc.tsv"
    rc = main(["qc", "--subjects", str(layout.subjects()), "--rejects", str(layout.manifest_rejects()),
               "--work", str(work), "--out", str(out)])
    assert rc == 0
    rows = {r["sid"]: r for r in read_tsv(out)}
    assert rows["GOOD"]["status"] == "ok" and rows["GOOD"]["register_dice"] == "0.97"
    assert (rows["BAD"]["status"], rows["BAD"]["failed_stage"]) == ("failed", "lung")
    assert rows["BAD"]["reason"].startswith("no lungs found")
    assert rows["DUP"]["status"] == "rejected" and "duplicate" in rows["DUP"]["reason"]
    assert rows["a/b"]["reason"].startswith("unsafe subject ID")


def test_qc_table_grades_kept_subjects_flagged_by_the_stage_or_by_the_cohort(tmp_path):
    """Flagged subjects stay in the table as kept ('flagged'), with the reason; failures stay failures."""
    import json

    layout = Layout(work=tmp_path / "work")
    dice = {f"S{i}": 0.95 + 0.005 * (i % 3) for i in range(8)}
    dice.update(LOW=0.80, IMPERFECT=0.95)
    sids = [*dice, "FAIL"]
    (tmp_path / "subjects.tsv").write_text("sid\timage\tformat\n" + "".join(f"{s}\t{s}.nii.gz\tnifti\n" for s in sids))
    for sid in sids:
        for stage in ("ingest", "lung", "patches"):
            write_json(layout.status(stage, sid), {"sid": sid, "stage": stage, "status": "ok"})
    for sid, value in dice.items():
        flag = "registration imperfect: left lung 0.70" if sid == "IMPERFECT" else ""
        write_json(layout.status("register", sid), {"sid": sid, "stage": "register", "status": "ok", "dice": value,
                                                     "flagged": bool(flag), "flag_reason": flag})
    write_json(layout.status("register", "FAIL"), {"sid": "FAIL", "stage": "register", "status": "failed",
                                                    "reason": "registration failed: Dice 0.400"})
    out = tmp_path / "qc.tsv"
    rc = main(["qc", "--subjects", str(tmp_path / "subjects.tsv"), "--work", str(layout.work), "--out", str(out),
               "--settings", json.dumps({"flag_mad": 3.0})])
    assert rc == 0
    rows = {r["sid"]: r for r in read_tsv(out)}
    assert {sid for sid, r in rows.items() if r["status"] == "flagged"} == {"LOW", "IMPERFECT"}
    assert rows["IMPERFECT"]["flag_reason"] == "registration imperfect: left lung 0.70"
    assert rows["LOW"]["flag_reason"].startswith("registration Dice 0.800 is an outlier of the cohort: below its median")
    assert (rows["FAIL"]["status"], rows["FAIL"]["failed_stage"], rows["FAIL"]["flag_reason"]) == ("failed", "register", "")
    assert all(rows[f"S{i}"]["status"] == "ok" for i in range(8))
    # a looser cohort rule flags only what the stage flagged
    main(["qc", "--subjects", str(tmp_path / "subjects.tsv"), "--work", str(layout.work), "--out", str(out),
          "--settings", json.dumps({"flag_mad": 100.0})])
    assert {r["sid"] for r in read_tsv(out) if r["status"] == "flagged"} == {"IMPERFECT"}


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    rc = main(["manifest", "--manifest", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "s.tsv"),
               "--rejects", str(tmp_path / "r.tsv")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
