"""Training: it learns, it resumes exactly after SIGKILL, data-parallel equals one process, bad recipes refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY_RECIPE = {
    "name": "tiny",
    "layout": "kits19",
    "plan": {"target_spacing_zyx": [4.0, 3.0, 3.0], "patch_size_zyx": [32, 64, 64]},
    "model": {
        "stem_channels": 8,
        "stage_channels": [12, 16, 24, 32],
        "stage_blocks": [1, 1, 1, 1],
        "aspp_channels": 16,
        "low_level_channels": 8,
        "decoder_channels": 16,
        "dropout": 0.0,
    },
    "training": {
        "epochs": 4,
        "steps_per_epoch": 3,
        "batch_size": 2,
        "optimizer": "adamw",
        "lr": 0.003,
        "num_workers": 0,
        "validate_every": 100,
        "val_overlap": 0.0,
        "val_cases": 1,
        "foreground_fraction": 0.5,
    },
}


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kidneytumorseg_train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def write_recipe(folder: Path, name: str = "tiny", **training) -> Path:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["name"] = name
    recipe["training"].update(training)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """A prepared work folder over 8 small phantoms (shared by the tests of this module)."""
    base = tmp_path_factory.mktemp("training")
    recipe = write_recipe(base)
    made = run_cli("make-phantoms", str(base / "data"), "--n", "8", "--seed", "100")
    assert made.returncode == 0, made.stderr
    done = run_cli(
        "prepare",
        "--data",
        str(base / "data"),
        "--recipe",
        str(recipe),
        "--work",
        str(base / "work"),
        "--workers",
        "1",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    return base, base / "work"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]


def test_sigkill_half_way_then_resume_gives_the_weights_of_an_uninterrupted_run(prepared):
    base, work = prepared
    recipe = write_recipe(base, "resume", epochs=6, num_workers=1)
    straight = run_cli(
        "train", "--work", str(work), "--recipe", str(recipe), "--device", "cpu", "--output", str(base / "straight")
    )
    assert straight.returncode == 0, straight.stderr

    killed_dir = base / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kidneytumorseg_train",
            "train",
            "--work",
            str(work),
            "--recipe",
            str(recipe),
            "--device",
            "cpu",
            "--output",
            str(killed_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed_dir / "checkpoint_last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed half-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(checkpoint, weights_only=True)["step"]
    assert 6 <= step_at_kill < 18
    resumed = run_cli(
        "train",
        "--work",
        str(work),
        "--recipe",
        str(recipe),
        "--device",
        "cpu",
        "--output",
        str(killed_dir),
        "--resume",
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(base / "straight"), weights(killed_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert torch.load(checkpoint, weights_only=True)["step"] == 18
    assert not list(killed_dir.glob(".*partial*"))  # a temporary left by the kill is cleared on resume


def test_two_process_ddp_matches_one_process_on_the_combined_batch(prepared):
    base, work = prepared
    # SGD: Adam's normalised steps turn float rounding in near-zero gradients into lr-sized differences.
    common = dict(epochs=1, steps_per_epoch=4, num_workers=0, optimizer="sgd", lr=0.01, momentum=0.9)
    ddp_recipe = write_recipe(base, "ddp", batch_size=1, **common)
    single_recipe = write_recipe(base, "single", batch_size=2, **common)
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            "-m",
            "kidneytumorseg_train",
            "train",
            "--work",
            str(work),
            "--recipe",
            str(ddp_recipe),
            "--device",
            "cpu",
            "--output",
            str(base / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    replicas = [json.loads(line) for line in ddp.stdout.splitlines() if '"replicas"' in line]
    assert replicas and replicas[0]["identical"] is True, ddp.stdout
    single = run_cli(
        "train",
        "--work",
        str(work),
        "--recipe",
        str(single_recipe),
        "--device",
        "cpu",
        "--output",
        str(base / "single"),
    )
    assert single.returncode == 0, single.stderr
    a, b = weights(base / "ddp"), weights(base / "single")
    worst = max(float((a[n].float() - b[n].float()).abs().max()) for n in a if a[n].is_floating_point())
    assert worst < 1e-4, f"DDP and single-process weights differ by {worst}"
    # And they did train: the weights moved from the initialisation.
    torch.manual_seed(0)
    from KidneyTumorSegLib.model import DeepLabConfig, DeepLabV3Plus3D

    init = DeepLabV3Plus3D(DeepLabConfig.from_dict(TINY_RECIPE["model"])).state_dict()
    assert max(float((init[n] - a[n]).abs().max()) for n in init if init[n].is_floating_point()) > 1e-3


def test_the_model_learns_on_phantoms_past_what_an_untrained_model_reaches(prepared, tmp_path):
    base, work = prepared
    recipe = write_recipe(base, "learn", epochs=5, steps_per_epoch=30, validate_every=5, val_cases=2, num_workers=1)
    run = run_cli(
        "train", "--work", str(work), "--recipe", str(recipe), "--device", "cpu", "--output", str(base / "learn")
    )
    assert run.returncode == 0, run.stderr
    epochs = [json.loads(line) for line in run.stdout.splitlines() if '"epoch"' in line]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    final = epochs[-1]
    # An untrained network scores about 0.05 kidney Dice here (mostly foreground everywhere or nowhere).
    assert final["kidney_dice"] > 0.6, final
    assert (base / "learn" / "curves.png").stat().st_size > 1000
    assert (base / "learn" / "metrics.csv").read_text().count("kidney_dice") == 1

    model = tmp_path / "learned.safetensors"
    exported = run_cli(
        "export", "--work", str(work), "--recipe", str(recipe), "--run", str(base / "learn"), "-o", str(model)
    )
    assert exported.returncode == 0, exported.stderr
    from KidneyTumorSegLib.modelfile import load_model

    loaded = load_model(model)
    assert loaded.metadata.trained
    assert loaded.metadata.provenance["validation_dice"]["kidney_dice"] == pytest.approx(final["kidney_dice"], abs=1e-4)
    assert loaded.metadata.provenance["split"] == "holdout"
    assert loaded.metadata.patch_size_zyx == (32, 64, 64)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda r: r["training"].update(lr=-0.1), "'training.lr' must be positive"),
        (lambda r: r["training"].update(learning_rate=0.1), "unknown key 'training.learning_rate'"),
        (lambda r: r.update(epochz=3), "unknown key 'epochz'"),
        (lambda r: r["model"].update(output_stride=5), "output_stride must be 8 or 16"),
        (lambda r: r["plan"].update(patch_size_zyx=[30, 64, 64]), "must be multiples of the divisor (4, 8, 8)"),
    ],
)
def test_bad_recipes_are_refused_with_the_key_named_and_nothing_written(prepared, tmp_path, edit, message):
    _, work = prepared
    recipe = json.loads(json.dumps(TINY_RECIPE))
    edit(recipe)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recipe))
    out = tmp_path / "run"
    result = run_cli("train", "--work", str(work), "--recipe", str(path), "--device", "cpu", "--output", str(out))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (out / "checkpoint_last.pt").exists()


def test_training_twice_into_one_folder_needs_resume(prepared):
    base, work = prepared
    recipe = write_recipe(base, "twice", epochs=1, steps_per_epoch=1)
    first = run_cli(
        "train", "--work", str(work), "--recipe", str(recipe), "--device", "cpu", "--output", str(base / "twice")
    )
    assert first.returncode == 0, first.stderr
    again = run_cli(
        "train", "--work", str(work), "--recipe", str(recipe), "--device", "cpu", "--output", str(base / "twice")
    )
    assert again.returncode == 2 and "--resume" in again.stderr


def test_a_patch_larger_than_every_case_is_refused(prepared, tmp_path):
    _, work = prepared
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["plan"]["patch_size_zyx"] = [512, 64, 64]
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(recipe))
    result = run_cli(
        "train", "--work", str(work), "--recipe", str(path), "--device", "cpu", "--output", str(tmp_path / "run")
    )
    assert result.returncode == 2
    assert "larger than every case after resampling" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_prepare_refuses_a_mismatched_case_and_an_empty_dataset_without_writing(tmp_path):
    import SimpleITK as sitk

    from kidneytumorseg_train.datasets import write_phantom_dataset

    data = tmp_path / "data"
    write_phantom_dataset(data, 3, seed=7, spacing_scale=2)
    label = data / "case_00008" / "segmentation.nii.gz"
    moved = sitk.ReadImage(str(label))
    moved.SetOrigin([v + 5.0 for v in moved.GetOrigin()])
    sitk.WriteImage(moved, str(label))
    recipe = write_recipe(tmp_path)
    work = tmp_path / "work"
    result = run_cli("prepare", "--data", str(data), "--recipe", str(recipe), "--work", str(work), "--workers", "1")
    assert result.returncode == 2, result.stderr
    assert "case_00008" in result.stderr and "Traceback" not in result.stderr
    assert not work.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("prepare", "--data", str(empty), "--recipe", str(recipe), "--work", str(work), "--workers", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not work.exists()
