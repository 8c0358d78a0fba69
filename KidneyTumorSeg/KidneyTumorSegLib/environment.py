"""What the Slicer module shows before a run: the torch build, the GPU, the models.

These facts are asked of a child Python (``python -m KidneyTumorSegLib.environment``) rather than found
in Slicer's own process, for two reasons: importing torch into Slicer can fail on a broken install (and
takes seconds), and asking CUDA for a device name creates a CUDA context, which holds GPU memory for as
long as Slicer runs. The child answers with one JSON object; ``device_summary`` and ``model_summary``
turn it into the one-line texts of the panel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .process import child_environment

MIN_TORCH_VERSION = "2.1"


def describe(model: str | None = None) -> dict[str, Any]:
    """The facts, found in this process (the child's side)."""
    info: dict[str, Any] = {"torch": None, "cuda_build": None, "gpus": [], "safetensors": None, "errors": []}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - a broken torch install raises anything; report it
        info["errors"].append(f"torch cannot be imported ({type(exc).__name__}: {exc})")
    try:
        import safetensors

        info["safetensors"] = getattr(safetensors, "__version__", "installed")
    except ImportError:
        pass
    info["models"] = []
    info["model"] = None
    if info["torch"] is None:
        return info
    from .errors import KidneyTumorSegError
    from .modelfile import read_metadata, read_registry, resolve_model

    try:
        info["models"] = [
            {
                "name": e.name,
                "version": e.version,
                "trained": e.trained,
                "description": e.description,
                "intended_use": e.intended_use,
                "default": e.default,
            }
            for e in read_registry()
        ]
    except KidneyTumorSegError as exc:
        info["errors"].append(str(exc))
    if model:
        entry = next((m for m in info["models"] if m["name"] == model), None)
        if entry is not None:
            info["model"] = {**entry, "source": "registry"}
            try:  # the training data is in the file's metadata, once the file is here
                provenance = read_metadata(resolve_model(model)).provenance
                info["model"]["dataset"] = str(provenance.get("dataset", ""))
            except KidneyTumorSegError:
                pass
        else:
            try:
                meta = read_metadata(model)
                info["model"] = {
                    "name": meta.name,
                    "version": meta.version,
                    "trained": meta.trained,
                    "description": meta.description,
                    "intended_use": meta.intended_use,
                    "dataset": str(meta.provenance.get("dataset", "")),
                    "source": "file",
                    "path": str(Path(model).resolve()),
                }
            except KidneyTumorSegError as exc:
                info["model"] = {"error": str(exc), "source": "file", "path": model}
    return info


def query(python: str | None = None, model: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Ask a child Python (Slicer's by default) for ``describe(model)``. Never raises: a failure is
    reported in ``errors``."""
    command = [python or sys.executable, "-m", "KidneyTumorSegLib.environment"]
    if model:
        command += ["--model", model]
    try:
        done = subprocess.run(  # noqa: S603 - a fixed argument list, no shell
            command,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=child_environment(),
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"torch": None, "gpus": [], "models": [], "model": None, "errors": [f"{command[0]}: {exc}"]}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"torch": None, "gpus": [], "models": [], "model": None, "errors": [tail or "no answer"]}
    return json.loads(lines[-1])


class BackgroundQuery:
    """``query`` on a thread, so the panel stays responsive; poll ``done`` and read ``result``."""

    def __init__(self, python: str | None = None, model: str | None = None) -> None:
        self.result: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, args=(python, model), daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self, python: str | None, model: str | None) -> None:
        self.result = query(python, model)


def device_summary(info: dict[str, Any]) -> str:
    """'torch 2.4.1 (CUDA 12.1): NVIDIA RTX A4000', 'torch 2.4.1: CPU only (CPU-only build)', or why not."""
    if not info.get("torch"):
        reason = "; ".join(info.get("errors") or []) or "not installed"
        return f"PyTorch: {reason}. Apply offers to install it through the PyTorch extension."
    build = f" (CUDA {info['cuda_build']})" if info.get("cuda_build") else ""
    if info.get("gpus"):
        return f"torch {info['torch']}{build}: {', '.join(info['gpus'])}"
    why = "CPU-only build" if not info.get("cuda_build") else "no usable GPU found"
    return f"torch {info['torch']}{build}: CPU only ({why})"


def model_summary(model: dict[str, Any] | None) -> str:
    """Name, version, whether trained, training data and intended use, on one line."""
    if not model:
        return ""
    if model.get("error"):
        return model["error"]
    trained = "trained" if model.get("trained") else "UNTRAINED (random weights): its labels are meaningless"
    parts = [f"{model.get('name', '?')} {model.get('version', '')}".strip(), trained]
    if model.get("dataset"):
        parts.append(f"training data: {model['dataset']}")
    if model.get("intended_use"):
        parts.append(model["intended_use"])
    return " · ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m KidneyTumorSegLib.environment")
    parser.add_argument("--model", default=None, help="registry name or model file to describe")
    args = parser.parse_args(argv)
    print(json.dumps(describe(args.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
