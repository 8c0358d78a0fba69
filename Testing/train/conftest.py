"""Fixtures for the training tools' tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("kidneytumorseg_train") is None:  # not installed: use the checkout's train/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "train"))


@pytest.fixture(scope="session")
def phantom_kits19(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small phantom cases in KiTS19 layout, mixed orientations and slice thicknesses (read-only)."""
    from kidneytumorseg_train.datasets import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom_kits19") / "data"
    write_phantom_dataset(root, 5, seed=0, layout="kits19", thick_fraction=0.4, oblique_fraction=0.6, spacing_scale=2)
    return root
