"""The background run of the segmentation command: progress, errors, cancel, temporary files.

Most tests drive a ``BackgroundPrediction`` through a scripted fake process (the ``Launcher`` protocol);
two start real processes: one that kills a process tree, one that runs the real command under a folder
with a non-ASCII name.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from KidneyTumorSegLib.process import (
    BackgroundPrediction,
    PredictionRequest,
    RunState,
    SubprocessLauncher,
    child_environment,
    prediction_command,
    private_temp_dir,
)


class _Stream:
    """A pipe stand-in: yields its lines, and at a gate waits until released (or closed by a kill)."""

    def __init__(self, lines: list[str | None]) -> None:
        self._lines = lines
        self.release = threading.Event()
        self.closed = threading.Event()

    def __iter__(self):
        for line in self._lines:
            if line is None:  # the gate
                while not (self.release.is_set() or self.closed.is_set()):
                    time.sleep(0.01)
                if self.closed.is_set():
                    return
                continue
            yield line + "\n"


class _FakeProcess:
    def __init__(self, stdout: list[str | None], stderr: list[str | None], exit_code: int) -> None:
        self.stdout = _Stream(stdout)
        self.stderr = _Stream(stderr)
        self.exit_code = exit_code
        self.killed = False

    def wait(self, timeout: float | None = None) -> int:
        return -9 if self.killed else self.exit_code

    def kill_tree(self) -> None:
        self.killed = True
        self.stdout.closed.set()
        self.stderr.closed.set()


class _FakeLauncher:
    """Records the command; 'runs' a scripted process that writes the labels file when told to."""

    def __init__(self, process: _FakeProcess, writes_output: bool = True) -> None:
        self.process = process
        self.writes_output = writes_output
        self.command: list[str] = []
        self.env: dict[str, str] = {}

    def launch(self, command, cwd, env):
        self.command, self.env = list(command), dict(env)
        if self.writes_output:
            Path(command[command.index("-o") + 1]).write_bytes(b"labels")
        return self.process


def _progress(stage: str, fraction: float, eta: float | None) -> str:
    return json.dumps({"event": "progress", "case": "ct", "stage": stage, "fraction": fraction, "eta_s": eta})


_DONE = json.dumps(
    {
        "event": "case_done",
        "case": "ct",
        "output": "labels.nrrd",
        "volumes_ml": {"kidney": 301.5, "tumor": 12.25},
        "timings_s": {"read": 0.1, "network": 2.0},
        "device": "cpu",
        "warnings": [],
    }
)


def _started(launcher, request: PredictionRequest | None = None) -> BackgroundPrediction:
    run = BackgroundPrediction(launcher, python="python-for-test")
    run.input_path.write_bytes(b"ct")
    run.start(request or PredictionRequest(model="tiny.safetensors", device="cpu"))
    return run


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_progress_lines_drive_fraction_stage_and_time_remaining():
    process = _FakeProcess([_progress("read", 0.04, None), _progress("network", 0.5, 12.0), None, _DONE], [], 0)
    run = _started(_FakeLauncher(process))
    _wait_for(lambda: run.status().stage == "network")
    status = run.status()
    assert status.state == RunState.RUNNING
    assert status.fraction == pytest.approx(0.5)
    assert status.eta_s == pytest.approx(12.0)
    assert status.elapsed_s > 0
    process.stdout.release.set()
    assert run.wait(5) == RunState.SUCCEEDED
    done = run.status()
    assert done.fraction == 1.0
    assert done.volumes_ml == {"kidney": 301.5, "tumor": 12.25}
    assert done.device == "cpu"
    assert run.output_path.is_file(), "the labels stay until the owner has read them"
    log = run.drain_log()
    assert log[0].startswith("$ python-for-test -m KidneyTumorSegLib predict")
    assert "stage: network" in log
    assert run.drain_log() == [], "lines are returned once"
    run.cleanup()
    assert not run.workdir.exists()


def test_warnings_on_stderr_are_collected_apart_from_errors():
    process = _FakeProcess([_DONE], ["warning: model tiny-test is UNTRAINED (random weights)"], 0)
    run = _started(_FakeLauncher(process))
    assert run.wait(5) == RunState.SUCCEEDED
    assert run.status().warnings == ["model tiny-test is UNTRAINED (random weights)"]
    assert run.status().error == ""
    run.cleanup()


def test_failure_reports_the_commands_own_error_line_and_removes_the_folder():
    message = "/models/m.safetensors: model file not found; check the path, or give a model name from the registry."
    process = _FakeProcess([], ["warning: something minor", f"error: {message}"], 2)
    run = _started(_FakeLauncher(process, writes_output=False))
    assert run.wait(5) == RunState.FAILED
    status = run.status()
    assert status.error == message
    assert status.exit_code == 2
    assert not run.workdir.exists()


def test_a_case_failed_record_is_an_error_message_too():
    record = json.dumps({"event": "case_failed", "case": "ct", "error": "ct.nrrd: is a 2D image"})
    run = _started(_FakeLauncher(_FakeProcess([record], [], 2), writes_output=False))
    assert run.wait(5) == RunState.FAILED
    assert run.status().error == "ct.nrrd: is a 2D image"


def test_a_crash_without_a_message_reports_exit_status_and_last_lines():
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1', "MemoryError: out of memory"]
    run = _started(_FakeLauncher(_FakeProcess([], traceback, 1), writes_output=False))
    assert run.wait(5) == RunState.FAILED
    error = run.status().error
    assert "exit status 1" in error
    assert "MemoryError: out of memory" in error


def test_exit_status_zero_without_labels_is_a_failure():
    run = _started(_FakeLauncher(_FakeProcess([], [], 0), writes_output=False))
    assert run.wait(5) == RunState.FAILED
    assert "without writing labels" in run.status().error


def test_cancel_kills_the_process_tree_and_removes_the_folder():
    process = _FakeProcess([_progress("network", 0.3, 20.0), None, _DONE], [None], 0)
    run = _started(_FakeLauncher(process))
    _wait_for(lambda: run.status().stage == "network")
    run.cancel()
    assert process.killed
    assert run.status().state == RunState.CANCELLED
    assert not run.workdir.exists()


def test_a_missing_python_fails_with_a_message_instead_of_raising():
    run = BackgroundPrediction(SubprocessLauncher(), python=str(Path("/no/such/python")))
    run.input_path.write_bytes(b"ct")
    run.start(PredictionRequest())
    assert run.status().state == RunState.FAILED
    assert "could not start /no/such/python" in run.status().error
    assert not run.workdir.exists()


def test_a_run_needs_its_input_and_runs_once():
    run = BackgroundPrediction(_FakeLauncher(_FakeProcess([_DONE], [], 0)))
    with pytest.raises(RuntimeError, match="write the CT"):
        run.start(PredictionRequest())
    run.input_path.write_bytes(b"ct")
    run.start(PredictionRequest())
    run.wait(5)
    with pytest.raises(RuntimeError, match="runs once"):
        run.start(PredictionRequest())
    run.cleanup()


def test_command_line_is_the_batch_predict_command_with_the_panel_options():
    command = prediction_command(
        "PythonSlicer",
        Path("in/ct.nrrd"),
        Path("in/labels.nrrd"),
        PredictionRequest(model="m.safetensors", device="cuda", tta=True, postprocess=False),
    )
    assert command[:4] == ["PythonSlicer", "-m", "KidneyTumorSegLib", "predict"]
    assert command[command.index("-o") + 1] == str(Path("in/labels.nrrd"))
    assert command[command.index("--progress") + 1] == "json"
    assert command[command.index("--device") + 1] == "cuda"
    assert command[command.index("--model") + 1] == "m.safetensors"
    assert "--tta" in command and "--no-postprocess" in command
    default = prediction_command("p", Path("a"), Path("b"), PredictionRequest())
    assert "--model" not in default and "--tta" not in default and "--no-postprocess" not in default


def test_child_environment_finds_the_library_and_speaks_utf8():
    env = child_environment({"PYTHONPATH": "/elsewhere", "HOME": "/home/x"})
    library_parent = str(Path(__file__).resolve().parents[2] / "KidneyTumorSeg")
    assert env["PYTHONPATH"].split(os.pathsep) == [library_parent, "/elsewhere"]
    assert env["PYTHONIOENCODING"] == "utf-8"
    assert env["HOME"] == "/home/x"


def test_private_temp_dir_is_private_and_works_under_a_non_ascii_root(tmp_path):
    root = tmp_path / "Jürgen Ødegård 测试"
    root.mkdir()
    folder = private_temp_dir(root=root)
    assert folder.parent == root and folder.is_dir()
    if os.name == "posix":
        assert folder.stat().st_mode & 0o777 == 0o700


_TREE_SCRIPT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("grandchild", child.pid, flush=True)
time.sleep(120)
"""


class _ScriptLauncher:
    """Starts a script through the real launcher (new session / process group), not the command."""

    def launch(self, command, cwd, env):
        return SubprocessLauncher().launch([sys.executable, "-c", _TREE_SCRIPT], cwd, env)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] not in "ZX"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process liveness is read from /proc")
def test_cancel_kills_grandchildren_not_only_the_direct_child():
    run = _started(_ScriptLauncher())
    grandchild = None
    deadline = time.monotonic() + 30
    while grandchild is None and time.monotonic() < deadline:
        grandchild = next((int(line.split()[1]) for line in run.drain_log() if line.startswith("grandchild")), None)
        time.sleep(0.02)
    assert grandchild is not None and _alive(grandchild)
    run.cancel()
    assert run.status().state == RunState.CANCELLED
    _wait_for(lambda: not _alive(grandchild))
    assert not run.workdir.exists()


def test_real_command_runs_in_a_folder_with_a_non_ascii_name(tmp_path, tiny_model_path):
    """Temporary folders with non-ASCII characters (a user name) broke other extensions' file exchange."""
    import SimpleITK as sitk

    from KidneyTumorSegLib.phantom import make_phantom

    root = tmp_path / "Jürgen 测试"
    root.mkdir()
    run = BackgroundPrediction(temp_root=root)
    image = make_phantom(2, size=(40, 32, 12), spacing=(8.0, 8.0, 10.0), n_tumors=1).image
    sitk.WriteImage(image, str(run.input_path))
    run.start(PredictionRequest(model=str(tiny_model_path), device="cpu"))
    assert run.wait(300) == RunState.SUCCEEDED, run.status().error
    labels = sitk.ReadImage(str(run.output_path))
    assert labels.GetSize() == image.GetSize()
    run.cleanup()
    assert not run.workdir.exists()
