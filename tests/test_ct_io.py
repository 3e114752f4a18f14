"""Tests of pipeline.ct_io: HU reading (NIfTI, DICOM), canonical orientation, resampling, I/O."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline import ct_io
from pipeline.errors import SubjectError
from tests.ct_fixtures import (
    ct_small_hu,
    ct_small_series,
    phantom_hu,
    reorient_canonical,
    sphere_hu,
    write_dicom_series,
    write_nifti,
)

SPACING = (0.75, 0.875, 1.25)  # (x, y, z) mm, exact in float32 so NIfTI and DICOM agree bit for bit
ORIGIN = (-12.5, 20.25, 30.5)  # LPS mm of canonical voxel (0, 0, 0)


@pytest.fixture(scope="module")
def phantom():
    return phantom_hu((16, 24, 28), seed=3)


def _canonical(img):
    out = ct_io.to_canonical(img)
    return sitk.GetArrayFromImage(out), out


# ---- NIfTI ------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["LPS", "RAS", "LAI", "SPL", "IRA"])
def test_nifti_flips_and_permutations_give_the_same_canonical_array(tmp_path, phantom, code):
    path = write_nifti(tmp_path / f"{code}.nii.gz", phantom, SPACING, ORIGIN, code=code)
    raw = ct_io.read_nifti_hu(path, "s1")
    assert ct_io.orientation_code(raw) == code
    array, img = _canonical(raw)
    np.testing.assert_array_equal(array, phantom)
    assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert img.GetSpacing() == pytest.approx(SPACING)
    assert img.GetOrigin() == pytest.approx(ORIGIN)


def test_nifti_ras_affine_maps_to_lps_world(tmp_path):
    """A marker at a hand-computed RAS position ends up at the matching LPS point (x, y negated)."""
    import nibabel as nib

    data = np.full((10, 12, 14), -1000, dtype=np.int16)  # [i, j, k]
    data[2:8, 2:10, 2:12] = 40
    data[3, 7, 5] = 1500  # the marker
    affine = np.array([[-0.5, 0, 0, 30.0],   # i -> Left (RAS +x is Right)
                       [0, 0, 2.0, -40.0],   # k -> Anterior
                       [0, 0.8, 0, 10.0],    # j -> Superior
                       [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "m.nii.gz"))
    ras = affine @ np.array([3, 7, 5, 1.0])
    lps = (-ras[0], -ras[1], ras[2])
    img = ct_io.to_canonical(ct_io.read_nifti_hu(tmp_path / "m.nii.gz", "s1"))
    index = img.TransformPhysicalPointToIndex(lps)
    assert img[index] == 1500
    assert ct_io.orientation_code(ct_io.read_nifti_hu(tmp_path / "m.nii.gz", "s1")) == "LSA"


def test_nifti_scaling_float_and_4d(tmp_path, phantom):
    scaled = write_nifti(tmp_path / "scaled.nii.gz", phantom, SPACING, ORIGIN, code="RAS", dtype=np.uint16,
                         slope=1.0, inter=-1024.0)
    as_float = write_nifti(tmp_path / "float.nii", phantom.astype(np.float32), SPACING, ORIGIN, code="RAS",
                           dtype=np.float32, four_d=True)
    for path in (scaled, as_float):
        img = ct_io.read_nifti_hu(path, "s1")
        assert img.GetPixelID() == sitk.sitkInt16  # integral values are stored exactly as int16
        np.testing.assert_array_equal(_canonical(img)[0], phantom)


def test_fractional_float_nifti_stays_float(tmp_path, phantom):
    values = phantom.astype(np.float32) + 0.25
    img = ct_io.read_nifti_hu(write_nifti(tmp_path / "f.nii.gz", values, SPACING, ORIGIN, dtype=np.float32), "s1")
    assert img.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(_canonical(img)[0], np.maximum(values, -1024))


def test_nifti_sheared_affine_is_rejected(tmp_path):
    import nibabel as nib

    affine = np.eye(4)
    affine[0, 1] = 0.3
    nib.save(nib.Nifti1Image(phantom_hu((8, 8, 8)).T.copy(), affine), str(tmp_path / "shear.nii.gz"))
    with pytest.raises(SubjectError, match="sheared"):
        ct_io.read_nifti_hu(tmp_path / "shear.nii.gz", "s1")


def test_nifti_not_3d_is_rejected(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(SubjectError, match=r"not a 3-D volume \(shape \(8, 8, 8, 2\)\)"):
        ct_io.read_nifti_hu(tmp_path / "4d.nii.gz", "s1")


# ---- HU plausibility --------------------------------------------------------------------------
def test_padding_is_clipped_after_the_check(phantom):
    padded = phantom_hu((16, 24, 28), seed=3, padding=True)
    assert padded.min() == -2048
    ct_io.check_hu(padded, "s1")  # padding is still air: accepted
    clipped = ct_io.clip_below_air(padded.copy())
    assert clipped.min() == -1024
    np.testing.assert_array_equal(clipped[padded >= -1024], padded[padded >= -1024])


@pytest.mark.parametrize("values, message", [
    (lambda p: (p.astype(np.int32) + 1024).astype(np.uint16), r"no air \(minimum 0 > -500 HU\)"),
    (lambda p: np.full(p.shape, -900, np.int16), r"no tissue \(maximum -900 < -500 HU\)"),
    (lambda p: np.where(np.arange(p.size).reshape(p.shape) < p.size // 10, -1000, 1200), r"median 1200 > 500"),
    (lambda p: np.where(p > 300, 40000.0, p), "outside the int16 range"),
])
def test_implausible_hu_is_rejected(phantom, values, message):
    with pytest.raises(SubjectError, match=message) as info:
        ct_io.check_hu(values(phantom), "s7")
    assert str(info.value).startswith("subject s7 [ingest]: values")


def test_nan_voxels_are_counted(phantom):
    values = phantom.astype(np.float32)
    values[0, 0, :3] = np.nan
    with pytest.raises(SubjectError, match="image contains 3 NaN voxels"):
        ct_io.check_hu(values, "s1")


# ---- DICOM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["LPS", "RAI", "LSA"])
def test_dicom_slices_are_sorted_by_position(tmp_path, phantom, code):
    """Names are shuffled and InstanceNumbers reversed; only ImagePositionPatient orders slices."""
    directory = write_dicom_series(tmp_path / code, phantom, SPACING, ORIGIN, code=code, seed=11)
    names = sorted(p.name for p in directory.glob("IM*"))
    instance = [int(pydicom.dcmread(directory / n, stop_before_pixels=True).InstanceNumber) for n in names]
    assert instance != sorted(instance) and instance != sorted(instance, reverse=True)  # file order is scrambled
    raw = ct_io.read_dicom_series_hu(directory, "s1", min_slices=4)
    array, img = _canonical(raw)
    np.testing.assert_array_equal(array, phantom)
    assert img.GetSpacing() == pytest.approx(SPACING)
    assert img.GetOrigin() == pytest.approx(ORIGIN)


def test_dicom_skips_non_images_and_reads_legacy_files(tmp_path, phantom):
    """README and DICOMDIR are skipped; a slice without the 'DICM' preamble is still read."""
    from pydicom.filewriter import dcmwrite

    directory = write_dicom_series(tmp_path / "d", phantom, SPACING, ORIGIN, extra_files=True)
    assert (directory / "README").is_file() and (directory / "DICOMDIR").is_file()
    legacy = sorted(directory.glob("IM*"))[3]
    ds = pydicom.dcmread(legacy)
    del ds.file_meta
    ds.preamble = None
    dcmwrite(legacy, ds, implicit_vr=True, little_endian=True)
    assert legacy.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(_canonical(ct_io.read_dicom_series_hu(directory, "s1"))[0], phantom)


def test_dicom_missing_slice_names_the_gap(tmp_path, phantom):
    directory = write_dicom_series(tmp_path / "d", phantom, SPACING, ORIGIN, drop_slice=5)
    z_before, z_after = ORIGIN[2] + 4 * SPACING[2], ORIGIN[2] + 6 * SPACING[2]  # axial: position = IPP z
    with pytest.raises(SubjectError) as info:
        ct_io.read_dicom_series_hu(directory, "s1")
    assert info.value.reason == (f"missing slice between z={z_before:.2f} and z={z_after:.2f} mm "
                                 f"(gap 2.50 mm, expected 1.25 mm)")


def test_dicom_uneven_spacing_and_gantry_tilt_are_rejected(tmp_path, phantom):
    directory = write_dicom_series(tmp_path / "d", phantom, SPACING, ORIGIN)
    files = sorted(directory.glob("IM*"))
    moved = pydicom.dcmread(files[0])
    moved.ImagePositionPatient[2] = float(moved.ImagePositionPatient[2]) + 0.5
    moved.save_as(files[0])
    with pytest.raises(SubjectError, match=r"non-uniform slice spacing .* \(gap .* mm, expected 1.25 mm"):
        ct_io.read_dicom_series_hu(directory, "s1")

    tilted = write_dicom_series(tmp_path / "t", phantom, SPACING, ORIGIN)
    for path in tilted.glob("IM*"):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.3 * float(ds.ImagePositionPatient[2])
        ds.save_as(path)
    with pytest.raises(SubjectError, match=r"gantry tilt or shear of 16\.7 degrees"):
        ct_io.read_dicom_series_hu(tilted, "s1")


def test_dicom_too_few_slices_and_no_images(tmp_path, phantom):
    directory = write_dicom_series(tmp_path / "d", phantom, SPACING, ORIGIN)
    with pytest.raises(SubjectError, match=r"only 16 slices \(minimum 20\)"):
        ct_io.read_dicom_series_hu(directory, "s1", min_slices=20)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("nothing here")
    with pytest.raises(SubjectError, match="no DICOM image files"):
        ct_io.read_dicom_series_hu(tmp_path / "empty", "s1")
    with pytest.raises(ValueError, match="min_slices"):
        ct_io.read_dicom_series_hu(directory, "s1", min_slices=0)


def test_dicom_qc_info_is_whitelisted(tmp_path, phantom):
    series = ct_io.load_dicom_series(write_dicom_series(tmp_path / "d", phantom, SPACING, ORIGIN), "s1")
    assert series.info == {"Manufacturer": "ACME", "ConvolutionKernel": "B31f", "SliceThickness": 1.25}


def test_real_ct_small_slice_hu(tmp_path):
    """pydicom's real CT slice: HU = pixel * slope + intercept, lung below -800, bone above 1000."""
    expected = ct_small_hu()
    series = ct_io.read_dicom_series_hu(ct_small_series(tmp_path / "s", n_slices=3), "ct_small", min_slices=3)
    array = sitk.GetArrayFromImage(series)
    assert array.shape == (3, 128, 128)
    for k in range(3):
        np.testing.assert_array_equal(array[k], expected)
    assert series.GetSpacing() == pytest.approx((0.661468, 0.661468, 5.0))
    assert ct_io.orientation_code(series) == "LPS"
    assert -1024 <= array.min() < -800  # aerated lung in the image corners (partial volume at 5 mm)
    assert array.max() > 1000  # vertebra
    assert -100 < np.median(array) < 100  # mostly soft tissue: the slice is cropped to the mediastinum

    single = ct_io.read_dicom_series_hu(ct_small_series(tmp_path / "one", n_slices=1), "ct_small", min_slices=1)
    assert single.GetSize() == (128, 128, 1)
    assert single.GetSpacing()[2] == pytest.approx(5.0)  # from SpacingBetweenSlices / SliceThickness


# ---- resampling -------------------------------------------------------------------------------
def _image(array_zyx, spacing, origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return img


def _points(img, idx_zyx):
    """Physical (x, y, z) points of voxel indices ``[n, 3]`` (z, y, x) of an identity-direction image."""
    assert np.allclose(img.GetDirection(), np.eye(3).ravel())
    return np.array(img.GetOrigin()) + idx_zyx[:, ::-1] * np.array(img.GetSpacing())


def _volume_and_centre(image, inside, outside):
    """Volume (mm³) and centre (x, y, z) of a bright object from its partial-volume fractions."""
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    fraction = np.clip((values - outside) / (inside - outside), 0, 1)
    idx = np.argwhere(fraction > 0.005)
    weights = fraction[fraction > 0.005]
    centre = (_points(image, idx) * weights[:, None]).sum(axis=0) / weights.sum()
    return fraction.sum() * float(np.prod(image.GetSpacing())), centre


def _extent(img):
    size, spacing = np.array(img.GetSize()), np.array(img.GetSpacing())
    direction = np.array(img.GetDirection()).reshape(3, 3)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * size - 0.5
    world = np.array(img.GetOrigin()) + (corners * spacing) @ direction.T
    return world.min(axis=0), world.max(axis=0)


def test_resampled_block_keeps_hu_and_extent():
    array = np.full((30, 40, 50), -1000, dtype=np.int16)
    array[5:25, 8:32, 10:40] = 40
    img = _image(array, (0.7, 0.6, 1.3), origin=(3.0, -7.0, 11.0))
    out = ct_io.resample_isotropic(img, 1.0)
    assert out.GetPixelID() == sitk.sitkInt16
    assert out.GetSpacing() == (1.0, 1.0, 1.0)
    (lo_in, hi_in), (lo_out, hi_out) = _extent(img), _extent(out)
    np.testing.assert_allclose((lo_out + hi_out) / 2, (lo_in + hi_in) / 2, atol=1e-6)  # same centre
    assert np.all(np.abs((hi_out - lo_out) - (hi_in - lo_in)) <= 0.5 + 1e-9)  # extent within half a voxel
    values = sitk.GetArrayFromImage(out)
    # Output voxels whose linear-interpolation neighbourhood lies inside the block are exactly 40.
    block_lo = np.array([3.0 + 10 * 0.7, -7.0 + 8 * 0.6, 11.0 + 5 * 1.3])  # (x, y, z) of the first block voxel
    block_hi = np.array([3.0 + 39 * 0.7, -7.0 + 31 * 0.6, 11.0 + 24 * 1.3])
    points = _points(out, np.argwhere(np.ones(values.shape, bool)))
    inside = np.all((points >= block_lo) & (points <= block_hi), axis=1).reshape(values.shape)
    assert inside.sum() > 1000
    assert set(np.unique(values[inside])) == {40}
    assert values[0, 0, 0] == -1000


@pytest.mark.parametrize("spacing, new_spacing", [((0.6, 0.6, 1.5), 1.0), ((0.4, 0.4, 0.4), 2.0)])
def test_resampled_sphere_keeps_volume_and_position(spacing, new_spacing):
    """Also covers the anti-aliased path (0.4 → 2 mm smooths before resampling)."""
    radius, inside, outside = 7.0, 100.0, -1000.0
    shape = tuple(int(round(26 / s)) for s in spacing[::-1])
    img = _image(sphere_hu(shape, spacing, radius, inside=inside, outside=outside), spacing, origin=(1.0, 2.0, 3.0))
    out = ct_io.resample_isotropic(img, new_spacing)
    true_volume = 4 / 3 * np.pi * radius ** 3
    vol_in, centre_in = _volume_and_centre(img, inside, outside)
    vol_out, centre_out = _volume_and_centre(out, inside, outside)
    assert vol_in == pytest.approx(true_volume, rel=0.02)
    assert vol_out == pytest.approx(true_volume, rel=0.03)
    np.testing.assert_allclose(centre_out, centre_in, atol=0.05)


def test_strong_downsampling_is_anti_aliased():
    """White noise at 0.4 mm → 2 mm: Gaussian pre-smoothing must average it out; plain linear
    interpolation (anti-aliasing disabled) keeps most of its standard deviation."""
    rng = np.random.default_rng(0)
    noise = (rng.normal(0, 100, size=(40, 40, 40)) + 40).astype(np.float32)
    img = _image(noise, (0.4, 0.4, 0.4))
    smooth = sitk.GetArrayFromImage(ct_io.resample_isotropic(img, 2.0))[1:-1, 1:-1, 1:-1]
    plain = sitk.GetArrayFromImage(ct_io.resample_isotropic(img, 2.0, antialias_factor=100))[1:-1, 1:-1, 1:-1]
    assert plain.std() > 40
    assert smooth.std() < 15
    assert abs(smooth.mean() - 40) < 5


def test_resampling_removes_an_oblique_rotation():
    angle = np.radians(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    spacing = (0.8, 0.8, 0.8)
    centre_mm = (14.0, 10.0, 12.0)  # in the rotated voxel frame, relative to the origin
    img = _image(sphere_hu((30, 30, 36), spacing, 6.0, centre_xyz_mm=centre_mm), spacing, origin=(5.0, 5.0, 5.0),
                 direction=rotation)
    assert ct_io.orientation_code(img) == "LPS"  # closest axes: to_canonical leaves it alone
    out = ct_io.resample_isotropic(ct_io.to_canonical(img), 1.0)
    assert out.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    expected = np.array((5.0, 5.0, 5.0)) + rotation @ np.array(centre_mm)
    volume, centre = _volume_and_centre(out, 100.0, -1000.0)
    np.testing.assert_allclose(centre, expected, atol=0.1)
    assert volume == pytest.approx(4 / 3 * np.pi * 6.0 ** 3, rel=0.03)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_resample_rejects_bad_spacing(bad):
    with pytest.raises(ValueError, match="spacing_mm"):
        ct_io.resample_isotropic(_image(np.zeros((4, 4, 4), np.int16), (1, 1, 1)), bad)


# ---- work/ volumes ----------------------------------------------------------------------------
def test_write_and_read_volume_round_trip(tmp_path, phantom):
    img = _image(phantom, SPACING, ORIGIN)
    img.SetMetaData("PatientName", "Secretname^Jane")
    target = tmp_path / "ct" / "s1.nii.gz"
    ct_io.write_volume(img, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["s1.nii.gz"]  # no temporary left behind
    back = ct_io.read_volume(target, "s1")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), phantom)
    assert back.GetPixelID() == sitk.sitkInt16
    assert back.GetSpacing() == pytest.approx(SPACING)
    assert back.GetOrigin() == pytest.approx(ORIGIN)
    import gzip

    assert b"Secretname" not in gzip.decompress(target.read_bytes())
    (tmp_path / "tomb.nii.gz").write_bytes(b"")
    with pytest.raises(SubjectError, match="subject s1 \\[lung\\]: volume .* is empty"):
        ct_io.read_volume(tmp_path / "tomb.nii.gz", "s1", stage="lung")


def test_reorient_fixture_is_consistent_with_itk(phantom):
    """Guard for the fixture itself: its geometry matches ITK's own index → point mapping."""
    data, spacing, direction, origin = reorient_canonical(phantom, SPACING, ORIGIN, "ASR")
    img = _image(np.ascontiguousarray(data.transpose(2, 1, 0)), tuple(spacing), tuple(origin), direction)
    canonical = _image(phantom, SPACING, ORIGIN)
    for index in [(0, 0, 0), (3, 5, 7), (27, 23, 15)]:  # canonical (x, y, z)
        point = canonical.TransformIndexToPhysicalPoint(index)
        stored = img.TransformPhysicalPointToIndex(point)
        assert img[stored] == canonical[index]
