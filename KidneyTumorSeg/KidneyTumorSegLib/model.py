"""3D DeepLab v3+ for kidney and kidney-tumor segmentation.

After Daza, Gomez and Arbelaez's KiTS19 method: DeepLab v3+ (Chen et al., ECCV 2018) carried to 3D CT with
its cost reduced so that it trains and runs on ordinary hardware:

- a residual 3D encoder whose last down-samplings are replaced by atrous (dilated) convolutions, so the
  deepest features keep an output stride of 8 (default) or 16 in-plane;
- optionally anisotropic first stages, which down-sample only in-plane, for thick-slice CT;
- ASPP: a 1x1 branch, three atrous 3x3x3 branches and an image-pooling branch, then a 1x1 projection.
  The rates are small (2, 4, 6 by default) because a 3D patch gives a feature map of only 10-20 voxels
  per axis, and 2D DeepLab's 6/12/18 would mostly sample padding;
- a decoder that joins the upsampled ASPP features with 1x1-reduced stride-4 encoder features, refines
  them with two 3x3x3 convolutions, classifies, and upsamples the logits to the input size;
- instance or group normalisation, which work at the batch size of 2 that 3D training affords.

Everything is configured by ``DeepLabConfig``, which the model file stores in its metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "DeepLabV3Plus3D"
NORMS = ("instance", "group", "batch")


@dataclass(frozen=True)
class DeepLabConfig:
    """Hyper-parameters of ``DeepLabV3Plus3D``; stored verbatim in model files."""

    in_channels: int = 1
    num_classes: int = 3
    stem_channels: int = 16
    stage_channels: tuple[int, ...] = (24, 48, 96, 128)
    stage_blocks: tuple[int, ...] = (1, 2, 2, 1)
    output_stride: int = 8
    anisotropic_stages: int = 1
    aspp_channels: int = 64
    aspp_rates: tuple[int, int, int] = (2, 4, 6)
    low_level_channels: int = 32
    decoder_channels: int = 64
    norm: str = "instance"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid DeepLabConfig: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Everything wrong with this configuration, as sentences (empty when valid)."""
        out = []
        for name in (
            "in_channels",
            "stem_channels",
            "aspp_channels",
            "low_level_channels",
            "decoder_channels",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                out.append(f"{name} must be a positive integer")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            out.append("num_classes must be an integer >= 2")
        if len(self.stage_channels) != 4 or len(self.stage_blocks) != 4:
            out.append("stage_channels and stage_blocks must each have 4 entries")
        if any(not isinstance(v, int) or v < 1 for v in (*self.stage_channels, *self.stage_blocks)):
            out.append("stage_channels and stage_blocks must be positive integers")
        if self.output_stride not in (8, 16):
            out.append("output_stride must be 8 or 16")
        if self.anisotropic_stages not in (0, 1, 2):
            out.append("anisotropic_stages must be 0, 1 or 2")
        if len(self.aspp_rates) != 3 or any(not isinstance(r, int) or r < 1 for r in self.aspp_rates):
            out.append("aspp_rates must be three positive integers")
        if self.norm not in NORMS:
            out.append(f"norm must be one of {', '.join(NORMS)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            out.append("dropout must be in [0, 1)")
        return out

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> DeepLabConfig:
        """Build from metadata; unknown keys are an error, so a typo never silently becomes a default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture parameter(s): {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def stage_strides(self) -> list[tuple[int, int, int]]:
        """(z, y, x) stride of the stem and of each of the four stages."""
        strides = []
        for i in range(5):  # stem, stage1..stage4
            inplane = 2 if i < 3 or (i == 3 and self.output_stride == 16) else 1
            z = 1 if i < self.anisotropic_stages else inplane
            strides.append((z, inplane, inplane))
        return strides

    def stage_dilations(self) -> list[int]:
        """Dilation of stage1..stage4: atrous convolutions replace the strides the output stride drops."""
        return [1, 1, 1, 2] if self.output_stride == 16 else [1, 1, 2, 4]

    def divisor(self) -> tuple[int, int, int]:
        """Patch sizes must be multiples of this (z, y, x), the total encoder stride."""
        total = [1, 1, 1]
        for stride in self.stage_strides():
            total = [t * s for t, s in zip(total, stride, strict=True)]
        return (total[0], total[1], total[2])


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.BatchNorm3d(channels)


def _conv_norm_act(
    cin: int, cout: int, kernel: Sequence[int] | int, norm: str, stride=1, dilation: int = 1
) -> nn.Sequential:
    kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    padding = tuple(dilation * (k // 2) for k in kernel)
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        _norm(norm, cout),
        nn.LeakyReLU(0.01, inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(
        self, cin: int, cout: int, norm: str, stride=1, dilation: int = 1, kernel=3, project: bool = False
    ) -> None:
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        padding = tuple(dilation * (k // 2) for k in kernel)
        self.conv1 = nn.Conv3d(cin, cout, kernel, stride, padding, dilation=dilation, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv3d(cout, cout, kernel, 1, padding, dilation=dilation, bias=False)
        self.norm2 = _norm(norm, cout)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        # The first block of each stage always projects, so the weights do not depend on the output stride
        # (a model trained at one output stride can run at the other).
        self.shortcut = (
            nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), _norm(norm, cout))
            if project or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3x3 branches, image pooling, projection."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], norm: str, dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_norm_act(cin, cout, 1, norm)] + [_conv_norm_act(cin, cout, 3, norm, dilation=r) for r in rates]
        )
        # A 1x1x1 map cannot be instance-normalised; the pooled branch uses a bias instead.
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(cin, cout, 1), nn.LeakyReLU(0.01, inplace=True))
        self.project = nn.Sequential(_conv_norm_act(cout * (len(rates) + 2), cout, 1, norm), nn.Dropout3d(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pooling(x).expand(-1, -1, *x.shape[2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus3D(nn.Module):
    """3D DeepLab v3+; input (N, C, Z, Y, X) with Z, Y, X multiples of ``config.divisor()``, output logits
    (N, num_classes, Z, Y, X)."""

    def __init__(self, config: DeepLabConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DeepLabConfig()
        strides = config.stage_strides()
        dilations = config.stage_dilations()
        stem_kernel = (1, 3, 3) if config.anisotropic_stages >= 1 else (3, 3, 3)
        self.stem = _conv_norm_act(config.in_channels, config.stem_channels, stem_kernel, config.norm, strides[0])
        stages = []
        cin = config.stem_channels
        for i, (cout, blocks) in enumerate(zip(config.stage_channels, config.stage_blocks, strict=True)):
            kernel = (1, 3, 3) if i + 1 < config.anisotropic_stages else 3
            layers = [ResidualBlock(cin, cout, config.norm, strides[i + 1], dilations[i], kernel, project=True)]
            layers += [ResidualBlock(cout, cout, config.norm, 1, dilations[i], kernel) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.aspp = ASPP(cin, config.aspp_channels, config.aspp_rates, config.norm, config.dropout)
        self.low_level = _conv_norm_act(config.stage_channels[0], config.low_level_channels, 1, config.norm)
        self.decoder = nn.Sequential(
            _conv_norm_act(config.aspp_channels + config.low_level_channels, config.decoder_channels, 3, config.norm),
            _conv_norm_act(config.decoder_channels, config.decoder_channels, 3, config.norm),
        )
        self.classifier = nn.Conv3d(config.decoder_channels, config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = self.stem(x)
        low_level = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == 0:
                low_level = x
        x = self.aspp(x)
        low_level = self.low_level(low_level)
        x = F.interpolate(x, size=low_level.shape[2:], mode="trilinear", align_corners=False)
        x = self.decoder(torch.cat([x, low_level], dim=1))
        x = self.classifier(x)
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_patch(model: nn.Module, patch_size: Sequence[int]) -> float:
    """Floating-point operations (multiply and add counted separately) of one forward pass over one patch,
    counted by torch's FLOP counter on meta tensors (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = model.config
    meta_model = DeepLabV3Plus3D(config).to("meta").eval()
    x = torch.empty((1, config.in_channels, *patch_size), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(x)
    return counter.get_total_flops() / 1e9
