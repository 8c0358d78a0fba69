"""A training run's best checkpoint -> a model file in the core's format, with provenance."""

from __future__ import annotations

import json
from pathlib import Path

from KidneyTumorSegLib import __version__
from KidneyTumorSegLib.model import DeepLabV3Plus3D
from KidneyTumorSegLib.modelfile import REQUIRED_LABELS, ModelMetadata, save_model
from KidneyTumorSegLib.preprocessing import IntensityNormalization

from .config import Recipe
from .errors import ConfigError


def model_metadata(recipe: Recipe, plan, provenance: dict | None = None, trained: bool = False) -> ModelMetadata:
    return ModelMetadata(
        name=f"kidneytumorseg-{recipe.name}",
        version=__version__,
        config=recipe.model,
        labels=dict(REQUIRED_LABELS),
        target_spacing_zyx=tuple(float(s) for s in plan.target_spacing_zyx),
        patch_size_zyx=tuple(int(p) for p in plan.patch_size_zyx),
        normalization=IntensityNormalization(float(plan.clip_hu[0]), float(plan.clip_hu[1]), plan.mean, plan.std),
        trained=trained,
        provenance=provenance or {},
        description=recipe.description,
    )


def export_run(run_dir: Path, output: Path, recipe: Recipe, plan, provenance: dict, half: bool = True) -> dict:
    """Write the best checkpoint of ``run_dir`` (the last one if no validation ran) as a model file."""
    from .trainer import CHECKPOINT_BEST, CHECKPOINT_LAST, load_checkpoint

    best = run_dir / CHECKPOINT_BEST
    source = best if best.exists() else run_dir / CHECKPOINT_LAST
    if not source.exists():
        raise ConfigError(f"{run_dir}: holds no checkpoint; train first (python -m kidneytumorseg_train train ...).")
    state = load_checkpoint(source)
    network = DeepLabV3Plus3D(recipe.model)
    network.load_state_dict(state["model"])
    scores = state.get("scores", {})
    provenance = {
        **provenance,
        "checkpoint": source.name,
        "epochs": int(state.get("epoch", state.get("step", 0) // recipe.training.steps_per_epoch)),
        "steps": int(state["step"]),
        "validation_dice": {
            k: round(float(scores[k]), 4)
            for k in ("kidney_dice", "tumor_dice", "mean_dice", "tumor_dice_cases_with_tumor")
            if k in scores
        },
        "validation_cases": len(scores.get("cases", [])),
        "code_version": __version__,
        "recipe": recipe.name,
        "training": json.loads(json.dumps(recipe.training.__dict__)),
    }
    metadata = model_metadata(recipe, plan, provenance, trained=True)
    save_model(output, network, metadata, half=half)
    return provenance
