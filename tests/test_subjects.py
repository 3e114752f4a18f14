"""Subject IDs and manifest screening: unsafe and duplicate IDs are rejected, the rest go on."""

import pytest

from pipeline.errors import ConfigError, SubjectError
from pipeline.subjects import check_sid, read_manifest, screen_subjects


@pytest.mark.parametrize("sid", ["10005Q", "SYN0001", "a.b-c_d", "0"])
def test_safe_ids(sid):
    assert check_sid(sid) == sid


@pytest.mark.parametrize("sid, cause", [
    ("../etc", "path separator"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("", "empty"),
    ("a..b", "without '..'"),
    (".hidden", "must match"),
    ("x" * 65, "must match"),
    ("sp ace", "must match"),
])
def test_unsafe_ids(sid, cause):
    with pytest.raises(SubjectError) as error:
        check_sid(sid)
    assert cause in str(error.value) and "unsafe subject ID" in str(error.value)
    assert "\n" not in str(error.value)


def test_screening_rejects_duplicates_and_unsafe_but_keeps_the_rest():
    rows = [
        {"sid": "A1", "image": "a1.nii.gz"},
        {"sid": "B2", "image": "b2"},
        {"sid": "A1", "image": "a1_again.nii.gz"},
        {"sid": "../x", "image": "x.nii.gz"},
        {"sid": "C3", "image": ""},
        {"sid": "D4", "image": "d4.mha", "format": "analyze"},
        {"sid": "E5", "image": "/abs/e5.nii", "format": "NIFTI"},
    ]
    subjects, rejections = screen_subjects(rows, base_dir="data")
    assert [(s.sid, s.image, s.format) for s in subjects] == [("B2", "data/b2", "dicom"), ("E5", "/abs/e5.nii", "nifti")]
    reasons = {(r.sid, r.reason.split(":")[0]) for r in rejections}
    assert reasons == {("A1", "duplicate subject ID"), ("../x", "unsafe subject ID"),
                       ("C3", "no image path in the manifest"), ("D4", "unknown image format 'analyze' (expected nifti or dicom)")}
    assert sum(r.sid == "A1" for r in rejections) == 2


def test_read_manifest_resolves_relative_paths(tmp_path):
    manifest = tmp_path / "cohort" / "subjects.tsv"
    manifest.parent.mkdir()
    manifest.write_text("sid\timage\tformat\nS1\timages/S1.nii.gz\tnifti\nS2\timages/S2\tdicom\n")
    subjects, rejections = read_manifest(manifest)
    assert not rejections
    assert subjects[0].image == str(tmp_path / "cohort" / "images" / "S1.nii.gz")
    assert subjects[1].format == "dicom"


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_manifest(tmp_path / "none.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tpath\nS1\tx.nii\n")
    with pytest.raises(ConfigError, match="lacks column"):
        read_manifest(bad)


def test_manifest_stage_writes_tables_that_read_back(tmp_path):
    """The manifest stage's two TSVs (one writer, pipeline.files.write_tsv) read back as written."""
    from pipeline.cli import main
    from pipeline.manifest import read_rejections, read_subjects

    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("sid\timage\tformat\nS1\ta b/S1.nii.gz\tnifti\nbad id\tx.nii.gz\tnifti\nS2\tS2\tdicom\n")
    out, rejects = tmp_path / "work" / "subjects.tsv", tmp_path / "work" / "rejected.tsv"
    assert main(["manifest", "--manifest", str(manifest), "--out", str(out), "--rejects", str(rejects)]) == 0
    assert out.read_text().splitlines()[0] == "sid\timage\tformat"
    assert [(s.sid, s.image, s.format) for s in read_subjects(out)] == [
        ("S1", str(tmp_path / "a b" / "S1.nii.gz"), "nifti"), ("S2", str(tmp_path / "S2"), "dicom")]
    assert [r.sid for r in read_rejections(rejects)] == ["bad id"]
    assert rejects.read_text().splitlines()[0] == "sid\treason"


def test_write_tsv_takes_row_dicts_with_leading_columns(tmp_path):
    from pipeline.files import write_tsv

    path = tmp_path / "rows.tsv"
    write_tsv(path, [{"b": 1, "a": "x"}, {"a": "y", "c": 2.5}], ("a",))
    assert path.read_text() == "a\tb\tc\nx\t1\t\ny\t\t2.5\n"  # a first, then b, c by first appearance
    write_tsv(path, [], ("sid", "reason"))
    assert path.read_text() == "sid\treason\n"
