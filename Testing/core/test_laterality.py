"""Left and right kidney by the patient's anatomy: phantoms whose sides are known, in every orientation;
a missing kidney, a horseshoe kidney, a cropped field of view; and a real CT with a third party's
left/right kidney labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from KidneyTumorSegLib import laterality
from KidneyTumorSegLib.laterality import LEFT_KIDNEY, RIGHT_KIDNEY, TUMOR, lps_x_of_voxels, merge_sides, split_kidneys
from KidneyTumorSegLib.phantom import make_phantom

TOTALSEG = Path(__file__).resolve().parents[3] / "shared" / "data" / "TotalSegmentator" / "tests" / "reference_files"


def _arrays(phantom):
    return sitk.GetArrayFromImage(phantom.labels), sitk.GetArrayFromImage(phantom.image)


def _centroid_x(image: sitk.Image, mask: np.ndarray) -> float:
    return float(lps_x_of_voxels(image, np.nonzero(mask)).mean())


@pytest.fixture(scope="module", params=["LPS", "RAS", "IPL", "random", "oblique"])
def phantom(request):
    return make_phantom(11, orientation=request.param, n_tumors=2, size=(96, 80, 60), spacing=(4.0, 4.0, 5.0))


def test_sides_follow_the_patient_not_the_array(phantom):
    labels, ct = _arrays(phantom)
    result = split_kidneys(labels, phantom.labels, ct)
    assert result.method == "two kidneys"
    assert set(np.unique(result.labels)) <= {0, RIGHT_KIDNEY, TUMOR, LEFT_KIDNEY}
    truth = {k["side"]: k["center_lps_mm"][0] for k in phantom.info["kidneys"]}
    assert truth["left"] > 0 > truth["right"]  # the phantom's convention: patient left is LPS +x
    for side, value in (("left", LEFT_KIDNEY), ("right", RIGHT_KIDNEY)):
        assert abs(_centroid_x(phantom.labels, result.labels == value) - truth[side]) < 15.0
    # Nothing but the kidney label changes, and the merge gives the KiTS labels back exactly.
    assert np.array_equal(result.labels == TUMOR, labels == TUMOR)
    assert np.array_equal(merge_sides(result.labels), labels)


def test_each_tumor_is_assigned_to_its_host_kidney(phantom):
    labels, ct = _arrays(phantom)
    result = split_kidneys(labels, phantom.labels, ct)
    hosts = sorted(t["kidney"] for t in phantom.info["tumors"])
    assert sorted(t.side for t in result.tumors) == hosts
    assert [t.component for t in result.tumors] == list(range(1, len(result.tumors) + 1))
    assert all(a.voxels >= b.voxels for a, b in zip(result.tumors, result.tumors[1:], strict=False))


def _without_kidney(phantom, side: str) -> np.ndarray:
    """The reference labels with one kidney (and its tumors) erased, using the phantom's own truth."""
    labels, _ = _arrays(phantom)
    x = np.zeros(labels.shape)
    idx = np.nonzero(labels)
    x[idx] = lps_x_of_voxels(phantom.labels, idx)
    erase = (x > 0) if side == "left" else (x < 0)
    out = labels.copy()
    out[erase & (labels > 0)] = 0
    return out


@pytest.mark.parametrize("missing", ["left", "right"])
def test_a_single_kidney_is_sided_by_the_spine(phantom, missing):
    _, ct = _arrays(phantom)
    labels = _without_kidney(phantom, missing)
    result = split_kidneys(labels, phantom.labels, ct)
    assert result.method == "spine"
    assert abs(result.midline_x_mm) < 10.0  # the phantom's spine lies on x = 0
    present = RIGHT_KIDNEY if missing == "left" else LEFT_KIDNEY
    absent = LEFT_KIDNEY if missing == "left" else RIGHT_KIDNEY
    assert np.count_nonzero(result.labels == present) == np.count_nonzero(labels == 1)
    assert not np.any(result.labels == absent)
    assert any("only the" in note for note in result.notes)


def test_without_a_ct_the_field_of_view_centre_stands_in_with_a_warning():
    phantom = make_phantom(12, orientation="LPS", n_tumors=0, size=(96, 80, 60), spacing=(4.0, 4.0, 5.0))
    labels = _without_kidney(phantom, "left")
    result = split_kidneys(labels, phantom.labels, None)
    assert result.method == "field of view centre"
    assert result.warnings and "may be wrong" in result.warnings[0]


def test_a_cropped_field_of_view_still_finds_the_spine_and_warns():
    """Only the patient's right half and the spine are in the image: the body's centre would be far off
    the midline, the spine is not."""
    phantom = make_phantom(13, orientation="LPS", n_tumors=0, size=(96, 80, 60), spacing=(4.0, 4.0, 5.0))
    labels, ct = _arrays(phantom)
    x_of_column = np.array(phantom.image.GetOrigin())[0] + np.arange(labels.shape[2]) * 4.0
    keep = x_of_column < 30.0  # patient right and 30 mm past the midline: the left kidney is outside
    image = sitk.GetImageFromArray(ct[:, :, keep])
    image.CopyInformation(phantom.image[: int(keep.sum()), :, :])
    result = split_kidneys(labels[:, :, keep], image, ct[:, :, keep])
    assert result.method == "spine"
    assert np.any(result.labels == RIGHT_KIDNEY) and not np.any(result.labels == LEFT_KIDNEY)
    assert result.warnings and "edge of the field of view" in result.warnings[0]


def test_a_horseshoe_kidney_is_cut_at_the_midline():
    phantom = make_phantom(14, orientation="oblique", n_tumors=0, size=(96, 80, 60), spacing=(4.0, 4.0, 5.0))
    labels, ct = _arrays(phantom)
    # Join the lower poles with an isthmus of kidney tissue across the midline.
    centres = {k["side"]: np.array(k["center_lps_mm"]) for k in phantom.info["kidneys"]}
    a, b = centres["left"], centres["right"]
    for t in np.linspace(0.0, 1.0, 200):
        p = a + t * (b - a)
        for dy in (-4.0, 0.0, 4.0):
            for dz in (-5.0, 0.0, 5.0):
                i = phantom.labels.TransformPhysicalPointToIndex((p[0], p[1] + dy, p[2] + dz))
                labels[i[2], i[1], i[0]] = 1
    components = sitk.ConnectedComponent(sitk.GetImageFromArray((labels > 0).astype(np.uint8)), True)
    assert sitk.GetArrayViewFromImage(components).max() == 1  # one fused kidney
    result = split_kidneys(labels, phantom.labels, ct)
    assert result.method == "spine"
    assert any("horseshoe" in note for note in result.notes)
    left_x = lps_x_of_voxels(phantom.labels, np.nonzero(result.labels == LEFT_KIDNEY))
    right_x = lps_x_of_voxels(phantom.labels, np.nonzero(result.labels == RIGHT_KIDNEY))
    assert left_x.min() > result.midline_x_mm >= right_x.max()


def test_no_kidney_gives_no_split():
    image = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    result = split_kidneys(np.zeros((8, 8, 8), np.uint8), image)
    assert result.method == "no kidney" and not result.labels.any()


def test_labels_off_the_grid_are_refused():
    with pytest.raises(ValueError, match="grid"):
        split_kidneys(np.zeros((4, 8, 8), np.uint8), sitk.Image(8, 8, 8, sitk.sitkUInt8))


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason=f"{TOTALSEG} is absent (the shared third-party data)")
@pytest.mark.parametrize("erase", [None, 2, 3])
def test_real_ct_agrees_with_an_independent_left_right_labelling(erase):
    """A real abdominal CT (RAS on disk) and a third party's model labels, 2 right kidney and 3 left
    kidney: merged into one kidney label, our split must give their sides back voxel for voxel; with one
    kidney erased, the other must still get its side (from the spine)."""
    ct = sitk.ReadImage(str(TOTALSEG / "example_ct.nii.gz"))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(TOTALSEG / "example_seg_fast_force_split.nii.gz")))
    if erase is not None:
        theirs = np.where(theirs == erase, 0, theirs)
    labels = np.isin(theirs, (2, 3)).astype(np.uint8)
    result = split_kidneys(labels, ct, sitk.GetArrayFromImage(ct))
    assert result.method == ("two kidneys" if erase is None else "spine")
    assert np.array_equal(result.labels == RIGHT_KIDNEY, theirs == 2)
    assert np.array_equal(result.labels == LEFT_KIDNEY, theirs == 3)


def test_module_documents_the_label_values():
    assert laterality.SPLIT_LABELS == {0: "background", 1: "kidney, right", 2: "tumor", 3: "kidney, left"}
