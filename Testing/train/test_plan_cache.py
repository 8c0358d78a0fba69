"""Fingerprint, plan, preprocessing cache and splits (kidneytumorseg_train.plan, .cache, .splits)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kidneytumorseg_train import cache as cache_module
from kidneytumorseg_train.cache import PARTIAL_PREFIX, cached_case_ids, open_case, preprocess_dataset
from kidneytumorseg_train.datasets import LabelMapping, find_cases, mapping_for, read_case, write_phantom_dataset
from kidneytumorseg_train.errors import ConfigError, DatasetError
from kidneytumorseg_train.plan import Plan, fingerprint, load_plan, make_plan, save_plan
from kidneytumorseg_train.splits import holdout, kfold, load_splits, save_splits, select_split
from KidneyTumorSegLib.preprocessing import (
    canonical_orientation,
    image_to_model_input,
    labels_to_model_grid,
    model_grid_for,
)

MAPPING = LabelMapping.kits19()


@pytest.fixture(scope="module")
def cases(phantom_kits19: Path):
    return find_cases(phantom_kits19)


@pytest.fixture(scope="module")
def fp(cases):
    return fingerprint(cases, MAPPING)


@pytest.fixture(scope="module")
def plan(fp) -> Plan:
    return make_plan(fp)


# ----------------------------------------------------------------------------------------------------
# Fingerprint and plan


def test_fingerprint_uses_canonical_zyx_geometry_and_foreground_intensities(cases, fp) -> None:
    json.dumps(fp)  # JSON-serialisable
    assert fp["num_cases"] == len(cases) == len(fp["cases"])
    spacings, shapes = [], []
    for case, entry in zip(cases, fp["cases"], strict=True):
        image, labels = read_case(case, MAPPING)
        orientation = canonical_orientation(image)
        spacing = orientation.canonical_spacing(image)
        shape = orientation.to_canonical(sitk.GetArrayViewFromImage(image)).shape
        assert entry["case_id"] == case.case_id
        assert entry["spacing_zyx"] == pytest.approx(spacing) and entry["shape_zyx"] == list(shape)
        assert entry["class_voxels"]["kidney"] == np.count_nonzero(sitk.GetArrayViewFromImage(labels) == 1)
        spacings.append(spacing)
        shapes.append(shape)
    assert fp["median_spacing_zyx"] == pytest.approx(np.median(spacings, axis=0).tolist())
    assert fp["median_shape_zyx"] == pytest.approx(np.median(shapes, axis=0).tolist())
    intensity = fp["foreground_intensity"]
    # Contrast-enhanced kidney and tumor: soft-tissue HU, and low < mean < high.
    assert -200 < intensity["percentile_00_5"] < intensity["mean"] < intensity["percentile_99_5"] < 400
    assert intensity["std"] > 0 and 0 < intensity["samples"] <= 10_000 * len(cases)
    assert fingerprint(cases, MAPPING) == fp  # seeded: deterministic


def test_fingerprint_caps_the_sample_per_case(cases) -> None:
    small = fingerprint(cases[:2], MAPPING, samples_per_case=100)
    assert small["foreground_intensity"]["samples"] == 200


def test_plan_from_phantoms(fp, plan: Plan) -> None:
    assert plan.target_spacing_zyx == pytest.approx(tuple(fp["median_spacing_zyx"]))
    assert all(p % d == 0 and p >= d for p, d in zip(plan.patch_size_zyx, plan.divisor, strict=True))
    assert math.prod(plan.patch_size_zyx) <= 80 * 160 * 160
    assert plan.clip_hu[0] < plan.clip_hu[1]
    assert plan.clip_hu == (
        fp["foreground_intensity"]["percentile_00_5"],
        fp["foreground_intensity"]["percentile_99_5"],
    )
    assert (plan.mean, plan.std) == (fp["foreground_intensity"]["mean"], fp["foreground_intensity"]["std"])
    assert plan.label_mapping == {"0": 0, "1": 1, "2": 2}
    # The phantoms are small: the patch is the median shape, rounded down to the divisor.
    median = plan.median_shape_zyx
    assert all(m - d < p <= m for p, m, d in zip(plan.patch_size_zyx, median, plan.divisor, strict=True))


def _fake_fingerprint(shape_zyx, spacing_zyx=(3.0, 0.8, 0.8)) -> dict:
    return {
        "cases": [{"shape_zyx": list(shape_zyx), "spacing_zyx": list(spacing_zyx)}],
        "median_spacing_zyx": list(spacing_zyx),
        "foreground_intensity": {"percentile_00_5": -80.0, "percentile_99_5": 300.0, "mean": 100.0, "std": 70.0},
        "label_mapping": {"values": {"0": 0, "1": 1, "2": 2}},
    }


def test_patch_is_clipped_to_max_voxels_keeping_proportions() -> None:
    # A KiTS-like case, 110 slices of 512 x 512 at 3 x 0.8 x 0.8 mm, planned at 3.2 x 1.6 x 1.6 mm.
    fp = _fake_fingerprint((110, 512, 512))
    plan = make_plan(fp, target_spacing_zyx=(3.2, 1.6, 1.6))
    assert plan.target_spacing_zyx == (3.2, 1.6, 1.6)
    assert plan.median_shape_zyx == (103, 256, 256)
    assert math.prod(plan.patch_size_zyx) <= 80 * 160 * 160
    assert all(p % d == 0 for p, d in zip(plan.patch_size_zyx, (4, 8, 8), strict=True))
    z, y, x = plan.patch_size_zyx
    assert y == x and abs(z / y - 103 / 256) < 0.1  # proportions kept, up to rounding down
    small = make_plan(fp, max_patch_voxels=32 * 32 * 32, divisor=(8, 16, 16))
    assert math.prod(small.patch_size_zyx) <= 32**3 and small.divisor == (8, 16, 16)
    # A tiny axis still gets one divisor.
    thin = make_plan(_fake_fingerprint((2, 300, 300), (3.0, 1.0, 1.0)))
    assert thin.patch_size_zyx[0] == 4 and math.prod(thin.patch_size_zyx) <= 80 * 160 * 160
    assert make_plan(fp, patch_size_zyx=(64, 128, 128)).patch_size_zyx == (64, 128, 128)
    with pytest.raises(ConfigError, match="multiples of the divisor"):
        make_plan(fp, patch_size_zyx=(30, 128, 128))
    with pytest.raises(ConfigError, match="target spacing"):
        make_plan(fp, target_spacing_zyx=(3.0, -1.0, 1.0))
    with pytest.raises(ConfigError, match="max_patch_voxels"):
        make_plan(fp, max_patch_voxels=100)


def test_plan_round_trip(tmp_path: Path, plan: Plan) -> None:
    path = tmp_path / "plans" / "plan.json"
    save_plan(plan, path)
    assert load_plan(path) == plan
    assert json.loads(path.read_text())["target_spacing_zyx"] == list(plan.target_spacing_zyx)
    assert not [p for p in path.parent.iterdir() if p.name != "plan.json"]  # no temporary left
    assert plan.normalization.clip_low == plan.clip_hu[0] and plan.normalization.std == plan.std


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"patch_sizes": [1, 2, 3]}, "patch_sizes"),
        ({"target_spacing_zyx": [3.0, -0.8, 0.8]}, "target_spacing_zyx"),
        ({"target_spacing_zyx": [3.0, 0.8]}, "target_spacing_zyx"),
        ({"patch_size_zyx": [30, 128, 128]}, "patch_size_zyx"),
        ({"clip_hu": [300.0, -80.0]}, "clip_hu"),
        ({"std": 0.0}, "std"),
        ({"mean": "high"}, "mean"),
        ({"label_mapping": {"3": 7}}, "label_mapping"),
        ({"format_version": 99}, "format_version"),
    ],
)
def test_load_plan_refuses_bad_keys_naming_them(tmp_path: Path, plan: Plan, change: dict, key: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**plan.to_json(), **change}))
    with pytest.raises(ConfigError, match=rf"{path}: .*'{key}'"):
        load_plan(path)


def test_load_plan_refuses_missing_or_broken_files(tmp_path: Path, plan: Plan) -> None:
    with pytest.raises(ConfigError, match="no such plan file"):
        load_plan(tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text('{"target_spacing_zyx": [3')
    with pytest.raises(ConfigError, match="cannot be read"):
        load_plan(tmp_path / "broken.json")
    data = plan.to_json()
    del data["mean"]
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="'mean'"):
        load_plan(tmp_path / "partial.json")
    with pytest.raises(ConfigError, match="'std'"):
        dataclasses.replace(plan, std=-1.0)


# ----------------------------------------------------------------------------------------------------
# Cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, cases, plan: Plan) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "cache"
    assert preprocess_dataset(cases, MAPPING, plan, folder, progress=False) == [c.case_id for c in cases]
    return folder


def test_cache_holds_model_grid_arrays(cache_dir: Path, cases, plan: Plan) -> None:
    assert cached_case_ids(cache_dir) == [c.case_id for c in cases]
    assert load_plan(cache_dir / "plan.json") == plan
    for case in cases:
        cached = open_case(cache_dir, case.case_id)
        image, labels = read_case(case, MAPPING)
        grid = model_grid_for(image, plan.target_spacing_zyx)
        assert cached.shape == grid.model_shape == tuple(cached.info["model_shape_zyx"])
        assert isinstance(cached.image, np.memmap) and isinstance(cached.labels, np.memmap)
        assert cached.image.dtype == np.float16 and cached.labels.dtype == np.uint8
        assert set(np.unique(cached.labels).tolist()) <= {0, 1, 2}
        assert not cached.image.flags.writeable
        # Exactly the core's preprocessing (nothing re-implemented).
        expected = image_to_model_input(image, grid, plan.normalization).numpy().astype(np.float16)
        np.testing.assert_array_equal(cached.image, expected)
        np.testing.assert_array_equal(cached.labels, labels_to_model_grid(labels, grid))
        info = cached.info
        assert info["case_id"] == case.case_id and info["original"]["size"] == list(image.GetSize())
        for value, name in ((0, "background"), (1, "kidney"), (2, "tumor")):
            assert info["class_voxels"][name] == np.count_nonzero(cached.labels == value)
        for value in (1, 2):
            coords = cached.foreground_coords(value)
            assert len(coords) == min(2000, info["class_voxels"][("kidney", "tumor")[value - 1]])
            if len(coords):
                assert (cached.labels[tuple(coords.T)] == value).all()
    with pytest.raises(DatasetError, match="no preprocessed case 'case_99999'"):
        open_case(cache_dir, "case_99999")


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_interrupted_preprocessing_leaves_no_half_case_and_resumes(
    tmp_path: Path, cases, plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache"
    calls = []
    real = cache_module.labels_to_model_grid

    def failing_on_second(labels, grid):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway through the second case
        return real(labels, grid)

    monkeypatch.setattr(cache_module, "labels_to_model_grid", failing_on_second)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(cases, MAPPING, plan, folder, progress=False)
    assert cached_case_ids(folder) == [cases[0].case_id]
    assert sorted(p.name for p in folder.iterdir()) == [".lock", cases[0].case_id, "plan.json"]
    first = _mtimes(folder / cases[0].case_id)
    # A run killed outright leaves its temporary folder: the next run removes it.
    stale = folder / f"{PARTIAL_PREFIX}{cases[1].case_id}-killed"
    stale.mkdir()
    (stale / "image.npy").write_bytes(b"half")

    calls.clear()
    monkeypatch.setattr(
        cache_module, "labels_to_model_grid", lambda labels, grid: calls.append(1) or real(labels, grid)
    )
    preprocess_dataset(cases, MAPPING, plan, folder, progress=False)
    assert len(calls) == len(cases) - 1  # only the missing cases
    assert _mtimes(folder / cases[0].case_id) == first
    assert cached_case_ids(folder) == [c.case_id for c in cases]
    assert not stale.exists() and not list(folder.glob(f"{PARTIAL_PREFIX}*"))


def test_failing_cases_are_listed_after_the_others_are_done(tmp_path: Path, plan: Plan) -> None:
    cases = write_phantom_dataset(tmp_path / "data", 3, seed=7, spacing_scale=3)
    data = cases[1].image.read_bytes()
    cases[1].image.write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match=r"1 of 3 case\(s\) failed preprocessing.*\n.*case_00008"):
        preprocess_dataset(cases, MAPPING, plan, tmp_path / "cache", progress=False)
    assert cached_case_ids(tmp_path / "cache") == ["case_00007", "case_00009"]


def test_cache_made_with_another_plan_is_refused(tmp_path: Path, cache_dir: Path, cases, plan: Plan) -> None:
    before = _mtimes(cache_dir)
    other = dataclasses.replace(plan, target_spacing_zyx=(6.0, 6.0, 6.0))
    with pytest.raises(ConfigError, match=r"different plan \(target_spacing_zyx: .*choose another cache folder"):
        preprocess_dataset(cases, MAPPING, other, cache_dir, progress=False)
    with pytest.raises(ConfigError, match="clip_hu"):
        preprocess_dataset(cases, MAPPING, dataclasses.replace(plan, clip_hu=(-100.0, 200.0)), cache_dir)
    assert _mtimes(cache_dir) == before
    # A folder that is not a cache is not written into.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a cache"):
        preprocess_dataset(cases, MAPPING, plan, tmp_path / "mine", progress=False)
    # A plan made with another label mapping does not fit the dataset read with this one.
    with pytest.raises(ConfigError, match="label mapping"):
        preprocess_dataset(cases, LabelMapping.kits23("tumor"), plan, tmp_path / "new", progress=False)


def test_cache_accepts_a_plan_with_only_another_patch_size(tmp_path: Path, phantom_kits19: Path) -> None:
    cases = find_cases(phantom_kits19)[:2]
    plan = make_plan(fingerprint(cases, mapping_for(phantom_kits19)))
    folder = tmp_path / "cache"
    preprocess_dataset(cases, MAPPING, plan, folder, progress=False)
    before = _mtimes(folder / cases[0].case_id)
    bigger = dataclasses.replace(plan, patch_size_zyx=tuple(2 * p for p in plan.patch_size_zyx))
    preprocess_dataset(cases, MAPPING, bigger, folder, progress=False)
    assert load_plan(folder / "plan.json") == bigger
    assert _mtimes(folder / cases[0].case_id) == before


# ----------------------------------------------------------------------------------------------------
# Splits

IDS = [f"case_{i:05d}" for i in range(23)]


def test_kfold_is_disjoint_covering_and_deterministic() -> None:
    splits = kfold(IDS, k=5, seed=0)
    assert list(splits) == [f"fold{i}" for i in range(5)]
    val_count = dict.fromkeys(IDS, 0)
    for split in splits.values():
        assert not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == IDS
        for case_id in split["val"]:
            val_count[case_id] += 1
        assert len(split["val"]) in (4, 5)
    assert set(val_count.values()) == {1}  # every case in exactly one validation fold
    assert kfold(list(reversed(IDS)), k=5, seed=0) == splits  # the input order does not matter
    assert kfold(IDS, k=5, seed=1) != splits
    with pytest.raises(ConfigError, match="at least 30 cases"):
        kfold(IDS, k=30)
    with pytest.raises(ConfigError, match="more than once"):
        kfold([*IDS, IDS[0]])


def test_holdout_split() -> None:
    splits = holdout(IDS, val_fraction=0.2, seed=3)
    split = splits["holdout"]
    assert len(split["val"]) == 5 and sorted(split["train"] + split["val"]) == IDS
    assert not set(split["train"]) & set(split["val"])
    assert holdout(IDS, 0.2, seed=3) == splits
    with pytest.raises(ConfigError, match="val_fraction"):
        holdout(IDS, val_fraction=1.5)


def test_splits_round_trip_and_unknown_name_refused(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    splits = {**kfold(IDS, 5), **holdout(IDS)}
    save_splits(path, splits)
    assert load_splits(path) == splits
    assert load_splits(path, "fold2") == splits["fold2"]
    with pytest.raises(ConfigError, match=r"no split 'fold9'; the splits are fold0, fold1, .*holdout"):
        load_splits(path, "fold9")
    with pytest.raises(ConfigError, match="no split"):
        select_split(splits, "fold5")
    path.write_text(json.dumps({"fold0": {"train": ["a", "b"], "val": ["b"]}}))
    with pytest.raises(ConfigError, match="in both train and val"):
        load_splits(path)
    path.write_text(json.dumps({"fold0": {"train": ["a"]}}))
    with pytest.raises(ConfigError, match="'train' and 'val'"):
        load_splits(path)


def test_sigkill_during_prepare_then_rerun_gives_the_cache_of_an_uninterrupted_run(tmp_path: Path) -> None:
    """``prepare`` killed outright (SIGKILL) after a few cases; the rerun finishes, and every cached array
    and case record equals those of a run that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    from kidneytumorseg_train.datasets import write_phantom_dataset

    data = tmp_path / "data"
    write_phantom_dataset(data, 10, seed=3, layout="kits19", spacing_scale=1)
    recipe = Path(__file__).resolve().parents[2] / "train" / "configs" / "phantom.json"

    def prepare(work: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "kidneytumorseg_train", "prepare", "--data", str(data)]
        command += ["--recipe", str(recipe), "--work", str(work), "--quiet", "--workers", "1"]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    killed = prepare(tmp_path / "killed")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        cache = tmp_path / "killed" / "cache"
        if cache.is_dir() and len([p for p in cache.iterdir() if (p / "case.json").is_file()]) >= 3:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    done_before = len(cached_case_ids(tmp_path / "killed" / "cache"))
    assert 3 <= done_before < 10
    for work in (tmp_path / "killed", tmp_path / "clean"):
        proc = prepare(work)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    ids = cached_case_ids(tmp_path / "clean" / "cache")
    assert cached_case_ids(tmp_path / "killed" / "cache") == ids and len(ids) == 10
    for case_id in ids:
        a, b = tmp_path / "killed" / "cache" / case_id, tmp_path / "clean" / "cache" / case_id
        for name in ("image.npy", "labels.npy"):
            assert np.array_equal(np.load(a / name), np.load(b / name)), f"{case_id}/{name} differs"
        assert json.loads((a / "case.json").read_text()) == json.loads((b / "case.json").read_text())
    leftovers = [p.name for p in (tmp_path / "killed" / "cache").iterdir() if p.name.startswith(".partial")]
    assert leftovers == []
