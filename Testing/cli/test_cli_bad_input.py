"""Bad input to the command line: every case ends with exit status 2, one ``error:`` line on stderr that
names the offending file or option and says what to do, no traceback, and no output file (not even a
half-written temporary one).

The CLI runs as a subprocess, exactly as a user or 3D Slicer runs it. Every bad file is made here, in the
test, from numpy arrays, SimpleITK images or raw bytes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

EXIT_BAD_INPUT = 2
METADATA_KEY = "kidneytumorseg"


# ------------------------------------------------------------------------------------------------- helpers


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "KidneyTumorSegLib", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def predict_argv(input_path: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return [
        "predict", str(input_path), "-o", str(output), "--progress", "none",
        "--model", str(model), "--device", "cpu", *extra,
    ]  # fmt: skip


def predict(input_path: Path, output: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(*predict_argv(input_path, output, model, *extra))


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def assert_refused(
    proc: subprocess.CompletedProcess, output: Path | None, names: str, hints: tuple[str, ...] = ()
) -> str:
    """Exit 2, exactly one ``error:`` line naming ``names`` and holding every hint, no traceback, no output
    file and no leftover temporary file. Returns the error line."""
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == EXIT_BAD_INPUT, report
    assert "Traceback" not in proc.stderr, report
    errors = error_lines(proc)
    assert len(errors) == 1, report
    line = errors[0]
    assert names in line, f"the error does not name {names!r}:\n{line}"
    for hint in hints:
        assert hint.lower() in line.lower(), f"the error lacks {hint!r}:\n{line}"
    if output is not None:
        assert not output.exists(), f"{output} was created although the run failed"
        if output.parent.is_dir():
            leftovers = [p.name for p in output.parent.iterdir() if ".partial" in p.name]
            assert not leftovers, f"temporary files left behind: {leftovers}"
    return line


def ct_array(shape_zyx: tuple[int, int, int] = (20, 48, 40)) -> np.ndarray:
    """Air (-1000 HU) around a soft-tissue block (40 HU)."""
    array = np.full(shape_zyx, -1000, dtype=np.int16)
    z, y, x = shape_zyx
    array[z // 5 : z - z // 5, y // 6 : y - y // 6, x // 5 : x - x // 5] = 40
    return array


def write(array: np.ndarray, path: Path, spacing=(4.0, 4.0, 4.0), is_vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if image.GetDimension() == len(spacing):
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


# ------------------------------------------------------------------------------------------ bad images


def _missing(tmp: Path) -> Path:
    return tmp / "no_such_scan.nii.gz"


def _text_file(tmp: Path) -> Path:
    path = tmp / "scan.txt"
    path.write_text("not an image\n")
    return path


def _empty_file(tmp: Path) -> Path:
    path = tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _truncated(tmp: Path) -> Path:
    noise = np.random.default_rng(0).integers(-1000, 1000, (20, 48, 40)).astype(np.int16)
    full = write(noise, tmp / "full.nii.gz").read_bytes()
    path = tmp / "truncated.nii.gz"
    path.write_bytes(full[: len(full) // 2])
    return path


def _random_bytes(tmp: Path) -> Path:
    path = tmp / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(8192))
    return path


def _image_2d(tmp: Path) -> Path:
    return write(ct_array()[10], tmp / "slice2d.nii.gz", spacing=(4.0, 4.0))


def _image_4d(tmp: Path) -> Path:
    volumes = [sitk.GetImageFromArray(ct_array()) for _ in range(3)]
    path = tmp / "series4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(volumes), str(path))
    return path


def _image_4d_from_array(tmp: Path) -> Path:
    return write(np.stack([ct_array()] * 2), tmp / "array4d.mha", spacing=(4.0, 4.0, 4.0, 1.0))


def _rgb_nifti(tmp: Path) -> Path:
    rgb = np.random.default_rng(2).integers(0, 255, (20, 48, 40, 3)).astype(np.uint8)
    return write(rgb, tmp / "rgb.nii.gz", is_vector=True)


def _rgb_mha(tmp: Path) -> Path:
    rgb = np.random.default_rng(2).integers(0, 255, (20, 48, 40, 3)).astype(np.uint8)
    return write(rgb, tmp / "rgb.mha", is_vector=True)


def _single_slice_nrrd(tmp: Path) -> Path:
    return write(ct_array((1, 48, 40)), tmp / "one_slice.nrrd")


def _single_slice_nifti(tmp: Path) -> Path:
    return write(ct_array((1, 48, 40)), tmp / "one_slice.nii.gz")


def _with_value(value: float, name: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        array = ct_array().astype(np.float32)
        array[10, 20:22, 15:18] = value
        return write(array, tmp / name)

    return build


def _mha_header(tmp: Path, name: str, fields: dict[str, str], data: bytes = b"") -> Path:
    """A MetaImage header with its voxels in a separate raw file (what a header that lies looks like)."""
    raw = tmp / f"{name}.raw"
    raw.write_bytes(data)
    header = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False"}
    header.update({"ElementType": "MET_SHORT", **fields, "ElementDataFile": raw.name})
    path = tmp / f"{name}.mhd"
    path.write_text("".join(f"{k} = {v}\n" for k, v in header.items()))
    return path


def _declared_huge(tmp: Path) -> Path:
    """A header declaring 100000 x 100000 x 5000 voxels over a 2 kB file: refused before any allocation."""
    return _mha_header(tmp, "huge", {"DimSize": "100000 100000 5000", "ElementSpacing": "1 1 1"}, b"\0" * 2048)


def _header_larger_than_data(tmp: Path) -> Path:
    """The header promises 64 x 64 x 40 voxels; the data file holds a tenth of them."""
    return _mha_header(tmp, "short", {"DimSize": "64 64 40", "ElementSpacing": "1 1 1"}, b"\0" * (64 * 64 * 8))


def _zero_length_axis(tmp: Path) -> Path:
    return _mha_header(tmp, "zero_axis", {"DimSize": "64 64 0", "ElementSpacing": "1 1 1"})


def _constant_image(tmp: Path) -> Path:
    return write(np.full((20, 48, 40), -1024, dtype=np.int16), tmp / "blank.nrrd")


# A negative spacing in a MetaImage header is not in this list: ITK reads it as a positive spacing along a
# flipped axis, the same geometry, so it is a valid input (a negative spacing cannot be written in NRRD, and
# in NIfTI it is the ordinary qfac flip).


def _zero_spacing(tmp: Path) -> Path:
    return _mha_header(tmp, "zero_spacing", {"DimSize": "40 48 20", "ElementSpacing": "1 0 1"}, ct_array().tobytes())


def _sheared_direction(tmp: Path) -> Path:
    fields = {"DimSize": "40 48 20", "ElementSpacing": "1 1 1", "TransformMatrix": "1 0 0 0.5 1 0 0 0 1"}
    return _mha_header(tmp, "sheared", fields, ct_array().tobytes())


def _dicom_series(tmp: Path, name: str, drop: int | None = None, second_series: bool = False) -> Path:
    """A CT written as DICOM slices (SimpleITK), optionally without one middle slice or with a second series."""
    folder = tmp / name
    folder.mkdir()
    image = sitk.GetImageFromArray(ct_array())
    image.SetSpacing((1.0, 1.0, 2.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for series in range(2 if second_series else 1):
        series_uid = f"1.2.826.0.1.3680043.8.498.{4242 + series}"
        for k in range(image.GetDepth()):
            if k == drop:
                continue
            piece = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            for key, value in {
                "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.8.498.4241", "0020|000e": series_uid,
                "0020|0013": str(k + 1), "0020|0032": "\\".join(str(v) for v in position),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"{series_uid}.{k + 1}",
            }.items():  # fmt: skip
                piece.SetMetaData(key, value)
            writer.SetFileName(str(folder / f"s{series}_{k:03d}.dcm"))
            writer.Execute(piece)
    return folder


BAD_IMAGES = {
    "missing_file": (_missing, ("no such file", "check the path")),
    "declared_size_too_large": (_declared_huge, ("declares", "--allow-large")),
    "header_larger_than_data": (_header_larger_than_data, ("cannot be read",)),
    "zero_length_axis": (_zero_length_axis, ("empty axis", "export")),
    "constant_image": (_constant_image, ("same value", "not a CT")),
    "zero_spacing": (_zero_spacing, ("spacing",)),
    "sheared_direction": (_sheared_direction, ("not orthonormal",)),
    "dicom_missing_slice": (lambda tmp: _dicom_series(tmp, "gap", drop=10), ("a slice is missing",)),
    "dicom_two_series": (lambda tmp: _dicom_series(tmp, "two", second_series=True), ("2 DICOM series",)),
    "unsupported_extension": (_text_file, ("unsupported file type", ".nii.gz")),
    "empty_file": (_empty_file, ("cannot be read",)),
    "truncated_nifti": (_truncated, ("truncated", "again")),
    "random_bytes_nifti": (_random_bytes, ("cannot be read", "corrupt")),
    "image_2d": (_image_2d, ("2D", "give the whole CT series")),
    "image_4d_joinseries": (_image_4d, ("4D", "give one 3D CT volume")),
    "image_4d_array_mha": (_image_4d_from_array, ("4D", "give one 3D CT volume")),
    "rgb_nifti": (_rgb_nifti, ("3 values per voxel", "give the CT itself")),
    "rgb_mha": (_rgb_mha, ("3 values per voxel", "give the CT itself")),
    "single_slice_nrrd": (_single_slice_nrrd, ("slice", "give the whole")),
    "single_slice_nifti": (_single_slice_nifti, ("slice", "give the whole")),
    "nan_voxels_nifti": (_with_value(np.nan, "nan.nii.gz"), ("NaN", "re-export")),
    "inf_voxels_nifti": (_with_value(np.inf, "inf.nii.gz"), ("infinite", "re-export")),
    "nan_voxels_nrrd": (_with_value(np.nan, "nan.nrrd"), ("NaN", "re-export")),
    "inf_voxels_mha": (_with_value(np.inf, "inf.mha"), ("infinite", "re-export")),
}


# ------------------------------------------------------------------------------------------ bad models


def _rewrite_model(source: Path, target: Path, edit_meta=None, edit_tensors=None) -> Path:
    """Copy a model file through safetensors, changing its metadata JSON and/or its tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(str(source))
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(target), metadata={METADATA_KEY: json.dumps(meta)})
    return target


def _model_missing(tmp: Path, good: Path) -> Path:
    return tmp / "no_such_model.safetensors"


def _model_random_bytes(tmp: Path, good: Path) -> Path:
    path = tmp / "corrupt.safetensors"
    data = bytearray(np.random.default_rng(3).bytes(4096))
    data[0] = 0x41  # never the pickle opcode, so this is about the safetensors checks
    path.write_bytes(bytes(data))
    return path


def _model_truncated(tmp: Path, good: Path) -> Path:
    data = good.read_bytes()
    path = tmp / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def _torch_pickle(tmp: Path, good: Path, name: str) -> Path:
    import torch
    from safetensors.torch import load_file

    path = tmp / name
    torch.save(load_file(str(good)), str(path))
    return path


def _model_pickle_pt(tmp: Path, good: Path) -> Path:
    return _torch_pickle(tmp, good, "model.pt")


def _model_pickle_renamed(tmp: Path, good: Path) -> Path:
    return _torch_pickle(tmp, good, "model_in_disguise.safetensors")


def _model_legacy_pickle_renamed(tmp: Path, good: Path) -> Path:
    """The pre-zip torch format (a bare pickle stream), named .safetensors."""
    import torch
    from safetensors.torch import load_file

    path = tmp / "legacy_pickle.safetensors"
    torch.save(load_file(str(good)), str(path), _use_new_zipfile_serialization=False)
    return path


def _model_other_architecture(tmp: Path, good: Path) -> Path:
    def edit(meta):
        meta["architecture"]["name"] = "UNet3D"

    return _rewrite_model(good, tmp / "unet.safetensors", edit_meta=edit)


def _model_wrong_shape(tmp: Path, good: Path) -> Path:
    def edit(tensors):
        name = next(n for n, t in tensors.items() if t.dim() == 5)
        tensors[name] = tensors[name].reshape(tensors[name].shape[0], -1).contiguous()

    return _rewrite_model(good, tmp / "wrong_shape.safetensors", edit_tensors=edit)


def _model_meta(name: str, edit) -> Callable[[Path, Path], Path]:
    def build(tmp: Path, good: Path) -> Path:
        return _rewrite_model(good, tmp / name, edit_meta=edit)

    return build


def _set(key: str, value):
    def edit(meta):
        meta[key] = value

    return edit


BAD_MODELS = {
    "model_missing": (_model_missing, ("not found",)),
    "model_random_bytes": (_model_random_bytes, ("not a safetensors",)),
    "model_truncated": (_model_truncated, ("truncated", "copy it again")),
    "model_pickle_pt": (_model_pickle_pt, ("pickle", ".safetensors model file")),
    "model_pickle_renamed_safetensors": (_model_pickle_renamed, ("pickle",)),
    "model_legacy_pickle_renamed": (_model_legacy_pickle_renamed, ("pickle",)),
    "model_other_architecture": (_model_other_architecture, ("architecture", "UNet3D")),
    "model_wrong_tensor_shape": (_model_wrong_shape, ("wrong shape",)),
    "model_patch_size_string": (
        _model_meta("patch_string.safetensors", _set("patch_size_zyx", "16,32,32")),
        ("patch_size_zyx", "list of 3 positive ints"),
    ),
    "model_negative_spacing": (
        _model_meta("negative_spacing.safetensors", _set("target_spacing_zyx_mm", [-4.0, 4.0, 4.0])),
        ("target_spacing_zyx_mm", "positive"),
    ),
    "model_format_version_99": (
        _model_meta("version99.safetensors", _set("format_version", 99)),
        ("format version 99", "update KidneyTumorSeg"),
    ),
}


# ----------------------------------------------------------------------------------------- bad options


BAD_OPTIONS = {
    "overlap_1.5": ("--overlap", "1.5"),
    "overlap_negative": ("--overlap", "-0.1"),
    "overlap_nan": ("--overlap", "nan"),
    "batch_size_0": ("--batch-size", "0"),
}


# ------------------------------------------------------------------------------------ all runs, in parallel


class CliRuns:
    """The module's CLI runs, all started when the first is needed and run a few at a time on a thread
    pool: each run spends ~1.5 s importing torch, and overlapping those start-ups saves most of this
    module's time on a 2-core machine. Each test then checks its own run."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self._runs: dict[str, tuple[Future, dict] | Exception] = {}

    def start(self, case: str, prepare: Callable[[], tuple[list[str], dict]]) -> None:
        """``prepare()`` makes the case's files and returns (CLI arguments, facts its test needs)."""
        try:
            argv, facts = prepare()
        except Exception as exc:  # noqa: BLE001 - reported by the case's own test, not by every test
            self._runs[case] = exc
            return
        self._runs[case] = (self._pool.submit(run_cli, *argv), facts)

    def result(self, case: str) -> tuple[subprocess.CompletedProcess, dict]:
        entry = self._runs[case]
        if isinstance(entry, Exception):
            raise entry
        future, facts = entry
        return future.result(), facts

    def check_refused(self, case: str) -> str:
        proc, facts = self.result(case)
        return assert_refused(proc, facts["output"], facts["names"], facts["hints"])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path):
    runs = CliRuns()
    model = tiny_model_path
    valid = write(ct_array(), tmp_path_factory.mktemp("valid") / "valid_ct.nii.gz")

    def case_folder(case: str) -> tuple[Path, Path]:
        folder = tmp_path_factory.mktemp(case)
        (folder / "out").mkdir()
        return folder, folder / "out" / "labels.nii.gz"

    def image_case(case, build, hints):
        folder, output = case_folder(case)
        image = build(folder)
        return predict_argv(image, output, model), {"output": output, "names": str(image), "hints": hints}

    def model_case(case, build, hints):
        folder, output = case_folder(case)
        bad_model = build(folder, model)
        return predict_argv(valid, output, bad_model), {
            "output": output,
            "names": str(bad_model),
            "hints": hints,
        }

    def option_case(case, option, value):
        _, output = case_folder(case)
        argv = predict_argv(valid, output, model, option, value)
        return argv, {"output": output, "names": option, "hints": (value,)}

    def broken_in_folder():
        folder, _ = case_folder("broken_in_folder")
        (folder / "cases").mkdir()
        broken = _with_value(np.nan, "broken.nii.gz")(folder / "cases")
        output = folder / "out" / "broken.nii.gz"
        argv = predict_argv(folder / "cases", folder / "out", model)
        return argv, {"output": output, "names": str(broken), "hints": ("NaN",)}

    def bad_option_for_a_batch():
        folder, _ = case_folder("bad_option_for_a_batch")
        (folder / "cases").mkdir()
        for name in ("case_a", "case_b"):
            write(ct_array(), folder / "cases" / f"{name}.nii.gz")
        argv = predict_argv(folder / "cases", folder / "out", model, "--overlap", "1.5")
        return argv, {"output": folder / "out" / "case_a.nii.gz", "names": "--overlap", "hints": ("1.5",)}

    def missing_output_folder():
        folder, _ = case_folder("missing_output_folder")
        output = folder / "no_such_folder" / "labels.nii.gz"
        hints = ("does not exist", "create it")
        return predict_argv(valid, output, model), {
            "output": output,
            "names": str(output.parent),
            "hints": hints,
        }

    def output_under_a_file():
        folder, _ = case_folder("output_under_a_file")
        blocker = folder / "not_a_folder"
        blocker.write_text("x")
        output = blocker / "labels.nii.gz"
        facts = {"output": output, "names": str(blocker), "hints": (), "blocker": blocker}
        return predict_argv(valid, output, model), facts

    def valid_small_ct():
        folder, _ = case_folder("valid_small_ct")
        image = sitk.GetImageFromArray(ct_array((20, 48, 40)))
        image.SetSpacing((4.0, 4.0, 4.0))
        image.SetOrigin((-80.0, 12.0, -300.0))
        ct = folder / "small_ct.nii.gz"
        sitk.WriteImage(image, str(ct))
        output = folder / "out" / "small_ct_labels.nii.gz"
        return predict_argv(ct, output, model), {"input": ct, "output": output}

    def mr_like():
        folder, _ = case_folder("mr_like")
        array = np.random.default_rng(4).integers(0, 801, (20, 48, 40)).astype(np.int16)
        mr = write(array, folder / "mr_like.nii.gz")
        output = folder / "out" / "mr_like_labels.nii.gz"
        return predict_argv(mr, output, model), {"input": mr, "output": output}

    for case, (build, hints) in BAD_IMAGES.items():
        runs.start(case, lambda c=case, b=build, h=hints: image_case(c, b, h))
    for case, (build, hints) in BAD_MODELS.items():
        runs.start(case, lambda c=case, b=build, h=hints: model_case(c, b, h))
    for case, (option, value) in BAD_OPTIONS.items():
        runs.start(case, lambda c=case, o=option, v=value: option_case(c, o, v))
    for prepare in (
        broken_in_folder,
        bad_option_for_a_batch,
        missing_output_folder,
        output_under_a_file,
        valid_small_ct,
        mr_like,
    ):
        runs.start(prepare.__name__, prepare)
    yield runs
    runs.close()


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_input_image_is_refused_with_clear_message(cli_runs: CliRuns, case: str):
    cli_runs.check_refused(case)


def test_truncated_nifti_is_refused_with_clear_message(cli_runs: CliRuns):
    """ITK reads half a NIfTI file without complaint (the missing voxels become 0): it must be refused."""
    assert "truncated" in cli_runs.check_refused("truncated_nifti")


def test_nan_voxels_in_nifti_are_refused_not_silently_zeroed(cli_runs: CliRuns):
    """ITK's NIfTI reader replaces NaN and infinite voxels by 0 without a word: they must be refused."""
    assert "NaN or infinite" in cli_runs.check_refused("nan_voxels_nifti")
    assert "NaN or infinite" in cli_runs.check_refused("inf_voxels_nifti")


def test_bad_image_in_a_folder_is_refused_and_writes_no_file(cli_runs: CliRuns):
    """A folder whose only image is broken: exit 2, the message names the file, nothing is written."""
    cli_runs.check_refused("broken_in_folder")


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_file_is_refused_with_clear_message(cli_runs: CliRuns, case: str):
    cli_runs.check_refused(case)


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_invalid_option_value_is_refused_with_clear_message(cli_runs: CliRuns, case: str):
    cli_runs.check_refused(case)


def test_invalid_option_for_a_batch_is_refused_once_before_any_work(cli_runs: CliRuns):
    """Two inputs and --overlap 1.5: one error line (not one per case), and no case is written."""
    cli_runs.check_refused("bad_option_for_a_batch")
    proc, facts = cli_runs.result("bad_option_for_a_batch")
    assert list(facts["output"].parent.iterdir()) == []
    assert "cases segmented" not in proc.stdout + proc.stderr


def test_missing_output_folder_is_refused_with_clear_message(cli_runs: CliRuns):
    cli_runs.check_refused("missing_output_folder")
    _, facts = cli_runs.result("missing_output_folder")
    assert not facts["output"].parent.exists()


def test_output_under_a_file_is_refused_with_clear_message(cli_runs: CliRuns):
    """The output's folder is an ordinary file: refused, the file untouched."""
    cli_runs.check_refused("output_under_a_file")
    _, facts = cli_runs.result("output_under_a_file")
    assert facts["blocker"].read_text() == "x"


def test_unwritable_output_folder_is_refused_with_clear_message(tmp_path: Path, tiny_model_path: Path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): a 0o500 folder is still writable")
        ct = write(ct_array(), tmp_path / "valid_ct.nii.gz")
        output = folder / "labels.nii.gz"
        proc = predict(ct, output, tiny_model_path)
        assert_refused(proc, output, str(folder), ("not writable", "choose a folder"))
    finally:
        folder.chmod(stat.S_IRWXU)


# ------------------------------------------------------------------------------ parser and evaluate errors


def test_non_numeric_option_is_refused_by_the_parser(tmp_path: Path, tiny_model_path: Path):
    """argparse's own error (its format: 'usage:' then 'PROG predict: error: ...'), still exit 2, no
    traceback and no output."""
    ct = write(ct_array(), tmp_path / "valid_ct.nii.gz")
    output = tmp_path / "labels.nii.gz"
    proc = predict(ct, output, tiny_model_path, "--overlap", "half")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--overlap" in proc.stderr and "invalid float value" in proc.stderr
    assert not output.exists()


def test_evaluate_with_different_sizes_is_refused_with_clear_message(tmp_path: Path):
    labels = np.zeros((20, 48, 40), dtype=np.uint8)
    labels[5:10, 10:20, 10:20] = 1
    prediction = write(labels, tmp_path / "prediction.nii.gz")
    reference = write(labels[:, :, :30].copy(), tmp_path / "reference.nii.gz")
    proc = run_cli("evaluate", str(prediction), str(reference))
    line = assert_refused(proc, None, str(prediction), ("same grid",))
    assert str(reference) in line
    assert proc.stdout == ""


def test_evaluate_with_missing_reference_is_refused_with_clear_message(tmp_path: Path):
    labels = np.zeros((20, 48, 40), dtype=np.uint8)
    prediction = write(labels, tmp_path / "prediction.nii.gz")
    reference = tmp_path / "no_such_reference.nii.gz"
    proc = run_cli("evaluate", str(prediction), str(reference))
    assert_refused(proc, None, str(reference), ("no such file",))


# ------------------------------------------------------------------------------------- positive controls


def test_valid_small_ct_is_segmented_on_its_own_grid(cli_runs: CliRuns):
    proc, facts = cli_runs.result("valid_small_ct")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not error_lines(proc)
    labels = sitk.ReadImage(str(facts["output"]))
    source = sitk.ReadImage(str(facts["input"]))
    assert labels.GetSize() == source.GetSize() == (40, 48, 20)
    assert labels.GetSpacing() == source.GetSpacing()
    assert labels.GetOrigin() == source.GetOrigin()
    assert labels.GetDirection() == source.GetDirection()
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}
    assert any("kidney" in line and "mL" in line for line in proc.stdout.splitlines()), proc.stdout
    assert [p.name for p in facts["output"].parent.iterdir()] == [facts["output"].name]


def test_mr_like_intensities_give_a_warning_about_ct(cli_runs: CliRuns):
    proc, facts = cli_runs.result("mr_like")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any("CT" in line and str(facts["input"]) in line for line in warnings), proc.stderr
    assert facts["output"].exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc: a folder no process can write to")
def test_output_folder_that_refuses_new_files_is_reported_without_traceback(tmp_path: Path, tiny_model_path: Path):
    # /proc refuses new files even for root, so this runs where chmod-based tests cannot.
    ct = tmp_path / "ct.nii.gz"
    image = sitk.GetImageFromArray(np.full((12, 20, 20), 40, np.int16))
    image.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(image, str(ct))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "KidneyTumorSegLib",
            "predict",
            str(ct),
            "-o",
            "/proc/self/labels.nii.gz",
            "--progress",
            "none",
            "--model",
            str(tiny_model_path),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "/proc/self" in errors[0] and "writ" in errors[0]
