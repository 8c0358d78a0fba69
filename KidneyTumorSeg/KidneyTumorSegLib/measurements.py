"""Measurements of a case from its labels on the input grid, in physical units.

Per side: kidney volume. Per tumor (26-connected component of the tumor label, largest first): side,
volume, largest 3D diameter, axial long and short axis, tumor-to-kidney volume ratio, and the parts of the
R.E.N.A.L. nephrometry score that geometry allows. How each figure is computed:

* **Volume**: voxel count times voxel volume (mL).
* **Largest 3D diameter**: the largest distance between the centres of two boundary voxels of the tumor.
  Candidate end points are the extreme boundary voxels along 256 directions spread over the sphere; the
  exact maximum is taken among them. Over so many pairs the farthest centres lie close to the true
  surface: on voxelised spheres the result is within half a voxel of the true diameter (tested).
* **Axial long and short axis** (RECIST-style): slices along the array axis closest to the patient's
  superior-inferior axis. The long axis is the largest in-plane diameter over all slices (as above, with
  180 directions); the short axis is, in that slice, the longest chord perpendicular to it, edge to edge
  (the extent of one strip of pixels plus one pixel step).
* **Tumor-to-kidney volume ratio**: the tumor's volume over the volume of its kidney's label (the
  kidney it is assigned to by ``laterality``).
* **R** (radius): the largest 3D diameter; 1 when <= 4 cm, 2 between, 3 when >= 7 cm.
* **E** (exophytic): the share of the tumor outside the kidney's outline, where the outline is the 3D
  convex hull of that kidney's voxels (tumor excluded; it bridges the renal hilum), as the intersection
  of its supporting half-spaces in 2000 directions and along the kidney's principal axes. 1 when >= 50 %
  outside, 2 when partly outside, 3 when entirely inside (less than 1 % outside).
* **A** (anterior/posterior): the tumor's centroid against its kidney's centroid along the patient's
  anterior-posterior axis; "a" or "p" when they differ by more than 5 mm, else "x".
* **L** (location against the polar lines): the renal sinus is not segmented, so the polar lines are
  taken at one and two thirds of the kidney's craniocaudal extent (an approximation, stated in the
  output). 1 when the tumor lies entirely above the upper or below the lower line; 3 when more than half
  of it lies between the lines or it crosses the kidney's axial midline; 2 otherwise.
* **N** (nearness to the collecting system): not computed. The model does not segment the collecting
  system, and a guess would look like a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from .laterality import LEFT_KIDNEY, RIGHT_KIDNEY, TUMOR, index_to_lps_matrix, split_kidneys
from .metrics import label_counts

EXOPHYTIC_NONE = 0.01  # below this share outside, the tumor counts as entirely endophytic
AP_MARGIN_MM = 5.0
POLAR_LINE_NOTE = (
    "polar lines taken at 1/3 and 2/3 of the kidney's craniocaudal extent (the renal sinus is not segmented)"
)
N_NOTE = "not computed: needs the collecting system, which the model does not segment"


@dataclass
class RenalComponent:
    score: int | str | None
    value: float | None
    how: str


@dataclass
class TumorMeasurement:
    tumor: int  # 1 = largest
    side: str
    volume_ml: float
    largest_diameter_mm: float
    axial_long_axis_mm: float
    axial_short_axis_mm: float
    tumor_to_kidney_volume_ratio: float | None
    centroid_lps_mm: list[float]
    renal: dict[str, RenalComponent]
    renal_partial_score: int | None  # R + E + L when all three are known (N not included)


@dataclass
class CaseMeasurements:
    kidney_volume_ml: dict[str, float]
    tumor_count: int
    tumor_volume_ml: float
    tumor_to_kidney_volume_ratio: float | None
    tumors: list[TumorMeasurement]
    laterality_method: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return _rounded(data)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- geometry


def _fibonacci_directions(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (mask padded with background)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (1, -1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _largest_distance(points: np.ndarray, directions: np.ndarray) -> tuple[float, np.ndarray]:
    """(largest distance between two of ``points`` (n, d), unit vector between them); exact among the
    extreme points along ``directions``."""
    if len(points) < 2:
        return 0.0, directions[0]
    projections = points @ directions.T
    candidates = np.unique(np.concatenate([projections.argmax(axis=0), projections.argmin(axis=0)]))
    pts = points[candidates]
    diff = pts[:, None, :] - pts[None, :, :]
    dist = np.linalg.norm(diff, axis=2)
    i, j = np.unravel_index(int(dist.argmax()), dist.shape)
    d = float(dist[i, j])
    return d, (diff[i, j] / d if d > 0 else directions[0])


def _voxel_width(edges: np.ndarray, unit: np.ndarray) -> float:
    """The length of one voxel step along ``unit``: 1 / |unit in voxel units| (``edges``: the voxel's edge
    vectors as rows, mm). The spacing itself along an index axis."""
    in_voxels = np.linalg.lstsq(edges.T, unit, rcond=None)[0]
    return float(1.0 / max(np.linalg.norm(in_voxels), 1e-12))


# ------------------------------------------------------------------------------------------- the case


class _Geometry:
    def __init__(self, image: sitk.Image) -> None:
        a, origin = index_to_lps_matrix(image)
        # Columns of a are the SimpleITK (x, y, z) index axes; array axes (z, y, x) are them reversed.
        self.edges_zyx = a.T[::-1]  # row k: the LPS vector of one step along array axis k
        self.origin = origin
        self.voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        # The array axis closest to the patient's superior-inferior axis: its slices are (near-)axial.
        self.axial_axis = int(np.argmax(np.abs(self.edges_zyx[:, 2]) / np.linalg.norm(self.edges_zyx, axis=1)))

    def lps(self, zyx: np.ndarray) -> np.ndarray:
        """(n, 3) LPS mm of (n, 3) array indices."""
        return self.origin + zyx @ self.edges_zyx


def measure(
    labels: np.ndarray, image: sitk.Image, ct: np.ndarray | None = None, split: np.ndarray | None = None
) -> CaseMeasurements:
    """Measure a case: ``labels`` (z, y, x) on ``image``'s grid, 0/1/2 (``split`` (1 right, 2 tumor, 3 left)
    when already made, else it is made here with ``laterality.split_kidneys`` and ``ct``)."""
    geometry = _Geometry(image)
    notes: list[str] = []
    warnings: list[str] = []
    if split is None:
        sides = split_kidneys(labels, image, ct)
        split, method = sides.labels, sides.method
        notes += sides.notes
        warnings += sides.warnings
    else:
        method = "the labels' own left/right values"
    counts = label_counts(split, 4)
    kidney_ml = {"right": counts[RIGHT_KIDNEY] * geometry.voxel_ml, "left": counts[LEFT_KIDNEY] * geometry.voxel_ml}

    components = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray((split == TUMOR).astype(np.uint8)), True)
    )
    sizes = np.bincount(components.ravel())
    order = [int(c) for c in np.argsort(-sizes) if c != 0 and sizes[c] > 0]
    kidneys = {side: np.argwhere(split == value) for side, value in (("right", RIGHT_KIDNEY), ("left", LEFT_KIDNEY))}
    tumors = [
        _measure_tumor(rank, np.argwhere(components == c), split, kidneys, geometry)
        for rank, c in enumerate(order, start=1)
    ]
    total_tumor = sum(t.volume_ml for t in tumors)
    total_kidney = kidney_ml["right"] + kidney_ml["left"]
    if tumors:
        notes.append("L: " + POLAR_LINE_NOTE)
        notes.append("N: " + N_NOTE)
    return CaseMeasurements(
        kidney_volume_ml=kidney_ml,
        tumor_count=len(tumors),
        tumor_volume_ml=total_tumor,
        tumor_to_kidney_volume_ratio=(total_tumor / total_kidney) if total_kidney > 0 else None,
        tumors=tumors,
        laterality_method=method,
        notes=notes,
        warnings=warnings,
    )


def _measure_tumor(
    rank: int, voxels: np.ndarray, split: np.ndarray, kidneys: dict[str, np.ndarray], geometry: _Geometry
) -> TumorMeasurement:
    # Side: the kidney whose voxels are nearest (by the laterality split, tumors keep their side's
    # kidney as neighbours); decided by the majority of tumor voxels' 26-neighbours.
    lo = np.maximum(voxels.min(axis=0) - 1, 0)
    hi = np.minimum(voxels.max(axis=0) + 2, split.shape)
    box = split[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    near_right = int(np.count_nonzero(box == RIGHT_KIDNEY))
    near_left = int(np.count_nonzero(box == LEFT_KIDNEY))
    points = geometry.lps(voxels.astype(float))
    centroid = points.mean(axis=0)
    if near_right == near_left:  # touches no kidney: the nearer kidney centroid decides
        dist = {
            side: np.linalg.norm(geometry.lps(k.mean(axis=0)) - centroid) if len(k) else np.inf
            for side, k in kidneys.items()
        }
        side = min(dist, key=dist.get)
    else:
        side = "right" if near_right > near_left else "left"
    kidney = kidneys[side]

    volume = len(voxels) * geometry.voxel_ml
    mask = np.zeros(tuple(hi - lo), dtype=bool)
    mask[tuple((voxels - lo).T)] = True
    boundary = np.argwhere(_boundary(mask)) + lo
    diameter, _ = _largest_distance(geometry.lps(boundary.astype(float)), _fibonacci_directions(256))
    long_axis, short_axis = _axial_axes(voxels, geometry)

    renal: dict[str, RenalComponent] = {}
    cm = diameter / 10.0
    renal["R"] = RenalComponent(
        1 if cm <= 4 else (3 if cm >= 7 else 2), round(diameter, 1), "largest 3D diameter (mm): <=40 1, >=70 3"
    )
    outside = _share_outside(voxels, kidney, geometry)
    renal["E"] = RenalComponent(
        1 if outside >= 0.5 else (3 if outside < EXOPHYTIC_NONE else 2),
        round(outside, 3),
        "share of the tumor outside the kidney's outline (the 3D convex hull of the kidney voxels)",
    )
    if len(kidney):
        kidney_centroid = geometry.lps(kidney.astype(float).mean(axis=0))
        offset = float(centroid[1] - kidney_centroid[1])  # LPS y: + posterior
        ap = "p" if offset > AP_MARGIN_MM else ("a" if offset < -AP_MARGIN_MM else "x")
        renal["A"] = RenalComponent(ap, round(offset, 1), "tumor centroid minus kidney centroid, posterior + (mm)")
        renal["L"] = _polar_location(points[:, 2], geometry.lps(kidney.astype(float))[:, 2])
    else:
        renal["A"] = RenalComponent(None, None, "no kidney voxels on this side")
        renal["L"] = RenalComponent(None, None, "no kidney voxels on this side")
    renal["N"] = RenalComponent(None, None, N_NOTE)
    scores = [renal[k].score for k in ("R", "E", "L")]
    partial = sum(scores) if all(isinstance(s, int) for s in scores) else None  # type: ignore[arg-type]
    kidney_ml = len(kidney) * geometry.voxel_ml
    return TumorMeasurement(
        tumor=rank,
        side=side,
        volume_ml=volume,
        largest_diameter_mm=diameter,
        axial_long_axis_mm=long_axis,
        axial_short_axis_mm=short_axis,
        tumor_to_kidney_volume_ratio=(volume / kidney_ml) if kidney_ml > 0 else None,
        centroid_lps_mm=[float(v) for v in centroid],
        renal=renal,
        renal_partial_score=partial,
    )


def _axial_axes(voxels: np.ndarray, geometry: _Geometry) -> tuple[float, float]:
    axis = geometry.axial_axis
    in_plane = [a for a in range(3) if a != axis]
    edges = geometry.edges_zyx[in_plane]  # (2, 3): LPS vectors of the two in-plane index steps
    directions = np.stack([np.cos(t := np.linspace(0, np.pi, 180, endpoint=False)), np.sin(t)], axis=1)
    # In-plane coordinates in mm along an orthonormal basis of the slice plane.
    basis_u = edges[0] / np.linalg.norm(edges[0])
    basis_v = edges[1] - (edges[1] @ basis_u) * basis_u
    basis_v /= np.linalg.norm(basis_v)
    basis = np.stack([basis_u, basis_v])  # (2, 3)
    pixel_edges = edges @ basis.T  # (2, 2): one in-plane step along each index axis, in plane coordinates
    best = (0.0, 0.0)
    for index in np.unique(voxels[:, axis]):
        pixels = voxels[voxels[:, axis] == index][:, in_plane].astype(float)
        plane = pixels @ pixel_edges
        length, unit = _largest_distance(plane, directions)
        if length > best[0]:
            perpendicular = np.array([-unit[1], unit[0]])
            along = plane @ unit
            across = plane @ perpendicular
            # Longest chord perpendicular to the long axis: group pixels into strips along the long axis.
            strip = max(1e-6, float(np.abs(pixel_edges @ unit).max()))
            bins = np.floor((along - along.min()) / strip).astype(int)
            widths = [across[bins == b].max() - across[bins == b].min() for b in np.unique(bins)]
            short = float(max(widths)) + _voxel_width(pixel_edges, perpendicular)
            best = (length, min(short, length))
    return best


def _share_outside(tumor: np.ndarray, kidney: np.ndarray, geometry: _Geometry) -> float:
    """Share of tumor voxels outside the kidney's convex hull (kidney voxels only, tumor excluded).

    The hull is taken as the intersection of its supporting half-spaces along 2000 directions spread over
    the sphere, plus the kidney's own principal axes and the patient and grid axes (both ways), with voxel
    centres widened to voxel edges. For a smooth outline this is the hull to a fraction of a millimetre;
    the principal axes make it exact for flat faces across them too.
    """
    if len(kidney) == 0:
        return 1.0
    kidney_points = geometry.lps(_boundary_points(kidney).astype(float))
    centred = kidney_points - kidney_points.mean(axis=0)
    principal = np.linalg.svd(centred, full_matrices=False)[2] if len(kidney_points) >= 3 else np.eye(3)
    grid_axes = geometry.edges_zyx / np.linalg.norm(geometry.edges_zyx, axis=1, keepdims=True)
    axes = np.concatenate([principal, np.eye(3), grid_axes])
    directions = np.concatenate([_fibonacci_directions(2000), axes, -axes])
    half_width = 0.5 * np.abs(geometry.edges_zyx @ directions.T).sum(axis=0)  # per direction
    support = (kidney_points @ directions.T).max(axis=0) + half_width
    points = geometry.lps(tumor.astype(float))
    outside = 0
    for start in range(0, len(points), 20000):
        chunk = points[start : start + 20000] @ directions.T
        outside += int(np.count_nonzero((chunk > support).any(axis=1)))
    return outside / len(tumor)


def _boundary_points(voxels: np.ndarray) -> np.ndarray:
    """The voxels of a set (n, 3 array indices) that have a 6-neighbour outside it: its hull is theirs."""
    lo = voxels.min(axis=0)
    mask = np.zeros(tuple(voxels.max(axis=0) - lo + 1), dtype=bool)
    mask[tuple((voxels - lo).T)] = True
    return np.argwhere(_boundary(mask)) + lo


def _polar_location(tumor_z: np.ndarray, kidney_z: np.ndarray) -> RenalComponent:
    lo, hi = float(kidney_z.min()), float(kidney_z.max())
    lower, upper, middle = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3, (lo + hi) / 2
    between = float(np.mean((tumor_z >= lower) & (tumor_z <= upper)))
    crosses_middle = bool(tumor_z.min() < middle < tumor_z.max())
    if between > 0.5 or crosses_middle:
        score = 3
    elif between == 0.0 and (tumor_z.min() > upper or tumor_z.max() < lower):
        score = 1
    else:
        score = 2
    return RenalComponent(score, round(between, 3), "share of the tumor between the polar lines; " + POLAR_LINE_NOTE)
