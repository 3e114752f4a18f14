"""CT input/output: read NIfTI or DICOM as Hounsfield units, reorient, resample, write.

Raw inputs are read with nibabel (NIfTI, :mod:`.nifti`) and pydicom (DICOM, :mod:`.dicom`);
everything after that is a SimpleITK image in ITK's LPS world. Volumes under ``work/`` are
canonical (:mod:`.geometry`): identity direction (voxel axis *i* → patient Left, *j* →
Posterior, *k* → Superior), so ``sitk.GetArrayFromImage`` gives ``[z, y, x]`` arrays (see
docs/architecture.md). Every raw volume passes the HU plausibility checks of :mod:`.hu` before
anything else; :mod:`.volume` reads and writes the ``work/`` volumes.

Heavy libraries (SimpleITK, nibabel, pydicom) are imported inside the functions so that
importing this package stays cheap for the per-subject CLI.
"""

from pipeline.ct_io.dicom import DicomSeries, load_dicom_series, read_dicom_series_hu
from pipeline.ct_io.geometry import CANONICAL, orientation_code, resample_isotropic, to_canonical
from pipeline.ct_io.hu import AIR_HU, STAGE, check_hu, clip_below_air
from pipeline.ct_io.nifti import read_nifti_hu
from pipeline.ct_io.volume import read_volume, write_volume

__all__ = ["AIR_HU", "CANONICAL", "STAGE", "DicomSeries", "check_hu", "clip_below_air", "load_dicom_series",
           "orientation_code", "read_dicom_series_hu", "read_nifti_hu", "read_volume", "resample_isotropic",
           "to_canonical", "write_volume"]
