"""The cohort plan: everything about every synthetic subject except its voxels.

Cheap by design (numpy only, no volumes): the Snakefile imports it at parse time and plans
10,000 subjects in well under a second. Each subject's parameters come from its own generator,
``np.random.default_rng([seed, index])``, so subject ``SYN0042`` is the same whatever
``n_subjects`` is and whichever other subjects are generated. The draws are taken as two
fixed-length vectors (``_NORMALS`` standard normals, ``_UNIFORMS`` uniforms) whose slots are
named below; new parameters must take *new* slots at the end so existing subjects do not change.

Coordinates: the body frame is in mm with LPS orientation (+x patient Left, +y Posterior,
+z Superior), its origin on the body axis at the vertical centre of the lungs. The image grid
is axis-aligned in LPS world coordinates (identity direction); arrays are ``[z, y, x]``.
All coefficients and distributions are documented in ``docs/synthetic_cohort.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---- constants of the model (documented in docs/synthetic_cohort.md) ---------------------------

#: Resolution presets: in-plane matrix size, slice spacing (mm) and nominal in-plane spacing.
PRESETS: dict[str, dict[str, float]] = {
    "demo": {"matrix": 192, "spacing_z": 2.0, "nominal_xy": 1.8},
    "full": {"matrix": 512, "spacing_z": 0.6, "nominal_xy": 0.65},
}
#: Scan range beyond the lungs at each end (mm); covers the pose shift.
Z_MARGIN_MM = 40.0

#: Sites (COPDGene ``ccenter``): sampling weight, HU calibration offset, padding value outside
#: the circular reconstruction field of view (``None``: none) and probability of a sharp kernel.
SITES: tuple[tuple[str, float, float, int | None, float], ...] = (
    ("SITE1", 0.30, 0.0, None, 0.3),
    ("SITE2", 0.25, 6.0, None, 0.5),
    ("SITE3", 0.20, -5.0, -2048, 0.4),
    ("SITE4", 0.15, 4.0, None, 0.6),
    ("SITE5", 0.10, -8.0, -3024, 0.3),
)
KERNELS = ("smooth", "sharp")

#: Correlation of the latent normals (smoking, cle, pse, awt).
LATENT_CORRELATION = np.array([
    [1.00, 0.30, 0.20, 0.25],
    [0.30, 1.00, 0.40, 0.10],
    [0.20, 0.40, 1.00, 0.00],
    [0.25, 0.10, 0.00, 1.00],
])

# Phenotype model: log(FEV1pp/100) = log(FEV1_B0) - B_CLE*cle - B_PSE*pse - B_AWT*(awt-1) + noise.
FEV1_B0, FEV1_B_CLE, FEV1_B_PSE, FEV1_B_AWT, FEV1_NOISE = 0.93, 3.0, 5.0, 0.9, 0.18
# FEV1/FVC = R0 - R_CLE*cle - R_PSE*pse - R_AWT*(awt-1) + RATIO_NOISE*(shared + own noise).
RATIO_R0, RATIO_CLE, RATIO_PSE, RATIO_AWT, RATIO_NOISE, RATIO_SHARED = 0.765, 1.8, 1.5, 0.12, 0.06, 0.5
# mMRC latent = M0 + M_FEV1*(-log(FEV1pp/100)) + M_AWT*(awt-1) + M_NOISE*noise, rounded, 0..4.
MMRC_M0, MMRC_FEV1, MMRC_AWT, MMRC_NOISE = 0.6, 2.2, 1.5, 0.8
#: Visual-score thresholds on rater-perturbed cle (Emph_Severity 0..5) and pse (Emph_Paraseptal 0..2).
SEVERITY_THRESHOLDS = (0.005, 0.02, 0.06, 0.15, 0.30)
PARASEPTAL_THRESHOLDS = (0.01, 0.04)
RATER_NOISE = 0.35
MISSING_MMRC, MISSING_PARASEPTAL = 0.02, 0.01

PHENOTYPE_COLUMNS = ("sid", "FEV1pp_utah", "FEV1_FVC_utah", "Emph_Severity", "Emph_Paraseptal",
                     "MMRCDyspneaScor", "finalGold", "age", "gender", "ATS_PackYears", "ccenter", "kernel")

# Slots of the per-subject draws. Append only (see module docstring).
_NORMAL_SLOTS = (
    "smoke", "cle", "pse", "awt",                              # correlated latent factors
    "fev1", "ratio", "mmrc", "rater_cle", "rater_pse", "age",
    "body_a", "body_b", "fat", "wall", "height", "dome", "dome_right",
    "heart_rx", "heart_ry", "heart_rz", "heart_x", "med_width", "med_x", "spine", "trachea",
    "scale", "rot_x", "rot_y", "rot_z", "shift_x", "shift_y", "shift_z", "density_shift",
)
_UNIFORM_SLOTS = (
    "format", "reorient", "axes", "flips", "site", "kernel", "noise", "gender",
    "missing_mmrc", "missing_paraseptal", "gap", "fov_margin", "table_x", "table_y", "table_z",
)
_N = {name: i for i, name in enumerate(_NORMAL_SLOTS)}
_U = {name: i for i, name in enumerate(_UNIFORM_SLOTS)}
_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


# ---- the plan's records ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid in LPS world coordinates (identity direction).

    ``shape_zyx``/``spacing_zyx`` are in array order; ``origin_lps`` is the world position
    (x, y, z) in mm of voxel ``[0, 0, 0]``. Voxel ``[k, j, i]`` is at
    ``origin + (i*sx, j*sy, k*sz)``.
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_lps: tuple[float, float, float]

    def __post_init__(self):
        if len(self.shape_zyx) != 3 or any(int(n) < 1 for n in self.shape_zyx):
            raise ValueError(f"grid shape_zyx must be 3 positive integers, got {self.shape_zyx!r}")
        if len(self.spacing_zyx) != 3 or any(not s > 0 for s in self.spacing_zyx):
            raise ValueError(f"grid spacing_zyx must be 3 positive numbers, got {self.spacing_zyx!r}")
        if len(self.origin_lps) != 3:
            raise ValueError(f"grid origin_lps must have 3 coordinates, got {self.origin_lps!r}")

    @property
    def centre_lps(self) -> tuple[float, float, float]:
        """World position (x, y, z) of the grid centre."""
        nz, ny, nx = self.shape_zyx
        sz, sy, sx = self.spacing_zyx
        ox, oy, oz = self.origin_lps
        return (ox + (nx - 1) * sx / 2, oy + (ny - 1) * sy / 2, oz + (nz - 1) * sz / 2)


@dataclass(frozen=True)
class Pose:
    """Similarity transform from the body frame to LPS world: ``w = centre + scale * R @ u``.

    ``R = Rz(rotation_deg[2]) @ Ry(rotation_deg[1]) @ Rx(rotation_deg[0])``; ``centre_lps`` is
    the world position of the body-frame origin (grid centre + shift).
    """

    scale: float
    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    centre_lps: tuple[float, float, float]


@dataclass(frozen=True)
class Anatomy:
    """Subject anatomy in body-frame mm (see docs/synthetic_cohort.md, "Geometry")."""

    body_half_width: float
    body_half_depth: float
    fat_mm: float
    chest_wall_mm: float
    lung_height: float
    dome_mm: float
    right_dome_offset: float
    heart_radii: tuple[float, float, float]
    heart_x: float
    mediastinum_half_width: float
    mediastinum_x: float
    anterior_gap: float
    spine_radius: float
    trachea_radius: float


@dataclass(frozen=True)
class SubjectPlan:
    """Everything about one synthetic subject except its voxels.

    ``image``/``label`` are paths relative to the cohort's ``out_dir``. ``axes``/``flips`` say
    how a NIfTI subject's array is stored relative to the canonical ``[x, y, z]`` (LPS) order:
    stored axis ``a`` is canonical axis ``axes[a]``, reversed where ``flips[a]``.
    """

    sid: str
    index: int
    seed: int
    format: str
    image: str
    label: str
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    orientation: str
    # latent disease factors
    cle: float
    pse: float
    awt: float
    # nuisance factors
    site: str
    kernel: str
    noise_hu: float
    density_shift_hu: float
    calibration_hu: float
    padding_hu: int | None
    # geometry
    grid: Grid
    pose: Pose
    anatomy: Anatomy
    # phenotypes (COPDGene names); NaN where missing
    FEV1pp_utah: float
    FEV1_FVC_utah: float
    Emph_Severity: int
    Emph_Paraseptal: float
    MMRCDyspneaScor: float
    finalGold: int
    age: float
    gender: int
    ATS_PackYears: float

    @property
    def reoriented(self) -> bool:
        return self.axes != (0, 1, 2) or any(self.flips)


# ---- planning -------------------------------------------------------------------------------------

def make_sid(index: int) -> str:
    """``SYN0001`` for index 1: zero-padded to at least 4 digits."""
    if index < 1:
        raise ValueError(f"subject index must be >= 1, got {index}")
    return f"SYN{index:04d}"


def sid_index(sid: str) -> int:
    """Inverse of :func:`make_sid`; ``ValueError`` for a name that is not a synthetic ID."""
    if not (isinstance(sid, str) and sid.startswith("SYN") and sid[3:].isdigit() and len(sid) >= 7):
        raise ValueError(f"{sid!r} is not a synthetic subject ID (SYN followed by 4+ digits)")
    index = int(sid[3:])
    if make_sid(index) != sid:
        raise ValueError(f"{sid!r} is not a synthetic subject ID (expected {make_sid(index)!r})")
    return index


def _check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    s = {"seed": 2021, "resolution": "demo", "spacing_mm": None, "shape": None,
         "dicom_fraction": 0.25, "reoriented_fraction": 0.25, **settings}
    if not isinstance(s.get("n_subjects"), int) or isinstance(s["n_subjects"], bool) or s["n_subjects"] < 1:
        raise ValueError(f"synthetic.n_subjects must be a positive integer, got {s.get('n_subjects')!r}")
    if not isinstance(s["seed"], int) or s["seed"] < 0:
        raise ValueError(f"synthetic.seed must be a non-negative integer, got {s['seed']!r}")
    if s["resolution"] not in PRESETS:
        raise ValueError(f"synthetic.resolution must be one of {', '.join(PRESETS)}, got {s['resolution']!r}")
    for key in ("dicom_fraction", "reoriented_fraction"):
        if not 0.0 <= float(s[key]) <= 1.0:
            raise ValueError(f"synthetic.{key} must be in [0, 1], got {s[key]!r}")
    if s["spacing_mm"] is not None and (len(s["spacing_mm"]) != 3 or any(not v > 0 for v in s["spacing_mm"])):
        raise ValueError(f"synthetic.spacing_mm must be null or 3 positive numbers (x, y, z), got {s['spacing_mm']!r}")
    if s["shape"] is not None and (len(s["shape"]) != 3 or any(int(v) < 16 for v in s["shape"])):
        raise ValueError(f"synthetic.shape must be null or 3 integers >= 16 (x, y, z), got {s['shape']!r}")
    return s


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _draws(seed: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-subject draws: normals ``[n, len(_NORMAL_SLOTS)]`` and uniforms ``[n, len(_UNIFORM_SLOTS)]``."""
    normals = np.empty((len(indices), len(_NORMAL_SLOTS)))
    uniforms = np.empty((len(indices), len(_UNIFORM_SLOTS)))
    for row, index in enumerate(indices):
        rng = np.random.default_rng([seed, int(index)])
        normals[row] = rng.standard_normal(len(_NORMAL_SLOTS))
        uniforms[row] = rng.random(len(_UNIFORM_SLOTS))
    return normals, uniforms


def _latent(normals: np.ndarray) -> dict[str, np.ndarray]:
    """Latent factors and smoking exposure from the correlated normals (vectorised over subjects)."""
    z = normals[:, :4] @ np.linalg.cholesky(LATENT_CORRELATION).T
    return {
        "smoke": z[:, 0],
        "cle": 0.6 * _expit(-3.3 + 1.4 * z[:, 1]),
        "pse": 0.3 * _expit(-3.6 + 1.4 * z[:, 2]),
        "awt": np.clip(1.0 + 0.18 * z[:, 3], 0.5, 1.8),
    }


def _phenotypes(latent: dict[str, np.ndarray], n: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
    """Phenotypes with COPDGene names (vectorised); see docs/synthetic_cohort.md for the equations."""
    cle, pse, awt = latent["cle"], latent["pse"], latent["awt"]
    e_fev, e_ratio = n[:, _N["fev1"]], n[:, _N["ratio"]]
    log_fev = (math.log(FEV1_B0) - FEV1_B_CLE * cle - FEV1_B_PSE * pse - FEV1_B_AWT * (awt - 1.0)
               + FEV1_NOISE * e_fev)
    fev1pp = np.clip(100.0 * np.exp(log_fev), 12.0, 140.0)
    own = math.sqrt(1.0 - RATIO_SHARED ** 2)
    ratio = np.clip(RATIO_R0 - RATIO_CLE * cle - RATIO_PSE * pse - RATIO_AWT * (awt - 1.0)
                    + RATIO_NOISE * (RATIO_SHARED * e_fev + own * e_ratio), 0.25, 0.92)
    obstructed = ratio < 0.70
    gold = np.where(obstructed, np.select([fev1pp >= 80, fev1pp >= 50, fev1pp >= 30], [1, 2, 3], 4),
                    np.where(fev1pp < 80, -1, 0))
    mmrc_latent = (MMRC_M0 + MMRC_FEV1 * -np.log(fev1pp / 100.0) + MMRC_AWT * (awt - 1.0)
                   + MMRC_NOISE * n[:, _N["mmrc"]])
    mmrc = np.clip(np.rint(mmrc_latent), 0, 4) + 0.0   # + 0.0 turns -0.0 into 0.0
    mmrc = np.where(u[:, _U["missing_mmrc"]] < MISSING_MMRC, np.nan, mmrc)
    severity = np.searchsorted(SEVERITY_THRESHOLDS, cle * np.exp(RATER_NOISE * n[:, _N["rater_cle"]]), side="right")
    paraseptal = np.searchsorted(PARASEPTAL_THRESHOLDS, pse * np.exp(RATER_NOISE * n[:, _N["rater_pse"]]),
                                 side="right").astype(float)
    paraseptal = np.where(u[:, _U["missing_paraseptal"]] < MISSING_PARASEPTAL, np.nan, paraseptal)
    age = np.clip(61.0 + 9.0 * n[:, _N["age"]], 45.0, 80.0)
    gender = np.where(u[:, _U["gender"]] < 0.46, 2, 1)  # COPDGene coding: 1 male, 2 female
    pack_years = np.clip(10.0 + np.exp(math.log(30.0) + 0.55 * latent["smoke"] + 0.01 * (age - 61.0)), 10.0, 200.0)
    return {"FEV1pp_utah": fev1pp, "FEV1_FVC_utah": ratio, "Emph_Severity": severity,
            "Emph_Paraseptal": paraseptal, "MMRCDyspneaScor": mmrc, "finalGold": gold,
            "age": age, "gender": gender, "ATS_PackYears": pack_years}


def _orientation_code(axes: tuple[int, ...], flips: tuple[bool, ...]) -> str:
    """nibabel-style axis codes of a stored array (canonical storage is ``LPS``)."""
    if axes == (0, 1, 2) and not any(flips):
        return "LPS"
    pos, neg = "LPS", "RAI"
    return "".join(neg[a] if f else pos[a] for a, f in zip(axes, flips))


def _grid_for(resolution: str, spacing_override, shape_override, fov_xy: float, extent_z: float,
              table: tuple[float, float, float]) -> Grid:
    """The subject's grid: preset, or the ``spacing_mm``/``shape`` overrides (both (x, y, z))."""
    preset = PRESETS[resolution]
    if spacing_override is not None and shape_override is not None:
        spacing = [float(v) for v in spacing_override]
        shape = [int(v) for v in shape_override]
    elif spacing_override is not None:
        spacing = [float(v) for v in spacing_override]
        shape = [math.ceil(fov_xy / spacing[0]), math.ceil(fov_xy / spacing[1]), math.ceil(extent_z / spacing[2])]
    elif shape_override is not None:
        shape = [int(v) for v in shape_override]
        spacing = [fov_xy / shape[0], fov_xy / shape[1], extent_z / shape[2]]
    else:
        matrix = int(preset["matrix"])
        shape = [matrix, matrix, math.ceil(extent_z / preset["spacing_z"])]
        spacing = [fov_xy / matrix, fov_xy / matrix, preset["spacing_z"]]
    # rounded so that DICOM decimal strings (ImagePositionPatient, PixelSpacing) hold them exactly
    spacing = [round(v, 6) for v in spacing]
    origin = tuple(round(c - (n - 1) * d / 2.0, 4) for c, n, d in zip(table, shape, spacing))
    return Grid(shape_zyx=(shape[2], shape[1], shape[0]), spacing_zyx=(spacing[2], spacing[1], spacing[0]),
                origin_lps=origin)


def plan_cohort(settings: dict[str, Any]) -> list[SubjectPlan]:
    """Plan the cohort described by the ``synthetic`` config section.

    Args:
        settings: ``n_subjects``, ``seed``, ``resolution`` (``demo``/``full``), ``spacing_mm`` and
            ``shape`` (``null`` or ``[x, y, z]``), ``dicom_fraction``, ``reoriented_fraction``
            (other keys are ignored).

    Returns:
        One :class:`SubjectPlan` per subject, ``SYN0001`` first.
    """
    s = _check_settings(settings)
    seed = int(s["seed"])
    indices = np.arange(1, s["n_subjects"] + 1)
    n, u = _draws(seed, indices)
    latent = _latent(n)
    pheno = _phenotypes(latent, n, u)
    female = pheno["gender"] == 2

    # nuisance factors
    site_cdf = np.cumsum([w for _, w, _, _, _ in SITES])
    site_idx = np.minimum(np.searchsorted(site_cdf / site_cdf[-1], u[:, _U["site"]], side="right"), len(SITES) - 1)
    p_sharp = np.array([p for *_, p in SITES])[site_idx]
    sharp = u[:, _U["kernel"]] < p_sharp
    noise_hu = np.where(sharp, 28.0 + 20.0 * u[:, _U["noise"]], 12.0 + 12.0 * u[:, _U["noise"]])
    density_shift = np.clip(18.0 * n[:, _N["density_shift"]], -50.0, 50.0)

    # anatomy (mm); expiration (positive density shift) shortens the lungs
    # the thorax interior (which holds the lungs) is drawn first; chest wall and fat add to it
    fat = np.clip(12.0 + 5.0 * n[:, _N["fat"]], 4.0, 30.0)
    wall = np.clip(12.0 + 2.0 * n[:, _N["wall"]], 8.0, 18.0)
    inner_a = np.clip(124.0 + 7.0 * n[:, _N["body_a"]] - 6.0 * female, 105.0, 145.0)
    inner_b = np.clip(90.0 + 6.0 * (0.6 * n[:, _N["body_a"]] + 0.8 * n[:, _N["body_b"]]) - 5.0 * female, 72.0, 110.0)
    body_a, body_b = inner_a + wall + fat, inner_b + wall + fat
    height = np.clip(250.0 + 14.0 * n[:, _N["height"]] - 12.0 * female - 0.5 * density_shift, 200.0, 295.0)

    # pose
    scale = np.clip(1.0 + 0.035 * n[:, _N["scale"]], 0.92, 1.08)
    rot = np.stack([np.clip(1.0 * n[:, _N["rot_x"]], -2.0, 2.0), np.clip(1.5 * n[:, _N["rot_y"]], -3.0, 3.0),
                    np.clip(2.5 * n[:, _N["rot_z"]], -6.0, 6.0)], axis=1)
    shift = np.clip(5.0 * n[:, [_N["shift_x"], _N["shift_y"], _N["shift_z"]]], -12.0, 12.0)

    # field of view: the technologist fits the body (in-plane) and the lungs (z)
    fov_xy = 2.0 * (body_a * scale + np.abs(shift[:, 0])) + 20.0 + 30.0 * u[:, _U["fov_margin"]]
    extent_z = height * scale + 2.0 * Z_MARGIN_MM
    table = np.stack([-4.0 + 8.0 * u[:, _U["table_x"]], -30.0 + 40.0 * u[:, _U["table_y"]],
                      -450.0 + 300.0 * u[:, _U["table_z"]]], axis=1)

    is_dicom = u[:, _U["format"]] < float(s["dicom_fraction"])
    reorient = ~is_dicom & (u[:, _U["reorient"]] < float(s["reoriented_fraction"]))

    col = n.T  # per-slot rows, vectorised over subjects
    anatomy_columns = {
        "body_half_width": body_a,
        "body_half_depth": body_b,
        "fat_mm": fat,
        "chest_wall_mm": wall,
        "lung_height": height,
        "dome_mm": np.clip(38.0 + 6.0 * col[_N["dome"]], 25.0, 55.0),
        "right_dome_offset": np.clip(15.0 + 5.0 * col[_N["dome_right"]], 5.0, 28.0),
        "heart_rx": np.clip(55.0 + 4.0 * col[_N["heart_rx"]], 45.0, 68.0),
        "heart_ry": np.clip(45.0 + 4.0 * col[_N["heart_ry"]], 36.0, 56.0),
        "heart_rz": np.clip(52.0 + 4.0 * col[_N["heart_rz"]], 42.0, 64.0),
        "heart_x": np.clip(18.0 + 5.0 * col[_N["heart_x"]], 6.0, 30.0),
        "mediastinum_half_width": np.clip(21.0 + 2.0 * col[_N["med_width"]], 16.0, 27.0),
        "mediastinum_x": np.clip(4.0 + 2.0 * col[_N["med_x"]], -2.0, 10.0),
        "anterior_gap": 4.0 + 4.0 * u[:, _U["gap"]],
        "spine_radius": np.clip(17.0 + 1.5 * col[_N["spine"]], 13.0, 21.0),
        "trachea_radius": np.clip(8.5 + 1.0 * col[_N["trachea"]], 6.5, 11.0),
    }
    an = {key: value.tolist() for key, value in anatomy_columns.items()}
    ph = {key: value.tolist() for key, value in pheno.items()}
    lat = {key: value.tolist() for key, value in latent.items()}
    rot_l, shift_l, scale_l, table_l = rot.tolist(), shift.tolist(), scale.tolist(), table.tolist()
    fov_l, extent_l, noise_l, dshift_l = fov_xy.tolist(), extent_z.tolist(), noise_hu.tolist(), density_shift.tolist()
    u_axes, u_flips = u[:, _U["axes"]].tolist(), u[:, _U["flips"]].tolist()
    sharp_l, site_l, dicom_l, reorient_l = sharp.tolist(), site_idx.tolist(), is_dicom.tolist(), reorient.tolist()

    plans = []
    for row, index in enumerate(indices.tolist()):
        sid = make_sid(index)
        fmt = "dicom" if dicom_l[row] else "nifti"
        axes, flips = (0, 1, 2), (False, False, False)
        if reorient_l[row]:
            axes = _PERMUTATIONS[min(int(u_axes[row] * 6), 5)]
            bits = min(int(u_flips[row] * 8), 7)
            flips = (bool(bits & 1), bool(bits & 2), bool(bits & 4))
            if axes == (0, 1, 2) and not any(flips):
                flips = (True, False, False)
        name, _, calibration, padding, _ = SITES[site_l[row]]
        grid = _grid_for(s["resolution"], s["spacing_mm"], s["shape"], fov_l[row], extent_l[row], table_l[row])
        centre = tuple(c + d for c, d in zip(grid.centre_lps, shift_l[row]))
        anatomy = Anatomy(
            body_half_width=an["body_half_width"][row], body_half_depth=an["body_half_depth"][row],
            fat_mm=an["fat_mm"][row], chest_wall_mm=an["chest_wall_mm"][row], lung_height=an["lung_height"][row],
            dome_mm=an["dome_mm"][row], right_dome_offset=an["right_dome_offset"][row],
            heart_radii=(an["heart_rx"][row], an["heart_ry"][row], an["heart_rz"][row]), heart_x=an["heart_x"][row],
            mediastinum_half_width=an["mediastinum_half_width"][row], mediastinum_x=an["mediastinum_x"][row],
            anterior_gap=an["anterior_gap"][row], spine_radius=an["spine_radius"][row],
            trachea_radius=an["trachea_radius"][row],
        )
        plans.append(SubjectPlan(
            sid=sid, index=index, seed=seed, format=fmt,
            image=f"images/{sid}" if fmt == "dicom" else f"images/{sid}.nii.gz",
            label=f"labels/{sid}.nii.gz", axes=axes, flips=flips, orientation=_orientation_code(axes, flips),
            cle=lat["cle"][row], pse=lat["pse"][row], awt=lat["awt"][row],
            site=name, kernel=KERNELS[int(sharp_l[row])], noise_hu=noise_l[row],
            density_shift_hu=dshift_l[row], calibration_hu=calibration, padding_hu=padding,
            grid=grid,
            pose=Pose(scale=scale_l[row], rotation_deg=tuple(rot_l[row]), shift_mm=tuple(shift_l[row]),
                      centre_lps=centre),
            anatomy=anatomy,
            FEV1pp_utah=ph["FEV1pp_utah"][row], FEV1_FVC_utah=ph["FEV1_FVC_utah"][row],
            Emph_Severity=int(ph["Emph_Severity"][row]), Emph_Paraseptal=ph["Emph_Paraseptal"][row],
            MMRCDyspneaScor=ph["MMRCDyspneaScor"][row], finalGold=int(ph["finalGold"][row]),
            age=ph["age"][row], gender=int(ph["gender"][row]), ATS_PackYears=ph["ATS_PackYears"][row],
        ))
    return plans


# ---- tables -----------------------------------------------------------------------------------------

def subjects_table(plans: list[SubjectPlan]) -> list[dict[str, Any]]:
    """Rows of ``subjects.tsv``: ``sid, image, format`` (image relative to the table's directory)."""
    return [{"sid": p.sid, "image": p.image, "format": p.format} for p in plans]


def phenotype_table(plans: list[SubjectPlan]) -> list[dict[str, Any]]:
    """Rows of ``phenotypes.tsv`` with exactly :data:`PHENOTYPE_COLUMNS` (NaN where missing)."""
    rows = []
    for p in plans:
        rows.append({
            "sid": p.sid,
            "FEV1pp_utah": round(p.FEV1pp_utah, 2),
            "FEV1_FVC_utah": round(p.FEV1_FVC_utah, 4),
            "Emph_Severity": p.Emph_Severity,
            "Emph_Paraseptal": p.Emph_Paraseptal,
            "MMRCDyspneaScor": p.MMRCDyspneaScor,
            "finalGold": p.finalGold,
            "age": round(p.age, 1),
            "gender": p.gender,
            "ATS_PackYears": round(p.ATS_PackYears, 1),
            "ccenter": p.site,
            "kernel": p.kernel,
        })
    return rows


def truth_table(plans: list[SubjectPlan]) -> list[dict[str, Any]]:
    """Rows of ``truth.tsv``: latent factors, nuisance factors, pose and storage layout.

    Grid size and spacing are left out (they are in the image headers): the evaluate stage reads
    every numeric column out of the embeddings, and those would only add noise to that table.
    """
    rows = []
    for p in plans:
        row = {"sid": p.sid, "cle": p.cle, "pse": p.pse, "awt": p.awt, "kernel": p.kernel,
               "noise_hu": p.noise_hu, "density_shift_hu": p.density_shift_hu, "site": p.site,
               "calibration_hu": p.calibration_hu,
               "padding_hu": float("nan") if p.padding_hu is None else p.padding_hu,
               "scale": p.pose.scale}
        for axis, value in zip("xyz", p.pose.rotation_deg):
            row[f"rot_{axis}_deg"] = value
        for axis, value in zip("xyz", p.pose.shift_mm):
            row[f"shift_{axis}_mm"] = value
        row["lung_height_mm"] = p.anatomy.lung_height
        row["format"] = p.format
        row["orientation"] = p.orientation
        rows.append(row)
    return rows
