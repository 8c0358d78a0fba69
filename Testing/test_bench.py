"""``bench/inference.py --quick`` as a regression test: both variants run end to end in their own
processes, the summary line has every field the README's Performance table is built from, and the two
variants' labels (with the trained demo model) agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "inference.py"


def test_quick_benchmark_runs_both_variants_and_reports_every_figure():
    pytest.importorskip("monai", reason="the MONAI baseline needs monai (the test extra installs it)")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, check=False, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("ours_s", "baseline_s", "speedup", "ours_peak_mb", "baseline_peak_mb", "label_agreement"):
        assert summary[key] > 0, key
    assert 0 < summary["conv_efficiency"] < 1.5 and summary["conv_gflops"] > 0
    case = summary["inputs"][0]
    assert case["ours"]["windows"] >= 1 and case["baseline"]["windows"] >= case["ours"]["windows"]
    # Same model, same windows here: only the way back to the input grid differs (trilinear logits against
    # nearest-neighbour labels), which moves boundary voxels and nothing else.
    assert summary["label_agreement"] > 0.99
    truth = case["dice_against_phantom_truth"]
    assert truth["ours"]["kidney_dice"] >= truth["baseline"]["kidney_dice"] - 0.01
    assert "| ours |" in done.stdout and "| baseline |" in done.stdout
