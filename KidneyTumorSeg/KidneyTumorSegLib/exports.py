"""Results in the hospital's and Slicer's own formats.

* ``write_seg_nrrd``: a Slicer segmentation file (``.seg.nrrd``, written with ``slicerio``) whose segments
  carry the names, colours and terminology the Slicer module gives them; Slicer opens it as the same
  segments.
* ``write_dicom_seg``: a DICOM Segmentation object (written with ``highdicom``) for a DICOM series input:
  it references the source series and instances, sits in the source study (same patient and study UIDs),
  and carries each segment's SNOMED CT category, type and anatomic region, so that a PACS shows it with
  the study. One frame per source slice that holds a segment.

Both packages are optional (``pip install kidneytumorseg[dicom]``): a missing one is a clear error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError, KidneyTumorSegError
from .io import publish
from .segments import segment_specs

MANUFACTURER = "KidneyTumorSeg"


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KidneyTumorSegError(
            f"{what} needs the Python package {module!r}, which is not installed; install it with "
            f"pip install 'kidneytumorseg[dicom]' (or pip install {module})."
        ) from None


def _atomic_target(path: Path) -> str:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return temporary


def is_split(labels: np.ndarray) -> bool:
    return int(labels.max(initial=0)) == 3


# --------------------------------------------------------------------------------------------- seg.nrrd


def write_seg_nrrd(labels: sitk.Image, path: str | os.PathLike, split: bool | None = None) -> Path:
    """Write ``labels`` (0 background, 1 kidney, 2 tumor; or 1 right, 2 tumor, 3 left) as a ``.seg.nrrd``."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise KidneyTumorSegError(f"{path}: a Slicer segmentation file must end in .seg.nrrd.")
    slicerio = _need("slicerio", "writing .seg.nrrd")
    array = sitk.GetArrayFromImage(labels)  # (k, j, i)
    split = is_split(array) if split is None else split
    direction = np.array(labels.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(labels.GetSpacing())[None, :]
    ijk_to_lps[:3, 3] = labels.GetOrigin()
    segments = []
    for spec in segment_specs(split):
        mask = array == spec.label
        extent = [int(v) for axis in np.nonzero(np.transpose(mask, (2, 1, 0))) for v in (axis.min(), axis.max())]
        segments.append(
            {
                "id": spec.name.replace(", ", "_").replace(" ", "_"),
                "name": spec.name,
                "labelValue": spec.label,
                "layer": 0,
                "color": list(spec.color),
                "terminology": slicerio.segmentation.terminology_entry_from_string(spec.terminology),
                "extent": extent if mask.any() else [0, -1, 0, -1, 0, -1],
            }
        )
    segmentation = {
        "voxels": np.ascontiguousarray(np.transpose(array, (2, 1, 0))).astype(np.uint8),
        "ijkToLPS": ijk_to_lps,
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }
    temporary = _atomic_target(path)
    try:
        slicerio.write_segmentation(temporary, segmentation)
        publish(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def read_seg_nrrd(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(labels (k, j, i), IJK-to-LPS 4x4, segments) of a ``.seg.nrrd`` written by ``write_seg_nrrd``."""
    slicerio = _need("slicerio", "reading .seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"])
    return np.transpose(voxels, (2, 1, 0)), np.asarray(segmentation["ijkToLPS"]), segmentation["segments"]


# ---------------------------------------------------------------------------------------------- DICOM


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the folder's DICOM series in the order SimpleITK stacks them (``io.read_image``)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputImageError(f"{folder}: no DICOM series here; a DICOM SEG needs a DICOM series as input.")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _code(hd, code: tuple[str, str, str]):
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def write_dicom_seg(
    labels: sitk.Image,
    series_folder: str | os.PathLike,
    path: str | os.PathLike,
    model_name: str = "kidneytumorseg",
    model_version: str = "",
    split: bool | None = None,
) -> tuple[Path, list[str]]:
    """Write ``labels`` (on the grid of the DICOM series in ``series_folder``) as a DICOM Segmentation;
    return the path and warnings (about identifiers the source series lacks)."""
    hd = _need("highdicom", "writing DICOM SEG")
    pydicom = _need("pydicom", "writing DICOM SEG")
    path = Path(path)
    files = dicom_series_files(series_folder)
    sources = [pydicom.dcmread(f) for f in files]
    warnings = _complete_identifiers(sources, series_folder, pydicom)
    array = sitk.GetArrayFromImage(labels)  # (slice, row, column) in the order of ``files``
    if array.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise InputImageError(
            f"{series_folder}: the labels ({array.shape[::-1]} voxels) are not on this series' grid "
            f"({sources[0].Columns} x {sources[0].Rows} x {len(sources)}); a DICOM SEG needs the labels of this "
            "series."
        )
    split = is_split(array) if split is None else split
    specs = segment_specs(split)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name,
        version=model_version or "unknown",
        family=_code(hd, ("DCM", "123110", "Artificial Intelligence")),
    )
    descriptions = []
    for number, spec in enumerate(specs, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.name,
            segmented_property_category=_code(hd, spec.category),
            segmented_property_type=_code(hd, spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[_code(hd, spec.region)] if spec.region[1] else None,
        )
        if spec.modifier[1]:
            item = pydicom.Dataset()
            item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = spec.modifier
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [item]
        description.RecommendedDisplayCIELabValue = _rgb_to_dicom_lab(spec.color)
        descriptions.append(description)
    # Segment numbers follow the label values' order in ``specs``: map label values onto them.
    pixel = np.zeros(array.shape, dtype=np.uint8)
    for number, spec in enumerate(specs, start=1):
        pixel[array == spec.label] = number
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=model_version or "unknown",
        device_serial_number="none",
        series_description="Kidney and tumor segmentation (research use only)",
        omit_empty_frames=True,
    )
    temporary = _atomic_target(path)
    try:
        seg.save_as(temporary)
        publish(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path, warnings


def _complete_identifiers(sources: list, folder: str | os.PathLike, pydicom) -> list[str]:
    """Fill identifiers an anonymiser blanked, in memory only (the source files are never changed): the SOP
    class and instance UIDs from each file's meta header (the same values), and missing study and series
    UIDs with UIDs derived from the series' frame of reference, with a warning: the SEG then references a
    series a PACS cannot match."""
    from pydicom.uid import generate_uid

    warnings = []
    for ds in sources:
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    seed = str(sources[0].get("FrameOfReferenceUID") or sources[0].SOPInstanceUID)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not all(ds.get(keyword) for ds in sources):
            uid = generate_uid(entropy_srcs=[seed, keyword])
            for ds in sources:
                setattr(ds, keyword, ds.get(keyword) or uid)
            warnings.append(
                f"{folder}: the series has no {keyword} (anonymised?); the DICOM SEG uses {uid}, derived from the "
                "series, so a PACS will not file it with the original study"
            )
    return warnings


def _rgb_to_dicom_lab(rgb: tuple[float, float, float]) -> list[int]:
    """sRGB (0-1) to DICOM's scaled CIELab (0-65535 each), as PS3.3 C.10.7.1.1 defines it."""
    c = np.array(rgb, dtype=float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    scaled = [lab[0] / 100 * 65535, (lab[1] + 128) / 255 * 65535, (lab[2] + 128) / 255 * 65535]
    return [int(round(min(65535, max(0, v)))) for v in scaled]


def read_dicom_seg(path: str | os.PathLike, series_folder: str | os.PathLike) -> tuple[np.ndarray, list]:
    """(labels (slice, row, column) in the series' order, segment descriptions) of a DICOM SEG written by
    ``write_dicom_seg``: label values follow the segment names (``segments.py``)."""
    hd = _need("highdicom", "reading DICOM SEG")
    pydicom = _need("pydicom", "reading DICOM SEG")
    seg = hd.seg.segread(str(path))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(series_folder)]
    _complete_identifiers(sources, series_folder, pydicom)
    uids = [ds.SOPInstanceUID for ds in sources]
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    descriptions = list(seg.SegmentSequence)
    by_name = {spec.name: spec.label for split in (False, True) for spec in segment_specs(split)}
    labels = np.zeros((len(uids), int(sources[0].Rows), int(sources[0].Columns)), dtype=np.uint8)
    present = [i for i, uid in enumerate(uids) if uid in referenced]
    if present:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uids[i] for i in present],
            segment_numbers=[int(d.SegmentNumber) for d in descriptions],
            combine_segments=True,
            relabel=False,
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )
        lut = np.zeros(len(descriptions) + 1, dtype=np.uint8)
        for d in descriptions:
            lut[int(d.SegmentNumber)] = by_name[d.SegmentLabel]
        labels[present] = lut[pixels]
    return labels, descriptions
