"""Data augmentation on whole batches, on the training device.

Spatial: rotation and scaling (one resampling by ``grid_sample``), mirroring. Intensity: brightness,
contrast, gamma, Gaussian noise, simulated low resolution. Every random draw comes from a generator
seeded by the sample's global index, so a resumed or data-parallel run sees exactly the same
augmentations as an uninterrupted single-process one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 15.0  # about each axis; in-plane rotation matters most in CT
    p_rotation: float = 0.2
    scale: tuple[float, float] = (0.85, 1.2)
    p_scale: float = 0.2
    p_mirror: float = 0.5  # per axis
    brightness: tuple[float, float] = (0.75, 1.25)
    p_brightness: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    gamma: tuple[float, float] = (0.7, 1.5)
    p_gamma: float = 0.3
    noise_std: float = 0.1
    p_noise: float = 0.1
    low_resolution: tuple[float, float] = (0.5, 1.0)
    p_low_resolution: float = 0.25

    @classmethod
    def from_dict(cls, data: dict) -> AugmentConfig:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """3x3 rotation from angles (radians) about the z, y and x axes."""
    cz, cy, cx = torch.cos(angles)
    sz, sy, sx = torch.sin(angles)
    one, zero = torch.ones(()), torch.zeros(())
    rz = torch.stack([one, zero, zero, zero, cz, -sz, zero, sz, cz]).view(3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy]).view(3, 3)
    rx = torch.stack([cx, -sx, zero, sx, cx, zero, zero, zero, one]).view(3, 3)
    return rz @ ry @ rx


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, seeds: list[int], config: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``images`` (N, 1, Z, Y, X) float and ``labels`` (N, Z, Y, X) int64 on their device; sample
    ``i`` draws from a generator seeded with ``seeds[i]``."""
    device = images.device
    n = images.shape[0]
    thetas = []
    flips = []
    intensity = []
    spatial = []
    for i in range(n):
        gen = torch.Generator().manual_seed(int(seeds[i]))
        draws = torch.rand(10, generator=gen)
        matrix = torch.eye(3)
        if draws[0] < config.p_rotation:
            limit = math.radians(config.rotation_deg)
            angles = (torch.rand(3, generator=gen) * 2 - 1) * limit
            matrix = _rotation_matrix(angles)
        if draws[1] < config.p_scale:
            matrix = matrix / _uniform(gen, *config.scale)  # sampling grid shrinks = content grows
        spatial.append(bool(draws[0] < config.p_rotation or draws[1] < config.p_scale))
        thetas.append(torch.cat([matrix, torch.zeros(3, 1)], dim=1))
        flips.append([bool(draws[2 + a] < config.p_mirror) for a in range(3)])
        intensity.append(
            {
                "brightness": _uniform(gen, *config.brightness) if draws[5] < config.p_brightness else None,
                "contrast": _uniform(gen, *config.contrast) if draws[6] < config.p_contrast else None,
                "gamma": _uniform(gen, *config.gamma) if draws[7] < config.p_gamma else None,
                "noise": _uniform(gen, 0.0, config.noise_std) if draws[8] < config.p_noise else None,
                "lowres": _uniform(gen, *config.low_resolution) if draws[9] < config.p_low_resolution else None,
                "noise_seed": int(torch.randint(0, 2**31 - 1, (), generator=gen)),
            }
        )
    images = images.clone()
    labels = labels.clone()
    moved = [i for i in range(n) if spatial[i]]
    if moved:
        # Only the samples drawn for it are resampled, so a sample's result never depends on its batch.
        # affine_grid works in (x, y, z) order; our matrices are in (z, y, x): reverse rows and columns.
        theta = torch.stack([thetas[i] for i in moved]).to(device)
        theta = torch.cat([theta[:, :3, :3].flip(1).flip(2), theta[:, :3, 3:]], dim=2)
        shape = [len(moved), *images.shape[1:]]
        grid = F.affine_grid(theta, shape, align_corners=False)
        source = images[moved]
        background = source.amin(dim=(1, 2, 3, 4), keepdim=True)
        warped = F.grid_sample(source - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        images[moved] = warped + background
        warped_labels = F.grid_sample(
            labels[moved][:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        labels[moved] = warped_labels[:, 0].round().long()
    for i in range(n):
        dims = [a + 1 for a in range(3) if flips[i][a]]
        if dims:
            images[i] = images[i].flip([d for d in dims])
            labels[i] = labels[i].flip([d - 1 for d in dims])
        x = images[i]
        p = intensity[i]
        if p["lowres"] is not None:
            size = [max(1, round(s * p["lowres"])) for s in x.shape[1:]]
            small = F.interpolate(x[None], size=size, mode="nearest")
            x = F.interpolate(small, size=list(x.shape[1:]), mode="trilinear", align_corners=False)[0]
        if p["noise"] is not None:
            gen = torch.Generator(device=device).manual_seed(p["noise_seed"])
            x = x + torch.randn(x.shape, generator=gen, device=device) * p["noise"]
        if p["brightness"] is not None:
            x = x * p["brightness"]
        if p["contrast"] is not None:
            mean = x.mean()
            lo, hi = x.min(), x.max()
            x = ((x - mean) * p["contrast"] + mean).clamp(lo, hi)
        if p["gamma"] is not None:
            lo, hi = x.min(), x.max()
            span = (hi - lo).clamp_min(1e-6)
            x = ((x - lo) / span) ** p["gamma"] * span + lo
        images[i] = x
    return images, labels
