"""Clean-up of the network's labels on the input grid.

Rules, each switchable through ``PostprocessSettings``:

1. Kidney plausibility: the connected components of kidney-or-tumor (26-connectivity) are ranked by
   volume; a component is kept when it holds at least ``min_component_fraction`` of the largest one's
   volume. Two kidneys of any size survive; specks of false positives elsewhere do not.
2. Tumor without kidney: a tumor component that touches no kidney voxel is dropped, because the model's
   tumor class means *kidney* tumor. Since tumor components are maximal, a component of kidney-or-tumor
   that holds no kidney voxel is exactly such a tumor.
3. Tumor specks: a tumor component (26-connectivity) smaller than ``min_tumor_ml`` (0.5 mL, a sphere
   about 1 cm across: below the size at which a renal mass can be characterised on CT) becomes kidney,
   when the voxel volume is known. Kidney Dice is unchanged by this rule (it counts kidney and tumor
   together); it removes the scattered false tumor voxels a network leaves in a healthy kidney.

Connected components run only inside the bounding box of the foreground, which is small against a CT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

KIDNEY = 1
TUMOR = 2


@dataclass(frozen=True)
class PostprocessSettings:
    enabled: bool = True
    min_component_fraction: float = 0.1
    min_tumor_ml: float = 0.5


@dataclass
class PostprocessReport:
    components_found: int = 0
    components_removed: int = 0
    voxels_removed: int = 0
    notes: list[str] = field(default_factory=list)


def _foreground_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def postprocess(
    labels: np.ndarray,
    settings: PostprocessSettings = PostprocessSettings(),  # noqa: B008
    voxel_ml: float | None = None,
) -> PostprocessReport:
    """Apply the rules above to ``labels`` (z, y, x uint8) in place; return what was removed. Rule 3 needs
    ``voxel_ml`` (the volume of one voxel in mL) and is skipped without it."""
    report = PostprocessReport()
    if not settings.enabled:
        return report
    box = _foreground_box(labels > 0)
    if box is None:
        return report
    crop = labels[box]
    # Components, their sizes and whether they hold kidney are computed by ITK on its own images, and only
    # a uint8 keep-mask comes back to numpy: no per-voxel int64 or float64 arrays (a CT's foreground box
    # can hold 10^8 voxels).
    components = sitk.ConnectedComponent(sitk.GetImageFromArray((crop > 0).view(np.uint8)), True)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(components)
    found = list(shape.GetLabels())
    report.components_found = len(found)
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(sitk.GetImageFromArray((crop == KIDNEY).view(np.uint8)), components)
    sizes = {label: shape.GetNumberOfPixels(label) for label in found}
    has_kidney = {label: stats.GetMaximum(label) > 0 for label in found}
    largest = max((n for label, n in sizes.items() if has_kidney[label]), default=0)
    dropped = [
        label for label in found if not has_kidney[label] or sizes[label] < settings.min_component_fraction * largest
    ]
    if dropped:
        lut = np.zeros(max(found) + 1, dtype=bool)
        lut[dropped] = True
        removed_mask = lut[sitk.GetArrayViewFromImage(components)]  # a view: the image is alive here
        del components
        removed = int(np.count_nonzero(removed_mask))
        crop[removed_mask] = 0
        report.components_removed = len(dropped)
        report.voxels_removed = removed
        report.notes.append(
            f"removed {report.components_removed} of {report.components_found} kidney/tumor components "
            f"({removed} voxels): too small next to the largest, or tumor touching no kidney"
        )
    if voxel_ml is not None and settings.min_tumor_ml > 0:
        _relabel_tumor_specks(crop, settings.min_tumor_ml / voxel_ml, report)
    return report


def _relabel_tumor_specks(crop: np.ndarray, min_voxels: float, report: PostprocessReport) -> None:
    tumor = crop == TUMOR
    if not tumor.any():
        return
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(tumor.view(np.uint8)), True)
    del tumor
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(components)
    small = {label for label in shape.GetLabels() if shape.GetNumberOfPixels(label) < min_voxels}
    if small:
        lut = np.zeros(max(shape.GetLabels()) + 1, dtype=bool)
        lut[sorted(small)] = True
        specks = lut[sitk.GetArrayViewFromImage(components)]  # a view: the image is alive here
        del components
        crop[specks] = KIDNEY
        report.notes.append(
            f"{len(small)} tumor component(s) under {min_voxels:.0f} voxels ({int(np.count_nonzero(specks))} "
            "voxels) relabelled kidney: too small to be a tumor"
        )
