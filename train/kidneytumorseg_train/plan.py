"""The dataset fingerprint and the training plan made from it.

Conventions: every spacing, shape and patch size is in array order (z, y, x) of the core's CANONICAL orientation
(``KidneyTumorSegLib.preprocessing``: z toward Superior, y Posterior, x Left), which is the order the network
sees. KiTS files are stored IPL, so SimpleITK's raw spacing of a KiTS image, (z, y, x) in index order, is
reversed relative to SimpleITK's usual (x, y, z) and neither is canonical: always go through
``canonical_orientation(image).canonical_spacing(image)``.

The plan follows nnU-Net's defaults for CT: target spacing = the median spacing per axis; patch = the median
case shape at that spacing, shrunk to ``max_patch_voxels`` keeping its proportions and rounded down to multiples
of the network's divisor; intensities clipped to the 0.5 and 99.5 percentiles of the foreground voxels, then
z-scored with the mean and standard deviation of the (unclipped) foreground voxels.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.io import publish
from KidneyTumorSegLib.preprocessing import IntensityNormalization

from .datasets import (
    CLASS_NAMES,
    Case,
    LabelMapping,
    canonical_geometry,
    failures_message,
    map_cases,
    read_case,
    read_json,
)
from .errors import ConfigError, DatasetError

__all__ = ["Plan", "fingerprint", "load_plan", "make_plan", "save_plan", "write_json_atomic"]

FORMAT_VERSION = 1
SAMPLES_PER_CASE = 10_000
DEFAULT_DIVISOR = (4, 8, 8)
DEFAULT_MAX_PATCH_VOXELS = 80 * 160 * 160


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file beside ``path`` and a rename: the file is either
    complete or untouched. Creates missing parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        publish(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# ----------------------------------------------------------------------------------------------------
# Fingerprint


def _case_fingerprint(item: tuple[Case, LabelMapping], samples: int, seed: int) -> dict[str, Any]:
    case, mapping = item
    image, labels = read_case(case, mapping)
    shape, spacing = canonical_geometry(image)
    lab = sitk.GetArrayViewFromImage(labels).reshape(-1)
    voxels = {name: int(np.count_nonzero(lab == c)) for c, name in enumerate(CLASS_NAMES)}
    foreground = np.flatnonzero(lab > 0)
    rng = np.random.default_rng([seed, zlib.crc32(case.case_id.encode())])
    if foreground.size > samples:
        foreground = np.sort(rng.choice(foreground, samples, replace=False))
    values = sitk.GetArrayViewFromImage(image).reshape(-1)[foreground].astype(np.float64)
    return {
        "case_id": case.case_id,
        "shape_zyx": [int(n) for n in shape],
        "spacing_zyx": [float(s) for s in spacing],
        "class_voxels": voxels,
        "sample": values,  # removed by ``fingerprint`` after pooling
    }


def fingerprint(
    cases: Sequence[Case],
    mapping: LabelMapping,
    workers: int = 1,
    samples_per_case: int = SAMPLES_PER_CASE,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """What the plan needs to know about a dataset (JSON-serialisable).

    Per case: canonical shape and spacing (z, y, x), voxels per class. Over the foreground (class > 0): up to
    ``samples_per_case`` voxel intensities per case, drawn with a seeded generator, pooled into percentiles
    0.5 and 99.5, mean and standard deviation. Plus the median spacing and shape per axis. Every unreadable
    case is listed in one ``DatasetError``.
    """
    if not cases:
        raise DatasetError("the dataset holds no cases; there is nothing to fingerprint.")
    if isinstance(samples_per_case, bool) or not isinstance(samples_per_case, int) or samples_per_case < 1:
        raise ConfigError(f"samples_per_case must be a positive integer, not {samples_per_case!r}.")
    function = partial(_case_fingerprint, samples=samples_per_case, seed=int(seed))
    results = map_cases(function, [(c, mapping) for c in cases], workers, progress, "fingerprint")
    message = failures_message("to be read", cases, results)
    if message:
        raise DatasetError(message)
    per_case = [r for _, r in results]
    pooled = np.concatenate([r.pop("sample") for r in per_case])
    if pooled.size == 0:
        raise DatasetError(
            "no case has any kidney or tumor voxel; check the label files and the label mapping "
            f"({mapping.describe()})."
        )
    lo, hi = (float(v) for v in np.percentile(pooled, [0.5, 99.5]))
    return {
        "format_version": FORMAT_VERSION,
        "num_cases": len(per_case),
        "label_mapping": mapping.to_json(),
        "median_spacing_zyx": [float(v) for v in np.median([r["spacing_zyx"] for r in per_case], axis=0)],
        "median_shape_zyx": [float(v) for v in np.median([r["shape_zyx"] for r in per_case], axis=0)],
        "foreground_intensity": {
            "percentile_00_5": lo,
            "percentile_99_5": hi,
            "mean": float(pooled.mean()),
            "std": float(pooled.std()),
            "min": float(pooled.min()),
            "max": float(pooled.max()),
            "samples": int(pooled.size),
            "samples_per_case": samples_per_case,
            "seed": int(seed),
        },
        "cases": per_case,
    }


# ----------------------------------------------------------------------------------------------------
# Plan


@dataclass
class Plan:
    """How the cases are preprocessed and how big the training patches are (all z, y, x canonical)."""

    target_spacing_zyx: tuple[float, float, float]
    patch_size_zyx: tuple[int, int, int]
    clip_hu: tuple[float, float]
    mean: float
    std: float
    divisor: tuple[int, int, int] = DEFAULT_DIVISOR
    # Source label value (a string, as in JSON) -> class 0/1/2; empty when unknown.
    label_mapping: dict[str, int] = field(default_factory=dict)
    # The median case shape at the target spacing (what the patch size was made from); None when unknown.
    median_shape_zyx: tuple[int, int, int] | None = None
    num_cases: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        checked = Plan.from_json(raw, "plan", _construct=False)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def normalization(self) -> IntensityNormalization:
        return IntensityNormalization(self.clip_hu[0], self.clip_hu[1], self.mean, self.std)

    def preprocessing_key(self) -> dict[str, Any]:
        """The part of the plan that decides the preprocessed arrays (not the patch size)."""
        data = self.to_json()
        return {k: data[k] for k in ("format_version", "target_spacing_zyx", "clip_hu", "mean", "std", "label_mapping")}

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "target_spacing_zyx": [float(v) for v in self.target_spacing_zyx],
            "patch_size_zyx": [int(v) for v in self.patch_size_zyx],
            "clip_hu": [float(v) for v in self.clip_hu],
            "mean": float(self.mean),
            "std": float(self.std),
            "divisor": [int(v) for v in self.divisor],
            "label_mapping": {str(k): int(v) for k, v in self.label_mapping.items()},
            "median_shape_zyx": None if self.median_shape_zyx is None else [int(v) for v in self.median_shape_zyx],
            "num_cases": int(self.num_cases),
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "plan", _construct: bool = True) -> Any:
        """A validated plan from its JSON form; ``ConfigError`` naming the first bad key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a plan is a JSON object, not {type(data).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(f"{source}: unknown key '{unknown[0]}' in the plan; the keys are {', '.join(known)}.")
        required = ("target_spacing_zyx", "patch_size_zyx", "clip_hu", "mean", "std")
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"{source}: the plan has no '{missing[0]}'; make the plan again.")

        def bad(key: str, what: str) -> ConfigError:
            return ConfigError(f"{source}: '{key}' must be {what}, not {data.get(key)!r}.")

        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: 'format_version' is {version!r}; this version of the training tools reads plans of "
                f"format {FORMAT_VERSION}. Make the plan again."
            )
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        out["target_spacing_zyx"] = _numbers(data["target_spacing_zyx"], 3, float, positive=True)
        if out["target_spacing_zyx"] is None:
            raise bad("target_spacing_zyx", "three positive spacings in mm (z, y, x)")
        out["divisor"] = _numbers(data.get("divisor", list(DEFAULT_DIVISOR)), 3, int, positive=True)
        if out["divisor"] is None:
            raise bad("divisor", "three positive integers (z, y, x)")
        out["patch_size_zyx"] = _numbers(data["patch_size_zyx"], 3, int, positive=True)
        if out["patch_size_zyx"] is None:
            raise bad("patch_size_zyx", "three positive integers (z, y, x)")
        if any(p % d for p, d in zip(out["patch_size_zyx"], out["divisor"], strict=True)):
            raise bad("patch_size_zyx", f"multiples of the divisor {out['divisor']}")
        out["clip_hu"] = _numbers(data["clip_hu"], 2, float)
        if out["clip_hu"] is None or not out["clip_hu"][0] < out["clip_hu"][1]:
            raise bad("clip_hu", "two finite numbers [low, high] with low < high")
        mean = _numbers([data["mean"]], 1, float)
        if mean is None:
            raise bad("mean", "a finite number")
        out["mean"] = mean[0]
        std = _numbers([data["std"]], 1, float, positive=True)
        if std is None:
            raise bad("std", "a positive finite number")
        out["std"] = std[0]
        labels = data.get("label_mapping", {})
        if not isinstance(labels, Mapping) or not all(
            str(k).strip().isdigit() and not isinstance(v, bool) and v in (0, 1, 2) for k, v in labels.items()
        ):
            raise bad("label_mapping", 'a mapping {"<label value>": 0, 1 or 2}')
        out["label_mapping"] = {str(int(k)): int(v) for k, v in labels.items()}
        median = data.get("median_shape_zyx")
        out["median_shape_zyx"] = None if median is None else _numbers(median, 3, int, positive=True)
        if median is not None and out["median_shape_zyx"] is None:
            raise bad("median_shape_zyx", "three positive integers or null")
        num_cases = data.get("num_cases", 0)
        if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 0:
            raise bad("num_cases", "an integer >= 0")
        out["num_cases"] = num_cases
        return cls(**out) if _construct else out


def _numbers(value: Any, count: int, kind: type, positive: bool = False) -> tuple | None:
    """``value`` as a tuple of ``count`` finite numbers of ``kind`` (> 0 when ``positive``), or None."""
    if not isinstance(value, Sequence | np.ndarray) or isinstance(value, str) or len(value) != count:
        return None
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            return None
        if kind is int:
            if not float(v).is_integer():
                return None
            v = int(v)
        else:
            v = float(v)
        if not math.isfinite(v) or (positive and v <= 0):
            return None
        out.append(v)
    return tuple(out)


def make_plan(
    fp: Mapping[str, Any],
    divisor: Sequence[int] = DEFAULT_DIVISOR,
    patch_size_zyx: Sequence[int] | None = None,
    target_spacing_zyx: Sequence[float] | None = None,
    max_patch_voxels: int = DEFAULT_MAX_PATCH_VOXELS,
) -> Plan:
    """The training plan for a fingerprint (see the module's docstring for the rules)."""
    if not isinstance(fp, Mapping) or not {"cases", "median_spacing_zyx", "foreground_intensity"} <= set(fp):
        raise ConfigError("make_plan needs a fingerprint from fingerprint() (cases, spacings, intensities).")
    div = _numbers(list(divisor), 3, int, positive=True)
    if div is None:
        raise ConfigError(f"divisor must be three positive integers (z, y, x), not {divisor!r}.")
    if isinstance(max_patch_voxels, bool) or not isinstance(max_patch_voxels, int) or max_patch_voxels < math.prod(div):
        raise ConfigError(
            f"max_patch_voxels must be an integer of at least {math.prod(div)} (one divisor {div}), "
            f"not {max_patch_voxels!r}."
        )
    if target_spacing_zyx is None:
        target = tuple(float(v) for v in fp["median_spacing_zyx"])
    else:
        target = _numbers(list(target_spacing_zyx), 3, float, positive=True)
        if target is None:
            raise ConfigError(
                f"target spacing must be three positive numbers in mm (z, y, x), not {target_spacing_zyx!r}."
            )
    resampled = [
        [n * s / t for n, s, t in zip(c["shape_zyx"], c["spacing_zyx"], target, strict=True)] for c in fp["cases"]
    ]
    median = np.median(np.array(resampled, dtype=float), axis=0)
    if patch_size_zyx is None:
        patch = _patch_from_shape(median, div, max_patch_voxels)
    else:
        patch = _numbers(list(patch_size_zyx), 3, int, positive=True)
        if patch is None or any(p % d for p, d in zip(patch, div, strict=True)):
            raise ConfigError(
                f"patch size must be three positive integers (z, y, x) that are multiples of the divisor {div}, "
                f"not {patch_size_zyx!r}."
            )
    intensity = fp["foreground_intensity"]
    lo, hi = float(intensity["percentile_00_5"]), float(intensity["percentile_99_5"])
    if not lo < hi:
        raise DatasetError(
            f"the foreground intensities are constant ({lo:g}); the images do not look like CT, or the labels do "
            "not match them."
        )
    std = float(intensity["std"])
    return Plan(
        target_spacing_zyx=target,
        patch_size_zyx=patch,
        clip_hu=(lo, hi),
        mean=float(intensity["mean"]),
        std=std if std > 0 else 1.0,
        divisor=div,
        label_mapping=dict(fp.get("label_mapping", {}).get("values", {})),
        median_shape_zyx=tuple(max(1, round(v)) for v in median),
        num_cases=int(fp.get("num_cases", len(fp["cases"]))),
    )


def _patch_from_shape(shape: np.ndarray, divisor: tuple[int, ...], max_voxels: int) -> tuple[int, int, int]:
    shape = np.maximum(np.asarray(shape, dtype=float), 1.0)
    if np.prod(shape) > max_voxels:
        shape = shape * (max_voxels / np.prod(shape)) ** (1.0 / 3.0)
    patch = [max(d, int(math.floor(s / d + 1e-9)) * d) for s, d in zip(shape, divisor, strict=True)]
    # An axis raised to one divisor can push the product over the limit: take divisors off the longest axis.
    while math.prod(patch) > max_voxels:
        axis = max((a for a in range(3) if patch[a] > divisor[a]), key=lambda a: patch[a])
        patch[axis] -= divisor[axis]
    return tuple(patch)  # type: ignore[return-value]


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write the plan as JSON, atomically."""
    write_json_atomic(path, plan.to_json())


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan; ``ConfigError`` naming the file and the bad key."""
    path = Path(path)
    data = read_json(path, ConfigError, "plan file", "make one with the prepare step")
    return Plan.from_json(data, str(path))
