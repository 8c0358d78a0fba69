"""Dataset readers, label mappings and case checks (kidneytumorseg_train.datasets)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kidneytumorseg_train.datasets import (
    Case,
    LabelMapping,
    check_case,
    check_dataset,
    detect_layout,
    find_cases,
    mapping_for,
    read_case,
    write_phantom_dataset,
)
from kidneytumorseg_train.errors import ConfigError, DatasetError
from KidneyTumorSegLib.preprocessing import canonical_orientation

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
KITS19 = SHARED_DATA / "kits19" / "data"
KITS23 = SHARED_DATA / "kits23" / "dataset"


def small_dataset(root: Path, n: int = 3, layout: str = "kits19", **kwargs) -> list[Case]:
    return write_phantom_dataset(root, n, layout=layout, spacing_scale=2, **kwargs)


def rewrite_labels(case: Case, change) -> None:
    """Apply ``change(array, image) -> image`` to a case's label file."""
    labels = sitk.ReadImage(str(case.label))
    array = sitk.GetArrayFromImage(labels)
    out = change(array, labels)
    sitk.WriteImage(out, str(case.label), True)


def like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


# ----------------------------------------------------------------------------------------------------
# Finding cases


@pytest.mark.parametrize("layout", ["kits19", "kits23", "nnunet"])
def test_find_cases_pairs_images_and_labels_in_each_layout(tmp_path: Path, layout: str) -> None:
    written = small_dataset(tmp_path / "ds", 3, layout)
    assert detect_layout(tmp_path / "ds") == layout
    for asked in ("auto", layout):
        found = find_cases(tmp_path / "ds", asked)
        assert found == written
    assert [c.case_id for c in found] == sorted(c.case_id for c in found)
    for case in found:
        assert case.image.is_file() and case.label.is_file()
    if layout == "nnunet":
        meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
        assert meta["channel_names"] == {"0": "CT"} and meta["labels"]["cyst"] == 3
        assert all(c.image.name == f"{c.case_id}_0000.nii.gz" for c in found)


def test_kits_repository_folders_are_accepted_and_flavour_detected(tmp_path: Path) -> None:
    # KiTS19 repository root (holding data/), KiTS23's dataset/ folder, KiTS21's majority-vote labels.
    small_dataset(tmp_path / "kits19" / "data", 2, "kits19")
    assert [c.case_id for c in find_cases(tmp_path / "kits19")] == ["case_00000", "case_00001"]
    assert detect_layout(tmp_path / "kits19") == "kits19"
    small_dataset(tmp_path / "kits23" / "dataset", 2, "kits23")
    (tmp_path / "kits23" / "dataset" / "kits23.json").unlink()
    assert detect_layout(tmp_path / "kits23") == "kits23"  # by the folder's name
    kits21 = small_dataset(tmp_path / "kits21" / "data", 2, "kits19")
    for case in kits21:
        case.label.rename(case.label.with_name("aggregated_MAJ_seg.nii.gz"))
    assert detect_layout(tmp_path / "kits21") == "kits23"
    assert [c.label.name for c in find_cases(tmp_path / "kits21")] == ["aggregated_MAJ_seg.nii.gz"] * 2
    assert mapping_for(tmp_path / "kits21").as_dict() == {0: 0, 1: 1, 2: 2, 3: 1}


def test_case_without_labels_refused_unless_allowed(tmp_path: Path) -> None:
    cases = small_dataset(tmp_path, 3)
    cases[1].label.unlink()
    with pytest.raises(DatasetError, match="case_00001") as error:
        find_cases(tmp_path)
    assert "no label" in str(error.value)
    found = find_cases(tmp_path, require_labels=False)
    assert [c.label is None for c in found] == [False, True, False]
    mapping = LabelMapping.kits19()
    assert check_case(found[1], mapping)["label_values"] == {}  # the image alone is checked
    with pytest.raises(DatasetError, match="case_00001: has no label file"):
        read_case(found[1], mapping)


def test_case_without_image_is_named(tmp_path: Path) -> None:
    cases = small_dataset(tmp_path, 2)
    cases[0].image.unlink()
    with pytest.raises(DatasetError, match=r"case_00000.*get_imaging"):
        find_cases(tmp_path)


def test_empty_dataset_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no cases found"):
        find_cases(tmp_path)
    (tmp_path / "nn" / "imagesTr").mkdir(parents=True)
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {}}))
    with pytest.raises(DatasetError, match="no cases"):
        find_cases(tmp_path / "nn")
    with pytest.raises(DatasetError, match="no such folder"):
        find_cases(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no cases"):
        check_dataset([], LabelMapping.kits19())
    with pytest.raises(ConfigError, match="layout"):
        find_cases(tmp_path, "kits42")


# ----------------------------------------------------------------------------------------------------
# nnU-Net datasets


def test_nnunet_multichannel_refused(tmp_path: Path) -> None:
    small_dataset(tmp_path, 2, "nnunet")
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"2 input channels \(0: CT, 1: PET\).*CT channel only"):
        find_cases(tmp_path)
    # One channel declared, but a second channel's files are there.
    meta["channel_names"] = {"0": "CT"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    shutil.copy(
        tmp_path / "imagesTr" / "phantom_00000_0000.nii.gz", tmp_path / "imagesTr" / "phantom_00000_0001.nii.gz"
    )
    with pytest.raises(DatasetError, match="channel.*0001"):
        find_cases(tmp_path)


def test_nnunet_label_names_are_read_case_insensitively(tmp_path: Path) -> None:
    dataset = {"labels": {"Background": 0, "KIDNEY": 1, "Tumor": 2, "cyst": 3}}
    assert LabelMapping.from_dataset_json(dataset).as_dict() == {0: 0, 1: 1, 2: 2, 3: 1}
    assert LabelMapping.from_dataset_json(dataset, cyst="tumor").as_dict() == {0: 0, 1: 1, 2: 2, 3: 2}
    assert LabelMapping.from_dataset_json(dataset, cyst="background").as_dict()[3] == 0
    # nnU-Net v1 style: value -> name.
    v1 = {"labels": {"0": "background", "1": "kidney", "2": "tumor"}}
    assert LabelMapping.from_dataset_json(v1).as_dict() == {0: 0, 1: 1, 2: 2}


def test_nnunet_unknown_label_name_refused_with_what_to_do(tmp_path: Path) -> None:
    cases = small_dataset(tmp_path, 1, "nnunet")
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "kidney": 1, "tumor": 2, "liver": 3}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"'liver' \(value 3\).*--label-map") as error:
        mapping_for(tmp_path)
    assert '"3": 0' in str(error.value)  # an example map to start from
    mapping = mapping_for(tmp_path, label_map={"0": 0, "1": "kidney", "2": 2, "3": 0})
    result = check_case(cases[0], mapping)
    assert set(result["label_values"]) <= {0, 1, 2, 3}
    with pytest.raises(DatasetError, match="region-based"):
        LabelMapping.from_dataset_json({"labels": {"background": 0, "kidney": [1, 2, 3], "tumor": 2}})


@pytest.mark.parametrize(
    ("label_map", "message"),
    [({"1": 5}, "maps to 5"), ({"x": 1}, "not an integer"), ({}, "non-empty"), ({"1": "liver"}, "liver")],
)
def test_bad_label_map_refused(label_map: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LabelMapping.from_dict(label_map)


def test_cyst_option_validated() -> None:
    with pytest.raises(ConfigError, match="cyst must be one of"):
        LabelMapping.kits23("liver")


# ----------------------------------------------------------------------------------------------------
# Checking and reading phantom cases


def test_phantom_cases_pass_and_spacing_is_canonical_zyx(tmp_path: Path) -> None:
    # Every case thick-sliced, in every orientation: the canonical z spacing is always the slice spacing.
    cases = small_dataset(tmp_path, 4, thick_fraction=1.0, oblique_fraction=0.75)
    results = check_dataset(cases, LabelMapping.kits19())
    assert [r["case_id"] for r in results] == [c.case_id for c in cases]
    orientations = set()
    for case, result in zip(cases, results, strict=True):
        z, y, x = result["spacing_zyx"]
        assert 9.0 <= z <= 11.0 and 4.8 <= y <= 6.4 and y == pytest.approx(x)
        image = sitk.ReadImage(str(case.image))
        orientations.add(sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection()))
        assert result["spacing_zyx"] == list(canonical_orientation(image).canonical_spacing(image))
        assert result["size"] == list(image.GetSize())
        assert set(result["label_values"]) <= {0, 1, 2} and result["label_values"][1] > 0
        image, labels = read_case(case, LabelMapping.kits19())
        assert labels.GetPixelID() == sitk.sitkUInt8 and labels.GetSize() == image.GetSize()
    assert len(orientations) >= 3


def test_check_dataset_lists_every_bad_case(tmp_path: Path) -> None:
    cases = small_dataset(tmp_path, 5)
    # case 1: labels shifted by 2 mm; case 3: truncated image; case 4: unknown label value 7.
    rewrite_labels(cases[1], lambda a, ref: _shifted(like(a, ref), 2.0))
    data = cases[3].image.read_bytes()
    cases[3].image.write_bytes(data[: len(data) // 2])
    rewrite_labels(cases[4], lambda a, ref: like(np.where(a == 1, 7, a).astype(a.dtype), ref))
    with pytest.raises(DatasetError) as error:
        check_dataset(cases, LabelMapping.kits19(), workers=2)
    message = str(error.value)
    assert "3 of 5 case(s)" in message
    lines = message.splitlines()
    assert any("case_00001" in line and "origin" in line for line in lines)
    assert any("case_00003" in line and "truncated" in line for line in lines)
    assert any("case_00004" in line and "label value(s) 7" in line for line in lines)
    assert not any("case_00000" in line or "case_00002" in line for line in lines)


def _shifted(image: sitk.Image, mm: float) -> sitk.Image:
    image.SetOrigin([o + mm for o in image.GetOrigin()])
    return image


def test_grid_tolerance(tmp_path: Path) -> None:
    cases = small_dataset(tmp_path, 1)
    rewrite_labels(cases[0], lambda a, ref: _shifted(like(a, ref), 2e-4))
    check_case(cases[0], LabelMapping.kits19())  # within 1e-3 mm
    with pytest.raises(DatasetError, match=r"case_00000: .*origin"):
        check_case(cases[0], LabelMapping.kits19(), tolerance_mm=1e-4)

    def rotated(a: np.ndarray, ref: sitk.Image) -> sitk.Image:
        out = like(a, ref)
        d = np.array(ref.GetDirection()).reshape(3, 3)
        c, s = np.cos(1e-3), np.sin(1e-3)
        out.SetDirection((d @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])).ravel().tolist())
        return out

    rewrite_labels(cases[0], rotated)
    with pytest.raises(DatasetError, match="direction"):
        check_case(cases[0], LabelMapping.kits19())


def test_kits19_mapping_names_cyst_value_and_suggests_kits23(tmp_path: Path) -> None:
    cases = small_dataset(tmp_path, 1, "kits23")  # has cysts labelled 3
    rewrite_labels(cases[0], lambda a, ref: like(np.where(a == 1, 3, a).astype(a.dtype), ref))
    with pytest.raises(DatasetError, match=r"case_00000: .*label value\(s\) 3 .*layout 'kits23'"):
        check_case(cases[0], LabelMapping.kits19())


@pytest.mark.parametrize("cyst", ["kidney", "background", "tumor"])
def test_kits23_phantom_cysts_follow_the_option(tmp_path: Path, cyst: str) -> None:
    cases = small_dataset(tmp_path, 3, "kits23")
    mapping = mapping_for(tmp_path, cyst=cyst)
    with_cyst = 0
    for case in cases:
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        _, labels = read_case(case, mapping)
        mapped = sitk.GetArrayViewFromImage(labels)
        target = {"background": 0, "kidney": 1, "tumor": 2}[cyst]
        expected = np.where(raw == 3, target, raw)
        np.testing.assert_array_equal(mapped, expected)
        with_cyst += int((raw == 3).any())
    assert with_cyst >= 1  # the phantoms do have cysts to map


# ----------------------------------------------------------------------------------------------------
# Real KiTS19 and KiTS23 labels, with synthetic images on their grids

needs_kits19 = pytest.mark.skipif(not KITS19.is_dir(), reason=f"real KiTS19 labels not found at {KITS19}")
needs_kits23 = pytest.mark.skipif(not KITS23.is_dir(), reason=f"real KiTS23 labels not found at {KITS23}")
REAL_CASES = ("case_00000", "case_00015", "case_00160")  # typical; uint16 with qform; 512x796 in plane


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copy(source, target)


def write_synthetic_image(label_file: Path, image_file: Path, origin_shift_mm: float = 0.0) -> None:
    """A CT-like int16 image on a label file's grid: labels * 100 - 50."""
    labels = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayViewFromImage(labels).astype(np.int16)
    array *= 100
    array -= 50
    image = like(array, labels)
    if origin_shift_mm:
        _shifted(image, origin_shift_mm)
    sitk.WriteImage(image, str(image_file), True, 1)


@pytest.fixture(scope="module")
def real_kits19(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not KITS19.is_dir():
        pytest.skip(f"real KiTS19 labels not found at {KITS19}")
    root = tmp_path_factory.mktemp("real_kits19") / "data"
    for case_id in REAL_CASES:
        (root / case_id).mkdir(parents=True)
        _link_or_copy(KITS19 / case_id / "segmentation.nii.gz", root / case_id / "segmentation.nii.gz")
        write_synthetic_image(KITS19 / case_id / "segmentation.nii.gz", root / case_id / "imaging.nii.gz")
    return root


@needs_kits19
def test_real_kits19_cases_are_found_and_paired(real_kits19: Path) -> None:
    assert detect_layout(real_kits19) == "kits19"
    cases = find_cases(real_kits19)
    assert [c.case_id for c in cases] == list(REAL_CASES)
    for case in cases:
        assert case.image.parent == case.label.parent == real_kits19 / case.case_id


@needs_kits19
@pytest.mark.parametrize("case_id", REAL_CASES)
def test_real_kits19_case_checks_and_reads_on_the_image_grid(real_kits19: Path, case_id: str) -> None:
    case = next(c for c in find_cases(real_kits19) if c.case_id == case_id)
    mapping = LabelMapping.kits19()
    result = check_case(case, mapping)
    reference = sitk.ReadImage(str(case.label))
    assert result["size"] == list(reference.GetSize())
    assert set(result["label_values"]) == {0, 1, 2}
    # KiTS stores IPL: SimpleITK's spacing, in index order (slices, rows, columns), is already canonical z, y, x.
    assert result["spacing_zyx"] == list(reference.GetSpacing())
    image, labels = read_case(case, mapping)
    assert labels.GetPixelID() == sitk.sitkUInt8
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(labels, get)() == getattr(image, get)()
    raw = sitk.GetArrayViewFromImage(reference)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), raw)
    # Voxel for voxel, the labels sit where the image says they do (every 3rd slice, to keep the test quick).
    image_array = sitk.GetArrayViewFromImage(image)[::3]
    np.testing.assert_array_equal(image_array, raw[::3].astype(np.int16) * 100 - 50)


@needs_kits19
def test_real_kits19_mismatched_pairs_are_refused(tmp_path: Path) -> None:
    label_file = KITS19 / "case_00015" / "segmentation.nii.gz"
    root = tmp_path / "data"
    shifted, cropped = root / "case_00015", root / "case_00016"
    for folder in (shifted, cropped):
        folder.mkdir(parents=True)
        _link_or_copy(label_file, folder / "segmentation.nii.gz")
    write_synthetic_image(label_file, shifted / "imaging.nii.gz", origin_shift_mm=1.5)
    labels = sitk.ReadImage(str(label_file))
    sitk.WriteImage(labels[:, :, :-5], str(cropped / "imaging.nii.gz"), True, 1)  # 5 columns fewer
    mapping = LabelMapping.kits19()
    cases = find_cases(root)
    with pytest.raises(DatasetError, match=r"^case_00015: .*origin"):
        check_case(cases[0], mapping)
    with pytest.raises(DatasetError, match=r"^case_00016: .*size"):
        read_case(cases[1], mapping)


@needs_kits19
def test_real_kits19_unknown_label_value_is_named(tmp_path: Path) -> None:
    label_file = KITS19 / "case_00015" / "segmentation.nii.gz"
    folder = tmp_path / "data" / "case_00015"
    folder.mkdir(parents=True)
    labels = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayFromImage(labels)
    array[array == 2] = 7
    sitk.WriteImage(like(array, labels), str(folder / "segmentation.nii.gz"), True, 1)
    write_synthetic_image(label_file, folder / "imaging.nii.gz")
    with pytest.raises(DatasetError, match=r"^case_00015: .*label value\(s\) 7 .*KiTS19: 0 background"):
        check_case(find_cases(tmp_path / "data")[0], LabelMapping.kits19())


@needs_kits23
def test_real_kits23_cyst_mapping_counts(tmp_path: Path) -> None:
    # case_00000 of KiTS23 has no cyst (labels 0, 1, 2); case_00400 has one (label 3).
    source = KITS23 / "case_00400" / "segmentation.nii.gz"
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    counts = {v: int(np.count_nonzero(raw == v)) for v in range(4)}
    assert counts[3] > 0
    root = tmp_path / "dataset"
    (root / "case_00400").mkdir(parents=True)
    _link_or_copy(source, root / "case_00400" / "segmentation.nii.gz")
    write_synthetic_image(source, root / "case_00400" / "imaging.nii.gz")
    assert detect_layout(root) == "kits23"
    case = find_cases(root)[0]
    expected = {
        "kidney": [counts[0], counts[1] + counts[3], counts[2]],
        "background": [counts[0] + counts[3], counts[1], counts[2]],
        "tumor": [counts[0], counts[1], counts[2] + counts[3]],
    }
    for cyst, want in expected.items():
        mapping = mapping_for(root, cyst=cyst)
        _, labels = read_case(case, mapping)
        mapped = sitk.GetArrayViewFromImage(labels)
        assert [int(np.count_nonzero(mapped == c)) for c in range(3)] == want, cyst
        assert list(check_case(case, mapping)["class_voxels"].values()) == want
