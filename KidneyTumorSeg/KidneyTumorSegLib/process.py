"""A background run of ``python -m KidneyTumorSegLib predict`` for the Slicer module.

The GUI must stay alive while a CT is segmented, and Slicer's own process must never hold GPU memory,
so the network runs in a child process: the same ``predict --progress json`` command batch users run,
started as ``-m KidneyTumorSegLib`` under Slicer's Python (console-script launchers are missing from
some installs). Reader threads turn the child's output into a state, a progress fraction, a stage, the
time remaining and, on failure, the command's own ``error: ...`` message. ``cancel`` kills the whole
process tree (the child is started in a new session or process group, because killing only the direct
child can leave workers running). Everything happens in a private temporary folder
(``tempfile.mkdtemp``), which is removed when the run ends, whatever the way it ends.

How the child is started is behind the small ``Launcher`` protocol, so tests can drive a run with a
scripted fake process.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from .errors import KidneyTumorSegError

INPUT_NAME = "ct.nrrd"
OUTPUT_NAME = "labels.nrrd"
# The folder that holds the KidneyTumorSegLib package: the child must import it from there.
_LIBRARY_PARENT = Path(__file__).resolve().parent.parent


class SegmentationRunError(KidneyTumorSegError):
    """The segmentation command failed; the message is the command's own."""


class SegmentationCancelledError(KidneyTumorSegError):
    """The run was cancelled by the user."""


class RunState(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


# ------------------------------------------------------------------------------------------ launching


class RunningProcess(Protocol):
    """What a run needs of a started child process."""

    stdout: IO[str]
    stderr: IO[str]

    def wait(self, timeout: float | None = None) -> int: ...

    def kill_tree(self) -> None: ...


class Launcher(Protocol):
    def launch(self, command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> RunningProcess: ...


class _PopenProcess:
    """A ``subprocess.Popen`` started as the leader of its own process group, so the group can be killed."""

    def __init__(self, command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> None:
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        self._popen = subprocess.Popen(  # noqa: S603 - a fixed argument list, no shell
            list(command),
            cwd=str(cwd),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        self.stdout = self._popen.stdout
        self.stderr = self._popen.stderr

    @property
    def pid(self) -> int:
        return self._popen.pid

    def wait(self, timeout: float | None = None) -> int:
        return self._popen.wait(timeout)

    def kill_tree(self) -> None:
        if self._popen.poll() is not None and sys.platform == "win32":
            return
        if sys.platform == "win32":
            # taskkill /T ends the children too; Popen.kill() would only end the direct child.
            subprocess.run(  # noqa: S603
                ["taskkill", "/F", "/T", "/PID", str(self._popen.pid)],  # noqa: S607
                capture_output=True,
                creationflags=subprocess.CREATE_NO_WINDOW,
                check=False,
            )
        else:
            # The group outlives its leader: kill it even when the leader has exited already.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._popen.kill()


class SubprocessLauncher:
    """Starts the child with ``subprocess`` (no shell), in a new session or process group."""

    def launch(self, command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> RunningProcess:
        return _PopenProcess(command, cwd, env)


# ------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class PredictionRequest:
    """What to run: a model (registry name or file path; None for the registry's default) and options."""

    model: str | None = None
    device: str = "auto"
    tta: bool = False
    postprocess: bool = True
    split_kidneys: bool = False
    report: bool = False  # also the measurements (NAME.report.json), read back into a table


def prediction_command(python: str, input_path: Path, output_path: Path, request: PredictionRequest) -> list[str]:
    """The command line of a run: the same ``predict --progress json`` that batch users run."""
    command = [python, "-m", "KidneyTumorSegLib", "predict", str(input_path), "-o", str(output_path)]
    command += ["--progress", "json", "--device", request.device]
    if request.model:
        command += ["--model", request.model]
    if request.tta:
        command.append("--tta")
    if not request.postprocess:
        command.append("--no-postprocess")
    if request.split_kidneys:
        command.append("--split-kidneys")
    if request.report:
        command.append("--report")
    return command


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this one, plus the library on the path and UTF-8 pipes (so messages that
    name a file with non-ASCII characters arrive intact on any platform)."""
    env = dict(os.environ if base is None else base)
    paths = [str(_LIBRARY_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def private_temp_dir(prefix: str = "kidneytumorseg-", root: str | os.PathLike | None = None) -> Path:
    """A new folder only this user can read (``mkdtemp`` makes it 0700). On Windows a path with non-ASCII
    characters (a user name such as "Jürgen") is replaced by its 8.3 short form when the volume has one,
    because some image libraries still open files through the ANSI code page."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    if sys.platform == "win32" and not str(folder).isascii():
        folder = _windows_short_path(folder)
    return folder


def _windows_short_path(path: Path) -> Path:
    import ctypes

    buffer = ctypes.create_unicode_buffer(1024)
    length = ctypes.windll.kernel32.GetShortPathNameW(str(path), buffer, len(buffer))  # type: ignore[attr-defined]
    return Path(buffer.value) if 0 < length < len(buffer) else path


@dataclass
class RunStatus:
    """A consistent picture of a run at one moment (what the GUI shows)."""

    state: RunState
    fraction: float = 0.0
    stage: str = ""
    eta_s: float | None = None
    elapsed_s: float = 0.0
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    device: str = ""
    exit_code: int | None = None


class BackgroundPrediction:
    """One run of the segmentation command on one CT, in the background.

    Usage: write the CT to ``input_path`` (the folder exists from construction on), ``start``, then poll
    ``status()`` (and ``drain_log()``) until ``status().state.finished``. On success the labels are at
    ``output_path`` until ``cleanup()``, which the owner calls once it has read them; a failed or
    cancelled run removes its folder by itself. ``cancel`` kills the process tree and returns once the
    run has ended.
    """

    def __init__(
        self,
        launcher: Launcher | None = None,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        temp_root: str | os.PathLike | None = None,
    ) -> None:
        self._launcher = launcher or SubprocessLauncher()
        self._python = python or sys.executable
        self._env = child_environment(env)
        self.workdir = private_temp_dir(root=temp_root)
        # Removes the folder if the owner forgets (or the application exits first).
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        self.command: list[str] = []
        self._lock = threading.Lock()
        self._status = RunStatus(RunState.IDLE)
        self._log: list[str] = []
        self._errors: list[str] = []
        self._stderr_tail: list[str] = []
        self._output_reported = False
        self._process: RunningProcess | None = None
        self._supervisor: threading.Thread | None = None
        self._cancel_requested = False
        self._started = 0.0

    @property
    def input_path(self) -> Path:
        return self.workdir / INPUT_NAME

    @property
    def output_path(self) -> Path:
        return self.workdir / OUTPUT_NAME

    # ------------------------------------------------------------------------------------------ control

    def start(self, request: PredictionRequest) -> None:
        if self._status.state != RunState.IDLE:
            raise RuntimeError("a BackgroundPrediction runs once; create a new one for the next run")
        if not self.input_path.is_file():
            raise RuntimeError(f"write the CT to {self.input_path} before starting")
        self.command = prediction_command(self._python, self.input_path, self.output_path, request)
        self._started = time.monotonic()
        self._append_log("$ " + " ".join(self.command))
        with self._lock:
            self._status = RunStatus(RunState.RUNNING, stage="starting")
        try:
            self._process = self._launcher.launch(self.command, self.workdir, self._env)
        except OSError as exc:
            self._finish(
                RunState.FAILED, f"could not start {self._python} ({exc.strerror or exc}); check the installation."
            )
            return
        self._supervisor = threading.Thread(target=self._supervise, name="kidneytumorseg-run", daemon=True)
        self._supervisor.start()

    def cancel(self, timeout: float = 30.0) -> None:
        """Kill the process tree; returns once the run has ended and its folder is gone."""
        with self._lock:
            if self._status.state.finished:
                return
            self._cancel_requested = True
        if self._process is None:  # never started
            self._finish(RunState.CANCELLED, "")
            return
        self._append_log("cancel: stopping the segmentation process")
        self._process.kill_tree()
        self.wait(timeout)

    def wait(self, timeout: float | None = None) -> RunState:
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        return self.status().state

    def cleanup(self) -> None:
        """Remove the temporary folder (the labels with it). Safe to call more than once."""
        self._finalizer()

    # ------------------------------------------------------------------------------------------- state

    def status(self) -> RunStatus:
        with self._lock:
            status = RunStatus(**{**self._status.__dict__})
            status.warnings = list(self._status.warnings)
            status.volumes_ml = dict(self._status.volumes_ml)
        if self._started and not status.state.finished:
            status.elapsed_s = time.monotonic() - self._started
        return status

    def drain_log(self) -> list[str]:
        """Log lines (the command, its messages, its progress stages) not returned before."""
        with self._lock:
            lines, self._log = self._log, []
        return lines

    # --------------------------------------------------------------------------------------- internals

    def _append_log(self, line: str) -> None:
        with self._lock:
            self._log.append(line)

    def _supervise(self) -> None:
        process = self._process
        if process is None:
            return
        stderr_reader = threading.Thread(target=self._read_stderr, args=(process.stderr,), daemon=True)
        stderr_reader.start()
        try:
            for line in process.stdout:
                self._on_stdout_line(line.rstrip("\r\n"))
        except (OSError, ValueError):  # the pipe was closed under us by a kill
            pass
        stderr_reader.join()
        exit_code = process.wait()
        with self._lock:
            self._status.exit_code = exit_code
            cancelled = self._cancel_requested
        if cancelled:
            self._finish(RunState.CANCELLED, "")
        elif exit_code == 0 and self._output_reported and self.output_path.is_file():
            self._finish(RunState.SUCCEEDED, "")
        else:
            self._finish(RunState.FAILED, self._failure_message(exit_code))

    def _on_stdout_line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            self._append_log(line)
            return
        if not isinstance(record, dict):
            self._append_log(line)
            return
        event = record.get("event")
        with self._lock:
            status = self._status
            if event == "progress":
                if record.get("stage") != status.stage:
                    self._log.append(f"stage: {record.get('stage')}")
                status.stage = str(record.get("stage", ""))
                status.fraction = max(0.0, min(1.0, float(record.get("fraction") or 0.0)))
                eta = record.get("eta_s")
                status.eta_s = None if eta is None else float(eta)
            elif event == "case_done":
                self._output_reported = True
                status.volumes_ml = {str(k): float(v) for k, v in (record.get("volumes_ml") or {}).items()}
                status.device = str(record.get("device", ""))
                timings = record.get("timings_s") or {}
                self._log.append(
                    "done on " + status.device + ": " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                )
            elif event == "case_failed":
                self._errors.append(str(record.get("error", "")))
            else:
                self._log.append(line)

    def _read_stderr(self, stream: IO[str]) -> None:
        try:
            for raw in stream:
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                with self._lock:
                    self._log.append(line)
                    self._stderr_tail = (self._stderr_tail + [line])[-20:]
                    if line.startswith("error: "):
                        self._errors.append(line[len("error: ") :])
                    elif line.startswith("warning: "):
                        self._status.warnings.append(line[len("warning: ") :])
        except (OSError, ValueError):
            pass

    def _failure_message(self, exit_code: int) -> str:
        with self._lock:
            if self._errors:
                return self._errors[-1]
            tail = [line for line in self._stderr_tail if line.strip()]
        if tail:
            # No message of the command's own (a crash): its last lines say most.
            return f"the segmentation command stopped with exit status {exit_code}: " + " | ".join(tail[-3:])
        if exit_code == 0:
            return "the segmentation command ended without writing labels; see the log."
        return f"the segmentation command stopped with exit status {exit_code} and no message; see the log."

    def _finish(self, state: RunState, error: str) -> None:
        with self._lock:
            self._status.state = state
            self._status.error = error
            if state == RunState.SUCCEEDED:
                self._status.fraction = 1.0
                self._status.eta_s = 0.0
            if self._started:
                self._status.elapsed_s = time.monotonic() - self._started
            self._log.append(f"{state.value}" + (f": {error}" if error else ""))
        if state != RunState.SUCCEEDED:
            self.cleanup()
