"""Training recipes: one JSON file each (``train/configs/*.json``), validated before anything runs.

Unknown keys and impossible values are refused with the key named, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from KidneyTumorSegLib.model import DeepLabConfig

from .augment import AugmentConfig
from .errors import ConfigError


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = 100
    steps_per_epoch: int = 250
    batch_size: int = 2
    optimizer: str = "sgd"  # "sgd" (Nesterov, poly schedule, nnU-Net style) or "adamw"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    amp: bool = True  # mixed precision, CUDA only
    seed: int = 0
    foreground_fraction: float = 0.33
    num_workers: int = 2
    validate_every: int = 10  # epochs
    val_overlap: float = 0.5
    val_cases: int = 0  # 0: every validation case; n: the first n (for quick runs)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    layout: str = "auto"
    cyst: str = "kidney"
    plan: dict[str, Any] = field(default_factory=dict)
    model: DeepLabConfig = field(default_factory=DeepLabConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    split: str = "holdout"
    estimate: str = ""


_PLAN_KEYS = {"target_spacing_zyx", "patch_size_zyx", "max_patch_voxels"}


def _build(cls, data: Any, where: str, path: Path):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: '{where}' must be an object.")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{where}.{key}'; known keys: {', '.join(sorted(known))}.")
    values = {}
    for key, value in data.items():
        default = getattr(cls(), key) if cls is not DeepLabConfig else getattr(DeepLabConfig(), key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{path}: '{where}.{key}' must be true or false; got {value!r}.")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{path}: '{where}.{key}' must be a number; got {value!r}.")
            if isinstance(default, int) and not isinstance(default, bool) and not float(value).is_integer():
                raise ConfigError(f"{path}: '{where}.{key}' must be an integer; got {value!r}.")
            value = type(default)(value)
        values[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: '{where}' is invalid: {exc}.") from None


def _check_training(t: TrainingSettings, path: Path) -> None:
    rules = [
        ("epochs", t.epochs >= 1, "at least 1"),
        ("steps_per_epoch", t.steps_per_epoch >= 1, "at least 1"),
        ("batch_size", t.batch_size >= 1, "at least 1"),
        ("optimizer", t.optimizer in ("sgd", "adamw"), "'sgd' or 'adamw'"),
        ("lr", t.lr > 0, "positive"),
        ("momentum", 0 <= t.momentum < 1, "in [0, 1)"),
        ("weight_decay", t.weight_decay >= 0, "zero or positive"),
        ("poly_exponent", t.poly_exponent > 0, "positive"),
        ("grad_clip", t.grad_clip > 0, "positive"),
        ("foreground_fraction", 0 <= t.foreground_fraction <= 1, "in [0, 1]"),
        ("num_workers", t.num_workers >= 0, "zero or positive"),
        ("validate_every", t.validate_every >= 1, "at least 1"),
        ("val_overlap", 0 <= t.val_overlap < 1, "in [0, 1)"),
        ("val_cases", t.val_cases >= 0, "zero or positive"),
    ]
    for key, ok, what in rules:
        if not ok:
            raise ConfigError(f"{path}: 'training.{key}' must be {what}; got {getattr(t, key)!r}.")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found; see train/configs/ for the recipes.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a JSON object.")
    top = {"name", "description", "layout", "cyst", "plan", "model", "training", "augmentation", "split", "estimate"}
    for key in data:
        if key not in top:
            raise ConfigError(f"{path}: unknown key '{key}'; known keys: {', '.join(sorted(top))}.")
    if not isinstance(data.get("name"), str):
        raise ConfigError(f"{path}: 'name' (a string) is required.")
    plan = data.get("plan", {})
    if not isinstance(plan, dict) or set(plan) - _PLAN_KEYS:
        bad = sorted(set(plan) - _PLAN_KEYS) if isinstance(plan, dict) else ["plan"]
        raise ConfigError(f"{path}: unknown key 'plan.{bad[0]}'; known keys: {', '.join(sorted(_PLAN_KEYS))}.")
    for key in ("target_spacing_zyx", "patch_size_zyx"):
        value = plan.get(key)
        if value is not None and (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
        ):
            raise ConfigError(f"{path}: 'plan.{key}' must be three positive numbers; got {value!r}.")
    if data.get("cyst", "kidney") not in ("kidney", "background", "tumor"):
        raise ConfigError(f"{path}: 'cyst' must be kidney, background or tumor; got {data['cyst']!r}.")
    training = _build(TrainingSettings, data.get("training", {}), "training", path)
    _check_training(training, path)
    return Recipe(
        name=data["name"],
        description=str(data.get("description", "")),
        layout=str(data.get("layout", "auto")),
        cyst=str(data.get("cyst", "kidney")),
        plan=dict(plan),
        model=_build(DeepLabConfig, data.get("model", {}), "model", path),
        training=training,
        augmentation=_build(AugmentConfig, data.get("augmentation", {}), "augmentation", path),
        split=str(data.get("split", "holdout")),
        estimate=str(data.get("estimate", "")),
    )
