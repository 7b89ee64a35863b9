import hashlib
import json
from collections import Counter
from dataclasses import astuple

import nibabel as nib
import numpy as np
import pytest

from dpseg.datalist import read_datalist
from dpseg.synthetic import (
    DEFAULT_PROFILES,
    PHASE_HU,
    PUBLIC_PHASES,
    PUBLIC_PROFILES,
    PUBLIC_SEED_TAG,
    SITE_FOV_MM,
    SITE_NOISE_HU,
    SITE_OFFSET_HU,
    SITE_PHASES,
    SITE_SLICE_MM,
    head_phantom,
    phantom,
    public_phantom,
    public_plan,
    public_profiles,
    public_rng,
    site_profiles,
    site_rng,
    write_cohort,
    write_site,
)


def _load(site_dir, pid):
    img = nib.load(str(site_dir / "imagesTr" / f"{pid}.nii.gz"))
    lab = nib.load(str(site_dir / "labelsTr" / f"{pid}.nii.gz"))
    return img, lab


def test_geometry_matches_the_site_profile(cohort):
    for profile in site_profiles(2, [6, 6], seed=7):
        img, lab = _load(cohort / profile.name, f"{profile.name}_000")
        assert img.shape == lab.shape == profile.shape
        assert np.allclose(img.affine, lab.affine)
        assert np.allclose(img.header.get_zooms()[:3], profile.spacing)
        assert "".join(nib.aff2axcodes(img.affine)) == profile.orientation
        # the volume is centred on the world origin whatever the storage orientation
        centre = img.affine @ np.r_[(np.array(img.shape) - 1) / 2, 1]
        assert np.allclose(centre[:3], 0, atol=1e-3)


def test_liver_is_on_the_patients_right_in_world_coordinates(cohort):
    for site in ("site-1", "site-2"):  # RAS and LPS storage
        img, lab = _load(cohort / site, f"{site}_001")
        ijk = np.argwhere(np.asanyarray(lab.dataobj) > 0)
        world = nib.affines.apply_affine(lab.affine, ijk)
        assert world[:, 0].mean() > 10, "liver centre must lie at +x (patient right, RAS+)"


def test_hu_ranges_and_tissues():
    rng = np.random.default_rng(0)
    image, label = phantom(DEFAULT_PROFILES[0], rng)
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.min() == -1024  # air outside the body
    assert 300 < image.max() < 1200  # bone, several hundred HU
    assert np.mean((image > -160) & (image < -40)) > 0.05  # fat around -100 HU
    liver_hu = image[label > 0]
    assert abs(np.median(liver_hu) - PHASE_HU["portal"][0]) < 35
    assert set(np.unique(label)) == {0, 1}
    assert 0.01 < label.mean() < 0.2


def test_head_phantom_is_a_skull_around_brain():
    hu, brain, affine = head_phantom(shape=(48, 48, 48), spacing=(5.0, 5.0, 5.0))
    assert hu.shape == brain.shape == (48, 48, 48) and np.allclose(np.diag(affine), [5, 5, 5, 1])
    assert np.allclose(affine @ np.r_[(np.array(hu.shape) - 1) / 2, 1], [0, 0, 0, 1])  # centred
    assert abs(np.median(hu[brain]) - 35) < 3
    assert abs(np.median(hu[(hu > 500)]) - 1000) < 20 and 0.02 < np.mean(hu > 500) < 0.2  # the skull
    assert np.median(hu[[0, -1]]) < -900  # air around the head
    # every line from the brain's centre to the border crosses the skull
    centre = tuple(n // 2 for n in hu.shape)
    for axis in range(3):
        ray = np.moveaxis(hu, axis, 0)[centre[axis]:, centre[(axis + 1) % 3], centre[(axis + 2) % 3]]
        assert ray.max() > 500, axis


def test_liver_cannot_be_found_by_a_threshold():
    """Voxels in the liver's HU band outside the liver (spleen, kidneys, vessels) are plenty."""
    image, label = phantom(DEFAULT_PROFILES[0], np.random.default_rng(3))
    lo, hi = np.percentile(image[label > 0], [10, 90])
    band = (image >= lo) & (image <= hi)
    precision = (band & (label > 0)).sum() / band.sum()
    assert precision < 0.8


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    profile = site_profiles(1, [3])[0]
    digests = []
    for run, seed in ((1, 5), (2, 5), (3, 6)):
        write_site(tmp_path / str(run), profile, seed)
        data = [np.asanyarray(nib.load(str(p)).dataobj).tobytes()
                for p in sorted((tmp_path / str(run) / profile.name).rglob("*.nii.gz"))]
        digests.append(hashlib.sha256(b"".join(data)).hexdigest())
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_sites_written_at_once_by_several_processes_are_the_same_files(tmp_path):
    one, two = (write_cohort(tmp_path / name, n_sites=3, patients=[3, 4, 3], seed=4, workers=workers)
                for name, workers in (("one", 1), ("two", 2)))
    assert [p.relative_to(tmp_path / "two") for p in two] == [p.relative_to(tmp_path / "one") for p in one]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 3 * 2 + 2 * (3 + 4 + 3)  # a datalist and a profile per site, an image and a label per patient
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def test_sites_differ_like_scanners():
    stats = []
    for profile in DEFAULT_PROFILES:
        image, label = phantom(profile, np.random.default_rng(11))
        # robust noise estimate: MAD of neighbour differences inside the liver (white noise, sqrt 2)
        diff = np.diff(image.astype(float), axis=0)[(label[1:] > 0) & (label[:-1] > 0)]
        noise = 1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2)
        stats.append((profile.spacing, noise, np.median(image[label > 0])))
    spacings = {s[0] for s in stats}
    assert len(spacings) == 3
    noise = [s[1] for s in stats]
    assert noise[0] < noise[1] < noise[2]
    for measured, profile in zip(noise, DEFAULT_PROFILES):
        assert abs(measured - profile.noise_hu) < 0.25 * profile.noise_hu
    liver = [s[2] for s in stats]
    assert max(liver) - min(liver) > 30  # contrast phases


def test_cohort_sizes_and_patient_splits(cohort):
    for site in ("site-1", "site-2"):
        data = read_datalist(cohort / site / "datalist.json")
        ids = [it["patient"] for split in ("training", "validation", "test") for it in data[split]]
        assert len(ids) == len(set(ids)) == 6
        assert all(data[split] for split in ("training", "validation", "test"))


def test_profiles_reject_bad_requests():
    with pytest.raises(ValueError, match="3 sites"):
        site_profiles(3, [10, 10])
    with pytest.raises(ValueError, match="at least 3 patients"):
        site_profiles(1, [2])
    assert len({p.name for p in site_profiles(5)}) == 5


def test_synth_command_writes_the_sites_and_the_pooled_datalist(tmp_path):
    from conftest import run_cli

    bad = run_cli("synth", "--out", str(tmp_path / "bad"), "--sites", "2", "--patients", "2,3")
    assert bad.returncode == 2 and bad.stderr.startswith("error: every site needs at least 3 patients")
    out = run_cli("synth", "--out", str(tmp_path / "data"), "--sites", "2", "--patients", "3,4", "--seed", "1")
    assert out.returncode == 0, out.stderr
    pooled = json.loads((tmp_path / "data" / "datalist.json").read_text())
    sites = [json.loads((tmp_path / "data" / f"site-{k}" / "datalist.json").read_text()) for k in (1, 2)]
    count = lambda d: sum(len(d.get(split, [])) for split in ("training", "validation", "test"))  # noqa: E731
    assert [count(d) for d in sites] == [3, 4] and count(pooled) == 7
    assert "(all sites pooled)" in out.stdout


# sha256 of (image bytes + label bytes) of the first patient phantom() draws for each site of
# site_profiles(5, seed=3) with write_site's generator for seed 7, and of the profiles of 12 sites
# (seed 5). Computed before the public cohort existed: site cohorts must stay bit-for-bit the same.
# (The digests hold for the numpy / scipy this project runs with; after an upgrade of those alone,
# recompute them on a commit that has not touched dpseg.synthetic.)
SITE_PHANTOM_SHA256 = {
    "site-1": "4792eb10226861799372128b00a0697e28a8ed22ed9dd43cdfeb8fb5b32bf8e4",
    "site-2": "d5891473ac7a7de499ffe3caa65ce83534d682ea57ca514ed3a6071ea049986f",
    "site-3": "d76816a6d00f710a8086047d13b3fc4e78d1ed645f6925515397503ecaf5d2f3",
    "site-4": "382d56c52fbdd98c3952ff498050f871d93a58e2a4383017d6994b49b2f96ae4",
    "site-5": "846c82ff88b70daac32d1ff239ed3bebe3cd704965a1c913b5bd508eb8b25579",
}
SITE_PROFILES_SHA256 = "d7f7423f7a8e73cbe0dd8288e4689a62ad17ac05576a1f34d49c25f1e6a93709"


def test_site_phantoms_and_profiles_are_unchanged():
    profiles = site_profiles(5, seed=3)
    assert [p.phase for p in profiles] == ["portal", "arterial", "native", "arterial", "native"]
    for profile in profiles:
        rng = np.random.default_rng([7, int(profile.name.split("-")[-1])])
        image, label = phantom(profile, rng)
        digest = hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()
        assert digest == SITE_PHANTOM_SHA256[profile.name], f"{profile.name}'s phantom changed"
    rows = repr([astuple(p) for p in site_profiles(12, seed=5)]).encode()
    assert hashlib.sha256(rows).hexdigest() == SITE_PROFILES_SHA256, "site_profiles() draws other sites"


def _outside(value: float, low_high: tuple[float, float]) -> bool:
    return not low_high[0] <= value <= low_high[1]


def test_public_profiles_differ_from_every_site_profile():
    assert not set(SITE_PHASES) & set(PUBLIC_PHASES)
    drawn = [s for seed in range(10) for s in site_profiles(40, seed=seed)]
    assert {s.phase for s in drawn} == set(SITE_PHASES)  # the sites draw exactly the phases they always did
    for p in PUBLIC_PROFILES:
        assert p.phase in PUBLIC_PHASES
        # outside the rule site_profiles() draws sites 4+ from, whatever the seed
        assert _outside(p.noise_hu, SITE_NOISE_HU) and _outside(p.offset_hu, SITE_OFFSET_HU)
        assert _outside(p.fov_mm, SITE_FOV_MM) and p.slice_mm not in SITE_SLICE_MM
        for s in (*DEFAULT_PROFILES, *drawn):
            assert p.name != s.name and p.phase != s.phase, (p, s)
            assert p.noise_hu != s.noise_hu and p.offset_hu != s.offset_hu, (p, s)
            assert p.fov_mm != s.fov_mm and p.slice_mm != s.slice_mm, (p, s)
            assert p.spacing != s.spacing


def _state(rng: np.random.Generator) -> tuple[int, int]:
    state = rng.bit_generator.state["state"]
    return state["state"], state["inc"]


def test_public_generators_never_start_where_a_sites_does():
    seeds = (0, 1, 7, 4242, 2**32 - 1)
    public = {_state(public_rng(seed, i)) for seed in seeds for i in range(64)}
    assert len(public) == len(seeds) * 64
    sites = {_state(site_rng(seed, n)) for seed in seeds for n in range(64)}
    # site seeds that spell, in numpy's 32-bit entropy words, a public patient's seed, number or tag
    for seed in seeds:
        for i in range(4):
            for big in (seed + (i << 32), seed + (PUBLIC_SEED_TAG << 32), seed + (i << 32) + (PUBLIC_SEED_TAG << 64),
                        seed + (i << 32) + (PUBLIC_SEED_TAG << 128)):
                sites |= {_state(site_rng(big, n)) for n in (0, 1, i, PUBLIC_SEED_TAG)}
    assert not public & sites
    # the look-alike seeds above are the ones that would catch a plain tag in the entropy
    naive = np.random.default_rng([5, PUBLIC_SEED_TAG, 3])
    assert _state(naive) == _state(site_rng(5 + (PUBLIC_SEED_TAG << 32), 3))
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="seed"):
            public_rng(bad, 0)


def test_public_plan_mixes_regions_and_scanners():
    regions = Counter(p.region for p in public_plan(96))
    assert regions == {"abdomen": 53, "chest": 15, "pelvis": 14, "head": 14}
    assert [p.name for p in public_plan(6)] == [p.name for p in PUBLIC_PROFILES]
    assert {p.name for p in public_plan(8)} == {p.name for p in PUBLIC_PROFILES}
    with pytest.raises(ValueError, match="at least 6 patients"):
        public_plan(5)


def test_public_regions_liver_only_in_the_abdomen_and_the_chests_bottom():
    by_region = {}
    for n, profile in enumerate(public_profiles(in_plane=48)):
        for i in range(3):
            image, label = public_phantom(profile, public_rng(11, 10 * n + i))
            assert image.shape == label.shape == profile.shape and image.dtype == np.int16
            by_region.setdefault(profile.region, []).append((profile, image, label))
    for profile, image, label in by_region["abdomen"]:
        assert 0.005 < label.mean() < 0.2, profile.name
    for profile, image, label in by_region["chest"]:
        z = profile.z_centre_mm + (np.arange(profile.shape[2]) - (profile.shape[2] - 1) / 2) * profile.slice_mm
        assert label.mean() < 0.002 and (not label.any() or z[label.any(axis=(0, 1))].max() < 75)
        assert np.mean(image < -700) > 0.15  # lungs
    for profile, image, label in by_region["pelvis"] + by_region["head"]:
        assert not label.any(), profile.name
        assert image.min() < -900 and image.max() > 450  # air around the body, bone
    for profile, image, label in by_region["head"]:
        assert image.max() > 900  # the skull, denser than any bone the sites show
    delayed = [image for profile, image, _ in by_region["pelvis"] if profile.phase == "delayed"]
    assert delayed and all(np.mean(image > 300) > 0.001 for image in delayed)  # contrast in the bladder


def test_synth_public_writes_a_cohort_check_data_accepts(tmp_path):
    from conftest import run_cli

    bad = run_cli("synth", "--public", "--out", str(tmp_path / "bad"), "--sites", "2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --public writes the public cohort alone")
    out = run_cli("synth", "--public", "--out", str(tmp_path), "--patients", "8", "--voxels", "24", "--seed", "3")
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "public"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public"]
    check = run_cli("check-data", str(folder / "datalist.json"))
    assert check.returncode == 0, check.stdout + check.stderr
    data = read_datalist(folder / "datalist.json")
    items = [it for split in ("training", "validation", "test") for it in data[split]]
    assert all(data[split] for split in ("training", "validation", "test"))
    assert sorted(it["patient"] for it in items) == [f"public_{i:03d}" for i in range(8)]
    scanners = json.loads((folder / "scanners.json").read_text())
    assert scanners["seed"] == 3 and [s["name"] for s in scanners["scanners"]] == [p.name for p in PUBLIC_PROFILES]
    region = {s["name"]: s["region"] for s in scanners["scanners"]}
    for it in items:
        img, lab = _load(folder, it["patient"])
        assert img.shape[:2] == (24, 24)
        liver = np.asanyarray(lab.dataobj).any()
        assert liver == (region[scanners["patients"][it["patient"]]] == "abdomen") or \
            region[scanners["patients"][it["patient"]]] == "chest"
