"""Tests of the synthetic CT phantom: determinism, grid and labels, volumes, physical placement under
every orientation, tumor variety, intensities, argument checks, and the speed of a full-size volume."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from KidneyTumorSegLib.phantom import Phantom, make_phantom

SMALL = (64, 64, 40)  # LPS voxels: enough for the anatomy, fast to generate


def arrays(p: Phantom) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(p.image), sitk.GetArrayFromImage(p.labels)


def physical_points(image: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """LPS points of (n, 3) numpy indices (z, y, x): origin + direction . (index * spacing)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    xyz = zyx[:, ::-1] * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + xyz @ direction.T


def ellipsoid_value(points: np.ndarray, center: list, semi: list, axes: list) -> np.ndarray:
    """Sum of squared normalised local coordinates (<= 1 inside) of an ``info`` ellipsoid."""
    local = (points - np.array(center)) @ np.array(axes).T / np.array(semi)
    return np.sum(local**2, axis=1)


def label_centroid_lps(p: Phantom, label: int) -> np.ndarray:
    _, lab = arrays(p)
    centroid_xyz = np.argwhere(lab == label).mean(axis=0)[::-1]
    return np.array(p.labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in centroid_xyz]))


# --- determinism ------------------------------------------------------------------------------------


def test_same_arguments_give_bit_identical_volumes() -> None:
    for kwargs in ({}, {"orientation": "random", "size": SMALL}, {"orientation": "oblique", "n_tumors": 2}):
        a, b = make_phantom(7, **kwargs), make_phantom(7, **kwargs)
        img_a, lab_a = arrays(a)
        img_b, lab_b = arrays(b)
        assert np.array_equal(img_a, img_b)
        assert np.array_equal(lab_a, lab_b)
        assert a.image.GetDirection() == b.image.GetDirection()
        assert a.image.GetOrigin() == b.image.GetOrigin()
        assert json.dumps(a.info) == json.dumps(b.info)


def test_different_seeds_give_different_volumes() -> None:
    img_a, lab_a = arrays(make_phantom(0, size=SMALL, spacing=(6.0, 6.0, 6.0)))
    img_b, lab_b = arrays(make_phantom(1, size=SMALL, spacing=(6.0, 6.0, 6.0)))
    assert not np.array_equal(img_a, img_b)
    assert not np.array_equal(lab_a, lab_b)


def test_grid_noise_and_orientation_do_not_move_the_anatomy() -> None:
    base = make_phantom(5, n_tumors=1)
    for other in (
        make_phantom(5, n_tumors=1, orientation="oblique"),
        make_phantom(5, n_tumors=1, size=SMALL, spacing=(5.0, 5.0, 5.0)),
        make_phantom(5, n_tumors=1, noise_hu=0.0),
    ):
        assert other.info["kidneys"] == base.info["kidneys"]
        assert other.info["tumors"] == base.info["tumors"]
    # Noise changes the image only: the labels are the same voxel for voxel.
    quiet = make_phantom(5, n_tumors=1, noise_hu=0.0)
    assert np.array_equal(arrays(quiet)[1], arrays(base)[1])
    assert not np.array_equal(arrays(quiet)[0], arrays(base)[0])


# --- grid, types, labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "IPL", "random", "oblique"])
def test_image_is_int16_and_labels_uint8_on_the_same_grid(orientation: str) -> None:
    p = make_phantom(2, orientation=orientation)
    assert p.image.GetPixelID() == sitk.sitkInt16
    assert p.labels.GetPixelID() == sitk.sitkUInt8
    assert p.labels.GetSize() == p.image.GetSize()
    assert p.labels.GetSpacing() == p.image.GetSpacing()
    assert p.labels.GetOrigin() == p.image.GetOrigin()
    assert p.labels.GetDirection() == p.image.GetDirection()
    direction = np.array(p.image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    img, lab = arrays(p)
    assert set(np.unique(lab).tolist()) == {0, 1, 2}  # seed 2 has tumors
    assert img.min() >= -1024 and img.max() <= 3071


def test_info_is_json_and_describes_the_grid() -> None:
    p = make_phantom(4, orientation="IPL")
    info = json.loads(json.dumps(p.info))
    assert info["seed"] == 4
    assert tuple(info["size"]) == p.image.GetSize()
    assert np.allclose(info["spacing"], p.image.GetSpacing())
    assert np.allclose(info["origin"], p.image.GetOrigin())
    assert np.allclose(info["direction"], p.image.GetDirection())
    assert {k["side"] for k in info["kidneys"]} == {"left", "right"}
    for t in info["tumors"]:
        assert t["kidney"] in ("left", "right")
        assert 8.0 <= t["radius_mm"] <= 35.0
        assert 30.0 <= t["mean_hu"] <= 120.0


def test_ipl_orientation_has_the_kits19_layout() -> None:
    p = make_phantom(0, orientation="IPL", size=(64, 48, 20), spacing=(3.0, 3.5, 5.0))
    # Index axes: slices (inferior), rows (posterior), columns (left); size and spacing follow them.
    assert p.image.GetSize() == (20, 48, 64)
    assert p.image.GetSpacing() == (5.0, 3.5, 3.0)
    assert p.image.GetDirection() == (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
    assert p.info["orientation_code"] == "IPL"


def test_explicit_size_and_spacing_are_used_and_default_grid_is_in_range() -> None:
    p = make_phantom(0, size=(40, 50, 30), spacing=(2.0, 2.5, 3.0), orientation="RAS")
    assert p.image.GetSize() == (40, 50, 30)
    assert p.image.GetSpacing() == (2.0, 2.5, 3.0)
    for seed in range(4):
        p = make_phantom(seed, n_tumors=0)
        size, spacing = np.array(p.image.GetSize()), np.array(p.image.GetSpacing())
        assert 2.4 <= spacing[0] == spacing[1] <= 3.2 and 2.5 <= spacing[2] <= 5.0
        fov = size * spacing
        assert fov[0] >= 2 * p.info["body"]["semi_x"] and fov[1] >= 2 * p.info["body"]["semi_y"]
        assert 200.0 <= fov[2] <= 320.0


def test_random_and_oblique_orientations_are_what_they_say() -> None:
    rand = np.array(make_phantom(3, orientation="random", size=SMALL).image.GetDirection()).reshape(3, 3)
    assert np.array_equal(np.abs(rand).sum(axis=0), np.ones(3)) and set(np.abs(rand).ravel()) == {0.0, 1.0}
    oblique = np.array(make_phantom(3, orientation="oblique", size=SMALL).image.GetDirection()).reshape(3, 3)
    angle = math.degrees(math.acos((np.trace(oblique) - 1.0) / 2.0))
    assert 4.9 <= angle <= 20.1


# --- volumes ----------------------------------------------------------------------------------------


def test_kidney_label_volume_matches_the_ellipsoids_without_tumors() -> None:
    for seed in (0, 1):
        p = make_phantom(seed, n_tumors=0)
        _, lab = arrays(p)
        voxel_ml = float(np.prod(p.image.GetSpacing())) / 1000.0
        expected = sum(4.0 / 3.0 * math.pi * float(np.prod(k["semi_axes_mm"])) / 1000.0 for k in p.info["kidneys"])
        assert not (lab == 2).any()
        assert (lab == 1).sum() * voxel_ml == pytest.approx(expected, rel=0.05)


def test_kidney_and_tumor_label_volumes_match_the_analytic_volumes() -> None:
    checked = 0
    for seed in range(6):
        p = make_phantom(seed)
        if not p.info["tumors"]:
            continue
        checked += 1
        _, lab = arrays(p)
        voxel_ml = float(np.prod(p.image.GetSpacing())) / 1000.0
        volumes = p.info["volumes_ml"]
        assert (lab > 0).sum() * voxel_ml == pytest.approx(volumes["kidney_and_tumor"], rel=0.10)
        assert (lab == 2).sum() * voxel_ml == pytest.approx(volumes["tumor"], rel=0.10, abs=1.0)
        for t in p.info["tumors"]:
            # The lobulated outline keeps about the volume of the radius-r sphere.
            assert t["volume_ml"] == pytest.approx(4.0 / 3.0 * math.pi * t["radius_mm"] ** 3 / 1000.0, rel=0.1)
    assert checked >= 2


# --- physical placement -----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "IPL", "oblique", "random"])
def test_tumor_is_at_its_physical_place_in_every_orientation(orientation: str) -> None:
    reference = make_phantom(11, n_tumors=1)
    p = make_phantom(11, n_tumors=1, orientation=orientation)
    tumor = p.info["tumors"][0]
    assert tumor == reference.info["tumors"][0]
    centroid = label_centroid_lps(p, 2)
    voxel = min(p.image.GetSpacing())
    assert np.linalg.norm(centroid - tumor["centroid_lps_mm"]) < 0.5 * voxel
    assert np.linalg.norm(centroid - tumor["center_lps_mm"]) < 2.0 * voxel
    # The voxel nearest the tumor centre is tumor.
    index = p.labels.TransformPhysicalPointToIndex(tumor["centroid_lps_mm"])
    assert p.labels[index] == 2


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "IPL", "oblique"])
def test_left_kidney_is_on_the_patient_left(orientation: str) -> None:
    p = make_phantom(6, n_tumors=0, orientation=orientation)
    left = next(k for k in p.info["kidneys"] if k["side"] == "left")
    right = next(k for k in p.info["kidneys"] if k["side"] == "right")
    assert left["center_lps_mm"][0] > 0 > right["center_lps_mm"][0]
    _, lab = arrays(p)
    points = physical_points(p.labels, np.argwhere(lab == 1))
    # Check the helper against SimpleITK on one voxel before trusting it.
    zyx = np.argwhere(lab == 1)[0]
    assert np.allclose(points[0], p.labels.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]]))
    on_left = points[:, 0] > 0
    voxel = max(p.image.GetSpacing())
    assert np.linalg.norm(points[on_left].mean(axis=0) - left["center_lps_mm"]) < voxel
    assert np.linalg.norm(points[~on_left].mean(axis=0) - right["center_lps_mm"]) < voxel


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), orientation=st.sampled_from(["LPS", "RAS", "IPL", "random", "oblique"]))
def test_kidney_centres_are_labelled_and_corners_are_air(seed: int, orientation: str) -> None:
    p = make_phantom(seed, orientation=orientation, size=(80, 80, 48), spacing=(5.0, 5.0, 5.0), noise_hu=0.0)
    for k in p.info["kidneys"]:
        assert p.labels[p.labels.TransformPhysicalPointToIndex(k["center_lps_mm"])] in (1, 2)
    img, _ = arrays(p)
    # 400 x 400 mm in-plane holds the whole body: the corners of every slice are air.
    corner = (0, 0, 0)
    assert img[corner] == -1000 and img[tuple(n - 1 for n in img.shape)] == -1000


# --- variety ----------------------------------------------------------------------------------------


def test_some_seeds_have_no_tumor_and_some_an_exophytic_one() -> None:
    without, exophytic, endophytic = 0, 0, 0
    for seed in range(20):
        p = make_phantom(seed)
        _, lab = arrays(p)
        if not p.info["tumors"]:
            assert not (lab == 2).any()
            without += 1
            continue
        if len(p.info["tumors"]) != 1:
            continue  # the share outside needs one tumor per label
        tumor = p.info["tumors"][0]
        kidney = next(k for k in p.info["kidneys"] if k["side"] == tumor["kidney"])
        points = physical_points(p.labels, np.argwhere(lab == 2))
        outside = float(
            np.mean(ellipsoid_value(points, kidney["center_lps_mm"], kidney["semi_axes_mm"], kidney["axes_lps"]) > 1.0)
        )
        assert outside == pytest.approx(tumor["outside_kidney_fraction"], abs=0.1)
        if tumor["exophytic"]:
            assert outside > 0.3
            exophytic += 1
        else:
            assert outside < 0.05
            endophytic += 1
    assert without >= 2
    assert exophytic >= 1
    assert endophytic >= 1


# --- intensities ------------------------------------------------------------------------------------


def test_intensities_look_like_contrast_enhanced_ct() -> None:
    for seed in (0, 1, 2, 3):
        p = make_phantom(seed, n_tumors=1)
        img, lab = arrays(p)
        kidney_zyx = np.argwhere(lab == 1)
        points = physical_points(p.image, kidney_zyx)
        cortex = np.zeros(len(points), bool)
        for k in p.info["kidneys"]:
            in_kidney = ellipsoid_value(points, k["center_lps_mm"], k["semi_axes_mm"], k["axes_lps"]) <= 1.0
            in_medulla = ellipsoid_value(points, k["center_lps_mm"], k["medulla_semi_axes_mm"], k["axes_lps"]) <= 1.0
            cortex |= in_kidney & ~in_medulla
        kidney_hu = img[lab == 1].astype(float)
        cortex_hu = img[tuple(kidney_zyx[cortex].T)].astype(float)
        tumor_hu = img[lab == 2].astype(float)
        assert cortex_hu.mean() > 100.0  # enhancing cortex
        assert tumor_hu.mean() < kidney_hu.mean()
        air = img[:, :4, :4].astype(float)  # the in-plane corners are outside the body
        assert air.mean() == pytest.approx(-1000.0, abs=3.0)


def test_noise_hu_sets_the_noise_level() -> None:
    quiet, _ = arrays(make_phantom(1, noise_hu=0.0))
    noisy, _ = arrays(make_phantom(1, noise_hu=8.0))
    assert np.all(quiet[:, :6, :6] == -1000)
    # Noise is added after the blur, so in the flat air it is white with the requested deviation.
    assert noisy[:, :6, :6].std() == pytest.approx(8.0, rel=0.08)


# --- arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"seed": 1.5},
        {"size": (64, 64)},
        {"size": (64, 0, 10)},
        {"spacing": (1.0, -1.0, 1.0)},
        {"spacing": (1.0, float("nan"), 1.0)},
        {"orientation": "LAS"},
        {"n_tumors": -1},
        {"n_tumors": 5},
        {"noise_hu": -1.0},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict) -> None:
    seed = kwargs.pop("seed", 0)
    with pytest.raises(ValueError):
        make_phantom(seed, **kwargs)


# --- speed ------------------------------------------------------------------------------------------


def test_default_phantom_is_quick() -> None:
    make_phantom(0)  # warm up imports and caches
    start = time.perf_counter()
    p = make_phantom(1)
    elapsed = time.perf_counter() - start
    assert np.prod(p.image.GetSize()) > 500_000
    assert elapsed < 3.0  # typically 0.1-0.3 s; generous for a loaded CI machine


@pytest.mark.slow
def test_full_resolution_volume_is_generated_in_time() -> None:
    start = time.perf_counter()
    p = make_phantom(4, size=(512, 512, 200), spacing=(0.8, 0.8, 2.5))
    elapsed = time.perf_counter() - start
    assert elapsed < 40.0
    assert p.image.GetSize() == (512, 512, 200)
    _, lab = arrays(p)
    voxel_ml = 0.8 * 0.8 * 2.5 / 1000.0
    assert (lab > 0).sum() * voxel_ml == pytest.approx(p.info["volumes_ml"]["kidney_and_tumor"], rel=0.03)
