"""Train/validation splits of case ids: k-fold cross-validation and a single hold-out split.

A splits file is JSON mapping split names ("fold0" .. "fold4", "holdout") to {"train": [...], "val": [...]}.
Splits are deterministic (the same ids, k or fraction and seed give the same splits, whatever the order of the
ids), train and val are disjoint and together hold every case, and with k folds every case is in exactly one
validation fold.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import read_json
from .errors import ConfigError
from .plan import write_json_atomic

__all__ = ["holdout", "kfold", "load_splits", "save_splits", "select_split"]

Splits = dict[str, dict[str, list[str]]]


def _ids(case_ids: Iterable[str]) -> list[str]:
    ids = [str(i) for i in case_ids]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"case id(s) {', '.join(duplicates)} occur more than once; case ids must be unique.")
    return sorted(ids)


def _shuffled(ids: list[str], seed: int) -> list[str]:
    order = np.random.default_rng(int(seed)).permutation(len(ids))
    return [ids[i] for i in order]


def kfold(case_ids: Iterable[str], k: int = 5, seed: int = 0) -> Splits:
    """``k`` folds "fold0" .. "fold<k-1>": the shuffled cases cut into k near-equal validation sets."""
    ids = _ids(case_ids)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"k must be an integer of at least 2, not {k!r}.")
    if k > len(ids):
        raise ConfigError(f"{k} folds need at least {k} cases; the dataset has {len(ids)}. Use fewer folds.")
    parts = np.array_split(np.array(_shuffled(ids, seed), dtype=object), k)
    splits = {}
    for i, part in enumerate(parts):
        val = set(part.tolist())
        splits[f"fold{i}"] = {"train": [c for c in ids if c not in val], "val": sorted(val)}
    return splits


def holdout(case_ids: Iterable[str], val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """One split "holdout": ``round(val_fraction * n)`` shuffled cases (at least 1) for validation."""
    ids = _ids(case_ids)
    if not isinstance(val_fraction, int | float) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number between 0 and 1 (exclusive), not {val_fraction!r}.")
    if len(ids) < 2:
        raise ConfigError(f"a hold-out split needs at least 2 cases; the dataset has {len(ids)}.")
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    val = set(_shuffled(ids, seed)[:n_val])
    return {"holdout": {"train": [c for c in ids if c not in val], "val": sorted(val)}}


def _validate(splits: Any, source: str) -> Splits:
    if not isinstance(splits, Mapping) or not splits:
        raise ConfigError(f"{source}: splits are a JSON object {{name: {{'train': [...], 'val': [...]}}}}.")
    out: Splits = {}
    for name, split in splits.items():
        if not isinstance(split, Mapping) or set(split) != {"train", "val"}:
            raise ConfigError(f"{source}: split {name!r} must have exactly the keys 'train' and 'val'.")
        parts = {}
        for part in ("train", "val"):
            ids = split[part]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ConfigError(f"{source}: split {name!r}: '{part}' must be a list of case ids.")
            parts[part] = list(ids)
        both = sorted(set(parts["train"]) & set(parts["val"]))
        if both:
            raise ConfigError(f"{source}: split {name!r}: case(s) {', '.join(both[:10])} are in both train and val.")
        out[str(name)] = parts
    return out


def save_splits(path: str | os.PathLike, splits: Mapping[str, Any]) -> None:
    """Write splits as JSON, atomically."""
    write_json_atomic(path, _validate(splits, str(path)))


def select_split(splits: Mapping[str, Any], name: str, source: str = "splits") -> dict[str, list[str]]:
    """The split called ``name``; ``ConfigError`` listing the names there are."""
    if name not in splits:
        raise ConfigError(f"{source}: has no split {name!r}; the splits are {', '.join(splits)}.")
    return splits[name]


def load_splits(path: str | os.PathLike, name: str | None = None) -> Any:
    """The splits in a file, validated; only the split ``name`` when given."""
    path = Path(path)
    data = read_json(path, ConfigError, "splits file", "make the splits with the prepare step")
    splits = _validate(data, str(path))
    return splits if name is None else select_split(splits, name, str(path))
