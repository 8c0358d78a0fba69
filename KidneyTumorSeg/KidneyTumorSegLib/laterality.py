"""Left and right kidney, by the patient's anatomy.

The network labels every kidney voxel 1 and every tumor voxel 2. ``split_kidneys`` relabels the kidney
voxels by side and assigns each tumor to a kidney:

    0 background, 1 right kidney, 2 tumor (any side), 3 left kidney

Tumor keeps the value 2 so that everything reading KiTS-style labels (the metric, the Slicer "Tumor"
segment) reads a split file the same way; the side of each tumor is in ``LateralityResult.tumors``.
To compare a split file with KiTS labels, map 3 to 1 (``merge_sides``).

Sides come from physical coordinates, never from array order: a voxel's LPS x (patient left is +x) is
computed from the image's origin, spacing and direction, so a flipped, permuted or oblique volume splits
the same way. The dividing plane is the sagittal plane x = midline:

* two kidneys (two kidney-or-tumor components of comparable size, at least ``MIN_SEPARATION_MM`` apart
  in x): the midline is halfway between their centroids;
* one kidney (the other removed, missing, or outside the field of view): the spine, found as the peak
  of the bone voxels (above 200 HU) projected onto the left-right axis in the slices that hold the
  kidney (the vertebral column is the one dense structure on the midline there; ribs spread out); when
  there is no bone, the x-centroid of the body (voxels above -500 HU) in those slices. When the body
  touches the left or right edge of the field of view the result warns that the side may be wrong.

Each kidney-or-tumor component goes whole to the side that holds most of it. A component with at least
``HORSESHOE_SHARE`` of its voxels on each side of the midline (a horseshoe kidney, fused across the
midline) is cut at the midline plane, and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

KIDNEY = 1
TUMOR = 2
RIGHT_KIDNEY = 1
LEFT_KIDNEY = 3
SPLIT_LABELS = {0: "background", RIGHT_KIDNEY: "kidney, right", TUMOR: "tumor", LEFT_KIDNEY: "kidney, left"}

MIN_SEPARATION_MM = 40.0  # two kidneys' centroids are 80-120 mm apart in x in adults
COMPARABLE_SIZE = 0.2  # a second component counts as a kidney when it has this share of the largest's volume
HORSESHOE_SHARE = 0.2
BODY_HU = -500.0
BONE_HU = 200.0
SPINE_BIN_MM = 5.0
SPINE_HALF_WIDTH_MM = 25.0
MIN_BONE_VOXELS = 50


@dataclass
class TumorSide:
    component: int  # 1-based, in order of decreasing volume
    side: str  # "left" or "right"
    voxels: int


@dataclass
class LateralityResult:
    labels: np.ndarray  # (z, y, x) uint8 with the values above
    method: str  # "two kidneys", "spine", "body midline", "field of view centre" or "no kidney"
    midline_x_mm: float | None  # LPS x of the dividing plane
    tumors: list[TumorSide] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def index_to_lps_matrix(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, origin) with LPS point = origin + A @ (i, j, k), for SimpleITK index order (x, y, z)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction * np.array(image.GetSpacing(), dtype=float)[None, :], np.array(image.GetOrigin(), dtype=float)


def lps_x_of_voxels(image: sitk.Image, zyx: tuple[np.ndarray, ...], axis: int = 0) -> np.ndarray:
    """LPS x (``axis`` 0; 1 for y, 2 for z) in mm of the voxels at array indices ``zyx`` = (z, y, x)."""
    a, origin = index_to_lps_matrix(image)
    z, y, x = zyx
    return origin[axis] + a[axis, 0] * x + a[axis, 1] * y + a[axis, 2] * z


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _midline_from_ct(
    ct: np.ndarray, image: sitk.Image, z_range_mm: tuple[float, float]
) -> tuple[float | None, str, bool]:
    """(LPS x of the midline, how it was found, whether the body touches the field of view's left or
    right edge) from the CT voxels whose LPS z lies in ``z_range_mm`` (the kidney's extent)."""
    # Subsample to a few million voxels: plenty for a centroid and a 5 mm histogram.
    step = max(1, int(round((ct.size / 4e6) ** (1 / 3))))
    sub = ct[::step, ::step, ::step]
    grid = np.ogrid[tuple(slice(0, n) for n in sub.shape)]
    zyx = tuple(g * step for g in grid)
    lps_z = lps_x_of_voxels(image, zyx, axis=2)
    in_range = (lps_z >= z_range_mm[0]) & (lps_z <= z_range_mm[1])
    body = (sub > BODY_HU) & in_range
    if not body.any():
        return None, "", False
    a, _ = index_to_lps_matrix(image)
    touches = False
    for axis_zyx, axis_xyz in ((0, 2), (1, 1), (2, 0)):  # the array edges across which LPS x changes most
        if abs(a[0, axis_xyz]) >= 0.7 * np.linalg.norm(a[:, axis_xyz]):
            faces = [0, sub.shape[axis_zyx] - 1]
            edge = np.take(body, faces, axis=axis_zyx)
            area = np.take(np.broadcast_to(in_range, sub.shape), faces, axis=axis_zyx)
            touches |= bool(edge.sum() > 0.05 * max(1, area.sum()))

    def xs_of(mask: np.ndarray) -> np.ndarray:
        return lps_x_of_voxels(image, tuple(idx * step for idx in np.nonzero(mask)))

    bone = xs_of((sub > BONE_HU) & in_range)
    if bone.size >= MIN_BONE_VOXELS:
        edges = np.arange(bone.min(), bone.max() + 2 * SPINE_BIN_MM, SPINE_BIN_MM)
        counts, edges = np.histogram(bone, bins=edges)
        smooth = np.convolve(counts, np.ones(3), mode="same")
        peak = int(np.argmax(smooth))
        centre = 0.5 * (edges[peak] + edges[peak + 1])
        # The vertebral body and arch are about 50 mm wide: their median, not the peak bin alone.
        near = bone[np.abs(bone - centre) <= SPINE_HALF_WIDTH_MM]
        return float(np.median(near)), "spine", touches
    return float(xs_of(body).mean()), "body midline", touches


def split_kidneys(labels: np.ndarray, image: sitk.Image, ct: np.ndarray | None = None) -> LateralityResult:
    """Relabel ``labels`` (z, y, x; 0/1/2 on ``image``'s grid) into right kidney 1, tumor 2, left kidney 3.

    ``ct`` (the CT's voxels on the same grid, HU) is used only when there is a single kidney, to find
    the body's midline; without it the centre of the field of view stands in, with a warning.
    """
    if labels.shape != sitk.GetArrayViewFromImage(image).shape[:3]:
        raise ValueError(f"labels of shape {labels.shape} are not on the image's grid")
    out = np.zeros_like(labels, dtype=np.uint8)
    out[labels == TUMOR] = TUMOR
    box = _box(labels > 0)
    if box is None:
        return LateralityResult(out, "no kidney", None, notes=["no kidney or tumor voxel: nothing to split"])

    crop = labels[box]
    components = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray((crop > 0).astype(np.uint8)), True)
    )
    flat = components.ravel()
    sizes = np.bincount(flat)
    sizes[0] = 0
    zyx = np.nonzero(components)
    comp_of_voxel = components[zyx]
    offset = [s.start for s in box]
    xs = lps_x_of_voxels(image, tuple(idx + off for idx, off in zip(zyx, offset, strict=True)))
    n = sizes.size
    centroid_x = np.bincount(comp_of_voxel, weights=xs, minlength=n) / np.maximum(sizes, 1)
    order = [int(c) for c in np.argsort(-sizes) if sizes[c] > 0]

    result = LateralityResult(out, "", None)
    largest = order[0]
    second = order[1] if len(order) > 1 else None
    if (
        second is not None
        and sizes[second] >= COMPARABLE_SIZE * sizes[largest]
        and abs(centroid_x[largest] - centroid_x[second]) >= MIN_SEPARATION_MM
    ):
        result.method = "two kidneys"
        result.midline_x_mm = float(0.5 * (centroid_x[largest] + centroid_x[second]))
    else:
        in_largest = comp_of_voxel == largest
        lps_z = lps_x_of_voxels(image, tuple(idx[in_largest] + off for idx, off in zip(zyx, offset, strict=True)), 2)
        midline, how, touches = (None, "", False)
        if ct is not None:
            midline, how, touches = _midline_from_ct(ct, image, (float(lps_z.min()), float(lps_z.max())))
        if midline is not None:
            result.method = how
            result.midline_x_mm = midline
            if touches:
                result.warnings.append(
                    "one kidney found and the body reaches the edge of the field of view: the body's midline, "
                    "and so the side of that kidney, may be wrong; check it"
                )
        else:
            result.method = "field of view centre"
            corners = np.array(image.GetSize(), dtype=float) - 1.0
            a, origin = index_to_lps_matrix(image)
            result.midline_x_mm = float(origin[0] + a[0] @ (corners / 2.0))
            result.warnings.append(
                "one kidney found and no CT to find the body's midline: the centre of the field of view was "
                "used, so the side of that kidney may be wrong; check it"
            )
    midline = result.midline_x_mm
    assert midline is not None

    left_voxel = xs > midline
    left_count = np.bincount(comp_of_voxel, weights=left_voxel, minlength=n)
    side_of_voxel = np.zeros(comp_of_voxel.shape, dtype=bool)  # True: left
    for c in order:
        share_left = left_count[c] / sizes[c]
        in_c = comp_of_voxel == c
        if HORSESHOE_SHARE <= share_left <= 1.0 - HORSESHOE_SHARE:
            side_of_voxel[in_c] = left_voxel[in_c]
            result.notes.append(
                f"a kidney crosses the midline ({100 * share_left:.0f}% left of it; horseshoe kidney?): "
                "cut at the midline plane"
            )
        else:
            side_of_voxel[in_c] = share_left > 0.5

    values = crop[zyx]
    kidney_values = np.where(side_of_voxel, LEFT_KIDNEY, RIGHT_KIDNEY).astype(np.uint8)
    relabelled = np.where(values == KIDNEY, kidney_values, values).astype(np.uint8)
    out_crop = out[box]
    out_crop[zyx] = relabelled

    # Tumors: each tumor component (26-connected) goes to the side that holds most of its voxels.
    tumor_components = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray((crop == TUMOR).astype(np.uint8)), True)
    )
    t_of_voxel = tumor_components[zyx]
    t_sizes = np.bincount(t_of_voxel)
    t_left = np.bincount(t_of_voxel, weights=side_of_voxel, minlength=t_sizes.size)
    t_order = [int(t) for t in np.argsort(-t_sizes) if t != 0 and t_sizes[t] > 0]
    for rank, t in enumerate(t_order, start=1):
        side = "left" if t_left[t] > 0.5 * t_sizes[t] else "right"
        result.tumors.append(TumorSide(rank, side, int(t_sizes[t])))

    kidneys_found = {("left" if v == LEFT_KIDNEY else "right") for v in np.unique(relabelled) if v != TUMOR}
    if len(kidneys_found) == 1:
        result.notes.append(f"only the {kidneys_found.pop()} kidney was found")
    return result


def merge_sides(labels: np.ndarray) -> np.ndarray:
    """Split labels (1 right, 2 tumor, 3 left) back to KiTS labels (1 kidney, 2 tumor)."""
    merged = labels.astype(np.uint8, copy=True)
    merged[merged == LEFT_KIDNEY] = KIDNEY
    return merged
