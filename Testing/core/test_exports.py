"""Hospital and Slicer formats, read back: DICOM SEG (highdicom) against the real DICOM series in
``../shared/data`` and against a complete series written here; ``.seg.nrrd`` (slicerio) on an oblique
grid. Voxels, geometry, references and segment codes must survive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from KidneyTumorSegLib import exports, io
from KidneyTumorSegLib.phantom import make_phantom
from KidneyTumorSegLib.segments import SEGMENTS, SPLIT_SEGMENTS

pytest.importorskip("highdicom", reason="DICOM SEG needs highdicom (the test extra installs it)")
pytest.importorskip("slicerio", reason=".seg.nrrd needs slicerio (the test extra installs it)")
import pydicom  # noqa: E402 - installed with highdicom

REAL_SERIES = (
    Path(__file__).resolve().parents[3] / "shared/data/TotalSegmentator/tests/reference_files/example_ct_dicom"
)
needs_real_series = pytest.mark.skipif(not REAL_SERIES.is_dir(), reason=f"{REAL_SERIES} is absent (shared data)")


def _labels_on(image: sitk.Image, split: bool) -> sitk.Image:
    """Blocks of kidney (or right and left kidney) and a tumor inside one, on ``image``'s grid."""
    nz, ny, nx = sitk.GetArrayViewFromImage(image).shape
    arr = np.zeros((nz, ny, nx), np.uint8)
    arr[1 : nz - 1, ny // 3 : ny // 2, nx // 6 : nx // 3] = 1
    arr[nz // 3 : nz // 2 + 1, ny // 3 + 2 : ny // 2 - 2, nx // 5 : nx // 4] = 2
    arr[1 : nz - 1, ny // 3 : ny // 2, 2 * nx // 3 : 5 * nx // 6] = 3 if split else 1
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(image)
    return labels


def _segment_codes(item) -> dict:
    t = item.SegmentedPropertyTypeCodeSequence[0]
    modifier = getattr(t, "SegmentedPropertyTypeModifierCodeSequence", None)
    region = getattr(item, "AnatomicRegionSequence", None)
    return {
        "category": item.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
        "type": t.CodeValue,
        "modifier": modifier[0].CodeValue if modifier else None,
        "region": region[0].CodeValue if region else None,
    }


@needs_real_series
@pytest.mark.parametrize("split", [False, True])
def test_dicom_seg_on_the_real_series_reads_back_voxel_for_voxel_with_codes(tmp_path, split):
    image = io.read_image(REAL_SERIES)
    labels = _labels_on(image, split)
    path, warnings = exports.write_dicom_seg(labels, REAL_SERIES, tmp_path / "seg.dcm", "test-model", "1.2.3", split)
    back, descriptions = exports.read_dicom_seg(path, REAL_SERIES)
    assert np.array_equal(back, sitk.GetArrayViewFromImage(labels))
    specs = SPLIT_SEGMENTS if split else SEGMENTS
    assert [d.SegmentLabel for d in descriptions] == [s.name for s in specs]
    codes = {d.SegmentLabel: _segment_codes(d) for d in descriptions}
    assert codes["Tumor"] == {"category": "49755003", "type": "108369006", "modifier": None, "region": "64033007"}
    if split:
        assert codes["Kidney, right"]["modifier"] == "24028007" and codes["Kidney, left"]["modifier"] == "7771000"
    else:
        assert codes["Kidney"] == {"category": "123037004", "type": "64033007", "modifier": None, "region": None}
    seg = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.Manufacturer == "KidneyTumorSeg"
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "test-model"
    # The real series is anonymised: no study or series UID. The SEG says so instead of failing.
    assert any("SeriesInstanceUID" in w for w in warnings) and any("StudyInstanceUID" in w for w in warnings)
    source_uids = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
                   for f in exports.dicom_series_files(REAL_SERIES)}  # fmt: skip
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == source_uids


def _write_dicom_series(image: sitk.Image, folder: Path) -> tuple[str, str]:
    """A complete CT series (study, series, frame of reference UIDs) written slice by slice."""
    folder.mkdir()
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    frame = pydicom.uid.generate_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(
        str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    )
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": pydicom.uid.generate_uid(), "0008|0060": "CT",
            "0020|000d": study, "0020|000e": series, "0020|0052": frame, "0020|0013": str(k + 1),
            "0020|0037": orientation, "0010|0010": "Phantom^Patient", "0010|0020": "PHANTOM-1",
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": str(image.GetSpacing()[2]), "0028|1052": "0", "0028|1053": "1",
        }  # fmt: skip
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    return study, series


def test_dicom_seg_joins_the_source_study_and_references_its_series(tmp_path):
    phantom = make_phantom(8, size=(64, 56, 12), spacing=(5.0, 5.0, 8.0), orientation="LPS")
    study, series = _write_dicom_series(phantom.image, tmp_path / "series")
    image = io.read_image(tmp_path / "series")
    labels = _labels_on(image, split=True)
    path, warnings = exports.write_dicom_seg(labels, tmp_path / "series", tmp_path / "seg.dcm")
    assert warnings == []
    seg = pydicom.dcmread(path)
    assert seg.StudyInstanceUID == study and seg.PatientID == "PHANTOM-1"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series and seg.SeriesInstanceUID != series
    back, _ = exports.read_dicom_seg(path, tmp_path / "series")
    assert np.array_equal(back, sitk.GetArrayViewFromImage(labels))


def test_dicom_seg_refuses_labels_off_the_series_grid(tmp_path):
    phantom = make_phantom(8, size=(64, 56, 12), spacing=(5.0, 5.0, 8.0), orientation="LPS")
    _write_dicom_series(phantom.image, tmp_path / "series")
    wrong = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    with pytest.raises(io.InputImageError, match="not on this series' grid"):
        exports.write_dicom_seg(wrong, tmp_path / "series", tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


@pytest.mark.parametrize("split", [False, True])
def test_seg_nrrd_reads_back_with_geometry_names_colours_and_terminology(tmp_path, split):
    image = make_phantom(9, size=(48, 40, 16), spacing=(4.0, 4.5, 6.0), orientation="oblique").image
    labels = _labels_on(image, split)
    path = exports.write_seg_nrrd(labels, tmp_path / "case.seg.nrrd")
    voxels, ijk_to_lps, segments = exports.read_seg_nrrd(path)
    assert np.array_equal(voxels, sitk.GetArrayViewFromImage(labels))
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    assert np.allclose(ijk_to_lps[:3, :3], direction) and np.allclose(ijk_to_lps[:3, 3], image.GetOrigin())
    specs = SPLIT_SEGMENTS if split else SEGMENTS
    assert [(s["name"], s["labelValue"]) for s in segments] == [(s.name, s.label) for s in specs]
    for written, spec in zip(segments, specs, strict=True):
        assert np.allclose(written["color"], spec.color, atol=1e-6)
        assert written["terminology"]["type"][1] == spec.terminology.split("~")[2].split("^")[1]


def test_seg_nrrd_needs_its_suffix(tmp_path):
    image = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    with pytest.raises(exports.KidneyTumorSegError, match="seg.nrrd"):
        exports.write_seg_nrrd(image, tmp_path / "case.nrrd")


@needs_real_series
def test_predict_writes_dicom_seg_and_seg_nrrd_beside_the_labels_and_refuses_dicom_seg_for_a_file(tmp_path):
    def kts(*args):
        return subprocess.run(
            [sys.executable, "-m", "KidneyTumorSegLib", *args, "--progress", "none"],
            capture_output=True,
            encoding="utf-8",
            timeout=600,
            check=False,
        )

    out = tmp_path / "ct.nii.gz"
    done = kts("predict", str(REAL_SERIES), "-o", str(out), "--dicom-seg", "--seg-nrrd", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    back, _ = exports.read_dicom_seg(tmp_path / "ct.seg.dcm", REAL_SERIES)
    assert np.array_equal(back, labels)
    assert np.array_equal(exports.read_seg_nrrd(tmp_path / "ct.seg.nrrd")[0], labels)
    assert "SeriesInstanceUID" in done.stderr  # the anonymised series' missing UIDs are reported
    single = tmp_path / "single.nii.gz"
    refused = kts("predict", str(out), "-o", str(single), "--dicom-seg", "--device", "cpu")
    assert refused.returncode == 2 and "needs a DICOM series folder" in refused.stderr
    assert "Traceback" not in refused.stderr and not single.exists()
