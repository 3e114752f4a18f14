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
