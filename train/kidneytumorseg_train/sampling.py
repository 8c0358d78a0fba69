"""Patch sampling from the preprocessed cache, with foreground oversampling.

Sample number ``i`` (counted over the whole run, across ranks) is a pure function of ``(seed, i)``: which
case, which centre, which augmentation. Resuming at step ``s`` therefore continues with exactly the
samples an uninterrupted run would have drawn, and data-parallel ranks split one global sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .cache import CachedCase, open_case


class PatchDataset(Dataset):
    """Random patches: ``(image (1, Z, Y, X) float32, labels (Z, Y, X) int64, sample index)``."""

    def __init__(
        self,
        cache_dir: Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        foreground_fraction: float,
        seed: int,
        pad_value: float,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        self.patch = tuple(int(p) for p in patch_size)
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        self.pad_value = pad_value
        self._open: dict[str, CachedCase] = {}

    def __len__(self) -> int:
        return 1 << 62  # the sampler decides how many

    def _case(self, case_id: str) -> CachedCase:
        # Opened lazily in each worker process: memory maps do not travel between processes.
        if case_id not in self._open:
            self._open[case_id] = open_case(self.cache_dir, case_id)
        return self._open[case_id]

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, int(index)])
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        case = self._case(case_id)
        image, labels = case.image, case.labels
        shape = np.array(image.shape)
        patch = np.array(self.patch)
        # Oversampled patches centre on kidney or tumor (each present class equally often), so that small
        # tumors are seen often enough to be learnt.
        coords = [c for c in (case.foreground_coords(1), case.foreground_coords(2)) if len(c)]
        if coords and rng.random() < self.foreground_fraction:
            points = coords[int(rng.integers(len(coords)))]
            centre = points[int(rng.integers(len(points)))]
            # The chosen voxel lands anywhere in the patch's middle half, not always dead centre.
            start = centre - patch // 2 + rng.integers(-(patch // 4), patch // 4 + 1)
        else:
            start = np.array(
                [int(rng.integers(min(0, s - p), max(0, s - p) + 1)) for s, p in zip(shape, patch, strict=True)]
            )
        start = np.clip(start, np.minimum(0, shape - patch), np.maximum(0, shape - patch))
        return _crop(image, start, patch, self.pad_value), _crop(labels, start, patch, 0), int(index)


def _crop(array: np.ndarray, start: np.ndarray, patch: np.ndarray, pad_value: float) -> torch.Tensor:
    """``array[start:start+patch]`` with ``pad_value`` wherever the window leaves the volume."""
    src = [slice(max(0, s), min(n, s + p)) for s, p, n in zip(start, patch, array.shape, strict=True)]
    dst = [slice(a.start - s, a.stop - s) for a, s in zip(src, start, strict=True)]
    if array.dtype == np.uint8:
        out = np.zeros(patch, dtype=np.int64)
    else:
        out = np.full(patch, pad_value, dtype=np.float32)
    out[tuple(dst)] = array[tuple(src)]
    tensor = torch.from_numpy(out)
    return tensor if array.dtype == np.uint8 else tensor.unsqueeze(0)


class StepSampler(Sampler[int]):
    """Global sample indices for this rank, from ``start_step`` on: step ``s`` of a run with ``world``
    ranks of ``batch`` samples each uses indices ``s * world * batch + rank * batch + j``."""

    def __init__(self, start_step: int, total_steps: int, batch: int, rank: int = 0, world: int = 1) -> None:
        self.start_step, self.total_steps = start_step, total_steps
        self.batch, self.rank, self.world = batch, rank, world

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.total_steps):
            base = (step * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.batch
