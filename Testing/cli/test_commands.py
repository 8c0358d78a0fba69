"""The kidneytumorseg command on good input: predict (file, several files, folder, JSON progress), evaluate,
demo, model-info."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from KidneyTumorSegLib.phantom import make_phantom


def kts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "KidneyTumorSegLib", *args],
        capture_output=True,
        encoding="utf-8",
        check=False,
        timeout=600,
    )


@pytest.fixture(scope="module")
def cts(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cts")
    paths = []
    for seed, (name, orientation) in enumerate([("a.nii.gz", "RAS"), ("b.nrrd", "IPL"), ("c.mha", "oblique")]):
        phantom = make_phantom(seed, size=(64, 56, 24), spacing=(5.0, 5.0, 8.0), orientation=orientation)
        sitk.WriteImage(phantom.image, str(folder / name))
        paths.append(folder / name)
    return paths


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


def test_json_progress_reports_stage_fraction_eta_and_case_then_volumes(cts, tmp_path, tiny_model_path):
    out = tmp_path / "labels.nrrd"
    result = kts("predict", str(cts[0]), "-o", str(out), "--progress", "json", "--model", str(tiny_model_path))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    progress = [r for r in records if r["event"] == "progress"]
    assert progress and all({"stage", "fraction", "eta_s", "case"} <= r.keys() for r in progress)
    fractions = [r["fraction"] for r in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [r["stage"] for r in progress][0] == "read" and progress[-1]["stage"] == "write"
    done = records[-1]
    assert done["event"] == "case_done" and done["case"] == "a"
    assert set(done["volumes_ml"]) == {"kidney", "tumor"}
    assert _same_grid(sitk.ReadImage(str(out)), sitk.ReadImage(str(cts[0])))


def test_several_inputs_go_into_a_folder_named_by_case(cts, tmp_path, tiny_model_path):
    out = tmp_path / "out"
    result = kts("predict", *map(str, cts), "-o", str(out), "--progress", "none", "--model", str(tiny_model_path))
    assert result.returncode == 0, result.stderr
    for ct in cts:
        name = ct.name.split(".")[0]
        written = out / f"{name}.nii.gz"
        assert _same_grid(sitk.ReadImage(str(written)), sitk.ReadImage(str(ct)))
        assert f"{name}: kidney" in result.stdout
    assert "3 of 3 cases segmented" in result.stdout


def test_a_folder_input_is_a_batch_and_nrrd_format_is_honoured(cts, tmp_path, tiny_model_path):
    out = tmp_path / "out"
    result = kts(
        "predict",
        str(cts[0].parent),
        "-o",
        str(out),
        "--format",
        "nrrd",
        "--progress",
        "none",
        "--model",
        str(tiny_model_path),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.nrrd", "b.nrrd", "c.nrrd"]


def test_a_batch_with_a_bad_case_writes_the_others_and_exits_1(cts, tmp_path, tiny_model_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    result = kts(
        "predict", str(cts[0]), str(bad), "-o", str(out), "--progress", "none", "--model", str(tiny_model_path)
    )
    assert result.returncode == 1
    assert (out / "a.nii.gz").exists() and not (out / "broken.nii.gz").exists()
    assert "1 of 2 cases segmented; failed: broken" in result.stdout
    assert "Traceback" not in result.stderr


def test_evaluate_prints_kits19_dice_as_json(tmp_path):
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 5:15, 5:15] = 1
    ref[4:6, 8:12, 8:12] = 2
    pred = ref.copy()
    pred[2:4] = 0
    paths = []
    for name, array in (("pred.nii.gz", pred), ("ref.nii.gz", ref)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
        paths.append(str(tmp_path / name))
    result = kts("evaluate", *paths)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    kidney = 2 * (pred > 0).sum() / ((pred > 0).sum() + (ref > 0).sum())
    assert scores["kidney_dice"] == pytest.approx(kidney)
    assert scores["tumor_dice"] == 1.0 and scores["both_empty"] == []


def test_model_info_prints_architecture_size_cost_labels_and_provenance(tiny_model_path):
    result = kts("model-info", str(tiny_model_path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "DeepLabV3Plus3D"
    assert info["parameters"] > 0 and info["gflops_per_patch"] > 0
    assert info["labels"] == {"background": 0, "kidney": 1, "tumor": 2}
    assert info["patch_size_zyx"] == [16, 32, 32]
    text = kts("model-info", str(tiny_model_path)).stdout
    for word in ("Parameters", "GFLOPs per patch", "Spacing", "Patch", "Provenance", "Intended use"):
        assert word in text


def test_demo_writes_ct_truth_labels_and_picture_and_prints_dice(tmp_path):
    out = tmp_path / "demo"
    result = kts("demo", "-o", str(out), "--progress", "none", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for name in ("ct.nii.gz", "truth.nii.gz", "labels.nii.gz", "overlay.png"):
        assert (out / name).stat().st_size > 0, name
    picture = sitk.ReadImage(str(out / "overlay.png"))
    assert picture.GetNumberOfComponentsPerPixel() == 3 and picture.GetSize()[0] > 200
    assert "Dice vs truth: kidney" in result.stdout
    assert _same_grid(sitk.ReadImage(str(out / "labels.nii.gz")), sitk.ReadImage(str(out / "ct.nii.gz")))


def test_split_kidneys_labels_each_kidney_by_side_and_evaluate_merges_them(tmp_path):
    """With the bundled demo model: --split-kidneys gives 1 right, 2 tumor, 3 left on the patient's sides
    (an IPL file, so array order and anatomy disagree), and is otherwise the plain result."""
    phantom = make_phantom(21, size=(96, 80, 60), spacing=(4.0, 4.0, 5.0), orientation="IPL", n_tumors=1)
    ct, truth = tmp_path / "ct.nii.gz", tmp_path / "truth.nii.gz"
    sitk.WriteImage(phantom.image, str(ct))
    sitk.WriteImage(phantom.labels, str(truth))
    plain, split = tmp_path / "plain.nii.gz", tmp_path / "split.nii.gz"
    for out, extra in ((plain, ()), (split, ("--split-kidneys",))):
        result = kts("predict", str(ct), "-o", str(out), "--progress", "json", "--device", "cpu", *extra)
        assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout.splitlines()[-1])
    assert set(done["volumes_ml"]) == {"kidney_right", "tumor", "kidney_left"}
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(plain)))
    image = sitk.ReadImage(str(split))
    b = sitk.GetArrayFromImage(image)
    assert set(np.unique(b)) == {0, 1, 2, 3}
    assert np.array_equal(np.where(b == 3, 1, b), a)
    from KidneyTumorSegLib.laterality import lps_x_of_voxels

    assert lps_x_of_voxels(image, np.nonzero(b == 3)).mean() > 30.0  # patient left is LPS +x
    assert lps_x_of_voxels(image, np.nonzero(b == 1)).mean() < -30.0

    merged = kts("evaluate", str(split), str(truth), "--merge-sides")
    reference = kts("evaluate", str(plain), str(truth))
    assert merged.returncode == reference.returncode == 0
    keys = ("kidney_dice", "tumor_dice")
    assert [json.loads(merged.stdout)[k] for k in keys] == [json.loads(reference.stdout)[k] for k in keys]
    unmerged = kts("evaluate", str(split), str(truth))
    assert "--merge-sides" in unmerged.stderr


def test_a_registry_model_is_downloaded_with_json_progress_before_the_case(
    tmp_path, monkeypatch, capsys, tiny_model_path
):
    """What the Slicer panel shows on first use of a downloadable model: 'download model' progress lines
    (bytes, total, fraction), then the case. The network is replaced by the file's bytes in memory."""
    import hashlib
    import io as _io

    from KidneyTumorSegLib import cli, modelfile

    data = tiny_model_path.read_bytes()
    registry = tmp_path / "models.json"
    entry = {
        "name": "remote",
        "version": "1.0",
        "default": True,
        "file": None,
        "url": "https://models.example/remote.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "labels": {"background": 0, "kidney": 1, "tumor": 2},
        "trained": False,
        "description": "test",
        "license": "Apache-2.0",
        "intended_use": "tests",
    }
    registry.write_text(json.dumps({"format_version": 1, "models": [entry]}))
    monkeypatch.setenv(modelfile.REGISTRY_ENV, str(registry))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    class Response(_io.BytesIO):
        headers = {"Content-Length": str(len(data))}

    opened = []
    monkeypatch.setattr(modelfile, "urlopen", lambda url, timeout: opened.append(url) or Response(data))
    phantom = make_phantom(2, size=(48, 40, 16), spacing=(6.0, 6.0, 10.0))
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(phantom.image, str(ct))
    code = cli.main(["predict", str(ct), "-o", str(tmp_path / "out.nrrd"), "--progress", "json", "--device", "cpu"])
    assert code == 0 and opened == [entry["url"]]
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    download = [r for r in records if r.get("stage") == "download model"]
    assert download and download[-1]["bytes"] == download[-1]["total_bytes"] == len(data)
    assert download[-1]["fraction"] == 1.0
    first_case = next(i for i, r in enumerate(records) if r.get("stage") == "read")
    assert records.index(download[-1]) < first_case
    assert (tmp_path / "cache" / "kidneytumorseg" / "models" / "remote-1.0.safetensors").read_bytes() == data


@pytest.fixture(scope="module")
def batch_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("batch")
    for seed in range(5):
        phantom = make_phantom(seed, size=(40, 36, 12), spacing=(8.0, 8.0, 16.0))
        sitk.WriteImage(phantom.image, str(folder / f"case{seed}.nrrd"))
    return folder


def test_skip_existing_does_only_what_is_missing(batch_folder, tmp_path, tiny_model_path):
    out = tmp_path / "out"
    first = kts("predict", str(batch_folder), "-o", str(out), "--model", str(tiny_model_path), "--progress", "none")
    assert first.returncode == 0, first.stderr
    (out / "case1.nii.gz").unlink()
    (out / "case3.nii.gz").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = kts(
        "predict", str(batch_folder), "-o", str(out), "--model", str(tiny_model_path), "--progress", "json",
        "--skip-existing",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    records = [json.loads(line) for line in again.stdout.splitlines()]
    assert sorted(r["case"] for r in records if r["event"] == "case_done") == ["case1", "case3"]
    summary = records[-1]
    assert summary["event"] == "summary" and summary["skipped"] == ["case0", "case2", "case4"]
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # untouched
    assert sorted(p.name for p in out.iterdir()) == [f"case{i}.nii.gz" for i in range(5)]


def test_torchrun_shares_the_cases_between_processes_each_done_once(batch_folder, tmp_path, tiny_model_path):
    """``torchrun --nproc_per_node=2 -m KidneyTumorSegLib predict``: two CPU processes (gloo), each case
    segmented by exactly one of them, one summary from rank 0 naming all five."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "KidneyTumorSegLib", "predict", str(batch_folder), "-o", str(out),
        "--model", str(tiny_model_path), "--device", "cpu", "--progress", "json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    done = [(r["case"], r["rank"]) for r in records if r["event"] == "case_done"]
    names = [name for name, _ in done]
    assert sorted(names) == [f"case{i}" for i in range(5)]  # every case once, none twice
    assert {rank for _, rank in done} == {0, 1}  # both processes worked
    summaries = [r for r in records if r["event"] == "summary"]
    assert len(summaries) == 1 and summaries[0]["done"] == 5 and summaries[0]["processes"] == 2
    assert summaries[0]["done_cases"] == sorted(names)
    assert sorted(p.name for p in out.iterdir()) == [f"case{i}.nii.gz" for i in range(5)]


def test_memory_stays_flat_over_twenty_cases_in_one_call(tmp_path, tiny_model_path):
    """RSS after each case (reported in case_done): no growth from case 5 to case 20 beyond noise."""
    folder = tmp_path / "cts"
    folder.mkdir()
    for seed in range(20):
        phantom = make_phantom(seed, size=(32, 32, 12), spacing=(5.0, 5.0, 10.0))  # a 16 x 16 x 12 cm box
        sitk.WriteImage(phantom.image, str(folder / f"c{seed:02d}.nrrd"))
    result = kts(
        "predict", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_model_path), "--device", "cpu",
        "--progress", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rss = [json.loads(line)["rss_mb"] for line in result.stdout.splitlines() if '"case_done"' in line]
    assert len(rss) == 20 and all(r > 0 for r in rss)
    assert max(rss[4:]) - rss[4] < 40.0, f"RSS after each case (MB): {rss}"


def test_report_writes_measurements_montage_and_a_batch_csv(tmp_path):
    """predict --report with the bundled demo model on two phantoms: per case a JSON of the measurements and
    a PNG montage beside the labels, and one CSV for the batch; the JSON's tumor volumes are the labels'."""
    import csv

    folder = tmp_path / "cts"
    folder.mkdir()
    for seed in (3, 4):
        phantom = make_phantom(seed, n_tumors=1, size=(120, 100, 50), spacing=(3.0, 3.0, 5.0))
        sitk.WriteImage(phantom.image, str(folder / f"p{seed}.nrrd"))
    out = tmp_path / "out"
    result = kts("predict", str(folder), "-o", str(out), "--report", "--split-kidneys", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "p3.nii.gz", "p3.report.json", "p3.report.png", "p4.nii.gz", "p4.report.json", "p4.report.png", "report.csv",
    ]  # fmt: skip
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["case"] for r in rows] == ["p3", "p4"]
    for row in rows:
        record = json.loads((out / f"{row['case']}.report.json").read_text())
        labels = sitk.ReadImage(str(out / f"{row['case']}.nii.gz"))
        voxel_ml = float(np.prod(labels.GetSpacing())) / 1000
        array = sitk.GetArrayFromImage(labels)
        m = record["measurements"]
        assert m["tumor_volume_ml"] == pytest.approx(np.count_nonzero(array == 2) * voxel_ml, abs=1e-3)
        assert m["kidney_volume_ml"]["left"] == pytest.approx(np.count_nonzero(array == 3) * voxel_ml, abs=1e-3)
        assert float(row["tumor_volume_ml"]) == pytest.approx(m["tumor_volume_ml"], abs=0.01)
        assert record["intended_use"].startswith("Research use only")
        for tumor in m["tumors"]:
            assert tumor["renal"]["N"]["score"] is None and "collecting system" in tumor["renal"]["N"]["how"]
            assert tumor["renal"]["R"]["score"] in (1, 2, 3)
        png = sitk.ReadImage(str(out / f"{row['case']}.report.png"))
        assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] > 3 * png.GetSize()[1] / 2
    single = tmp_path / "single.nii.gz"
    result = kts("predict", str(folder / "p3.nrrd"), "-o", str(single), "--report", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "single.report.json").is_file() and not (tmp_path / "report.csv").exists()
