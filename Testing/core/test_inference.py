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
