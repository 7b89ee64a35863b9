"""Synthetic multi-site abdominal CT cohort (phantoms in Hounsfield units).

Each patient is a 3D volume built in patient coordinates (millimetres, RAS+: +x towards the
patient's right, +y anterior, +z superior) from an anatomy drawn at random: body outline,
subcutaneous fat (about -100 HU), abdominal wall and paraspinal muscle, spine and ribs (bone,
several hundred HU), lung bases and heart above the diaphragm, aorta and vena cava, stomach and
bowel, kidneys and spleen whose HU are close to the liver's, and a lobed liver of varying size,
shape and position with intrahepatic vessels and sometimes lesions. The label is binary (liver,
lesions and intrahepatic vessels included; the vena cava excluded).

Sites differ like scanners do: noise level, HU calibration offset, in-plane field of view and
hence spacing, slice spacing, contrast phase (liver brightness), storage orientation, and cohort
size. The output follows the Medical Segmentation Decathlon layout (``imagesTr/``, ``labelsTr/``)
with a datalist per site (see :mod:`dpseg.datalist`).

The public cohort (``write_public``, ``dpseg synth --public``) stands for the public data a model
is pretrained on: other scanners (PUBLIC_PROFILES) and contrast phases (PUBLIC_PHASES) than any
site, other body regions (abdomen, chest, pelvis, head and neck; the last two without liver), and
generators that no site's can coincide with (``public_rng``).
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dpseg.datalist import split_patients, write_datalist

IN_PLANE_VOXELS = 128
Z_EXTENT_MM = 180.0

# HU of contrast-enhanced structures per contrast phase: (liver, aorta, portal/hepatic veins).
# The sites' scanners use SITE_PHASES only; the public cohort's use PUBLIC_PHASES only.
PHASE_HU = {
    "portal": (110.0, 160.0, 170.0),
    "arterial": (75.0, 280.0, 90.0),
    "native": (58.0, 45.0, 42.0),
    "early-arterial": (66.0, 330.0, 55.0),
    "late-portal": (122.0, 135.0, 150.0),
    "delayed": (92.0, 105.0, 100.0),
}
# Blood in the heart (HU) per contrast phase.
HEART_HU = {"portal": 150.0, "arterial": 150.0, "native": 40.0,
            "early-arterial": 260.0, "late-portal": 140.0, "delayed": 105.0}
SITE_PHASES = ("portal", "arterial", "native")
PUBLIC_PHASES = ("early-arterial", "late-portal", "delayed")

# The scanners site_profiles() draws for sites 4 and up: ranges of uniform draws, and choices.
SITE_NOISE_HU = (10.0, 30.0)
SITE_OFFSET_HU = (-15.0, 15.0)
SITE_FOV_MM = (340.0, 420.0)
SITE_SLICE_MM = (4.0, 5.0, 6.0)


@dataclass(frozen=True)
class SiteProfile:
    """How one site's scanner and population differ.

    noise_hu: standard deviation of the image noise (HU); offset_hu: calibration offset added to
    every voxel (HU); fov_mm: in-plane field of view (mm, over 128 voxels); slice_mm: slice
    spacing (mm); phase: contrast phase, a key of PHASE_HU; orientation: storage axis codes
    ("RAS" or "LPS"); patients: cohort size.
    """

    name: str
    noise_hu: float
    offset_hu: float
    fov_mm: float
    slice_mm: float
    phase: str
    orientation: str
    patients: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along the stored axes."""
        return (self.fov_mm / IN_PLANE_VOXELS, self.fov_mm / IN_PLANE_VOXELS, self.slice_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape in voxels (x, y, z)."""
        return (IN_PLANE_VOXELS, IN_PLANE_VOXELS, int(round(Z_EXTENT_MM / self.slice_mm)))


DEFAULT_PROFILES = (
    SiteProfile("site-1", 12.0, 0.0, 350.0, 5.0, "portal", "RAS", 60),
    SiteProfile("site-2", 20.0, 15.0, 380.0, 4.0, "arterial", "LPS", 90),
    SiteProfile("site-3", 28.0, -12.0, 410.0, 6.0, "native", "LPS", 120),
)


def site_profiles(n_sites: int, patients: list[int] | None = None, seed: int = 0) -> list[SiteProfile]:
    """The profiles of ``n_sites`` sites: the three defaults, then random scanners.

    ``patients`` overrides the cohort size per site (one number per site).
    """
    if n_sites < 1:
        raise ValueError(f"--sites must be at least 1, got {n_sites}")
    if patients is not None and len(patients) != n_sites:
        raise ValueError(f"--patients gives {len(patients)} sizes for {n_sites} sites")
    if patients is not None and min(patients) < 3:
        raise ValueError("every site needs at least 3 patients (training, validation and test)")
    rng = np.random.default_rng(seed + 1000)
    profiles = list(DEFAULT_PROFILES[:n_sites])
    for i in range(len(profiles), n_sites):
        profiles.append(SiteProfile(
            name=f"site-{i + 1}",
            noise_hu=float(rng.uniform(*SITE_NOISE_HU)),
            offset_hu=float(rng.uniform(*SITE_OFFSET_HU)),
            fov_mm=float(rng.uniform(*SITE_FOV_MM)),
            slice_mm=float(rng.choice(list(SITE_SLICE_MM))),
            phase=str(rng.choice(list(SITE_PHASES))),
            orientation=str(rng.choice(["RAS", "LPS"])),
            patients=int(rng.integers(60, 121)),
        ))
    if patients is not None:
        profiles = [SiteProfile(**{**asdict(p), "patients": n}) for p, n in zip(profiles, patients)]
    return profiles


class _Grid:
    """Patient coordinates (mm) of every voxel of a RAS-ordered volume, each of shape (X, Y, Z).

    The volume is centred on x = y = 0 and on z = ``z_centre_mm``.
    """

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], z_centre_mm: float = 0.0):
        axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
        if z_centre_mm:
            axes[2] = axes[2] + np.float32(z_centre_mm)
        self.x, self.y, self.z = np.meshgrid(*axes, indexing="ij", sparse=True)
        self.shape = shape

    def ellipsoid(self, centre, semi_axes) -> np.ndarray:
        """Normalised squared distance: < 1 inside the ellipsoid (centre and semi-axes in mm)."""
        (cx, cy, cz), (ax, ay, az) = centre, semi_axes
        return ((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2 + ((self.z - cz) / az) ** 2

    def ellipse(self, centre, semi_axes) -> np.ndarray:
        """Normalised squared in-plane distance (an infinite elliptic cylinder along z)."""
        (cx, cy), (ax, ay) = centre, semi_axes
        return np.broadcast_to(((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2, self.shape)

    def smooth_field(self, rng: np.random.Generator, wavelength_mm: float, n: int = 6) -> np.ndarray:
        """A smooth random field in about [-1, 1] (sum of random plane waves)."""
        field = np.zeros(self.shape, dtype=np.float32)
        for _ in range(n):
            k = rng.normal(size=3)
            k *= 2 * np.pi / wavelength_mm / np.linalg.norm(k)
            phase = rng.uniform(0, 2 * np.pi)
            # sin(kx x + ky y + kz z + phase) as the imaginary part of a separable product (fast)
            wave = np.exp(1j * (k[0] * self.x + phase)) * np.exp(1j * k[1] * self.y)
            field += (wave.astype(np.complex64) * np.exp(1j * k[2] * self.z).astype(np.complex64)).imag
        return field / np.sqrt(n / 2)


def _tube(grid: _Grid, start, end, radius: float) -> np.ndarray:
    """Boolean mask of a straight vessel (a capsule) between two points (mm), radius in mm."""
    p0, d = np.asarray(start, np.float32), np.asarray(end, np.float32) - np.asarray(start, np.float32)
    length2 = float(d @ d)
    t = ((grid.x - p0[0]) * d[0] + (grid.y - p0[1]) * d[1] + (grid.z - p0[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    dist2 = (grid.x - p0[0] - t * d[0]) ** 2 + (grid.y - p0[1] - t * d[1]) ** 2 + (grid.z - p0[2] - t * d[2]) ** 2
    return dist2 < radius**2


@dataclass
class _Torso:
    """Landmarks of a drawn torso (mm, patient coordinates) and its masks (X, Y, Z).

    cy: body centre (anterior-posterior); ac, bc: semi-axes of the cavity inside the abdominal
    wall; z_right: top of the right diaphragm dome; dome: height of the diaphragm at every voxel;
    yv: centre of the vertebral bodies (anterior-posterior).
    """

    cy: float
    ac: float
    bc: float
    cavity: np.ndarray
    z_right: float
    dome: np.ndarray
    thorax: np.ndarray
    yv: float
    vert: np.ndarray


def _body_wall(g: _Grid, hu: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float, np.ndarray]:
    """Body, subcutaneous fat, abdominal wall, abdominal cavity (visceral fat), drawn into ``hu``.

    Returns (cy, ac, bc, cavity): the body's centre (y, mm), the cavity's semi-axes (mm), its mask.
    """
    a, b = rng.uniform(130, 165), rng.uniform(95, 120)
    cy = rng.uniform(-8, 8)
    fat, wall = rng.uniform(8, 28), rng.uniform(8, 13)
    ac, bc = a - fat - wall, b - fat - wall
    body = g.ellipse((0, cy), (a, b)) < 1
    hu[body] = -100 + rng.normal(0, 5)
    hu[g.ellipse((0, cy), (a - fat, b - fat)) < 1] = 45
    cavity = g.ellipse((0, cy), (ac, bc)) < 1
    hu[cavity] = -85
    return cy, ac, bc, cavity


def _torso(g: _Grid, hu: np.ndarray, heart_hu: float, rng: np.random.Generator,
           ribs_above_dome_mm: float = 30.0) -> _Torso:
    """Body wall, diaphragm with lungs and heart above it, spine and ribs, drawn into ``hu``.

    Ribs reach ``ribs_above_dome_mm`` above the right dome (the sites' volumes end about there).
    """
    cy, ac, bc, cavity = _body_wall(g, hu, rng)

    # Diaphragm: two domes (the right one higher); lungs and heart above, abdomen below.
    z_right = rng.uniform(40, 75)
    z_left = z_right - rng.uniform(8, 22)
    dome = np.maximum(z_right - ((g.x - 55) ** 2 + (g.y - cy + 10) ** 2) / 300.0,
                      z_left - ((g.x + 55) ** 2 + (g.y - cy + 10) ** 2) / 300.0)
    thorax = cavity & (g.z > dome)
    hu[thorax] = -850 + rng.normal(0, 15)
    heart = thorax & (g.ellipsoid((-20, cy + 35, z_right + 45), (55, 45, 50)) < 1)
    hu[heart] = heart_hu

    # Spine (vertebral bodies with discs), canal, paraspinal muscles, ribs.
    yv = cy - bc + rng.uniform(26, 34)
    vert = g.ellipse((0, yv), (17, 15)) < 1
    disc = np.abs(((g.z + rng.uniform(0, 30)) % 30) - 15) < 2.5
    hu[g.ellipse((35, yv - 22), (24, 18)) < 1] = 50
    hu[g.ellipse((-35, yv - 22), (24, 18)) < 1] = 50
    hu[vert & ~disc] = 700
    hu[(g.ellipse((0, yv), (13, 11)) < 1) & ~disc] = 230
    hu[vert & disc] = 85
    hu[g.ellipse((0, yv - 22), (7, 7)) < 1] = 20
    hu[(g.ellipse((0, yv - 22), (11, 11)) < 1) & ~(g.ellipse((0, yv - 22), (7, 7)) < 1)] = 600
    rib_phase = rng.uniform(0, 26)
    for angle in np.linspace(-np.pi, np.pi, 16, endpoint=False):
        if abs(angle - np.pi / 2) < 0.45:  # no ribs over the anterior midline
            continue
        rx, ry = np.cos(angle) * (ac + 3), cy + np.sin(angle) * (bc + 3)
        band = np.abs(((g.z + rib_phase + 8 * angle) % 26) - 13) < 5
        hu[(g.ellipse((rx, ry), (6, 5)) < 1) & band & (g.z < z_right + ribs_above_dome_mm)] = 550
    return _Torso(cy, ac, bc, cavity, z_right, dome, thorax, yv, vert)


def _liver(g: _Grid, hu: np.ndarray, t: _Torso, abdomen: np.ndarray, liver_hu: float,
           rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A union of lobes with a smoothly perturbed surface, under the right dome, drawn into ``hu``.

    Returns the liver mask and the centre (mm) of its main lobe.
    """
    s = rng.uniform(0.8, 1.2)
    xl, yl, zl = rng.uniform(50, 75), t.cy + rng.uniform(-10, 12), t.z_right - rng.uniform(40, 60)
    lobes = [
        ((xl, yl, zl), (62 * s, 70 * s, 55 * s)),
        ((xl - rng.uniform(60, 85), yl + rng.uniform(25, 45), zl + 12), (rng.uniform(40, 65) * s, 32 * s, 35 * s)),
        ((xl + 8, yl - 10, zl - rng.uniform(40, 70)), (36 * s, 40 * s, rng.uniform(25, 45) * s)),
    ]
    shape = np.minimum.reduce([g.ellipsoid(c, r) for c, r in lobes])
    liver = abdomen & (shape < 1 + 0.3 * g.smooth_field(rng, 120.0)) & (g.z < t.dome - 3)
    liver &= g.ellipse((0, t.yv), (24, 22)) >= 1
    texture = 6 * g.smooth_field(rng, 25.0)
    hu[liver] = (liver_hu + texture)[liver]
    return liver, (xl, yl, zl)


def _abdominal_organs(g: _Grid, hu: np.ndarray, t: _Torso, abdomen: np.ndarray, liver: np.ndarray, zl: float,
                      liver_hu: float, rng: np.random.Generator) -> None:
    """Organs with HU close to the liver's (spleen, kidneys), then stomach and bowel, into ``hu``."""
    cy, yv = t.cy, t.yv
    spleen = abdomen & ~liver & (g.ellipsoid((-rng.uniform(70, 90), yv + rng.uniform(25, 40), zl + rng.uniform(0, 30)),
                                             np.array([28.0, 45.0, 50.0]) * rng.uniform(0.8, 1.2)) < 1)
    hu[spleen] = liver_hu + rng.uniform(-12, 15)
    zk = zl - rng.uniform(45, 75)
    for side in (1, -1):
        kidney = abdomen & ~liver & (g.ellipsoid((side * rng.uniform(55, 70), yv + 8, zk + side * 10), (24, 28, 48)) < 1)
        hu[kidney] = liver_hu + rng.uniform(-15, 30)
    stomach = abdomen & ~liver & ~spleen & (g.ellipsoid((-45, cy + 40, zl + 20), (38, 32, 40)) < 1)
    hu[stomach] = 20
    hu[stomach & (g.y > cy + 55)] = -800
    for _ in range(rng.integers(6, 14)):
        c = (rng.uniform(-70, 60), cy + rng.uniform(-10, 60), rng.uniform(-90, zl - 30))
        blob = abdomen & ~liver & (g.ellipsoid(c, rng.uniform(10, 25, size=3)) < 1)
        hu[blob] = -700 if rng.random() < 0.25 else rng.uniform(-20, 50)


def _liver_vessels_and_lesions(g: _Grid, hu: np.ndarray, liver: np.ndarray, centre, liver_hu: float,
                               vein_hu: float, rng: np.random.Generator) -> None:
    """Intrahepatic veins and sometimes lesions (both part of the liver label), drawn into ``hu``."""
    xl, yl, zl = centre
    for _ in range(rng.integers(3, 7)):  # intrahepatic veins, labelled liver as in MSD
        start = (xl + rng.uniform(-30, 30), yl + rng.uniform(-30, 30), zl + rng.uniform(-30, 30))
        end = (xl + rng.uniform(-60, 60), yl + rng.uniform(-60, 60), zl + rng.uniform(-50, 50))
        vessel = liver & _tube(g, start, end, rng.uniform(2.5, 5))
        hu[vessel] = vein_hu
    for _ in range(min(rng.poisson(0.8), 3)):  # lesions, merged into the liver label
        inside = np.argwhere(liver)
        if len(inside) == 0:
            break
        i, j, k = inside[rng.integers(len(inside))]
        centre = (g.x[i, 0, 0], g.y[0, j, 0], g.z[0, 0, k])
        lesion = liver & (g.ellipsoid(centre, rng.uniform(5, 20, size=3)) < 1)
        hu[lesion] = liver_hu - rng.uniform(30, 60) if rng.random() < 0.8 else liver_hu + rng.uniform(30, 60)


def _abdomen(g: _Grid, phase: str, rng: np.random.Generator,
             ribs_above_dome_mm: float = 30.0) -> tuple[np.ndarray, np.ndarray, _Torso]:
    """The torso with its abdominal organs before the scanner: (HU float32, liver mask, landmarks).

    The liver mask holds the liver, its lesions and intrahepatic vessels (not the vena cava).
    """
    liver_hu, aorta_hu, vein_hu = PHASE_HU[phase]
    liver_hu += rng.normal(0, 6)
    hu = np.full(g.shape, -1000.0, dtype=np.float32)
    t = _torso(g, hu, HEART_HU[phase], rng, ribs_above_dome_mm)
    abdomen = t.cavity & ~t.thorax & ~t.vert
    liver, centre = _liver(g, hu, t, abdomen, liver_hu, rng)
    _abdominal_organs(g, hu, t, abdomen, liver, centre[2], liver_hu, rng)
    aorta = (g.ellipse((-15, t.yv + 27), (11, 11)) < 1) & ~t.thorax
    ivc = (g.ellipse((22, t.yv + 30), (12, 10)) < 1) & ~t.thorax
    hu[aorta] = aorta_hu
    hu[ivc] = vein_hu
    liver &= ~ivc
    _liver_vessels_and_lesions(g, hu, liver, centre, liver_hu, vein_hu, rng)
    return hu, liver, t


def _scanned(hu: np.ndarray, spacing, noise_hu: float, offset_hu: float, rng: np.random.Generator) -> np.ndarray:
    """What a scanner stores (int16 HU): partial volume blur, white noise (``noise_hu``, HU), offset (HU)."""
    sigma_vox = [0.7 * min(spacing) / sp for sp in spacing]
    hu = ndimage.gaussian_filter(hu, sigma_vox)
    hu += rng.normal(0, noise_hu, size=hu.shape).astype(np.float32)
    hu += offset_hu
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def phantom(profile: SiteProfile, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One patient: (image in HU as int16, binary liver label as uint8), both RAS-ordered (X, Y, Z)."""
    g = _Grid(profile.shape, profile.spacing)
    hu, liver, _ = _abdomen(g, profile.phase, rng)
    return _scanned(hu, profile.spacing, profile.noise_hu, profile.offset_hu, rng), liver.astype(np.uint8)


def head_phantom(shape: tuple[int, int, int] = (64, 64, 40), spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head-like CT, the wrong input for a liver model (for its plausibility check): a skull of
    1000 HU, 7 mm thick, around brain at 35 HU, under 4 mm of scalp at 40 HU, in air (-1000 HU),
    noise 10 HU; the head is 158 x 198 x 178 mm. Returns (image in HU as float32, brain mask),
    both RAS-ordered (X, Y, Z) and centred, and the affine (4, 4, voxel indices to mm)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)

    def inside(grow_mm: float) -> np.ndarray:
        return (x / (75 + grow_mm)) ** 2 + (y / (95 + grow_mm)) ** 2 + (z / (85 + grow_mm)) ** 2 < 1

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[inside(4)] = 40
    hu[inside(0)] = 1000
    brain = inside(-7)
    hu[brain] = 35
    hu += np.random.default_rng(seed).normal(0, 10, size=shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)
    return hu, brain, affine


def ras_to_storage(volume: np.ndarray, spacing, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a RAS-ordered, centred volume to its storage orientation; returns (array, affine).

    The affine maps voxel indices to RAS+ world millimetres, with the volume centred at 0.
    """
    shape = np.array(volume.shape)
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = -(shape - 1) / 2 * np.array(spacing)
    if orientation == "RAS":
        return volume, affine
    if orientation == "LPS":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = shape[:2] - 1
        return np.ascontiguousarray(volume[::-1, ::-1, :]), affine @ flip
    raise ValueError(f"unknown storage orientation {orientation!r} (use RAS or LPS)")


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write one NIfTI volume with a qform and sform set to ``affine`` (mm)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def site_rng(seed: int, site_number: int) -> np.random.Generator:
    """The generator of site ``site-<site_number>``'s cohort (all its patients, in order)."""
    return np.random.default_rng([seed, site_number])


def write_site(out: Path, profile: SiteProfile, seed: int, progress=None) -> Path:
    """Write one site's cohort in MSD layout plus ``datalist.json``; returns the datalist path."""
    site_dir = out / profile.name
    rng = site_rng(seed, int(profile.name.split("-")[-1]))
    patients = []
    for i in range(profile.patients):
        pid = f"{profile.name}_{i:03d}"
        image, label = phantom(profile, rng)
        image, affine = ras_to_storage(image, profile.spacing, profile.orientation)
        label, _ = ras_to_storage(label, profile.spacing, profile.orientation)
        write_nifti(image, affine, site_dir / "imagesTr" / f"{pid}.nii.gz")
        write_nifti(label, affine, site_dir / "labelsTr" / f"{pid}.nii.gz")
        patients.append({"image": f"imagesTr/{pid}.nii.gz", "label": f"labelsTr/{pid}.nii.gz", "patient": pid})
        if progress:
            progress(profile.name, i + 1, profile.patients)
    splits = split_patients(patients, seed=seed)
    (site_dir / "site.json").write_text(json.dumps(asdict(profile), indent=2) + "\n")
    return write_datalist(site_dir / "datalist.json", splits, description=f"synthetic CT, {profile.name}")


def write_cohort(out: Path, n_sites: int = 3, patients: list[int] | None = None, seed: int = 0,
                 progress=None, workers: int = 1) -> list[Path]:
    """Write a synthetic multi-site cohort under ``out``; returns each site's datalist path.

    ``workers`` > 1: sites are written by that many processes at once, the largest first (each site
    draws from its own generator, so the files are the same as one process writes); ``progress``
    must then be picklable (it is called in the workers)."""
    profiles = site_profiles(n_sites, patients, seed)
    if workers <= 1 or len(profiles) == 1:
        return [write_site(Path(out), p, seed, progress) for p in profiles]
    with ProcessPoolExecutor(max_workers=min(workers, len(profiles)), mp_context=get_context("spawn")) as pool:
        futures = {p.name: pool.submit(write_site, Path(out), p, seed, progress)
                   for p in sorted(profiles, key=lambda p: -p.patients)}
        return [futures[p.name].result() for p in profiles]


# ---------------------------------------------------------------------------------------------
# The public cohort: other scanners, protocols, contrast phases and body regions than any site's.

REGIONS = ("abdomen", "chest", "pelvis", "head")
PUBLIC_PATIENTS = 96
# Fixed word in the public cohort's seed sequence (ASCII "publ"), so that its generators never
# coincide with a site's: see public_rng().
PUBLIC_SEED_TAG = 0x7075626C


@dataclass(frozen=True)
class PublicProfile:
    """One public scanner and protocol, unlike every site's.

    region: one of REGIONS; noise_hu, offset_hu, fov_mm, slice_mm, phase (one of PUBLIC_PHASES),
    orientation: as in SiteProfile; share: its fraction of the public cohort's patients;
    z_extent_mm: length of the volume along z (mm); z_centre_mm: where the volume's centre lies in
    the torso's coordinates (abdomen and chest; the diaphragm's right dome tops out between z = 40
    and 75 mm), ignored for the head and pelvis, which are drawn about their own centre;
    in_plane: voxels per in-plane side (fewer for quick tests).
    """

    name: str
    region: str
    noise_hu: float
    offset_hu: float
    fov_mm: float
    slice_mm: float
    phase: str
    orientation: str
    share: float
    z_extent_mm: float
    z_centre_mm: float = 0.0
    in_plane: int = IN_PLANE_VOXELS

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along the stored axes."""
        return (self.fov_mm / self.in_plane, self.fov_mm / self.in_plane, self.slice_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape in voxels (x, y, z)."""
        return (self.in_plane, self.in_plane, int(round(self.z_extent_mm / self.slice_mm)))


# Every value lies outside the sites' (DEFAULT_PROFILES and the SITE_* ranges of site_profiles()).
# The chest volumes start at z = 60 mm in the torso's coordinates: the liver (below the diaphragm,
# z < 72 mm) shows at most in their bottom slices.
PUBLIC_PROFILES = (
    PublicProfile("public-1", "abdomen", 7.0, 20.0, 440.0, 3.0, "late-portal", "RAS", 0.20, 240.0, -30.0),
    PublicProfile("public-2", "abdomen", 34.0, -20.0, 320.0, 7.0, "early-arterial", "LPS", 0.20, 210.0, -10.0),
    PublicProfile("public-3", "abdomen", 8.0, -24.0, 470.0, 2.5, "delayed", "RAS", 0.15, 250.0, -40.0),
    PublicProfile("public-4", "chest", 38.0, 18.0, 450.0, 2.0, "early-arterial", "LPS", 0.15, 180.0, 150.0),
    PublicProfile("public-5", "pelvis", 9.0, -18.0, 460.0, 7.0, "delayed", "LPS", 0.15, 200.0),
    PublicProfile("public-6", "head", 6.0, 25.0, 250.0, 2.5, "early-arterial", "RAS", 0.15, 220.0),
)


def _check_public_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed}: the public cohort takes a seed from 0 to {2**32 - 1}")


def public_rng(seed: int, patient: int) -> np.random.Generator:
    """The generator of public patient ``patient`` (0, 1, ...) of the public cohort of ``seed``.

    Its seed sequence has the entropy (seed, patient) and the spawn key (PUBLIC_SEED_TAG,), so numpy
    mixes the 32-bit words [seed, patient, 0, 0, PUBLIC_SEED_TAG] (the entropy padded with zeros to
    the pool's 4 words, then the key). A site's generator (``site_rng``: entropy [seed, site], no
    key) mixes the words of its seed, then its site number (one word: sites are numbered from 1):
    five words only when the seed has four, whose fourth (the seed's top word) is never 0; shorter
    entropies are padded to four words. So no site's generator, for any seed, starts where a public
    patient's does. The public seed and patient number must each be one word (below 2**32).
    """
    _check_public_seed(seed)
    if not 0 <= patient < 2**32:
        raise ValueError(f"public patient number {patient} out of range")
    return np.random.default_rng(np.random.SeedSequence([seed, patient], spawn_key=(PUBLIC_SEED_TAG,)))


def public_profiles(in_plane: int = IN_PLANE_VOXELS) -> tuple[PublicProfile, ...]:
    """PUBLIC_PROFILES with ``in_plane`` voxels per in-plane side (same field of view)."""
    if in_plane < 16:
        raise ValueError(f"--voxels must be at least 16, got {in_plane}")
    return tuple(replace(p, in_plane=in_plane) for p in PUBLIC_PROFILES)


def public_plan(patients: int, profiles: tuple[PublicProfile, ...] = PUBLIC_PROFILES) -> list[PublicProfile]:
    """The profile of each public patient: counts in proportion to the shares (largest remainder),
    in blocks in the order of ``profiles``."""
    if patients < len(profiles):
        raise ValueError(f"--patients {patients}: the public cohort needs at least {len(profiles)} patients "
                         "(one per public scanner)")
    exact = np.array([p.share for p in profiles]) * patients / sum(p.share for p in profiles)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[:patients - counts.sum()]:
        counts[i] += 1
    return [p for p, n in zip(profiles, counts) for _ in range(n)]


def _chest(g: _Grid, hu: np.ndarray, t: _Torso, phase: str, rng: np.random.Generator) -> None:
    """What the chest shows above the abdomen's torso, drawn into ``hu``: mediastinum, trachea and
    main bronchi, thoracic aorta, pulmonary vessels, scapulae. Nothing below the diaphragm."""
    _, aorta_hu, vein_hu = PHASE_HU[phase]
    lung_vessel_hu = aorta_hu if phase == "early-arterial" else vein_hu  # pulmonary arteries in CT angiography
    top = t.z_right + rng.uniform(55, 70)  # the heart's top: mediastinum and great vessels above
    front = t.cy + t.bc  # the chest wall's inner edge, anterior; the mediastinum spans spine to sternum
    hu[t.thorax & (g.ellipse((0, (t.yv + front) / 2), (28, (front - t.yv) / 2)) < 1) & (g.z > top)] = 15
    for _ in range(rng.integers(8, 16)):
        side = 1 if rng.random() < 0.5 else -1
        start = (side * rng.uniform(25, 40), t.cy + rng.uniform(-10, 20), top - rng.uniform(0, 30))
        end = (side * rng.uniform(50, 110), t.cy + rng.uniform(-60, 60), start[2] + rng.uniform(-80, 80))
        hu[t.thorax & _tube(g, start, end, rng.uniform(2, 5))] = lung_vessel_hu
    descending = (-20, t.yv + 25)
    hu[t.thorax & (g.ellipse(descending, (11, 11)) < 1)] = aorta_hu
    arch_z = top + rng.uniform(15, 30)
    hu[t.thorax & _tube(g, (*descending, arch_z), (10, t.cy + 30, arch_z), 12)] = aorta_hu
    hu[t.thorax & _tube(g, (10, t.cy + 30, arch_z), (10, t.cy + 30, top - 20), 13)] = aorta_hu
    carina = top + rng.uniform(0, 15)
    hu[_tube(g, (0, t.yv + 42, carina), (0, t.yv + 42, carina + 400), 9)] = -950
    for side in (1, -1):
        hu[_tube(g, (0, t.yv + 42, carina), (side * 35, t.yv + 35, carina - 25), 6)] = -950
        u, v = _rotated(g, (side * 80, t.cy - 0.8 * t.bc - 12), side * 0.45)
        hu[((u / 40) ** 2 + (v / 4) ** 2 < 1) & (g.z > t.z_right + 40)] = 600  # scapula, a tilted plate


def _rotated(g: _Grid, centre, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """In-plane coordinates (mm) about ``centre`` (mm) along axes turned by ``angle`` (radians)."""
    dx, dy = g.x - centre[0], g.y - centre[1]
    return dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)


def _pelvis(g: _Grid, phase: str, rng: np.random.Generator) -> np.ndarray:
    """A pelvis (HU float32, before the scanner), drawn about its own centre (iliac crests near the
    top): body wall, gluteal and psoas muscles, bowel, bladder (contrast layered in its dependent part
    in the delayed phase), rectum, iliac vessels, lumbar spine and sacrum, iliac wings, femoral heads
    and necks, pubic rami. No liver."""
    _, artery_hu, vein_hu = PHASE_HU[phase]
    hu = np.full(g.shape, -1000.0, dtype=np.float32)
    cy, ac, bc, cavity = _body_wall(g, hu, rng)
    yv = cy - bc + rng.uniform(26, 34)  # vertebral bodies and sacrum, like the torso's spine
    front = cy + bc  # the cavity's anterior edge
    for side in (1, -1):
        hu[cavity & (g.ellipse((side * 0.55 * ac, cy - 0.5 * bc), (0.38 * ac, 0.4 * bc)) < 1)] = 50  # gluteal
        hu[(g.ellipse((side * 38, yv + 15), (16, 14)) < 1) & (g.z > -30)] = 48  # psoas
    for _ in range(rng.integers(5, 10)):
        c = (rng.uniform(-60, 60), cy + rng.uniform(0, 0.6 * bc), rng.uniform(-10, 90))
        blob = cavity & (g.ellipsoid(c, rng.uniform(10, 22, size=3)) < 1)
        hu[blob] = -700 if rng.random() < 0.25 else rng.uniform(-20, 50)
    fill = rng.uniform(0.7, 1.2)
    centre = np.array([0.0, front - 10 - 35 * fill, -45.0])
    bladder = cavity & (g.ellipsoid(centre, np.array([50.0, 35.0, 40.0]) * fill) < 1)
    hu[bladder] = rng.uniform(0, 15)
    if phase == "delayed":  # excreted contrast sinks to the back (the patient lies supine)
        hu[bladder & (g.y < centre[1] - rng.uniform(0, 15))] = rng.uniform(350, 700)
    hu[_tube(g, (0, yv + 38, 20), (0, yv + 30, -100), rng.uniform(12, 18))] = \
        -750 if rng.random() < 0.5 else rng.uniform(-100, 40)  # rectum: air or stool
    for side in (1, -1):
        hu[_tube(g, (side * 12, yv + 30, 100), (side * 70, front - 25, -90), 5)] = artery_hu
        hu[_tube(g, (side * 20, yv + 22, 100), (side * 62, front - 35, -90), 7)] = vein_hu
    # Bones: lumbar spine down to the sacrum, which curves backwards as it descends.
    z_sacrum = rng.uniform(35, 55)
    vert = (g.ellipse((0, yv), (18, 15)) < 1) & (g.z > z_sacrum)
    disc = np.abs(((g.z - z_sacrum) % 35) - 17.5) > 14.5
    hu[vert & ~disc] = 650
    hu[vert & disc] = 85
    depth = z_sacrum - g.z  # mm below the sacrum's top
    sacrum = ((depth >= 0) & (depth < 110) & (np.abs(g.x) < 50 - 0.3 * depth)
              & (np.abs(g.y - (yv + 5 - 0.003 * depth**2)) < 13))
    hu[sacrum] = 500
    bone = rng.uniform(550, 750)
    for side in (1, -1):
        wing = g.ellipse((side * 45, yv + 80), (65, 80))  # iliac wing: from the sacroiliac joint forwards
        hu[(wing > 0.85) & (wing < 1) & (side * g.x > 45) & (g.y < yv + 80)
           & (g.z > z_sacrum - 60) & (g.z < z_sacrum + 35)] = bone
        head = (side * rng.uniform(80, 92), cy + rng.uniform(0, 15), z_sacrum - rng.uniform(105, 125))
        socket = g.ellipsoid(head, (32, 32, 32))
        hu[(socket < 1) & (g.z > head[2] - 5)] = bone  # acetabulum
        hu[_tube(g, head, (side * (abs(head[0]) + 30), head[1] + 5, head[2] - 70), 15)] = bone  # neck and shaft
        ball = g.ellipsoid(head, (24, 24, 24))
        hu[ball < 1] = bone
        hu[ball < 0.7] = 250  # marrow
        ramus = ((side * 0.8 * abs(head[0]), head[1] + 10, head[2] + 5), (side * 6, front - 20, head[2] - 10))
        hu[_tube(g, *ramus, 9)] = bone  # pubic ramus
    return hu


def _head_and_neck(g: _Grid, phase: str, rng: np.random.Generator) -> np.ndarray:
    """A head and neck (HU float32, before the scanner), drawn about its own centre: scalp, skull
    and skull base, brain (grey and white matter) with lateral and third ventricles, eyes, nasal
    cavity and maxillary sinuses, mandible; below, the neck with cervical spine and cord, airway,
    carotid arteries and jugular veins. No liver."""
    _, artery_hu, vein_hu = PHASE_HU[phase]
    hu = np.full(g.shape, -1000.0, dtype=np.float32)
    a, b, c = rng.uniform(66, 76), rng.uniform(84, 96), rng.uniform(70, 80)  # inner skull semi-axes
    yc, zc = rng.uniform(-5, 5), rng.uniform(20, 35)  # centre of the cranium
    base = zc - rng.uniform(0.4, 0.5) * c  # the skull base: brain above, face and neck below

    # Neck, then face, then the cranium over both.
    ny, nr = yc - rng.uniform(10, 20), (rng.uniform(50, 60), rng.uniform(50, 60))
    neck = (g.ellipse((0, ny), nr) < 1) & (g.z < base + 20)
    hu[neck] = -100 + rng.normal(0, 5)
    hu[neck & (g.ellipse((0, ny), (nr[0] - 7, nr[1] - 7)) < 1)] = 50
    face = g.ellipsoid((0, yc + 15, base - 30), (a - 8, b - 5, 50)) < 1
    hu[face] = 45
    skull_hu, thick = rng.uniform(1100, 1500), rng.uniform(6, 9)
    cranium = g.z > base - 25  # lower down, the face and neck
    hu[cranium & (g.ellipsoid((0, yc, zc), (a + thick + 5, b + thick + 5, c + thick + 5)) < 1)] = 40  # scalp
    hu[cranium & (g.ellipsoid((0, yc, zc), (a + thick, b + thick, c + thick)) < 1)] = skull_hu
    inside = g.ellipsoid((0, yc, zc), (a, b, c)) < 1
    hu[inside & (g.z <= base)] = 45
    brain = inside & (g.z > base)
    hu[brain] = (36 + 2 * g.smooth_field(rng, 30.0))[brain]
    hu[brain & (g.ellipsoid((0, yc + 5, zc + 5), (0.65 * a, 0.7 * b, 0.6 * c)) < 1)] = 28  # white matter
    for side in (1, -1):
        ventricle = (side * rng.uniform(6, 11), yc + rng.uniform(0, 10), zc + rng.uniform(5, 15))
        hu[g.ellipsoid(ventricle, (rng.uniform(5, 8), rng.uniform(25, 35), rng.uniform(8, 13))) < 1] = 6
    hu[g.ellipsoid((0, yc, zc - 5), (2.5, 12, 10)) < 1] = 6  # third ventricle
    hu[inside & (g.z <= base) & (g.z > base - 10)] = 0.7 * skull_hu  # skull base
    for side in (1, -1):
        hu[g.ellipsoid((side * 32, yc + b - 5, base + 15), (12, 12, 12)) < 1] = 12  # eye (vitreous)
        hu[g.ellipsoid((side * 24, yc + b - 25, base - 25), (14, 16, 16)) < 1] = -950  # maxillary sinus
    hu[g.ellipsoid((0, yc + b - 20, base - 20), (8, 25, 20)) < 1] = -900  # nasal cavity
    arc = g.ellipse((0, yc + 10), (a - 20, b - 20))
    z_jaw = base - rng.uniform(40, 50)
    hu[face & (arc < 1) & (arc > 0.8) & (g.y > yc + 10) & (np.abs(g.z - z_jaw) < 12)] = skull_hu  # mandible

    # Cervical spine, cord, airway, vessels (below the skull base).
    ys = ny - rng.uniform(5, 12)
    below = g.z < base
    disc = np.abs(((g.z - base) % 18) - 9) > 7
    vert = below & (g.ellipse((0, ys), (12, 10)) < 1)
    hu[vert & ~disc] = 700
    hu[vert & disc] = 85
    hu[below & (g.ellipse((0, ys - 17), (11, 11)) < 1)] = 600
    hu[below & (g.ellipse((0, ys - 17), (7, 7)) < 1)] = 35
    hu[(g.z < base - 20) & (g.ellipse((0, ys + 22), (9, 7)) < 1)] = -900
    for side in (1, -1):
        hu[(g.z < base - 10) & (g.ellipse((side * 22, ys + 25), (4, 4)) < 1)] = artery_hu
        hu[(g.z < base - 10) & (g.ellipse((side * 31, ys + 20), (6, 6)) < 1)] = vein_hu
    return hu


def public_phantom(profile: PublicProfile, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One public patient: (image in HU as int16, binary liver label as uint8), RAS-ordered (X, Y, Z).

    Abdomen and chest volumes cut the sites' torso anatomy at ``profile.z_centre_mm`` (the chest's
    ribs, great vessels and airways added); their label is the liver in view. Pelvis and head
    volumes hold no liver: their label is all 0.
    """
    if profile.phase not in PUBLIC_PHASES:
        raise ValueError(f"{profile.name}: phase {profile.phase!r} is not a public phase ({', '.join(PUBLIC_PHASES)})")
    if profile.region in ("abdomen", "chest"):
        g = _Grid(profile.shape, profile.spacing, profile.z_centre_mm)
        chest = profile.region == "chest"
        hu, liver, torso = _abdomen(g, profile.phase, rng, ribs_above_dome_mm=np.inf if chest else 30.0)
        if chest:
            _chest(g, hu, torso, profile.phase, rng)
    elif profile.region in ("pelvis", "head"):
        g = _Grid(profile.shape, profile.spacing)
        hu = (_pelvis if profile.region == "pelvis" else _head_and_neck)(g, profile.phase, rng)
        liver = np.zeros(g.shape, dtype=bool)
    else:
        raise ValueError(f"{profile.name}: unknown region {profile.region!r} (one of {', '.join(REGIONS)})")
    return _scanned(hu, profile.spacing, profile.noise_hu, profile.offset_hu, rng), liver.astype(np.uint8)


def write_public(out: Path, seed: int = 0, patients: int = PUBLIC_PATIENTS, in_plane: int = IN_PLANE_VOXELS,
                 progress=None) -> Path:
    """Write the public cohort under ``out/public`` in MSD layout (``imagesTr/``, ``labelsTr/``,
    ``datalist.json`` split by patient, ``scanners.json``: the profiles and each patient's);
    returns the datalist path. ``in_plane``: voxels per in-plane side (fewer for quick tests)."""
    _check_public_seed(seed)
    plan = public_plan(patients, public_profiles(in_plane))
    folder = Path(out) / "public"
    items, scanners = [], {}
    for i, profile in enumerate(plan):
        pid = f"public_{i:03d}"
        image, label = public_phantom(profile, public_rng(seed, i))
        image, affine = ras_to_storage(image, profile.spacing, profile.orientation)
        label, _ = ras_to_storage(label, profile.spacing, profile.orientation)
        write_nifti(image, affine, folder / "imagesTr" / f"{pid}.nii.gz")
        write_nifti(label, affine, folder / "labelsTr" / f"{pid}.nii.gz")
        items.append({"image": f"imagesTr/{pid}.nii.gz", "label": f"labelsTr/{pid}.nii.gz", "patient": pid})
        scanners[pid] = profile.name
        if progress:
            progress("public", i + 1, patients)
    description = {"seed": seed, "seed_tag": PUBLIC_SEED_TAG, "in_plane": in_plane,
                   "scanners": [asdict(p) for p in public_profiles(in_plane)], "patients": scanners}
    (folder / "scanners.json").write_text(json.dumps(description, indent=2) + "\n")
    return write_datalist(folder / "datalist.json", split_patients(items, seed=seed),
                          description="synthetic public CT: abdomen, chest, pelvis, head and neck; other scanners "
                                      "than the sites'")
