"""Measurements against values known analytically: a sphere of known radius beside a box-shaped kidney
(volume, 3D diameter, axial axes, R), the sphere half outside the kidney (E), in front of or behind it (A),
above its upper polar line (L); on anisotropic and oblique grids; and phantoms whose tumor volumes and
exophytic shares are known from their geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from KidneyTumorSegLib.laterality import index_to_lps_matrix
from KidneyTumorSegLib.measurements import N_NOTE, measure
from KidneyTumorSegLib.phantom import make_phantom

# A kidney-like box on the patient's left (LPS +x), 40 x 50 x 100 mm, centred here (off the voxel lattice,
# so that a sphere centred on it is not aligned with the voxel centres: the typical case, not the worst):
KIDNEY_CENTER = np.array([70.3, 20.45, 0.2])
KIDNEY_HALF = np.array([20.0, 25.0, 50.0])


def _grid(spacing, oblique_degrees: float = 0.0, size_mm=(240.0, 160.0, 220.0)) -> sitk.Image:
    size = [int(round(s / sp)) for s, sp in zip(size_mm, spacing, strict=True)]
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    t = math.radians(oblique_degrees)
    direction = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    image.SetDirection(direction.ravel().tolist())
    # Centre the grid's box on (0, 20, 0) mm.
    centre_index = (np.array(size) - 1) / 2.0
    a = direction * np.array(spacing)[None, :]
    image.SetOrigin((np.array([0.0, 20.0, 0.0]) - a @ centre_index).tolist())
    return image


def _lps_points(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS coordinates of every voxel centre."""
    a, origin = index_to_lps_matrix(image)
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return origin + np.stack([i, j, k], axis=-1) @ a.T


def _case(spacing, tumor_center, radius, oblique_degrees=0.0):
    image = _grid(spacing, oblique_degrees)
    p = _lps_points(image)
    labels = np.zeros(p.shape[:3], dtype=np.uint8)
    labels[np.all(np.abs(p - KIDNEY_CENTER) <= KIDNEY_HALF, axis=-1)] = 1
    labels[np.linalg.norm(p - np.array(tumor_center), axis=-1) <= radius] = 2
    return labels, image


GRIDS = [((1.0, 1.0, 1.0), 0.0), ((0.8, 0.8, 2.5), 0.0), ((1.2, 1.2, 2.0), 15.0)]


@pytest.mark.parametrize(("spacing", "oblique"), GRIDS)
def test_a_sphere_inside_the_kidney_has_its_analytic_size(spacing, oblique):
    radius = 15.0
    labels, image = _case(spacing, KIDNEY_CENTER, radius, oblique)
    m = measure(labels, image)
    assert m.tumor_count == 1
    t = m.tumors[0]
    assert t.side == "left"
    assert t.volume_ml == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.04)
    half_voxel = max(spacing) / 2
    assert abs(t.largest_diameter_mm - 2 * radius) <= half_voxel
    assert abs(t.axial_long_axis_mm - 2 * radius) <= half_voxel
    assert abs(t.axial_short_axis_mm - 2 * radius) <= 0.6 * max(spacing)  # one strip of pixels: coarser
    box_ml = float(np.prod(2 * KIDNEY_HALF)) / 1000
    assert m.kidney_volume_ml["left"] == pytest.approx(box_ml - t.volume_ml, rel=0.05)
    assert m.kidney_volume_ml["right"] == 0.0
    assert t.renal["R"].score == 1
    assert t.renal["E"].score == 3 and t.renal["E"].value < 0.01  # entirely inside
    assert t.renal["A"].score == "x"  # centred front to back
    assert t.renal["L"].score == 3  # between the polar lines, across the midline
    assert t.renal["N"].score is None and t.renal["N"].how == N_NOTE
    assert t.renal_partial_score == 1 + 3 + 3


@pytest.mark.parametrize(("spacing", "oblique"), GRIDS)
def test_a_sphere_centred_on_the_kidney_surface_is_half_outside(spacing, oblique):
    surface_x = KIDNEY_CENTER[0] + KIDNEY_HALF[0]  # the lateral face
    labels, image = _case(spacing, (surface_x, KIDNEY_CENTER[1], KIDNEY_CENTER[2]), 12.0, oblique)
    t = measure(labels, image).tumors[0]
    assert t.renal["E"].value == pytest.approx(0.5, abs=0.06)


def test_a_sphere_beyond_the_surface_is_entirely_outside_and_in_front_is_anterior():
    front = KIDNEY_CENTER[1] - KIDNEY_HALF[1]  # LPS y: smaller is anterior
    labels, image = _case((1.0, 1.0, 1.0), (KIDNEY_CENTER[0], front - 8.0, 0.0), 10.0)
    t = measure(labels, image).tumors[0]
    assert t.renal["E"].value > 0.95 and t.renal["E"].score == 1
    assert t.renal["A"].score == "a" and t.renal["A"].value < -5.0
    labels, image = _case((1.0, 1.0, 1.0), (KIDNEY_CENTER[0], KIDNEY_CENTER[1] + 15.0, 0.0), 8.0)
    assert measure(labels, image).tumors[0].renal["A"].score == "p"


def test_a_sphere_at_the_upper_pole_is_above_the_polar_line():
    top = KIDNEY_CENTER[2] + KIDNEY_HALF[2]  # LPS z: larger is superior
    labels, image = _case((1.0, 1.0, 1.0), (KIDNEY_CENTER[0], KIDNEY_CENTER[1], top - 10.0), 8.0)
    t = measure(labels, image).tumors[0]
    assert t.renal["L"].score == 1 and t.renal["L"].value == 0.0
    labels, image = _case((1.0, 1.0, 1.0), (KIDNEY_CENTER[0], KIDNEY_CENTER[1], KIDNEY_CENTER[2] + 20.0), 12.0)
    assert measure(labels, image).tumors[0].renal["L"].score in (2, 3)


@pytest.mark.parametrize(("radius", "score"), [(15.0, 1), (27.0, 2), (37.0, 3)])
def test_r_follows_the_largest_diameter(radius, score):
    labels, image = _case((1.5, 1.5, 1.5), KIDNEY_CENTER, radius)
    t = measure(labels, image).tumors[0]
    assert t.renal["R"].score == score
    assert abs(t.largest_diameter_mm - 2 * radius) < 0.75


def test_tumors_are_counted_largest_first_with_their_sides():
    image = _grid((1.5, 1.5, 1.5))
    p = _lps_points(image)
    labels = np.zeros(p.shape[:3], dtype=np.uint8)
    right_kidney = KIDNEY_CENTER * np.array([-1, 1, 1])
    for centre in (KIDNEY_CENTER, right_kidney):
        labels[np.all(np.abs(p - centre) <= KIDNEY_HALF, axis=-1)] = 1
    labels[np.linalg.norm(p - right_kidney, axis=-1) <= 14.0] = 2
    labels[np.linalg.norm(p - KIDNEY_CENTER, axis=-1) <= 9.0] = 2
    m = measure(labels, image)
    assert m.laterality_method == "two kidneys"
    assert [t.side for t in m.tumors] == ["right", "left"]
    assert m.tumors[0].volume_ml > m.tumors[1].volume_ml
    assert m.tumor_volume_ml == pytest.approx(sum(t.volume_ml for t in m.tumors))
    assert m.to_json()["tumors"][0]["renal"]["N"]["score"] is None


@pytest.mark.parametrize(("seed", "orientation"), [(3, "LPS"), (4, "IPL"), (5, "oblique")])
def test_phantom_tumors_match_their_known_volume_side_and_exophytic_share(seed, orientation):
    phantom = make_phantom(seed, orientation=orientation, n_tumors=2, size=(200, 180, 120), spacing=(1.6, 1.6, 2.5))
    m = measure(sitk.GetArrayFromImage(phantom.labels), phantom.labels, sitk.GetArrayFromImage(phantom.image))
    truth = sorted(phantom.info["tumors"], key=lambda t: -t["volume_ml"])
    assert m.tumor_count == len(truth)
    for ours, true in zip(m.tumors, truth, strict=True):
        assert ours.side == true["kidney"]
        assert ours.volume_ml == pytest.approx(true["volume_ml"], rel=0.05)
        assert ours.renal["E"].value == pytest.approx(true["outside_kidney_fraction"], abs=0.1)
        assert ours.largest_diameter_mm >= 2 * min(true["semi_axes_mm"]) - 2.0
