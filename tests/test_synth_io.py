"""Writers and CLI: DICOM and NIfTI geometry, reorientation, tables, failure isolation."""

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from pipeline.synth import cohort
from pipeline.synth.dicom import patient_tags, slice_file_name, write_dicom_series
from pipeline.synth.nifti import write_nifti
from pipeline.synth.plan import PHENOTYPE_COLUMNS, plan_cohort
from pipeline.synth.preview import read_written_image
from pipeline.synth.render import render_subject
from tests.synth_fixtures import small_plan, small_settings


@pytest.fixture(scope="module")
def subject():
    plan = small_plan(2, format="dicom", image="images/SYN0002", padding_hu=-3024)
    return plan, render_subject(plan)


def _read_series(directory):
    """HU volume [z, y, x] of a DICOM series sorted by position, and the sorted datasets."""
    slices = [pydicom.dcmread(f) for f in sorted(directory.iterdir())]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    return hu, slices


def test_dicom_series_reads_back_to_the_rendered_hu(tmp_path, subject):
    plan, rendered = subject
    n = write_dicom_series(tmp_path / "series", rendered.hu, rendered.grid, plan)
    hu, slices = _read_series(tmp_path / "series")
    assert n == len(slices) == rendered.hu.shape[0]
    assert np.array_equal(hu, rendered.hu.astype(float))          # padding (-3024) included
    back, spacing = read_written_image(tmp_path / "series", "dicom")
    assert np.array_equal(back, rendered.hu) and spacing == pytest.approx(rendered.grid.spacing_zyx)
    assert hu.min() == -3024 and slices[0].PixelRepresentation == 1
    first = slices[0]
    assert first.Modality == "CT" and float(first.RescaleIntercept) == -1024 and float(first.RescaleSlope) == 1
    sz, sy, sx = rendered.grid.spacing_zyx
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([sy, sx], abs=1e-4)
    assert float(first.SliceThickness) == pytest.approx(sz, abs=1e-4)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    assert positions[:, :2] == pytest.approx(np.tile(rendered.grid.origin_lps[:2], (n, 1)), abs=1e-9)
    assert positions[:, 2] == pytest.approx(rendered.grid.origin_lps[2] + sz * np.arange(n), abs=1e-6)
    # file names are not in slice order, instance numbers run head to feet
    names = [slice_file_name(plan, k) for k in range(n)]
    assert names != sorted(names) and set(names) == {p.name for p in (tmp_path / "series").iterdir()}
    assert [int(ds.InstanceNumber) for ds in slices] == list(range(n, 0, -1))
    # identifying tags are set (so downstream can prove they do not leak); UIDs are unique
    assert str(first.PatientName) == patient_tags(plan)["PatientName"] and first.PatientID and first.PatientBirthDate
    assert len({ds.SOPInstanceUID for ds in slices}) == n and len({ds.SeriesInstanceUID for ds in slices}) == 1


def test_dicom_uids_are_deterministic_and_unsigned_without_padding(tmp_path, subject):
    plan, rendered = subject
    plain = dataclasses.replace(plan, padding_hu=None)
    hu = np.maximum(rendered.hu, -1024)
    write_dicom_series(tmp_path / "a", hu, rendered.grid, plain)
    write_dicom_series(tmp_path / "b", hu, rendered.grid, plain)
    a, sa = _read_series(tmp_path / "a")
    _, sb = _read_series(tmp_path / "b")
    assert [ds.SOPInstanceUID for ds in sa] == [ds.SOPInstanceUID for ds in sb]
    assert sa[0].PixelRepresentation == 0 and np.array_equal(a, hu)
    other = dataclasses.replace(plain, seed=plain.seed + 1)
    write_dicom_series(tmp_path / "c", hu, rendered.grid, other)
    assert {ds.SOPInstanceUID for ds in _read_series(tmp_path / "c")[1]}.isdisjoint({ds.SOPInstanceUID for ds in sa})
    # rewriting replaces the series atomically (no stale or temporary files remain)
    write_dicom_series(tmp_path / "a", hu, rendered.grid, plain)
    assert len(list((tmp_path / "a").iterdir())) == hu.shape[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_label_of_a_dicom_subject_has_the_dicom_geometry_in_ras(tmp_path, subject):
    plan, rendered = subject
    write_dicom_series(tmp_path / "series", rendered.hu, rendered.grid, plan)
    write_nifti(tmp_path / "label.nii.gz", rendered.labels, rendered.grid)
    _, slices = _read_series(tmp_path / "series")
    # the affine a reader builds from DICOM (LPS), converted to RAS by negating x and y
    row, col = (np.array([float(v) for v in slices[0].ImageOrientationPatient[i:i + 3]]) for i in (0, 3))
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    p0 = np.array([float(v) for v in slices[0].ImagePositionPatient])
    p1 = np.array([float(v) for v in slices[-1].ImagePositionPatient])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dc, col * dr, (p1 - p0) / (len(slices) - 1), p0
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    label = nib.load(tmp_path / "label.nii.gz")
    assert np.allclose(label.affine, ras, atol=1e-3)
    assert label.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(label.dataobj).T, rendered.labels)
    # right lung (label 1) on the patient's right: positive RAS x
    ijk = np.argwhere(np.asarray(label.dataobj) == 1).mean(axis=0)
    assert nib.affines.apply_affine(label.affine, ijk)[0] > 0
    ijk2 = np.argwhere(np.asarray(label.dataobj) == 2).mean(axis=0)
    assert nib.affines.apply_affine(label.affine, ijk2)[0] < 0


def test_reoriented_nifti_has_the_same_physical_content(tmp_path, subject):
    plan, rendered = subject
    write_nifti(tmp_path / "canonical.nii.gz", rendered.hu, rendered.grid)
    canonical = nib.load(tmp_path / "canonical.nii.gz")
    assert nib.aff2axcodes(canonical.affine) == ("L", "P", "S")
    assert int(canonical.header["qform_code"]) == 1 and int(canonical.header["sform_code"]) == 1
    assert np.allclose(canonical.get_qform(), canonical.get_sform())
    cases = (((2, 0, 1), (True, False, True)), ((0, 1, 2), (False, True, False)), ((1, 0, 2), (True, True, True)))
    for axes, flips in cases:
        write_nifti(tmp_path / "moved.nii.gz", rendered.hu, rendered.grid, axes, flips)
        moved = nib.load(tmp_path / "moved.nii.gz")
        assert moved.shape != canonical.shape or not np.allclose(moved.affine, canonical.affine)
        a, b = nib.as_closest_canonical(canonical), nib.as_closest_canonical(moved)
        assert np.allclose(a.affine, b.affine) and np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        # the world position of one voxel's value is the same in both files
        data = np.asarray(moved.dataobj)
        ijk = np.unravel_index(np.argmax(data), data.shape)
        world = nib.affines.apply_affine(moved.affine, ijk)
        back = np.rint(nib.affines.apply_affine(np.linalg.inv(canonical.affine), world)).astype(int)
        assert np.asarray(canonical.dataobj)[tuple(back)] == data[ijk]
        # the preview reader brings it back to the canonical [z, y, x] LPS array
        hu, spacing = read_written_image(tmp_path / "moved.nii.gz", "nifti")
        assert np.array_equal(hu, rendered.hu) and spacing == pytest.approx(rendered.grid.spacing_zyx)


def test_cli_writes_tables_images_labels_and_preview(tmp_path):
    from pipeline.cli import main

    settings = small_settings(n_subjects=3, dicom_fraction=0.5, reoriented_fraction=1.0, preview_subjects=2)
    out = tmp_path / "cohort"
    assert main(["synth", "--settings", json.dumps(settings), "--out-dir", str(out), "--threads", "2"]) == 0
    subjects = pd.read_csv(out / "subjects.tsv", sep="\t")
    assert list(subjects.columns) == ["sid", "image", "format"]
    assert subjects.sid.tolist() == ["SYN0001", "SYN0002", "SYN0003"]
    for row in subjects.itertuples():
        assert (out / row.image).is_dir() if row.format == "dicom" else (out / row.image).is_file()
        label = nib.load(out / "labels" / f"{row.sid}.nii.gz")
        assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}
    phenotypes = pd.read_csv(out / "phenotypes.tsv", sep="\t")
    assert tuple(phenotypes.columns) == PHENOTYPE_COLUMNS
    truth = pd.read_csv(out / "truth.tsv", sep="\t")
    plans = plan_cohort(settings)
    assert np.allclose(truth.cle, [p.cle for p in plans], rtol=1e-5)
    # worker processes write exactly what an in-process render gives
    written, _ = read_written_image(out / plans[0].image, plans[0].format)
    assert np.array_equal(written, render_subject(plans[0]).hu)
    png = tmp_path / "preview.png"
    assert main(["synth", "--settings", json.dumps(settings), "--out-dir", str(out), "--preview", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_an_unknown_subject(tmp_path, capsys):
    from pipeline.cli import main

    settings = small_settings(n_subjects=2)
    code = main(["synth", "--settings", json.dumps(settings), "--out-dir", str(tmp_path), "--sids", "SYN0009"])
    assert code == 1
    assert "subject SYN0009 [synth]: not in the synthetic plan" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_one_failing_subject_leaves_the_others_and_its_old_file_intact(tmp_path, monkeypatch):
    plans = plan_cohort(small_settings(n_subjects=3, dicom_fraction=0.0, reoriented_fraction=0.0))
    broken = plans[1]
    old = tmp_path / broken.image
    old.parent.mkdir(parents=True)
    old.write_bytes(b"previous version")
    real_write = cohort.write_subject.__globals__["write_subject"]

    def flaky(plan, out_dir):
        if plan.sid == broken.sid:
            from pipeline.synth import nifti

            def fail(path, *args, **kwargs):
                with nifti.atomic_path(path) as tmp:
                    tmp.write_bytes(b"half")
                    raise OSError("disk full")

            monkeypatch.setattr(nifti, "write_nifti", fail)
            try:
                return real_write(plan, out_dir)
            finally:
                monkeypatch.undo()
        return real_write(plan, out_dir)

    monkeypatch.setattr(cohort, "write_subject", flaky)
    failures = cohort.write_subjects(plans, tmp_path, threads=1)
    assert [f.sid for f in failures] == [broken.sid] and "disk full" in failures[0].reason
    assert old.read_bytes() == b"previous version"
    for plan in (plans[0], plans[2]):
        assert nib.load(tmp_path / plan.image).shape == plan.grid.shape_zyx[::-1]
    leftovers = [p.name for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert math.isclose(len(list((tmp_path / "labels").iterdir())), 2)
