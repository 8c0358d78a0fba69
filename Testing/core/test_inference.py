"""Sliding windows, blending, TTA, body crop, devices."""

import pytest
import torch
from torch import nn

from KidneyTumorSegLib.errors import KidneyTumorSegError
from KidneyTumorSegLib.inference import (
    InferenceSettings,
    gaussian_importance,
    predict_logits,
    resolve_device,
    segment_model_grid,
    window_starts,
)


class PointwiseNet(nn.Module):
    """Logits that depend on each voxel alone: blending any windows must reproduce them exactly."""

    class config:  # noqa: N801 - mimics DeepLabV3Plus3D.config
        num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.calls += 1
        return torch.cat([-x, x * self.scale, 0.5 * x - 1.0], dim=1)


@pytest.mark.parametrize(
    "size,patch,overlap", [(100, 32, 0.5), (32, 32, 0.5), (20, 32, 0.5), (97, 40, 0.0), (97, 40, 0.9)]
)
def test_windows_cover_the_axis_start_at_zero_and_end_flush(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0
    assert starts[-1] == max(0, size - patch)
    covered = set()
    for s in starts:
        covered.update(range(s, s + patch))
    assert covered >= set(range(size))
    if size > patch:
        steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert max(steps) <= int(patch * (1 - overlap)) or len(starts) == 2


def test_gaussian_importance_peaks_in_the_centre_and_is_never_zero():
    w = gaussian_importance((8, 16, 16))
    assert float(w.max()) == 1.0 and float(w.min()) >= 1e-3
    assert torch.allclose(w, torch.flip(w, (0, 1, 2)))
    assert w[4, 8, 8] > w[0, 0, 0]


@pytest.mark.parametrize("overlap,batch,tta", [(0.0, 1, False), (0.5, 3, False), (0.3, 2, True)])
def test_blended_windows_reproduce_a_pointwise_network_exactly(overlap, batch, tta):
    volume = torch.randn(37, 45, 29)
    net = PointwiseNet()
    settings = InferenceSettings(patch_size=(16, 16, 16), overlap=overlap, batch_size=batch, tta=tta)
    logits = predict_logits(net, volume, settings, pad_value=-4.0)
    expected = net(volume[None, None])[0]
    assert logits.shape == (3, 37, 45, 29)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_volume_smaller_than_the_patch_is_padded_and_cropped_back():
    volume = torch.randn(5, 9, 7)
    logits = predict_logits(PointwiseNet(), volume, InferenceSettings(patch_size=(8, 16, 16)), pad_value=-4.0)
    assert logits.shape == (3, 5, 9, 7)
    assert torch.allclose(logits[1], volume, atol=1e-5)


def test_tta_runs_eight_mirrored_passes_per_batch():
    net = PointwiseNet()
    predict_logits(net, torch.randn(16, 16, 16), InferenceSettings(patch_size=(16, 16, 16), tta=True), -4.0)
    assert net.calls == 8


def test_air_only_volume_skips_the_network_and_is_background():
    net = PointwiseNet()
    air = torch.full((20, 30, 30), -4.0)
    logits = segment_model_grid(net, air, InferenceSettings(patch_size=(8, 8, 8)), -4.0, body_threshold=-3.0)
    assert net.calls == 0
    assert bool((logits.argmax(0) == 0).all())


def test_body_crop_runs_the_network_only_around_the_body():
    net = PointwiseNet()
    volume = torch.full((40, 64, 64), -4.0)
    volume[10:20, 20:30, 25:35] = 1.0
    logits = segment_model_grid(net, volume, InferenceSettings(patch_size=(16, 16, 16), overlap=0.0), -4.0, -3.0)
    assert net.calls == 4  # the 18-voxel box (10 + 2 x 4 margin) needs 2x2x2 windows = 4 batches, not 3x4x4
    labels = logits.argmax(0)
    assert bool((labels[10:20, 20:30, 25:35] == 1).all())
    assert int((labels == 1).sum()) == 1000


def test_asking_for_cuda_without_a_gpu_says_which_torch_is_installed():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(KidneyTumorSegError, match=r"torch .* finds no usable GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


# ------------------------------------------------------------------------- out of memory, injected


def test_out_of_memory_retries_with_fewer_windows_then_on_the_cpu_with_warnings():
    import torch

    from KidneyTumorSegLib.inference import InferenceSettings, with_memory_fallback

    tried, warnings = [], []

    def run(settings):
        tried.append((settings.device.type, settings.batch_size))
        if settings.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(1)

    start = InferenceSettings(patch_size=(16, 32, 32), batch_size=4, device=torch.device("cuda"))
    with_memory_fallback(run, start, warnings.append)
    assert tried == [("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert len(warnings) == 3 and "retrying on the CPU" in warnings[-1]


def test_out_of_memory_on_the_cpu_with_one_window_is_a_clear_error_and_other_errors_pass_through():

    from KidneyTumorSegLib.errors import KidneyTumorSegError
    from KidneyTumorSegLib.inference import InferenceSettings, with_memory_fallback

    def oom(settings):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB; out of memory")

    settings = InferenceSettings(patch_size=(16, 32, 32), batch_size=2)
    warnings = []
    with pytest.raises(KidneyTumorSegError, match="out of memory on the CPU even with one window"):
        with_memory_fallback(oom, settings, warnings.append)
    assert warnings == ["out of memory on cpu with 2 windows per batch; retrying with 1"]

    def other(settings):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        with_memory_fallback(other, settings, warnings.append)


def test_segment_survives_an_injected_out_of_memory_and_gives_the_same_labels(tiny_model, monkeypatch):
    """The whole pipeline: the first forward pass with 2 windows fails as if memory ran out; the run
    retries with 1 window per batch, warns, and the labels equal an undisturbed run's."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from KidneyTumorSegLib import pipeline
    from KidneyTumorSegLib.phantom import make_phantom

    image = make_phantom(2, size=(48, 40, 16), spacing=(6.0, 6.0, 10.0)).image
    reference = pipeline.segment(image, tiny_model, pipeline.SegmentOptions(device="cpu", batch_size=1))
    original = pipeline.segment_model_grid
    calls = []

    def flaky(network, volume, settings, *args):
        calls.append(settings.batch_size)
        if settings.batch_size > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(network, volume, settings, *args)

    monkeypatch.setattr(pipeline, "segment_model_grid", flaky)
    result = pipeline.segment(image, tiny_model, pipeline.SegmentOptions(device="cpu", batch_size=2))
    assert calls == [2, 1]
    assert any("retrying with 1" in w for w in result.warnings)
    assert np.array_equal(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(reference.labels))


def test_bf16_on_a_cpu_with_native_bf16_gives_the_fp32_labels_to_within_0_1_percent():
    """Mixed precision on the CPU is used only where the CPU has bf16 in hardware; with the trained demo
    model its labels must agree with float32 on at least 99.9 % of voxels (measured: 99.999 %)."""
    import numpy as np
    import SimpleITK as sitk

    from KidneyTumorSegLib import pipeline
    from KidneyTumorSegLib.inference import cpu_has_native_bf16
    from KidneyTumorSegLib.modelfile import load_model, resolve_model
    from KidneyTumorSegLib.phantom import make_phantom

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16: mixed precision stays off on it")
    model = load_model(resolve_model(None))
    for seed in (6000, 6001):
        image = make_phantom(seed).image
        labels = {}
        for mixed in (False, True):
            result = pipeline.segment(image, model, pipeline.SegmentOptions(device="cpu", mixed_precision=mixed))
            labels[mixed] = sitk.GetArrayFromImage(result.labels)
        assert np.count_nonzero(labels[True]) > 0
        assert np.mean(labels[True] == labels[False]) >= 0.999


def test_the_result_names_the_device_the_network_finally_ran_on(tiny_model, monkeypatch):
    """After a fallback from a (simulated) GPU to the CPU, the result says cpu, not the device asked for."""
    import torch

    from KidneyTumorSegLib import pipeline
    from KidneyTumorSegLib.phantom import make_phantom

    image = make_phantom(2, size=(48, 40, 16), spacing=(6.0, 6.0, 10.0)).image
    original = pipeline.segment_model_grid

    def gpu_out_of_memory(network, volume, settings, *args):
        if settings.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(network, volume, settings, *args)

    monkeypatch.setattr(pipeline, "segment_model_grid", gpu_out_of_memory)
    monkeypatch.setattr(pipeline, "resolve_device", lambda requested: torch.device("cuda"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # no CUDA here: moving is a no-op
    result = pipeline.segment(image, tiny_model, pipeline.SegmentOptions(device="cuda", batch_size=1))
    assert result.device == "cpu"
    assert any("retrying on the CPU" in w for w in result.warnings)
