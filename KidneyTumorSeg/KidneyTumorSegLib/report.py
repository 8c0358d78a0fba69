"""``predict --report``: per case a JSON of the measurements and a PNG montage for quality control; for a
batch, one CSV over all cases.

Files sit beside the labels: ``NAME.report.json`` and ``NAME.report.png`` for labels ``NAME.nii.gz``
(or ``.nrrd``), and ``report.csv`` in the output folder of a batch. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import overlay
from .io import label_suffix, publish
from .measurements import CaseMeasurements, measure
from .modelfile import ModelMetadata
from .preprocessing import canonical_orientation

CSV_COLUMNS = (
    "case",
    "kidney_right_ml",
    "kidney_left_ml",
    "tumor_count",
    "tumor_volume_ml",
    "tumor_to_kidney_volume_ratio",
    "largest_tumor_side",
    "largest_tumor_volume_ml",
    "largest_tumor_diameter_mm",
    "largest_tumor_axial_long_mm",
    "largest_tumor_axial_short_mm",
    "renal_R",
    "renal_E",
    "renal_E_share_outside",
    "renal_A",
    "renal_L",
    "renal_N",
    "renal_partial_score_R_E_L",
    "warnings",
)


def report_paths(labels_path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(labels_path)
    stem = path.name[: -len(label_suffix(path))]
    return path.with_name(f"{stem}.report.json"), path.with_name(f"{stem}.report.png")


def _write_text_atomic(text: str, path: Path) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        publish(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def montage_center(labels: sitk.Image) -> list[int] | None:
    """The canonical voxel at the centre of the largest tumor (else of the foreground; None when empty)."""
    array = canonical_orientation(labels).to_canonical(sitk.GetArrayViewFromImage(labels))
    tumor = np.ascontiguousarray(array == 2)
    if tumor.any():
        components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(tumor.astype(np.uint8))))
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        return [int(np.median(a)) for a in np.nonzero(components == int(sizes.argmax()))]
    if array.any():
        return [int(np.median(a)) for a in np.nonzero(array)]
    return None


def write_case_report(
    case: str,
    input_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    image: sitk.Image,
    labels: sitk.Image,
    model: ModelMetadata,
    volumes_ml: dict[str, float],
    warnings: Sequence[str] = (),
) -> tuple[Path, Path, CaseMeasurements]:
    """Measure the case and write its JSON and PNG (see the module docstring)."""
    array = sitk.GetArrayViewFromImage(labels)
    split = array if int(array.max(initial=0)) == 3 else None
    base = np.where(array == 3, 1, array).astype(np.uint8) if split is not None else np.asarray(array)
    measured = measure(base, image, sitk.GetArrayViewFromImage(image), split=split)
    json_path, png_path = report_paths(labels_path)
    record: dict[str, Any] = {
        "case": case,
        "input": str(input_path),
        "labels": str(labels_path),
        "montage": png_path.name,
        "model": {"name": model.name, "version": model.version, "trained": model.trained},
        "intended_use": model.intended_use,
        "volumes_ml": {k: round(v, 3) for k, v in volumes_ml.items()},
        "measurements": measured.to_json(),
        "warnings": list(warnings) + measured.warnings,
    }
    _write_text_atomic(json.dumps(record, indent=2) + "\n", json_path)
    overlay.write_png(overlay.montage(image, labels, montage_center(labels)), png_path)
    return json_path, png_path, measured


def csv_row(case: str, measured: CaseMeasurements, warnings: Sequence[str] = ()) -> dict[str, Any]:
    row: dict[str, Any] = {k: "" for k in CSV_COLUMNS}
    row.update(
        case=case,
        kidney_right_ml=round(measured.kidney_volume_ml["right"], 2),
        kidney_left_ml=round(measured.kidney_volume_ml["left"], 2),
        tumor_count=measured.tumor_count,
        tumor_volume_ml=round(measured.tumor_volume_ml, 2),
        warnings=" | ".join(list(warnings) + measured.warnings),
    )
    if measured.tumor_to_kidney_volume_ratio is not None:
        row["tumor_to_kidney_volume_ratio"] = round(measured.tumor_to_kidney_volume_ratio, 4)
    if measured.tumors:
        t = measured.tumors[0]
        row.update(
            largest_tumor_side=t.side,
            largest_tumor_volume_ml=round(t.volume_ml, 2),
            largest_tumor_diameter_mm=round(t.largest_diameter_mm, 1),
            largest_tumor_axial_long_mm=round(t.axial_long_axis_mm, 1),
            largest_tumor_axial_short_mm=round(t.axial_short_axis_mm, 1),
            renal_R=t.renal["R"].score,
            renal_E=t.renal["E"].score,
            renal_E_share_outside=t.renal["E"].value,
            renal_A=t.renal["A"].score,
            renal_L=t.renal["L"].score,
            renal_N="not computed",
            renal_partial_score_R_E_L=t.renal_partial_score if t.renal_partial_score is not None else "",
        )
    return row


def write_batch_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    _write_text_atomic(buffer.getvalue(), path)
    return path
