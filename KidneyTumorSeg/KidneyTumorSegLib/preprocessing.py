"""From a CT on its own grid to the network's input, and back.

The network always sees the volume in one canonical orientation (array axes z, y, x running toward
patient Superior, Posterior, Left: SimpleITK's identity direction in LPS), at the model's spacing, with
intensities clipped and normalised as the model file says.

Geometry is exact by construction: reorientation only permutes and flips array axes (no interpolation,
oblique directions are kept, not rotated), and resampling maps voxel centres so that the model grid
covers the same physical box as the input grid. ``ModelGrid`` records both maps, so labels come back onto
exactly the input grid, voxel for voxel. Training uses these same functions, so what is trained is what
is run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Orientation:
    """How the input array maps onto the canonical array: canonical axis ``a`` is input array axis
    ``permutation[a]``, reversed when ``flips[a]``."""

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """A view (no copy) of ``array`` (z, y, x) in canonical orientation."""
        out = np.transpose(array, self.permutation)
        slices = tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)
        return out[slices]

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """The inverse of ``to_canonical``: a view of a canonical array in the input's array order."""
        slices = tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)
        return np.transpose(array[slices], np.argsort(self.permutation))

    def canonical_spacing(self, image: sitk.Image) -> tuple[float, float, float]:
        spacing_zyx = tuple(reversed(image.GetSpacing()))
        return tuple(float(spacing_zyx[p]) for p in self.permutation)


def canonical_orientation(image: sitk.Image) -> Orientation:
    """The axis permutation and flips that bring ``image`` closest to the LPS-aligned canonical layout.

    Chooses, among the six permutations, the one whose axes align best with the patient axes (largest sum
    of |cosines|), so that an oblique scan goes to its nearest canonical layout without resampling.
    """
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: index axes in LPS
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(direction[row, perm[row]]) for row in range(3)),
    )
    # best[row] is the SimpleITK (x, y, z) index axis that runs along patient axis ``row`` (L, P, S).
    # Array axes are reversed: array axis a <-> SimpleITK axis 2 - a, patient axis 2 - a.
    permutation = tuple(2 - best[2 - a] for a in range(3))
    flips = tuple(bool(direction[2 - a, best[2 - a]] < 0) for a in range(3))
    return Orientation(permutation, flips)  # type: ignore[arg-type]


@dataclass(frozen=True)
class IntensityNormalization:
    """CT intensities clipped to [clip_low, clip_high] HU, then z-scored with (mean, std)."""

    clip_low: float
    clip_high: float
    mean: float
    std: float

    def apply_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Normalise a float tensor in place and return it."""
        return tensor.clamp_(self.clip_low, self.clip_high).sub_(self.mean).div_(self.std)

    @property
    def background_value(self) -> float:
        """What air becomes after normalisation: the value to pad with."""
        return (self.clip_low - self.mean) / self.std


@dataclass(frozen=True)
class ModelGrid:
    """The canonical input grid and the model grid that covers the same physical box."""

    orientation: Orientation
    input_shape: tuple[int, int, int]  # canonical (z, y, x)
    input_spacing: tuple[float, float, float]  # canonical (z, y, x) mm
    model_shape: tuple[int, int, int]

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        return tuple(s * n / m for s, n, m in zip(self.input_spacing, self.input_shape, self.model_shape, strict=True))


def model_grid_for(image: sitk.Image, target_spacing_zyx: Sequence[float]) -> ModelGrid:
    orientation = canonical_orientation(image)
    spacing = orientation.canonical_spacing(image)
    shape_zyx = tuple(reversed(image.GetSize()))
    shape = tuple(int(shape_zyx[p]) for p in orientation.permutation)
    model_shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing_zyx, strict=True))
    return ModelGrid(orientation, shape, spacing, model_shape)  # type: ignore[arg-type]


def _source_positions(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis, voxel centres aligned (align_corners=False), edges clamped:
    for each output index the two source indices and the weight of the second."""
    pos = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    pos = np.clip(pos, 0.0, in_size - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def _lerp_z(block: torch.Tensor, i0: np.ndarray, i1: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``block`` (C, Z, Y, X) along z at the given source slices and weights."""
    device = block.device
    lo = block.index_select(1, torch.from_numpy(i0).to(device))
    hi = block.index_select(1, torch.from_numpy(i1).to(device))
    return torch.lerp(lo, hi, torch.from_numpy(w).to(device).view(1, -1, 1, 1))


def _aligned_crop(in_size: int, out_size: int, out_lo: int, out_hi: int) -> tuple[int, int, int, int]:
    """A crop of one axis that resamples exactly like the whole axis.

    Resampling ``in_size`` voxels to ``out_size`` with aligned voxel centres maps output index ``o`` to
    source position ``(o + 0.5) * in/out - 0.5``. A crop reproduces that map when it starts on a multiple
    of the ratio's denominator (q output voxels = p input voxels) and keeps the ratio. Returns
    (in_lo, in_hi, out_lo, out_hi) covering [out_lo, out_hi) with one period of margin, so that every
    interpolation reads the same neighbours as on the whole axis.
    """
    g = math.gcd(in_size, out_size)
    p, q = in_size // g, out_size // g
    first = max(0, out_lo // q - 1)
    last = min(g, -(-out_hi // q) + 1)
    return first * p, last * p, first * q, last * q


def _resample_plane(block: torch.Tensor, size_yx: tuple[int, int], crop_yx=None) -> torch.Tensor:
    """Bilinear in-plane resampling of (C, S, Y, X) to ``size_yx`` (aligned voxel centres, edges clamped),
    or to the output window ``crop_yx = ((y0, y1), (x0, x1))`` of it."""
    if crop_yx is None:
        if tuple(block.shape[2:]) == tuple(size_yx):
            return block
        return F.interpolate(block, size=size_yx, mode="bilinear", align_corners=False)
    (y0, y1), (x0, x1) = crop_yx
    ya0, ya1, yb0, yb1 = _aligned_crop(block.shape[2], size_yx[0], y0, y1)
    xa0, xa1, xb0, xb1 = _aligned_crop(block.shape[3], size_yx[1], x0, x1)
    part = block[:, :, ya0:ya1, xa0:xa1]
    if part.shape[2:] != (yb1 - yb0, xb1 - xb0):
        part = F.interpolate(part, size=(yb1 - yb0, xb1 - xb0), mode="bilinear", align_corners=False)
    return part[:, :, y0 - yb0 : y1 - yb0, x0 - xb0 : x1 - xb0]


def image_to_model_input(
    image: sitk.Image, grid: ModelGrid, normalization: IntensityNormalization, slab_bytes: int = 64 << 20
) -> torch.Tensor:
    """The normalised (Z, Y, X) float32 tensor on the model grid.

    Works slab by slab along the output z axis, so memory stays near one float copy of the model grid
    plus one slab of the input, whatever the input size. Linear along z then bilinear in-plane is exactly
    trilinear interpolation.
    """
    source = grid.orientation.to_canonical(sitk.GetArrayViewFromImage(image))
    out = torch.empty(grid.model_shape, dtype=torch.float32)
    z_src = _source_positions(grid.model_shape[0], grid.input_shape[0])
    slice_bytes = 4 * grid.input_shape[1] * grid.input_shape[2]
    step = max(1, slab_bytes // max(1, 2 * slice_bytes))
    for start in range(0, grid.model_shape[0], step):
        rows = slice(start, min(start + step, grid.model_shape[0]))
        first, last = int(z_src[0][rows].min()), int(z_src[1][rows].max())
        block = torch.from_numpy(np.array(source[first : last + 1], dtype=np.float32)).unsqueeze(0)
        slab = _lerp_z(block, z_src[0][rows] - first, z_src[1][rows] - first, z_src[2][rows])
        out[rows] = _resample_plane(slab, grid.model_shape[1:])[0]
    return normalization.apply_(out)


def labels_to_model_grid(labels: sitk.Image, grid: ModelGrid, num_classes: int = 3) -> np.ndarray:
    """A label map (on the grid ``grid`` was made from) resampled to the model grid, uint8 (Z, Y, X).

    Each class's mask is interpolated trilinearly and the largest wins, which keeps thin structures better
    than nearest neighbour does. Training uses this to put reference labels on the grid the network sees.
    """
    source = grid.orientation.to_canonical(sitk.GetArrayViewFromImage(labels))
    out = np.empty(grid.model_shape, dtype=np.uint8)
    z_src = _source_positions(grid.model_shape[0], grid.input_shape[0])
    classes = torch.arange(num_classes, dtype=torch.uint8).view(-1, 1, 1, 1)
    slice_bytes = 4 * num_classes * grid.input_shape[1] * grid.input_shape[2]
    step = max(1, (64 << 20) // max(1, 2 * slice_bytes))
    for start in range(0, grid.model_shape[0], step):
        rows = slice(start, min(start + step, grid.model_shape[0]))
        first, last = int(z_src[0][rows].min()), int(z_src[1][rows].max())
        block = torch.from_numpy(np.array(source[first : last + 1], dtype=np.uint8))
        one_hot = (block.unsqueeze(0) == classes).float()
        slab = _lerp_z(one_hot, z_src[0][rows] - first, z_src[1][rows] - first, z_src[2][rows])
        out[rows] = _resample_plane(slab, grid.model_shape[1:]).argmax(dim=0).to(torch.uint8).numpy()
    return out


def _needed_range(i0: np.ndarray, i1: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """The output indices whose interpolation reads any source index in [lo, hi)."""
    hit = np.flatnonzero((i1 >= lo) & (i0 < hi))
    return (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0)


def logits_to_input_labels(logits: torch.Tensor, grid: ModelGrid, slab_bytes: int = 64 << 20) -> np.ndarray:
    """Labels (uint8) on the input grid, in the input's own array order, from model-grid logits (C, Z, Y, X).

    Logits are interpolated trilinearly to the input grid and reduced to labels slab by slab: at no time
    does a full-resolution float map of all classes exist. Only the box around model voxels that are not
    background is interpolated: a convex combination of logit vectors that all favour background favours
    background too, so everything outside that box is background exactly.
    """
    channels = logits.shape[0]
    labels = np.zeros(grid.input_shape, dtype=np.uint8)
    foreground = logits.argmax(dim=0) > 0
    if not bool(foreground.any()):
        return np.ascontiguousarray(grid.orientation.from_canonical(labels))
    positions = [_source_positions(n, m) for n, m in zip(grid.input_shape, grid.model_shape, strict=True)]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(foreground.any(dim=other[1]).any(dim=other[0]))
        box.append(_needed_range(positions[axis][0], positions[axis][1], int(hit.min()), int(hit.max()) + 1))
    (z0, z1), (y0, y1), (x0, x1) = box
    z_src = positions[0]
    step = max(1, slab_bytes // max(1, 4 * channels * (y1 - y0) * (x1 - x0)))
    for start in range(z0, z1, step):
        rows = slice(start, min(start + step, z1))
        first, last = int(z_src[0][rows].min()), int(z_src[1][rows].max())
        slab = _lerp_z(
            logits[:, first : last + 1].float(), z_src[0][rows] - first, z_src[1][rows] - first, z_src[2][rows]
        )
        slab = _resample_plane(slab, grid.input_shape[1:], ((y0, y1), (x0, x1)))
        labels[rows, y0:y1, x0:x1] = slab.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(grid.orientation.from_canonical(labels))


def labels_like(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label image carrying exactly the reference's grid (size, spacing, origin, direction)."""
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(reference)
    return out
