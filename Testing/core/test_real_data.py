"""Geometry on real third-party files (../shared/data): KiTS19/KiTS23 labels, TotalSegmentator's CT and DICOM
series, pyradiomics' NRRD; and a synthetic oblique, anisotropic volume in three formats.

The real files are never copied into the repository; the tests that need them skip, with the reason,
when ../shared/data is absent (as in a user's clone). The model is the tiny untrained one from
``Testing/conftest.py``: its labels mean nothing, so these tests check where labels land (the grid), not
what they say.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from KidneyTumorSegLib.io import read_image
from KidneyTumorSegLib.pipeline import SegmentOptions, predict_file, segment
from KidneyTumorSegLib.preprocessing import (
    IntensityNormalization,
    canonical_orientation,
    image_to_model_input,
    logits_to_input_labels,
    model_grid_for,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
KITS19 = "kits19/data/{case}/segmentation.nii.gz"
TOTALSEG = "TotalSegmentator/tests/reference_files"
CPU = SegmentOptions(device="cpu")


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data not present: real-data tests need the shared data folder")
    return DATA


def need(data: Path, relative: str) -> Path:
    path = data / relative
    if not path.exists():
        pytest.skip(f"{path} not present in ../shared/data")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "KidneyTumorSegLib", *args], capture_output=True, text=True, timeout=300, check=False
    )


def assert_same_grid(actual: sitk.Image, expected: sitk.Image, atol: float = 0.0) -> None:
    """Same size, and spacing, origin and direction equal (within ``atol``; 0: exactly)."""
    assert actual.GetSize() == expected.GetSize()
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        a, e = getattr(actual, what)(), getattr(expected, what)()
        if atol == 0.0:
            assert a == e, f"{what}: {a} != {e}"
        else:
            np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=what)


def corner_points(image: sitk.Image) -> np.ndarray:
    """Physical (LPS) centres of the grid's 8 corner voxels."""
    ranges = [(0, n - 1) for n in image.GetSize()]
    return np.array([image.TransformIndexToPhysicalPoint(c) for c in itertools.product(*ranges)])


def kidney_slab(labels: sitk.Image, slices: int) -> sitk.Image:
    """``slices`` slices around the middle of the kidneys. KiTS19 stores slices along SimpleITK's first
    index axis; SimpleITK slicing keeps the geometry (origin moves to the first kept slice)."""
    along_slices = sitk.GetArrayViewFromImage(labels).any(axis=(0, 1))  # array axes are (x, y, slice)
    hits = np.flatnonzero(along_slices)
    centre = (int(hits[0]) + int(hits[-1])) // 2 if hits.size else labels.GetSize()[0] // 2
    start = max(0, min(centre - slices // 2, labels.GetSize()[0] - slices))
    return labels[start : start + slices, :, :]


def ct_like(labels: sitk.Image) -> sitk.Image:
    """A CT-like image on the label's grid: background -100, kidney 50, tumor 200 HU."""
    array = sitk.GetArrayViewFromImage(labels).astype(np.int16) * 150 - 100
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(labels)
    return image


# ------------------------------------------------------------------------------------------------- KiTS19

KITS_CASES = [
    # case, pixel type, header variant, SimpleITK size (slices, rows, cols), slices kept for segmentation
    pytest.param("case_00000", sitk.sitkUInt8, "sform", (611, 512, 512), 64, id="case_00000_uint8_sform"),
    pytest.param("case_00015", sitk.sitkUInt16, "qform", (75, 512, 512), 75, id="case_00015_uint16_qform"),
    pytest.param("case_00160", sitk.sitkUInt8, "sform", (252, 512, 796), 48, id="case_00160_512x796"),
]


def _nifti_codes(path: Path) -> tuple[int, int]:
    import gzip
    import struct

    with gzip.open(path, "rb") as f:
        header = f.read(348)
    return struct.unpack("<2h", header[252:256])  # qform_code, sform_code


@pytest.mark.parametrize(("case", "pixel", "variant", "size", "slices"), KITS_CASES)
def test_kits19_labels_read_with_their_header_geometry(data: Path, case, pixel, variant, size, slices):
    path = need(data, KITS19.format(case=case))
    qform_code, sform_code = _nifti_codes(path)
    assert (qform_code, sform_code) == ((0, 2) if variant == "sform" else (1, 0))
    image = read_image(path)
    assert image.GetPixelID() == pixel
    assert image.GetSize() == size
    spacing = json.loads((data / "kits19/data/kits.json").read_text())
    entry = next(c["voxel_spacing"] for c in spacing if c["case_id"] == case)
    np.testing.assert_allclose(
        image.GetSpacing(), (entry["z_spacing"], entry["y_spacing"], entry["x_spacing"]), rtol=1e-6
    )
    # IPL: index axes run toward Inferior, Posterior, Left (LPS columns: -S, +P, +L).
    np.testing.assert_allclose(image.GetDirection(), (0, 0, 1, 0, 1, 0, -1, 0, 0), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(image))) <= {0, 1, 2}


@pytest.mark.parametrize(("case", "pixel", "variant", "size", "slices"), KITS_CASES)
def test_kits19_canonical_axes_run_superior_posterior_left(data: Path, case, pixel, variant, size, slices):
    image = read_image(need(data, KITS19.format(case=case)))
    orientation = canonical_orientation(image)
    assert orientation.permutation == (2, 1, 0)
    assert orientation.flips == (True, False, False)

    # Check through physical points, on a small corner of the real grid (same direction, spacing, origin):
    # a step along canonical axis 0, 1, 2 must move +S, +P, +L (LPS axes 2, 1, 0) by that axis' spacing.
    corner = image[:4, :5, :6]
    ids = np.arange(4 * 5 * 6).reshape(tuple(reversed(corner.GetSize())))
    canonical = orientation.to_canonical(ids)
    spacing = orientation.canonical_spacing(corner)
    assert spacing == (image.GetSpacing()[0], image.GetSpacing()[1], image.GetSpacing()[2])

    def point(flat_id: int) -> np.ndarray:
        array_index = np.unravel_index(int(flat_id), ids.shape)
        return np.array(corner.TransformIndexToPhysicalPoint([int(i) for i in reversed(array_index)]))

    start = point(canonical[0, 0, 0])
    for axis, patient_axis in ((0, 2), (1, 1), (2, 0)):
        step = [0, 0, 0]
        step[axis] = 1
        expected = np.zeros(3)
        expected[patient_axis] = spacing[axis]
        np.testing.assert_allclose(point(canonical[tuple(step)]) - start, expected, atol=1e-9)

    array = sitk.GetArrayViewFromImage(image)
    back = orientation.from_canonical(orientation.to_canonical(array))
    assert back.shape == array.shape
    assert np.array_equal(back, array)


@pytest.mark.parametrize(("case", "pixel", "variant", "size", "slices"), KITS_CASES)
def test_kits19_segmentation_lands_on_the_input_grid(data: Path, tiny_model, case, pixel, variant, size, slices):
    labels = kidney_slab(read_image(need(data, KITS19.format(case=case))), slices)
    ct = ct_like(labels)
    result = segment(ct, tiny_model, CPU)
    assert_same_grid(result.labels, ct)
    assert_same_grid(result.labels, labels)
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels))) <= {0, 1, 2}


def _official_dice(prediction: np.ndarray, reference: np.ndarray, threshold: int) -> float:
    """2|A n B| / (|A| + |B|) on label > threshold, as kits19/starter_code/evaluation.py computes it."""
    a, b = prediction > threshold, reference > threshold
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_evaluate_kits19_reference_against_itself_is_perfect(data: Path):
    reference = need(data, KITS19.format(case="case_00000"))
    proc = run_cli("evaluate", str(reference), str(reference))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["kidney_dice"] == 1.0
    assert result["tumor_dice"] == 1.0
    assert result["both_empty"] == []


def test_evaluate_kits19_against_kits23_reannotation_matches_the_official_formula(data: Path):
    """KiTS23 case 0 is the same patient on the same grid, annotated again. KiTS23 adds label 3 (cyst),
    which the KiTS19 metric (label > 0, label > 1) would count as kidney and tumor; this case has none."""
    kits19 = need(data, KITS19.format(case="case_00000"))
    kits23 = need(data, "kits23/dataset/case_00000/segmentation.nii.gz")
    proc = run_cli("evaluate", str(kits23), str(kits19))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)

    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(kits19)))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(kits23)))
    assert not (prediction == 3).any(), "KiTS23 case 0 gained cysts: revisit the label mapping here"
    kidney, tumor = _official_dice(prediction, reference, 0), _official_dice(prediction, reference, 1)
    assert result["kidney_dice"] == pytest.approx(kidney, abs=1e-9)
    assert result["tumor_dice"] == pytest.approx(tumor, abs=1e-9)
    assert result["composite_dice"] == pytest.approx((kidney + tumor) / 2, abs=1e-9)
    # Two expert annotations of one scan agree well, but not perfectly.
    assert 0.8 < result["kidney_dice"] < 1.0
    assert 0.5 < result["tumor_dice"] < 1.0


# ---------------------------------------------------------------------------------------- TotalSegmentator


def test_totalsegmentator_ras_ct_is_segmented_on_its_grid(data: Path, tiny_model, tmp_path: Path):
    source = need(data, f"{TOTALSEG}/example_ct.nii.gz")
    image = read_image(source)
    assert image.GetPixelID() == sitk.sitkInt32
    assert image.GetSize() == (122, 101, 112)
    output = tmp_path / "example_labels.nii.gz"
    predict_file(source, output, tiny_model, CPU)
    labels = sitk.ReadImage(str(output))
    assert_same_grid(labels, image, atol=1e-5)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}


def test_dicom_series_geometry_matches_its_las_nifti_segmentation(data: Path):
    dicom = read_image(need(data, f"{TOTALSEG}/example_ct_dicom"))
    nifti = sitk.ReadImage(str(need(data, f"{TOTALSEG}/example_seg_dicom.nii.gz")))
    assert dicom.GetSize() == (512, 512, 20)
    assert sorted(dicom.GetSize()) == sorted(nifti.GetSize())
    np.testing.assert_allclose(sorted(dicom.GetSpacing()), sorted(nifti.GetSpacing()), atol=1e-4)
    # The arrays may be flipped against each other (LPS DICOM, LAS NIfTI); the physical box must agree.
    a, b = corner_points(dicom), corner_points(nifti)
    distances = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    assert distances.min(axis=1).max() < 0.01
    assert distances.min(axis=0).max() < 0.01
    # CT numbers: the rescale intercept (-1024) has been applied.
    assert sitk.GetArrayViewFromImage(dicom).min() < -900


def test_predict_from_dicom_folder_to_nrrd_lands_on_the_dicom_grid(data: Path, tiny_model_path, tmp_path: Path):
    folder = need(data, f"{TOTALSEG}/example_ct_dicom")
    output = tmp_path / "dicom_labels.nrrd"
    proc = run_cli(
        "predict", str(folder), "-o", str(output), "--progress", "none",
        "--model", str(tiny_model_path), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    labels = sitk.ReadImage(str(output))
    assert_same_grid(labels, read_image(folder), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}


# -------------------------------------------------------------------------------------------- pyradiomics


def test_pyradiomics_lps_nrrd_is_segmented_on_its_grid(data: Path, tiny_model, tmp_path: Path):
    source = need(data, "pyradiomics/data/lung1_image.nrrd")
    image = read_image(source)
    assert image.GetSize() == (512, 512, 48)
    output = tmp_path / "lung1_labels.nii.gz"
    predict_file(source, output, tiny_model, CPU)
    assert_same_grid(sitk.ReadImage(str(output)), image, atol=1e-4)


# ----------------------------------------------------------------------------- synthetic oblique volume


def _rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis``."""
    k = np.asarray(axis, dtype=float)
    k /= np.linalg.norm(k)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    theta = np.radians(degrees)
    return np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross


@pytest.fixture(scope="module")
def oblique_image() -> sitk.Image:
    """A sagittal-like layout (index axes toward Anterior, Superior, Right) turned 25 degrees about an
    oblique axis, spacing (0.9, 1.3, 3.1) mm, a non-zero origin; air around a body block (40 HU) holding a
    bright block (300 HU) off centre."""
    array = np.full((24, 56, 64), -1000, dtype=np.int16)  # (z, y, x)
    array[3:21, 8:48, 8:56] = 40
    array[6:12, 30:42, 12:30] = 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 1.3, 3.1))
    image.SetOrigin((-31.5, 12.25, 104.0))
    layout = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)  # columns: index axes in LPS
    image.SetDirection((_rotation((1.0, 2.0, 0.5), 25.0) @ layout).ravel().tolist())
    return image


def _bright_centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Physical centroid of ``mask`` (array order of ``image``)."""
    zyx = np.argwhere(mask).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in reversed(zyx)]))


@pytest.mark.parametrize(("suffix", "out_suffix"), [(".nii.gz", ".nii.gz"), (".nrrd", ".nrrd"), (".mha", ".nrrd")])
def test_oblique_anisotropic_volume_round_trips_through_each_format(
    oblique_image: sitk.Image, tiny_model, tmp_path: Path, suffix: str, out_suffix: str
):
    source = tmp_path / f"oblique{suffix}"
    sitk.WriteImage(oblique_image, str(source))
    image = read_image(source)
    assert_same_grid(image, oblique_image, atol=1e-4)  # NIfTI keeps float32 and a quaternion

    output = tmp_path / f"oblique_labels{out_suffix}"
    predict_file(source, output, tiny_model, CPU)
    labels = sitk.ReadImage(str(output))
    assert_same_grid(labels, image, atol=1e-4)
    assert_same_grid(labels, oblique_image, atol=1e-4)

    # Through the network's own geometry (reorient, resample to the model grid and back) the bright block
    # must come back where it was: labels from thresholded model-grid "logits".
    grid = model_grid_for(image, (2.0, 1.5, 1.5))
    assert grid.orientation.permutation != (0, 1, 2) and any(grid.orientation.flips)  # not a trivial case
    volume = image_to_model_input(image, grid, IntensityNormalization(-1e9, 1e9, 0.0, 1.0))
    bright = volume - 170.0
    back = logits_to_input_labels(torch.stack([-bright, bright, torch.full_like(bright, -1e6)]), grid)
    truth = sitk.GetArrayViewFromImage(image) > 170
    found = back == 1
    dice = 2.0 * np.logical_and(found, truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.95
    shift = np.linalg.norm(_bright_centroid(image, found) - _bright_centroid(image, truth))
    assert shift < 0.25, f"the bright block moved by {shift:.2f} mm"
