"""The preprocessing cache: every case on the model grid, as arrays that training memory-maps.

Layout of ``cache_dir``::

    plan.json                  the plan the cache was made with
    <case_id>/image.npy        float16 (Z, Y, X): the normalised CT on the model grid, canonical orientation
    <case_id>/labels.npy       uint8 (Z, Y, X): 0 background, 1 kidney, 2 tumor on the same grid
    <case_id>/case.json        the original grid, the model grid, voxels per class ("class_voxels"), and
                               "foreground_voxels": {"1": [[z, y, x], ...], "2": [...]}, up to 2000 sampled
                               voxels per foreground class (1 kidney, 2 tumor) for oversampled patches

The arrays are made with the core's own functions (``model_grid_for``, ``image_to_model_input``,
``labels_to_model_grid``), so training sees exactly what inference will. A case is written into a temporary
folder (``.partial-*``) inside ``cache_dir`` and renamed into place when complete: an interrupted run leaves no
half case, and a rerun skips the complete cases and removes stale temporaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.preprocessing import ModelGrid, image_to_model_input, labels_to_model_grid, model_grid_for

from .datasets import CLASS_NAMES, Case, LabelMapping, failures_message, map_cases, read_case
from .errors import ConfigError, DatasetError
from .plan import Plan, load_plan, save_plan

__all__ = ["CachedCase", "cached_case_ids", "is_complete", "open_case", "preprocess_dataset"]

CACHE_FORMAT = 1
COORDS_PER_CLASS = 2000
PARTIAL_PREFIX = ".partial-"
_FILES = ("image.npy", "labels.npy", "case.json")
_LOCK = ".lock"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a complete preprocessed case."""
    return all((folder / name).is_file() for name in _FILES)


def _case_folder(cache_dir: Path, case_id: str) -> Path:
    if not case_id or case_id.startswith(".") or "/" in case_id or "\\" in case_id or case_id != case_id.strip():
        raise DatasetError(f"case id {case_id!r} cannot be a folder name in the cache; rename the case.")
    return cache_dir / case_id


def _sample_coords(labels: np.ndarray, value: int, count: int, rng: np.random.Generator) -> list[list[int]]:
    flat = np.flatnonzero(labels.reshape(-1) == value)
    if flat.size > count:
        flat = np.sort(rng.choice(flat, count, replace=False))
    return np.stack(np.unravel_index(flat, labels.shape), axis=1).astype(int).tolist()


def _case_info(case: Case, image: sitk.Image, grid: ModelGrid, labels: np.ndarray) -> dict[str, Any]:
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    return {
        "format_version": CACHE_FORMAT,
        "case_id": case.case_id,
        "image_file": str(case.image),
        "label_file": str(case.label),
        "original": {
            "size": list(image.GetSize()),
            "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection()),
        },
        "orientation": {"permutation": list(grid.orientation.permutation), "flips": list(grid.orientation.flips)},
        "input_shape_zyx": list(grid.input_shape),
        "input_spacing_zyx": list(grid.input_spacing),
        "model_shape_zyx": list(grid.model_shape),
        "model_spacing_zyx": list(grid.model_spacing),
        "class_voxels": {name: int(np.count_nonzero(labels == c)) for c, name in enumerate(CLASS_NAMES)},
        # Class value ("1" kidney, "2" tumor) -> up to COORDS_PER_CLASS sampled (z, y, x) voxels of that class.
        "foreground_voxels": {str(c): _sample_coords(labels, c, COORDS_PER_CLASS, rng) for c in (1, 2)},
    }


def _preprocess_one(item: tuple[Case, LabelMapping], plan: Plan, cache_dir: Path) -> str:
    case, mapping = item
    target = _case_folder(cache_dir, case.case_id)
    image, labels = read_case(case, mapping)
    # Everything from here on happens inside the temporary folder, which is removed on any failure; a killed
    # process leaves it behind as ``.partial-*``, which the next run removes.
    temporary = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{case.case_id}-", dir=cache_dir))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)
        grid = model_grid_for(image, plan.target_spacing_zyx)
        np.save(
            temporary / "image.npy", image_to_model_input(image, grid, plan.normalization).numpy().astype(np.float16)
        )
        y = labels_to_model_grid(labels, grid)
        np.save(temporary / "labels.npy", y)
        info = _case_info(case, image, grid, y)
        (temporary / "case.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
        os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return case.case_id


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache folder (POSIX; elsewhere a no-op)."""
    try:
        import fcntl
    except ImportError:  # Windows: one run at a time is up to the user
        yield
        return
    with open(cache_dir / _LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(
                f"{cache_dir}: another preprocessing run is using this cache folder; wait for it to finish or "
                "choose another folder."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _claim(cache_dir: Path, plan: Plan) -> None:
    """Refuse a cache made with another plan (or a folder that is not a cache), then record ``plan``."""
    plan_path = cache_dir / "plan.json"
    if plan_path.exists():
        try:
            existing = load_plan(plan_path)
        except ConfigError as exc:
            raise ConfigError(
                f"{cache_dir}: holds a plan.json that cannot be used ({exc}); choose another cache folder or "
                "delete this one."
            ) from None
        old, new = existing.preprocessing_key(), plan.preprocessing_key()
        changed = [f"{k}: {old[k]} there, {new[k]} now" for k in new if old[k] != new[k]]
        if changed:
            raise ConfigError(
                f"{cache_dir}: this cache was made with a different plan ({'; '.join(changed)}); choose another "
                "cache folder or delete this one."
            )
    else:
        others = sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))
        if others:
            raise ConfigError(
                f"{cache_dir}: is not empty ({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}) and holds "
                "no plan.json, so it is not a cache made by these tools; choose an empty or new folder."
            )
    save_plan(plan, plan_path)


def _check_mapping(plan: Plan, mapping: LabelMapping) -> None:
    if plan.label_mapping and plan.label_mapping != {str(v): t for v, t in mapping.pairs}:
        raise ConfigError(
            f"the plan was made with the label mapping {plan.label_mapping} (source value -> class) but the "
            f"dataset is read with {mapping.describe()}; make the plan again with this mapping, or use the "
            "mapping the plan was made with."
        )


def preprocess_dataset(
    cases: Sequence[Case],
    mapping: LabelMapping,
    plan: Plan,
    cache_dir: str | os.PathLike,
    workers: int = 1,
    progress: bool = True,
) -> list[str]:
    """Preprocess every case into ``cache_dir`` (see the module's docstring); returns the case ids, in order.

    Complete cases already in the cache are kept (resumable); stale temporaries of an interrupted run are
    removed. A cache made with a different plan is refused with a ``ConfigError``. Cases that cannot be read
    are all listed in one ``DatasetError`` after the others are done.
    """
    if not cases:
        raise DatasetError("the dataset holds no cases; there is nothing to preprocess.")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DatasetError(f"case id(s) {', '.join(duplicates)} occur more than once; case ids must be unique.")
    _check_mapping(plan, mapping)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(f"{cache_dir}: is a file, not a folder; choose a folder for the cache.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir):
        _claim(cache_dir, plan)
        for stale in cache_dir.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        todo = []
        for case in cases:
            folder = _case_folder(cache_dir, case.case_id)
            if is_complete(folder):
                continue
            if folder.exists():  # not made by a rename of a finished case: someone else's damage
                shutil.rmtree(folder)
            todo.append(case)
        function = partial(_preprocess_one, plan=plan, cache_dir=cache_dir)
        results = map_cases(function, [(c, mapping) for c in todo], workers, progress, "preprocessing")
    message = failures_message("preprocessing", todo, results)
    if message:
        raise DatasetError(message)
    return ids


@dataclass
class CachedCase:
    """One preprocessed case: memory-mapped arrays (read-only) and its ``case.json``."""

    case_id: str
    image: np.ndarray  # float16 (Z, Y, X), memory-mapped
    labels: np.ndarray  # uint8 (Z, Y, X), memory-mapped
    info: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def foreground_coords(self, label: int | str) -> np.ndarray:
        """The sampled (z, y, x) voxel coordinates of a class (1 or "kidney", 2 or "tumor"), (N, 3) int."""
        value = CLASS_NAMES.index(label) if isinstance(label, str) else int(label)
        coords = self.info["foreground_voxels"].get(str(value), [])
        return np.asarray(coords, dtype=np.int64).reshape(-1, 3)


def cached_case_ids(cache_dir: str | os.PathLike) -> list[str]:
    """The ids of the complete cases in a cache folder, sorted."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".") and p.is_dir() and is_complete(p))


def load_cache_plan(cache_dir: str | os.PathLike) -> Plan:
    """The plan a cache folder was made with."""
    return load_plan(Path(cache_dir) / "plan.json")


def open_case(cache_dir: str | os.PathLike, case_id: str) -> CachedCase:
    """A preprocessed case, its arrays memory-mapped (``np.load(..., mmap_mode="r")``)."""
    cache_dir = Path(cache_dir)
    folder = _case_folder(cache_dir, case_id)
    if not is_complete(folder):
        available = cached_case_ids(cache_dir)
        listed = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "") if available else "none"
        raise DatasetError(
            f"{cache_dir}: holds no preprocessed case {case_id!r} (cached: {listed}); run the preprocessing first."
        )
    try:
        image = np.load(folder / "image.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy", mmap_mode="r")
        info = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"{folder}: the cached case is damaged ({exc}); delete the folder and run the preprocessing again."
        ) from None
    if image.shape != labels.shape or image.dtype != np.float16 or labels.dtype != np.uint8:
        raise DatasetError(
            f"{folder}: the cached case is damaged (image {image.dtype} {image.shape}, labels {labels.dtype} "
            f"{labels.shape}); delete the folder and run the preprocessing again."
        )
    return CachedCase(case_id, image, labels, info)
