"""Interruptions and faults: SIGKILL during predict, a full disk, paths with spaces and non-ASCII
characters, a batch of 30 with 5 bad inputs and its rerun; and properties over random grids
(hypothesis): the output grid is the input grid, labels stay in {0, 1, 2}, the metric is symmetric,
bounded and 1 on identical inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from KidneyTumorSegLib.phantom import make_phantom


def kts_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "KidneyTumorSegLib", *args]


def kts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(kts_command(*args), capture_output=True, encoding="utf-8", check=False, timeout=600)


def small_ct(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(make_phantom(seed, size=(40, 36, 12), spacing=(8.0, 8.0, 16.0)).image, str(path))
    return path


# ----------------------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize("stage", ["network", "write"])
def test_sigkill_during_predict_leaves_no_output_that_looks_complete(tmp_path, tiny_model_path, stage):
    """Killed outright while the network runs, or as the write stage begins (the labels exist in memory,
    the file is about to be written): the output name does not exist (only a temporary
    ``.NAME.*.partial*`` file may), and the next run writes it whole and removes any stale temporary file."""
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_phantom(1, size=(160, 140, 60), spacing=(2.5, 2.5, 5.0)).image, str(ct))
    out = tmp_path / "out" / "labels.nii.gz"
    out.parent.mkdir()
    argv = ["predict", str(ct), "-o", str(out), "--model", str(tiny_model_path), "--progress", "json"]
    argv += ["--device", "cpu", "--batch-size", "1", "--overlap", "0.75"]
    proc = subprocess.Popen(kts_command(*argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed_at = None
    try:
        for line in proc.stdout:
            record = json.loads(line)
            if record.get("event") == "progress" and record.get("stage") == stage:
                proc.send_signal(signal.SIGKILL)
                killed_at = record["fraction"]
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists(), "a killed run left a file under the output's name"
    assert all(".partial" in p.name and p.name.startswith(".") for p in out.parent.iterdir())
    done = kts(*argv)
    assert done.returncode == 0, done.stderr
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct)).GetSize()
    assert [p.name for p in out.parent.iterdir()] == ["labels.nii.gz"], "the stale temporary file is still there"


def test_a_full_disk_is_reported_and_leaves_nothing(tmp_path, tiny_model_path, monkeypatch, capsys):
    """The writer fails half-way as on a full disk (ENOSPC, injected): one clear error, exit 2, neither the
    output nor a temporary file left."""
    from KidneyTumorSegLib import cli
    from KidneyTumorSegLib import io as kio

    ct = small_ct(tmp_path / "ct.nrrd")
    out = tmp_path / "out.nii.gz"
    real_write = sitk.WriteImage

    def full_disk(image, path, *args):
        Path(path).write_bytes(b"\x1f\x8b partial")  # what a full disk leaves: a few bytes
        raise RuntimeError(f"ITK ERROR: NiftiImageIO: Could not write {path}: No space left on device")

    monkeypatch.setattr(kio.sitk, "WriteImage", full_disk)
    code = cli.main(["predict", str(ct), "-o", str(out), "--model", str(tiny_model_path), "--progress", "none"])
    monkeypatch.setattr(kio.sitk, "WriteImage", real_write)
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "No space left on device" in errors[0]
    assert "disk space" in errors[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_paths_with_spaces_and_non_ascii_characters_work_and_are_named_intact(tmp_path, tiny_model_path):
    folder = tmp_path / "Jürgen Ødegård 测试" / "scans of today"
    ct = small_ct(folder / "ct scan ü.nii.gz")
    out = folder / "résultats" / "labels ü.nrrd"
    out.parent.mkdir()
    done = kts("predict", str(ct), "-o", str(out), "--model", str(tiny_model_path), "--progress", "none")
    assert done.returncode == 0, done.stderr
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct)).GetSize()
    broken = folder / "défaut ü.nii.gz"
    broken.write_bytes(b"not an image")
    failed = kts("predict", str(broken), "-o", str(out.with_name("x.nrrd")), "--model", str(tiny_model_path))
    assert failed.returncode == 2 and f"error: {broken}:" in failed.stderr


def test_batch_of_30_with_5_bad_writes_25_names_the_5_and_a_rerun_does_only_what_is_missing(tmp_path, tiny_model_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = {
        "c03": lambda p: p.write_bytes(b""),  # empty
        "c08": lambda p: p.write_bytes(small_ct(tmp_path / "tmp8.nii.gz").read_bytes()[:300]),  # truncated
        "c13": lambda p: sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(p)),  # 2D
        "c21": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),  # random bytes
        "c27": lambda p: sitk.WriteImage(sitk.Image(32, 32, 16, sitk.sitkInt16) - 1024, str(p)),  # constant
    }
    for i in range(30):
        name = f"c{i:02d}"
        path = inputs / f"{name}.nii.gz"
        if name in bad:
            bad[name](path)
        else:
            small_ct(path, seed=i)
    out = tmp_path / "out"
    argv = ["predict", str(inputs), "-o", str(out), "--model", str(tiny_model_path), "--progress", "json"]
    first = kts(*argv)
    assert first.returncode == 1, first.stderr  # partly failed
    summary = json.loads(first.stdout.splitlines()[-1])
    assert summary["event"] == "summary" and summary["done"] == 25 and sorted(summary["failed"]) == sorted(bad)
    assert len(list(out.iterdir())) == 25
    summary_line = [line for line in first.stderr.splitlines() if "cases segmented" in line][0]
    for name in bad:
        assert name in summary_line
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 5 and "Traceback" not in first.stderr
    for name in bad:  # the inputs are repaired; only they are run again
        small_ct(inputs / f"{name}.nii.gz", seed=int(name[1:]))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = kts(*argv, "--skip-existing")
    assert again.returncode == 0, again.stderr
    redone = sorted(json.loads(line)["case"] for line in again.stdout.splitlines() if '"case_done"' in line)
    assert redone == sorted(bad)
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())
    assert len(list(out.iterdir())) == 30


# ------------------------------------------------------------------------------------------ properties


def _rotation(angles) -> list[float]:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return (rx @ ry @ rz).ravel().tolist()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.tuples(st.integers(6, 40), st.integers(6, 40), st.integers(2, 24)),
    spacing=st.tuples(*[st.floats(0.4, 9.0)] * 3),
    origin=st.tuples(*[st.floats(-500.0, 500.0)] * 3),
    angles=st.tuples(*[st.floats(-3.1, 3.1)] * 3),
    flip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_grid_gives_labels_on_exactly_that_grid(tiny_model, size, spacing, origin, angles, flip, seed):
    from KidneyTumorSegLib import pipeline

    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 400, size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    direction = np.array(_rotation(angles)).reshape(3, 3)
    if flip:
        direction[:, 0] *= -1
    image.SetDirection(direction.ravel().tolist())
    result = pipeline.segment(image, tiny_model, pipeline.SegmentOptions(device="cpu"))
    labels = result.labels
    assert labels.GetSize() == image.GetSize()
    assert np.allclose(labels.GetSpacing(), image.GetSpacing())
    assert np.allclose(labels.GetOrigin(), image.GetOrigin())
    assert np.allclose(labels.GetDirection(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
    seeds=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)),
    density=st.floats(0.0, 1.0),
)
def test_kits19_dice_is_symmetric_bounded_and_one_on_identical_inputs(shape, seeds, density):
    from KidneyTumorSegLib.metrics import kits19_dice

    a = np.random.default_rng(seeds[0]).choice(3, size=shape, p=[1 - density, density / 2, density / 2])
    b = np.random.default_rng(seeds[1]).choice(3, size=shape, p=[1 - density, density / 2, density / 2])
    ab, ba = kits19_dice(a, b), kits19_dice(b, a)
    for key in ("kidney_dice", "tumor_dice", "composite_dice"):
        assert ab[key] == ba[key]
        assert 0.0 <= ab[key] <= 1.0
    same = kits19_dice(a, a.copy())
    assert same["kidney_dice"] == same["tumor_dice"] == same["composite_dice"] == 1.0


def test_a_failing_extra_output_leaves_no_labels_and_no_other_file(tmp_path, tiny_model_path, monkeypatch, capsys):
    """--report and --seg-nrrd with the .seg.nrrd writer failing half-way (an error the writer's library
    raises, injected): one clear error, exit 2, and neither the labels nor the report files remain."""
    pytest.importorskip("slicerio")
    from KidneyTumorSegLib import cli, exports

    ct = small_ct(tmp_path / "in" / "ct.nrrd")
    out = tmp_path / "out"
    out.mkdir()

    def broken(labels, path, split=None):
        Path(path).write_bytes(b"NRRD0004\n")  # a few bytes, then the library gives up
        raise ValueError("Unsupported number of dimensions: 5")

    monkeypatch.setattr(exports, "write_seg_nrrd", broken)
    argv = ["predict", str(ct), "-o", str(out / "ct.nii.gz"), "--model", str(tiny_model_path), "--progress", "none"]
    code = cli.main([*argv, "--report", "--seg-nrrd"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not be written" in errors[0] and "Unsupported number of dimensions" in errors[0]
    assert list(out.iterdir()) == []
