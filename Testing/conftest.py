"""Fixtures shared by every test folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

# A network small enough that a forward pass over a whole test volume takes milliseconds on a CPU.
TINY_CONFIG_KWARGS = dict(
    stem_channels=4,
    stage_channels=(4, 8, 8, 8),
    stage_blocks=(1, 1, 1, 1),
    aspp_channels=8,
    low_level_channels=4,
    decoder_channels=8,
)
TINY_PATCH_ZYX = (16, 32, 32)
TINY_SPACING_ZYX = (4.0, 4.0, 4.0)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small untrained model file per test session (random weights, 4 mm spacing, 16x32x32 patches)."""
    from KidneyTumorSegLib.model import DeepLabConfig
    from KidneyTumorSegLib.modelfile import create_untrained_model, untrained_metadata

    meta = untrained_metadata(DeepLabConfig(**TINY_CONFIG_KWARGS), name="tiny-test", seed=0)
    meta = dataclasses.replace(meta, patch_size_zyx=TINY_PATCH_ZYX, target_spacing_zyx=TINY_SPACING_ZYX)
    path = tmp_path_factory.mktemp("tiny_model") / "tiny.safetensors"
    create_untrained_model(path, meta, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path: Path):
    """The tiny model, loaded (``LoadedModel``) on the CPU."""
    from KidneyTumorSegLib.modelfile import load_model

    return load_model(tiny_model_path)
