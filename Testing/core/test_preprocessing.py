"""Reorientation and resampling: exact geometry, slab-wise equals whole-volume."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from KidneyTumorSegLib.preprocessing import (
    IntensityNormalization,
    Orientation,
    canonical_orientation,
    image_to_model_input,
    logits_to_input_labels,
    model_grid_for,
)

IDENTITY_NORM = IntensityNormalization(-1e9, 1e9, 0.0, 1.0)


def _signed_permutation_directions():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for col, (row, sign) in enumerate(zip(perm, signs, strict=True)):
                d[row, col] = sign
            yield d


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _image(direction, size=(7, 5, 4), spacing=(1.0, 2.0, 3.0)):
    image = sitk.GetImageFromArray(np.arange(np.prod(size), dtype=np.float32).reshape(size[::-1]))
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    image.SetSpacing(spacing)
    image.SetOrigin((12.0, -30.0, 7.5))
    return image


def _canonical_steps(image, orientation):
    """Physical displacement (LPS) of one voxel step along each canonical array axis (z, y, x)."""
    shape_zyx = image.GetSize()[::-1]
    idx = np.indices(shape_zyx).reshape(3, -1).T[:1]  # any voxel: (0,0,0) in input array order
    canonical = orientation.to_canonical(np.arange(np.prod(shape_zyx)).reshape(shape_zyx))
    steps = []
    for axis in range(3):
        a = [0, 0, 0]
        b = [0, 0, 0]
        b[axis] = 1
        flat_a, flat_b = canonical[tuple(a)], canonical[tuple(b)]
        ka = np.unravel_index(flat_a, shape_zyx)[::-1]
        kb = np.unravel_index(flat_b, shape_zyx)[::-1]
        pa = np.array(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in ka)))
        pb = np.array(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in kb)))
        steps.append(pb - pa)
    del idx
    return steps


@pytest.mark.parametrize("direction", list(_signed_permutation_directions()))
def test_canonical_axes_run_toward_superior_posterior_left_for_every_axis_layout(direction):
    image = _image(direction)
    orientation = canonical_orientation(image)
    steps = _canonical_steps(image, orientation)
    for axis, patient_axis in enumerate((2, 1, 0)):  # canonical z, y, x -> LPS S, P, L
        assert steps[axis][patient_axis] > 0
        assert np.count_nonzero(np.abs(steps[axis]) > 1e-9) == 1


@pytest.mark.parametrize("degrees", [10, 30, 44])
def test_oblique_scans_go_to_nearest_canonical_layout(degrees):
    direction = _rotation((1, 2, 3), degrees) @ np.diag([1, -1, -1])
    image = _image(direction)
    steps = _canonical_steps(image, canonical_orientation(image))
    for axis, patient_axis in enumerate((2, 1, 0)):
        assert steps[axis][patient_axis] == pytest.approx(np.abs(steps[axis]).max())


def test_from_canonical_inverts_to_canonical_for_all_48_layouts():
    array = np.random.default_rng(0).random((3, 4, 5))
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            o = Orientation(perm, flips)
            assert np.array_equal(o.from_canonical(o.to_canonical(array)), array)


def test_canonical_spacing_follows_the_permutation():
    image = _image(np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]]), spacing=(0.7, 0.8, 5.0))  # KiTS IPL
    orientation = canonical_orientation(image)
    # In the KiTS layout SimpleITK's axes run I, P, R: the first (0.7 mm) becomes canonical z (toward S),
    # the third (5.0 mm) canonical x (toward L).
    assert orientation.canonical_spacing(image) == (0.7, 0.8, 5.0)


def test_slab_wise_resampling_equals_one_trilinear_resampling():
    rng = np.random.default_rng(3)
    array = rng.normal(size=(23, 17, 19)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.5, 2.5))
    grid = model_grid_for(image, (1.7, 1.1, 0.6))
    slabwise = image_to_model_input(image, grid, IDENTITY_NORM, slab_bytes=1)  # one output slice per slab
    whole = F.interpolate(
        torch.from_numpy(array)[None, None], size=grid.model_shape, mode="trilinear", align_corners=False
    )[0, 0]
    assert torch.allclose(slabwise, whole, atol=1e-5)


def test_labels_come_back_through_slabs_like_one_trilinear_resampling():
    rng = np.random.default_rng(4)
    image = sitk.GetImageFromArray(np.zeros((31, 22, 27), np.int16))
    image.SetSpacing((0.8, 0.9, 2.0))
    grid = model_grid_for(image, (3.0, 1.6, 1.6))
    logits = torch.from_numpy(rng.normal(size=(3, *grid.model_shape)).astype(np.float32))
    labels = logits_to_input_labels(logits, grid, slab_bytes=1)
    whole = F.interpolate(logits[None], size=grid.input_shape, mode="trilinear", align_corners=False)[0]
    expected = whole.argmax(0).numpy()
    assert labels.shape == image.GetSize()[::-1] and labels.dtype == np.uint8
    assert np.mean(labels == expected) > 0.9999  # ties at float rounding may differ


def test_round_trip_through_a_coarser_model_grid_keeps_a_sphere():
    shape = (40, 64, 64)
    z, y, x = np.indices(shape)
    sphere = ((z - 20) * 2.5) ** 2 + ((y - 30) * 0.8) ** 2 + ((x - 34) * 0.8) ** 2 < 18**2
    image = sitk.GetImageFromArray(sphere.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetDirection(tuple(np.diag([-1.0, -1.0, 1.0]).ravel()))  # RAS-stored file
    grid = model_grid_for(image, (3.0, 1.6, 1.6))
    volume = image_to_model_input(image, grid, IDENTITY_NORM)
    logits = torch.stack([0.5 - volume, volume - 0.5, torch.full_like(volume, -10)])
    labels = logits_to_input_labels(logits, grid)
    overlap = np.logical_and(labels == 1, sphere).sum()
    assert 2 * overlap / (sphere.sum() + (labels == 1).sum()) > 0.97


def test_normalisation_clips_then_z_scores():
    norm = IntensityNormalization(-100.0, 300.0, 100.0, 50.0)
    out = norm.apply_(torch.tensor([-1000.0, 100.0, 2000.0]))
    assert out.tolist() == [-4.0, 0.0, 4.0]
    assert norm.background_value == -4.0


@pytest.mark.parametrize(
    "shape,spacing",
    [((45, 50, 41), (0.7, 0.9, 2.2)), ((40, 128, 96), (0.8, 0.8, 2.5)), ((30, 112, 120), (0.7, 0.7, 3.0))],
)
def test_only_the_box_around_foreground_is_interpolated_and_the_result_is_exact(shape, spacing):
    rng = np.random.default_rng(5)
    image = sitk.GetImageFromArray(np.zeros(shape, np.int16))
    image.SetSpacing(spacing)
    grid = model_grid_for(image, (3.0, 1.6, 1.6))
    logits = torch.from_numpy(rng.normal(size=(3, *grid.model_shape)).astype(np.float32))
    logits[0] += 6.0  # background everywhere ...
    logits[1:, 10:14, 8:13, 5:9] += 12.0  # ... but in one small region
    labels = logits_to_input_labels(logits, grid, slab_bytes=1)
    whole = F.interpolate(logits[None], size=grid.input_shape, mode="trilinear", align_corners=False)[0]
    expected = whole.argmax(0).numpy()
    assert 0 < (expected > 0).sum() < expected.size / 20
    assert np.array_equal(labels, expected)


def test_labels_go_to_the_model_grid_like_the_image_does():
    from KidneyTumorSegLib.preprocessing import labels_to_model_grid

    shape = (50, 96, 80)
    z, y, x = np.indices(shape)
    kidney = ((z - 25) * 2.5) ** 2 + ((y - 48) * 0.8) ** 2 + ((x - 40) * 0.8) ** 2 < 25**2
    tumor = ((z - 25) * 2.5) ** 2 + ((y - 48) * 0.8) ** 2 + ((x - 55) * 0.8) ** 2 < 8**2
    labels = (kidney.astype(np.uint8) + (tumor & kidney)).astype(np.uint8)
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetDirection(tuple(np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float).ravel()))
    grid = model_grid_for(image, (3.0, 1.6, 1.6))
    on_model = labels_to_model_grid(image, grid)
    assert on_model.shape == grid.model_shape
    # Volumes survive within a few percent; every class present survives.
    voxel_in = np.prod(image.GetSpacing())
    voxel_model = np.prod(grid.model_spacing)
    for value in (1, 2):
        ratio = (on_model == value).sum() * voxel_model / ((labels == value).sum() * voxel_in)
        assert 0.9 < ratio < 1.1
    # Same place as the image: a mask of the labels resampled like an image agrees.
    as_image = image_to_model_input(sitk.Cast(image, sitk.sitkFloat32), grid, IDENTITY_NORM)
    agree = ((as_image.numpy() > 0.5) == (on_model > 0)).mean()
    assert agree > 0.99
