"""What the panel shows before a run (torch build, GPU, models), asked of a child Python."""

from __future__ import annotations

import sys
import time

from KidneyTumorSegLib import environment


def test_device_summary_names_the_gpu_or_says_cpu_only():
    gpu = {"torch": "2.4.1", "cuda_build": "12.1", "gpus": ["NVIDIA RTX A4000"]}
    assert environment.device_summary(gpu) == "torch 2.4.1 (CUDA 12.1): NVIDIA RTX A4000"
    cpu_build = {"torch": "2.4.1+cpu", "cuda_build": None, "gpus": []}
    assert environment.device_summary(cpu_build) == "torch 2.4.1+cpu: CPU only (CPU-only build)"
    no_gpu = {"torch": "2.4.1", "cuda_build": "12.1", "gpus": []}
    assert environment.device_summary(no_gpu).endswith("CPU only (no usable GPU found)")


def test_device_summary_without_torch_says_how_to_get_it():
    text = environment.device_summary({"torch": None, "errors": []})
    assert "not installed" in text and "PyTorch extension" in text


def test_model_summary_says_whether_the_model_is_trained():
    untrained = {"name": "demo", "version": "0.1.0", "trained": False, "intended_use": "Research use only."}
    assert environment.model_summary(untrained) == (
        "demo 0.1.0 · UNTRAINED (random weights): its labels are meaningless · Research use only."
    )
    trained = {"name": "kits19", "version": "1.0.0", "trained": True, "dataset": "KiTS19 (210 cases)"}
    assert environment.model_summary(trained) == "kits19 1.0.0 · trained · training data: KiTS19 (210 cases)"
    assert environment.model_summary({"error": "m.safetensors: not found"}) == "m.safetensors: not found"
    assert environment.model_summary(None) == ""


def test_child_python_reports_torch_the_registry_and_a_model_file(tiny_model_path):
    info = environment.query(sys.executable, str(tiny_model_path))
    assert info["errors"] == []
    assert info["torch"]
    assert any(m["name"] == "kidneytumorseg-phantom" and m["default"] for m in info["models"])
    assert info["model"]["name"] == "tiny-test" and info["model"]["trained"] is False
    assert info["model"]["source"] == "file"


def test_a_broken_python_is_reported_not_raised():
    info = environment.query("/no/such/python")
    assert info["torch"] is None and info["errors"]


def test_background_query_answers_without_blocking():
    query = environment.BackgroundQuery("/no/such/python")
    deadline = time.monotonic() + 30
    while not query.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert query.done and query.result["errors"]
