"""Quality-control pictures: CT slices with label overlays, written as PNG (by SimpleITK, no extra package).

Slices are shown the radiological way: axial with the patient's right on the image's left and anterior at
the top; coronal with superior at the top. Pixels are made square in millimetres, so thick-slice scans
are not squashed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .preprocessing import canonical_orientation

# Slicer's colours for the two structures (the generic anatomy colour table); 3 is the left kidney of
# labels split by side (lighter, as in the Slicer module).
LABEL_COLORS = {1: (185, 102, 83), 2: (144, 238, 144), 3: (212, 140, 120)}
WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window


def _canonical(image: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    orientation = canonical_orientation(image)
    return orientation.to_canonical(sitk.GetArrayViewFromImage(image)), orientation.canonical_spacing(image)


def _square_pixels(plane: np.ndarray, spacing_rc: Sequence[float], mode: str, pixel_mm: float) -> np.ndarray:
    rows = max(1, round(plane.shape[0] * spacing_rc[0] / pixel_mm))
    cols = max(1, round(plane.shape[1] * spacing_rc[1] / pixel_mm))
    t = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t, size=(rows, cols), mode=mode, **kwargs)[0, 0].numpy()


def _render(ct: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    lo, hi = WINDOW_HU
    gray = np.clip((ct - lo) / (hi - lo) * 255.0, 0, 255)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if labels is not None:
        for value, color in LABEL_COLORS.items():
            mask = labels == value
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(color, dtype=float)
    return rgb.astype(np.uint8)


def overlay_panels(
    ct: sitk.Image,
    label_maps: Sequence[sitk.Image | None],
    center_zyx: Sequence[int] | None = None,
    pixel_mm: float = 1.0,
) -> np.ndarray:
    """An RGB picture: one column per label map (None: the plain CT), axial on top, coronal below.

    ``center_zyx`` is the canonical voxel the slices pass through (default: the centre of the first label
    map's foreground, else of the volume).
    """
    ct_array, spacing = _canonical(ct)
    maps = [None if m is None else _canonical(m)[0] for m in label_maps]
    if center_zyx is None:
        reference = next((m for m in maps if m is not None and m.any()), None)
        center_zyx = (
            [int(np.median(axis)) for axis in np.nonzero(reference)]
            if reference is not None
            else [n // 2 for n in ct_array.shape]
        )
    z, y, _ = center_zyx
    columns = []
    for labels in maps:
        axial = [_square_pixels(ct_array[z], spacing[1:], "bilinear", pixel_mm)]
        coronal = [_square_pixels(ct_array[::-1, y, :], (spacing[0], spacing[2]), "bilinear", pixel_mm)]
        if labels is not None:
            axial.append(_square_pixels(labels[z], spacing[1:], "nearest", pixel_mm))
            coronal.append(_square_pixels(labels[::-1, y, :], (spacing[0], spacing[2]), "nearest", pixel_mm))
        top = _render(axial[0], axial[1] if labels is not None else None)
        bottom = _render(coronal[0], coronal[1] if labels is not None else None)
        width = max(top.shape[1], bottom.shape[1])
        gap = np.full((4, width, 3), 255, dtype=np.uint8)
        columns.append(np.concatenate([_pad_width(top, width), gap, _pad_width(bottom, width)], axis=0))
    height = max(c.shape[0] for c in columns)
    columns = [np.pad(c, ((0, height - c.shape[0]), (0, 0), (0, 0)), constant_values=255) for c in columns]
    spacer = np.full((height, 4, 3), 255, dtype=np.uint8)
    parts = []
    for column in columns:
        parts += [column, spacer]
    return np.concatenate(parts[:-1], axis=1)


def _pad_width(picture: np.ndarray, width: int) -> np.ndarray:
    return np.pad(picture, ((0, 0), (0, width - picture.shape[1]), (0, 0)), constant_values=255)


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    from .io import write_image_atomic

    write_image_atomic(sitk.GetImageFromArray(rgb, isVector=True), path, compress=False)


def _scale_bar(rgb: np.ndarray, pixel_mm: float, length_mm: float = 50.0) -> np.ndarray:
    """Draw a white bar of ``length_mm`` with a dark outline near the bottom-left corner."""
    out = rgb.copy()
    length = int(round(length_mm / pixel_mm))
    if length + 16 > out.shape[1] or out.shape[0] < 20:
        return out
    r0, c0 = out.shape[0] - 12, 8
    out[r0 - 1 : r0 + 5, c0 - 1 : c0 + length + 1] = 0
    out[r0 : r0 + 4, c0 : c0 + length] = 255
    for tick in (c0, c0 + length - 2):
        out[r0 - 6 : r0, tick : tick + 2] = 255
    return out


def montage(
    ct: sitk.Image, labels: sitk.Image, center_zyx: Sequence[int] | None = None, pixel_mm: float = 1.0
) -> np.ndarray:
    """Axial, coronal and sagittal slices through ``center_zyx`` (a canonical voxel; default: the centre of
    the foreground) side by side, CT with the labels over it, each with a 5 cm scale bar.

    Axial: patient's right on the left, anterior up; coronal: right on the left, superior up; sagittal:
    anterior on the left, superior up.
    """
    ct_array, spacing = _canonical(ct)
    lab = _canonical(labels)[0]
    if center_zyx is None:
        center_zyx = [int(np.median(a)) for a in np.nonzero(lab)] if lab.any() else [n // 2 for n in lab.shape]
    z, y, x = (int(v) for v in center_zyx)
    planes = [
        (ct_array[z], lab[z], spacing[1:]),
        (ct_array[::-1, y, :], lab[::-1, y, :], (spacing[0], spacing[2])),
        (ct_array[::-1, :, x], lab[::-1, :, x], (spacing[0], spacing[1])),
    ]
    panels = []
    for ct_plane, label_plane, plane_spacing in planes:
        gray = _square_pixels(ct_plane, plane_spacing, "bilinear", pixel_mm)
        overlay = _square_pixels(label_plane, plane_spacing, "nearest", pixel_mm)
        panels.append(_scale_bar(_render(gray, overlay), pixel_mm))
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    spacer = np.full((height, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], spacer, panels[1], spacer, panels[2]], axis=1)
