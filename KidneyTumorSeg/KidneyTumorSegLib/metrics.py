"""KiTS19 metrics and physical measures.

Dice follows the official KiTS19 evaluation (``starter_code/evaluation.py`` in the kits19 repository):
prediction and reference must have the same array shape, nothing is resampled and the affine is ignored;
"kidney" Dice is computed on label > 0 (kidney and tumor together against background) and tumor Dice on
label > 1.

One deliberate difference: when both masks are empty the official code divides 0 by 0 and gets NaN.
Here that case returns 1.0 (the prediction agrees perfectly: there is nothing and nothing was found),
so that a mean over cases stays defined and JSON output stays valid. ``both_empty`` in the result says
when that rule was used.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

LABEL_NAMES = {1: "kidney", 2: "tumor"}


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty (see the module docstring)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"shapes differ: prediction {prediction.shape}, reference {reference.shape}")
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(reference))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & reference)) / total


def kits19_dice(prediction: np.ndarray, reference: np.ndarray) -> dict:
    """``kidney_dice`` (label > 0), ``tumor_dice`` (label > 1), their mean (the challenge's ranking score),
    and which classes were empty in both."""
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference must have the same shape (the KiTS19 metric resamples nothing): "
            f"{prediction.shape} vs {reference.shape}"
        )
    result = {}
    both_empty = []
    for name, threshold in (("kidney", 0), ("tumor", 1)):
        p = prediction > threshold
        r = reference > threshold
        if not p.any() and not r.any():
            both_empty.append(name)
        result[f"{name}_dice"] = dice(p, r)
    result["composite_dice"] = (result["kidney_dice"] + result["tumor_dice"]) / 2
    result["both_empty"] = both_empty
    return result


def label_counts(labels: np.ndarray, minlength: int, chunk: int = 1 << 24) -> np.ndarray:
    """``np.bincount(labels.ravel(), minlength)`` in chunks: bincount turns its input into 8-byte integers,
    which for a whole CT's label map would be a gigabyte or more."""
    flat = labels.reshape(-1)
    counts = np.zeros(minlength, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        part = np.bincount(flat[start : start + chunk], minlength=minlength)
        if part.size > counts.size:
            part, counts = part, np.pad(counts, (0, part.size - counts.size))
        counts[: part.size] += part
    return counts


SPLIT_LABEL_NAMES = {1: "kidney_right", 2: "tumor", 3: "kidney_left"}


def label_volumes_ml(labels: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """Volume in mL of each named label (kidney: label 1 only, tumor: label 2); spacing in mm, any order.
    Labels split by side (any voxel of value 3) give ``kidney_right``, ``tumor`` and ``kidney_left``."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = label_counts(labels, 4)
    names = SPLIT_LABEL_NAMES if counts[3] else LABEL_NAMES
    return {name: float(counts[value]) * voxel_ml for value, name in names.items()}


def format_volumes(volumes: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f} mL" for name, value in volumes.items())
