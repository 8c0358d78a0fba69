"""DeepLabV3Plus3D: shapes, strides, configuration, cost."""

import pytest
import torch

from KidneyTumorSegLib.model import DeepLabConfig, DeepLabV3Plus3D, count_parameters, gflops_per_patch

TINY = dict(
    stem_channels=4,
    stage_channels=(4, 8, 8, 8),
    stage_blocks=(1, 1, 1, 1),
    aspp_channels=8,
    low_level_channels=4,
    decoder_channels=8,
)


def _feature_shapes(model, x):
    shapes = {}
    h = model.stem(x)
    for i, stage in enumerate(model.stages):
        h = stage(h)
        shapes[i] = tuple(h.shape[2:])
    return shapes


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("anisotropic", [0, 1, 2])
def test_output_matches_input_size_and_strides_follow_config(output_stride, anisotropic):
    config = DeepLabConfig(output_stride=output_stride, anisotropic_stages=anisotropic, **TINY)
    model = DeepLabV3Plus3D(config).eval()
    dz, dy, dx = config.divisor()
    x = torch.randn(2, 1, 2 * dz, 2 * dy, 2 * dx)
    with torch.no_grad():
        y = model(x)
        shapes = _feature_shapes(model, x)
    assert y.shape == (2, 3, *x.shape[2:])
    # Low-level features at in-plane stride 4, deepest features at in-plane stride output_stride.
    assert shapes[0][1] == x.shape[3] // 4
    assert shapes[3][1] == x.shape[3] // output_stride
    assert shapes[3][0] == x.shape[2] // dz
    assert dy == dx == output_stride and dz == output_stride // 2**anisotropic


def test_output_stride_8_keeps_larger_feature_maps_with_dilation_instead_of_stride():
    c8, c16 = DeepLabConfig(output_stride=8, **TINY), DeepLabConfig(output_stride=16, **TINY)
    assert c8.stage_dilations()[-1] > c16.stage_dilations()[-1]
    assert c8.stage_strides()[3][1] == 1 and c16.stage_strides()[3][1] == 2
    # Same weights either way: output stride changes how they are applied, not what they are.
    assert count_parameters(DeepLabV3Plus3D(c8)) == count_parameters(DeepLabV3Plus3D(c16))


def test_aspp_has_five_branches_with_configured_rates():
    config = DeepLabConfig(aspp_rates=(1, 3, 5), **TINY)
    aspp = DeepLabV3Plus3D(config).aspp
    dilations = [branch[0].dilation for branch in aspp.branches]
    assert dilations == [(1, 1, 1), (1, 1, 1), (3, 3, 3), (5, 5, 5)]
    assert aspp.branches[0][0].kernel_size == (1, 1, 1)
    assert isinstance(aspp.pooling[0], torch.nn.AdaptiveAvgPool3d)


@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
def test_every_normalisation_trains_on_batch_of_two(norm):
    model = DeepLabV3Plus3D(DeepLabConfig(norm=norm, **TINY))
    x = torch.randn(2, 1, 16, 32, 32)
    target = torch.randint(0, 3, (2, 16, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_config_round_trips_through_dict_and_rejects_bad_values():
    config = DeepLabConfig(output_stride=16, **TINY)
    assert DeepLabConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabConfig(output_stride=4)
    with pytest.raises(ValueError, match="unknown"):
        DeepLabConfig.from_dict({**config.to_dict(), "widht": 3})
    with pytest.raises(ValueError, match="norm"):
        DeepLabConfig(norm="layer")


def test_default_configuration_cost_is_documented_size():
    model = DeepLabV3Plus3D()
    params = count_parameters(model)
    gflops = gflops_per_patch(model, (80, 160, 160))
    # The README's figures: 2.89 M parameters, 80.2 GFLOPs per 80x160x160 patch.
    assert params == 2_888_547
    assert 79.0 < gflops < 81.5
    # Output stride 16 costs less per patch.
    assert gflops_per_patch(DeepLabV3Plus3D(DeepLabConfig(output_stride=16)), (80, 160, 160)) < gflops
