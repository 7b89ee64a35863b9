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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dpseg.datalist import split_patients, write_datalist

IN_PLANE_VOXELS = 128
Z_EXTENT_MM = 180.0

# HU of contrast-enhanced structures per contrast phase: (liver, aorta, portal/hepatic veins).
PHASE_HU = {
    "portal": (110.0, 160.0, 170.0),
    "arterial": (75.0, 280.0, 90.0),
    "native": (58.0, 45.0, 42.0),
}


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
            noise_hu=float(rng.uniform(10, 30)),
            offset_hu=float(rng.uniform(-15, 15)),
            fov_mm=float(rng.uniform(340, 420)),
            slice_mm=float(rng.choice([4.0, 5.0, 6.0])),
            phase=str(rng.choice(list(PHASE_HU))),
            orientation=str(rng.choice(["RAS", "LPS"])),
            patients=int(rng.integers(60, 121)),
        ))
    if patients is not None:
        profiles = [SiteProfile(**{**asdict(p), "patients": n}) for p, n in zip(profiles, patients)]
    return profiles


class _Grid:
    """Patient coordinates (mm) of every voxel of a RAS-ordered volume, each of shape (X, Y, Z)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
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
    t = _torso(g, hu, 40 if phase == "native" else 150, rng, ribs_above_dome_mm)
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


def write_site(out: Path, profile: SiteProfile, seed: int, progress=None) -> Path:
    """Write one site's cohort in MSD layout plus ``datalist.json``; returns the datalist path."""
    site_dir = out / profile.name
    rng = np.random.default_rng([seed, int(profile.name.split("-")[-1])])
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
                 progress=None) -> list[Path]:
    """Write a synthetic multi-site cohort under ``out``; returns each site's datalist path."""
    return [write_site(Path(out), p, seed, progress) for p in site_profiles(n_sites, patients, seed)]
