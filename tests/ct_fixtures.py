"""Small CT test inputs: synthetic HU phantoms written as NIfTI or DICOM, and real CT.

Other engineers' tests import these helpers. Geometry convention (docs/architecture.md):
a *canonical* array is indexed ``[z, y, x]`` with voxel axes (x, y, z) pointing to patient
(Left, Posterior, Superior) in ITK's LPS world; spacing and origin triples given to the
writers are ``(x, y, z)`` in mm (as SimpleITK and DICOM spell them).

* :func:`phantom_hu` — body ellipse with two air-filled lungs, spine and seeded noise.
* :func:`write_nifti` — the same physical volume stored with any axis order/flips.
* :func:`write_dicom_series` — one file per slice, shuffled names, misleading
  InstanceNumbers, options to break it (dropped slice, MR, mixed orientation/shape/series,
  raw unsigned values without intercept) and fake patient tags to check they never leak.
* :func:`ct_small_series` — a tiny series built from pydicom's real ``CT_small.dcm`` slice.
* :func:`cranium_head_ct` — the real head CT of Debian's ``invesalius-examples`` as NIfTI
  (``None`` when the package is not installed).
"""

from __future__ import annotations

import os
import plistlib
import tarfile
from pathlib import Path

import numpy as np

# Patient tag values written into every synthetic DICOM slice; they must never appear in
# any output (status JSON, NIfTI header, logs).
PATIENT_TAGS = {
    "PatientName": "Secretname^Jane",
    "PatientID": "PID-9931-SECRET",
    "PatientBirthDate": "19470312",
    "OtherPatientIDs": "OTHER-ID-7781",
    "InstitutionName": "Hidden General Hospital",
}

CRANIUM_CANDIDATES = (
    "/usr/share/doc/invesalius-examples/examples/Cranium.inv3",
    "/usr/share/invesalius/samples/Cranium.inv3",
    "/usr/share/invesalius-examples/Cranium.inv3",
)

_AXIS_OF = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
_LPS_SIGN = {"L": 1.0, "R": -1.0, "P": 1.0, "A": -1.0, "S": 1.0, "I": -1.0}


# --------------------------------------------------------------------------------------------
# phantom
# --------------------------------------------------------------------------------------------
def phantom_hu(shape_zyx: tuple[int, int, int] = (20, 32, 40), seed: int = 0, noise_hu: float = 20.0,
               padding: bool = False) -> np.ndarray:
    """A synthetic chest-like HU volume in canonical order.

    Air (−1000) around an elliptic body (40 HU soft tissue) holding two ellipsoidal lungs
    (−850 HU, the right lung — small x — larger than the left) and a posterior spine
    (400 HU). Seeded Gaussian noise makes the volume asymmetric along every axis, so any
    wrong flip or permutation changes the array.

    Args:
        shape_zyx: ``(nz, ny, nx)``, each at least 8.
        seed: noise seed.
        noise_hu: noise standard deviation.
        padding: set the corners outside an inscribed cylinder to −2048 (scanner padding).

    Returns:
        int16 array ``[z, y, x]``, values ≥ −1024 unless ``padding``.
    """
    nz, ny, nx = shape_zyx
    if min(shape_zyx) < 8:
        raise ValueError(f"shape_zyx must be at least 8 along every axis, got {shape_zyx!r}")
    rng = np.random.default_rng(seed)
    y = np.linspace(-1, 1, ny, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, :]
    body = (x / 0.9) ** 2 + (y / 0.75) ** 2 <= 1
    spine = (x / 0.12) ** 2 + ((y - 0.58) / 0.1) ** 2 <= 1
    outside_fov = x ** 2 + y ** 2 > 1
    volume = np.empty(shape_zyx, dtype=np.int16)
    for k, z in enumerate(np.linspace(-1, 1, nz)):  # slab by slab: full-size volumes stay small in memory
        plane = np.where(body, 40.0, -1000.0).astype(np.float32)
        right = ((x + 0.42) / 0.34) ** 2 + ((y + 0.05) / 0.5) ** 2 + ((z - 0.1) / 0.85) ** 2 <= 1
        left = ((x - 0.45) / 0.27) ** 2 + ((y + 0.05) / 0.45) ** 2 + ((z - 0.15) / 0.75) ** 2 <= 1
        plane[(right | left) & body] = -850.0
        plane[spine] = 400.0
        plane += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(noise_hu)
        plane = np.clip(np.rint(plane), -1024, 3000)
        if padding:
            plane[outside_fov] = -2048
        volume[k] = plane
    return volume


def sphere_hu(shape_zyx: tuple[int, int, int], spacing_xyz: tuple[float, float, float], radius_mm: float,
              centre_xyz_mm: tuple[float, float, float] | None = None, inside: float = 100.0,
              outside: float = -1000.0, supersample: int = 4) -> np.ndarray:
    """A sphere on an anisotropic grid with partial-volume edges (float32 ``[z, y, x]``).

    Each voxel holds the mean over ``supersample³`` sub-samples, so the sum of the
    fractional occupancy times the voxel volume is the sphere's volume to good accuracy.
    Coordinates are relative to voxel 0's centre; the default centre is the grid centre.
    """
    sx, sy, sz = spacing_xyz
    if centre_xyz_mm is None:
        centre_xyz_mm = tuple((n - 1) / 2 * s for n, s in zip(shape_zyx[::-1], spacing_xyz))
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    occupancy = np.zeros(shape_zyx)
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape_zyx), indexing="ij")
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                d2 = (((xx + dx) * sx - centre_xyz_mm[0]) ** 2 + ((yy + dy) * sy - centre_xyz_mm[1]) ** 2
                      + ((zz + dz) * sz - centre_xyz_mm[2]) ** 2)
                occupancy += d2 <= radius_mm ** 2
    occupancy /= supersample ** 3
    return (outside + (inside - outside) * occupancy).astype(np.float32)


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------
def _check_code(code: str) -> str:
    code = code.upper()
    if len(code) != 3 or sorted(_AXIS_OF[c] for c in code if c in _AXIS_OF) != [0, 1, 2]:
        raise ValueError(f"orientation code must name each of L/R, P/A, S/I once, got {code!r}")
    return code


def reorient_canonical(array_zyx: np.ndarray, spacing_xyz, origin_xyz, code: str):
    """Store a canonical volume with voxel axes pointing to ``code`` (e.g. ``"RAS"``, ``"SPL"``).

    Independent of the code under test: plain numpy flips/transposes and explicit geometry.

    Args:
        array_zyx: canonical array ``[z, y, x]`` (axes L, P, S).
        spacing_xyz: canonical voxel size (x, y, z) in mm.
        origin_xyz: LPS position of canonical voxel (0, 0, 0) in mm.
        code: target orientation: letter *a* is the direction voxel axis *a* points to.

    Returns:
        ``(data_ijk, spacing_ijk, direction_lps [3, 3] (columns = axis directions),
        origin_lps [3])`` where ``data_ijk`` is indexed ``[i, j, k]`` (NIfTI order).
    """
    code = _check_code(code)
    data = np.asarray(array_zyx).transpose(2, 1, 0)  # [x, y, z] = canonical [i, j, k]
    spacing_xyz = np.asarray(spacing_xyz, dtype=np.float64)
    origin = np.asarray(origin_xyz, dtype=np.float64)
    # Flip the canonical axes whose target letter points the other way.
    for letter in code:
        axis = _AXIS_OF[letter]
        if _LPS_SIGN[letter] < 0:
            data = np.flip(data, axis=axis)
            origin = origin.copy()
            origin[axis] += (array_zyx.shape[2 - axis] - 1) * spacing_xyz[axis]
    perm = [_AXIS_OF[letter] for letter in code]
    data = np.ascontiguousarray(data.transpose(perm))
    direction = np.zeros((3, 3))
    for new_axis, letter in enumerate(code):
        direction[_AXIS_OF[letter], new_axis] = _LPS_SIGN[letter]
    return data, spacing_xyz[perm], direction, origin


def write_nifti(path: str | os.PathLike, array_zyx: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0),
                origin_xyz=(0.0, 0.0, 0.0), code: str = "LPS", dtype=None, slope: float | None = None,
                inter: float | None = None, four_d: bool = False) -> Path:
    """Write a canonical volume as NIfTI stored with axis orientation ``code``.

    Args:
        path: ``.nii`` or ``.nii.gz``.
        array_zyx: canonical HU array ``[z, y, x]``.
        spacing_xyz, origin_xyz: canonical geometry (LPS, mm).
        code: storage orientation (``"RAS"`` is what most converters write).
        dtype: on-disk dtype (default: the array's).
        slope, inter: stored ``scl_slope``/``scl_inter``; the data are divided accordingly so
            that the scaled values equal ``array_zyx``.
        four_d: add a trailing singleton 4th dimension.
    """
    import nibabel as nib

    data, spacing, direction, origin = reorient_canonical(array_zyx, spacing_xyz, origin_xyz, code)
    linear_ras = np.diag([-1.0, -1.0, 1.0]) @ direction * spacing
    affine = np.eye(4)
    affine[:3, :3] = linear_ras
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ origin
    if slope is not None or inter is not None:
        s, b = (slope if slope is not None else 1.0), (inter if inter is not None else 0.0)
        data = (data.astype(np.float64) - b) / s
    if dtype is not None:
        if np.issubdtype(np.dtype(dtype), np.integer):
            info = np.iinfo(dtype)
            if data.min() < info.min or data.max() > info.max:
                raise ValueError(f"stored values {data.min()}..{data.max()} do not fit dtype {np.dtype(dtype)}")
            data = np.rint(data).astype(dtype)
        else:
            data = data.astype(dtype)
    if four_d:
        data = data[..., None]
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    if slope is not None or inter is not None:
        image.header.set_slope_inter(slope if slope is not None else 1.0, inter if inter is not None else 0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------
def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def write_dicom_series(directory: str | os.PathLike, array_zyx: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0),
                       origin_xyz=(0.0, 0.0, 0.0), *, code: str = "LPS", slope: float = 1.0,
                       intercept: float = -1024.0, seed: int = 0, modality: str = "CT",
                       drop_slice: int | None = None, unsigned_raw: bool = False,
                       mix_orientation: bool = False, mix_shape: bool = False, mix_series: bool = False,
                       extra_files: bool = True, manufacturer: str = "ACME", kernel: str = "B31f") -> Path:
    """Write a canonical HU volume as a DICOM series, one file per slice.

    The slice axis is the third letter of ``code``'s axis *after* making the set
    right-handed: rows run along ``code[0]``, columns along ``code[1]`` and slices along
    their cross product (DICOM's slice normal); ``code[2]`` must be that normal or its
    opposite (the slice order in the files is irrelevant). File names are a seeded random
    permutation and InstanceNumbers are reversed, so only ImagePositionPatient orders them.

    Args:
        directory: created if needed.
        array_zyx, spacing_xyz, origin_xyz: canonical volume and geometry (LPS, mm).
        code: in-plane orientation, e.g. ``"LPS"`` (axial, the usual), ``"LSA"`` (coronal).
        slope, intercept: RescaleSlope/RescaleIntercept; stored = (HU − intercept) / slope.
        seed: seed of the file-name permutation.
        modality: the Modality tag (``"MR"`` to test rejection).
        drop_slice: index (in position order) of a slice not to write.
        unsigned_raw: store HU + 1024 as unsigned values with intercept 0 (not HU).
        mix_orientation: give the middle slice a different ImageOrientationPatient.
        mix_shape: crop the middle slice by one row.
        mix_series: give the middle slice another SeriesInstanceUID.
        extra_files: also write a README and a DICOMDIR-like DICOM file without pixel data.

    Returns:
        ``directory``.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    code = _check_code(code)
    data, spacing, direction, origin = reorient_canonical(array_zyx, spacing_xyz, origin_xyz, code)
    row_cos, col_cos = direction[:, 0], direction[:, 1]
    normal = np.cross(row_cos, col_cos)
    if np.allclose(direction[:, 2], -normal):  # store slices along +normal
        data = data[:, :, ::-1]
        origin = origin + direction[:, 2] * spacing[2] * (data.shape[2] - 1)
    elif not np.allclose(direction[:, 2], normal):
        raise ValueError(f"code {code!r}: the third axis is not the slice normal")
    n_slices = data.shape[2]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = rng.permutation(n_slices)
    study, series, frame = _uid("study", seed), _uid("series", seed), _uid("frame", seed)
    middle = n_slices // 2
    for k in range(n_slices):
        if drop_slice is not None and k == drop_slice:
            continue
        plane = data[:, :, k].T  # [row, column] = [j, i]
        if unsigned_raw:
            stored = (plane.astype(np.int64) + 1024).clip(0, 65535).astype(np.uint16)
            slope_k, intercept_k = 1.0, 0.0
        else:
            stored = np.rint((plane.astype(np.float64) - intercept) / slope).astype(np.int16)
            slope_k, intercept_k = slope, intercept
        iop = np.concatenate([row_cos, col_cos])
        if mix_orientation and k == middle:
            iop = np.concatenate([col_cos, row_cos])
        if mix_shape and k == middle:
            stored = stored[:-1]
        meta = FileMetaDataset()
        sop = _uid("sop", seed, k)
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(directory / "x"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = _uid("other-series", seed) if (mix_series and k == middle) else series
        ds.FrameOfReferenceUID = frame
        ds.Modality = modality
        ds.Manufacturer = manufacturer
        ds.ConvolutionKernel = kernel
        ds.SliceThickness = f"{spacing[2]:.6g}"
        for keyword, value in PATIENT_TAGS.items():
            setattr(ds, keyword, value)
        ds.InstanceNumber = n_slices - k  # misleading on purpose
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + normal * spacing[2] * k]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]  # row spacing (along j), column spacing (i)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if unsigned_raw else 1
        ds.RescaleSlope = f"{slope_k:.6g}"
        ds.RescaleIntercept = f"{intercept_k:.6g}"
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(directory / f"IM{names[k]:05d}", enforce_file_format=True)
    if extra_files:
        (directory / "README").write_text("exported by a test fixture\n")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
        meta.MediaStorageSOPInstanceUID = _uid("dicomdir", seed)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dicomdir = FileDataset(str(directory / "DICOMDIR"), {}, file_meta=meta, preamble=b"\0" * 128)
        dicomdir.FileSetID = "TESTSET"
        dicomdir.save_as(directory / "DICOMDIR", enforce_file_format=True)
    return directory


def ct_small_series(directory: str | os.PathLike, n_slices: int = 3) -> Path:
    """A series of ``n_slices`` copies of pydicom's real ``CT_small.dcm`` slice.

    Slice *k* is shifted by *k* × SliceThickness along the slice normal and gets its own
    SOPInstanceUID; names are written in reverse position order. Pixel values, rescale
    tags and the real (Clunie test) patient tags are kept.
    """
    import pydicom
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(n_slices):
        ds = pydicom.dcmread(source)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64) + normal * float(ds.SliceThickness) * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.SOPInstanceUID = _uid("ct_small", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.save_as(directory / f"slice{n_slices - k:03d}.dcm", enforce_file_format=True)
    return directory


def ct_small_hu() -> np.ndarray:
    """HU of the real ``CT_small.dcm`` slice, ``[row, column]`` float64 (pixel × slope + intercept)."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# --------------------------------------------------------------------------------------------
# real head CT (Debian invesalius-examples)
# --------------------------------------------------------------------------------------------
def find_cranium() -> Path | None:
    """Path of ``Cranium.inv3`` from the ``invesalius-examples`` package, or ``None``."""
    for candidate in CRANIUM_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    listing = Path("/var/lib/dpkg/info/invesalius-examples.list")
    if listing.is_file():
        for line in listing.read_text().splitlines():
            if line.endswith(".inv3") and Path(line).is_file():
                return Path(line)
    return None


def cranium_head_ct(out_path: str | os.PathLike) -> Path | None:
    """Write the real head CT of ``Cranium.inv3`` as an int16 HU NIfTI at ``out_path``.

    ``Cranium.inv3`` is a tar.gz holding ``main.plist`` (dtype, shape ``[z, y, x]`` and spacing
    ``(x, y, z)`` of the volume) and the raw little-endian volume. Read as displayed by
    InVesalius, row index *j* runs posterior → anterior (the head rest is at small *j*) and
    slice index *k* inferior → superior; left/right cannot be told from the image and is taken
    as *i* → Left. The NIfTI therefore has LPS direction diag(1, −1, 1), i.e. orientation "LAS".

    Returns:
        ``out_path``, or ``None`` when the package is not installed (tests then skip).
    """
    source = find_cranium()
    if source is None:
        return None
    with tarfile.open(source, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        matrix = main["matrix"]
        raw = archive.extractfile(members[Path(matrix["filename"]).name]).read()
    shape_zyx = tuple(int(n) for n in matrix["shape"])
    volume = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(shape_zyx)
    spacing_xyz = tuple(float(s) for s in main["spacing"])
    # Store with j flipped relative to canonical: canonical P axis = reversed stored j.
    canonical = np.ascontiguousarray(volume[:, ::-1, :])
    origin = (-(shape_zyx[2] - 1) / 2 * spacing_xyz[0], -(shape_zyx[1] - 1) / 2 * spacing_xyz[1],
              -(shape_zyx[0] - 1) / 2 * spacing_xyz[2])
    return write_nifti(out_path, canonical, spacing_xyz, origin, code="LAS")
