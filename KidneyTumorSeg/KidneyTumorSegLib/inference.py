"""Sliding-window inference: Gaussian-blended windows, several per batch, optional mirroring TTA.

Works on the model grid (see ``preprocessing``). The body is cropped first: a CT is mostly air and table,
and windows that hold only air are not worth a forward pass.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import KidneyTumorSegError

log = logging.getLogger(__name__)

# progress(fraction_of_this_stage) -> None
StageProgress = Callable[[float], None]


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' takes CUDA when torch can use it, else the CPU; 'cuda' without CUDA is a clear error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
            raise KidneyTumorSegError(
                f"--device cuda was asked for, but torch {torch.__version__} ({build}) finds no usable GPU; "
                "use --device cpu or auto, or install a CUDA build of torch (see the README)."
            )
        return torch.device("cuda")
    if requested == "cpu":
        return torch.device("cpu")
    raise KidneyTumorSegError(f"unknown device {requested!r}; use auto, cpu or cuda.")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX): there bf16 autocast roughly
    halves the network's time; elsewhere it would be emulated and slower."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for the network: float16 on CUDA, bfloat16 on a CPU with native bf16, else none.
    (Labels with and without it are compared in Testing/core/test_inference.py and by the benchmark.)"""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def gaussian_importance(patch_size: Sequence[int], sigma_fraction: float = 0.125) -> torch.Tensor:
    """Window weights that fall off toward the borders, where a convolutional network sees least context."""
    axes = []
    for n in patch_size:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (sigma_fraction * n)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    # Never zero: a voxel covered only by window borders must still get a prediction.
    return weights.clamp_min(1e-3).float()


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start positions along one axis: evenly spread, the first at 0 and the last flush with the end."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return sorted({round(i * (size - patch) / (count - 1)) for i in range(count)})


def body_bounding_box(volume: torch.Tensor, threshold: float, margin: int) -> tuple[slice, ...] | None:
    """The box around everything brighter than ``threshold`` (the body), grown by ``margin`` voxels;
    None when nothing is."""
    mask = volume > threshold
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(mask.any(dim=other[1]).any(dim=other[0]))
        if hit.numel() == 0:
            return None
        lo = max(0, int(hit.min()) - margin)
        hi = min(volume.shape[axis], int(hit.max()) + 1 + margin)
        box.append(slice(lo, hi))
    return tuple(box)


@dataclass
class InferenceSettings:
    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    batch_size: int = 2
    tta: bool = False
    device: torch.device = torch.device("cpu")  # noqa: B008 - immutable
    mixed_precision: bool = True  # float16 on CUDA, bfloat16 on CPUs with native bf16 (autocast_dtype)


def _mirror_sets(tta: bool) -> list[tuple[int, ...]]:
    """Flip sets over the spatial dims of an (N, C, Z, Y, X) batch: all 8 combinations with TTA."""
    if not tta:
        return [()]
    dims = (2, 3, 4)
    return [combo for r in range(4) for combo in itertools.combinations(dims, r)]


def predict_logits(
    network: nn.Module,
    volume: torch.Tensor,
    settings: InferenceSettings,
    pad_value: float,
    progress: StageProgress | None = None,
) -> torch.Tensor:
    """Blended logits (C, Z, Y, X), float32 on the CPU, for a normalised volume (Z, Y, X)."""
    device = settings.device
    patch = settings.patch_size
    shape = tuple(volume.shape)
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
    if padded_shape != shape:
        padded = torch.full(padded_shape, pad_value, dtype=volume.dtype)
        padded[: shape[0], : shape[1], : shape[2]] = volume
        volume = padded
    starts = [window_starts(s, p, settings.overlap) for s, p in zip(padded_shape, patch, strict=True)]
    windows = list(itertools.product(*starts))
    mirrors = _mirror_sets(settings.tta)
    num_classes = network.config.num_classes
    importance = gaussian_importance(patch).to(device)
    logit_sum = torch.zeros((num_classes, *padded_shape), dtype=torch.float32, device=device)
    weight_sum = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    volume_on_device = volume.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed window shape: let cuDNN pick its fastest kernels once
    amp_dtype = autocast_dtype(device) if settings.mixed_precision else None
    use_amp = amp_dtype is not None
    network = network.to(device).eval()
    done = 0
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
        for first in range(0, len(windows), settings.batch_size):
            batch_windows = windows[first : first + settings.batch_size]
            boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True)) for start in batch_windows]
            batch = torch.stack([volume_on_device[box] for box in boxes]).unsqueeze(1)
            out = None
            for flip in mirrors:
                x = torch.flip(batch, flip) if flip else batch
                y = network(x).float()
                y = torch.flip(y, flip) if flip else y
                out = y if out is None else out.add_(y)
            out.div_(len(mirrors)).mul_(importance)
            for box, logits in zip(boxes, out, strict=True):
                logit_sum[(slice(None), *box)] += logits
                weight_sum[box] += importance
            done += len(batch_windows)
            if progress is not None:
                progress(done / len(windows))
    log.debug("%d windows x %d mirrors in %.1f s", len(windows), len(mirrors), time.perf_counter() - started)
    logit_sum /= weight_sum
    return logit_sum[:, : shape[0], : shape[1], : shape[2]].cpu()


def segment_model_grid(
    network: nn.Module,
    volume: torch.Tensor,
    settings: InferenceSettings,
    pad_value: float,
    body_threshold: float | None,
    progress: StageProgress | None = None,
) -> torch.Tensor:
    """Logits over the whole model grid, running the network only on the body's bounding box.

    Outside the box the logits say background with certainty. ``body_threshold`` is in normalised units;
    None disables cropping.
    """
    num_classes = network.config.num_classes
    box = (
        body_bounding_box(volume, body_threshold, margin=4)
        if body_threshold is not None
        else tuple(slice(0, s) for s in volume.shape)
    )
    logits = torch.zeros((num_classes, *volume.shape), dtype=torch.float32)
    logits[0] = 1e4  # background wherever the network does not run
    if box is None:
        if progress is not None:
            progress(1.0)
        return logits
    crop = volume[box].contiguous()
    logits[(slice(None), *box)] = predict_logits(network, crop, settings, pad_value, progress)
    return logits


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error (and the CPU allocator's, which is a plain RuntimeError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def with_memory_fallback(run, settings: InferenceSettings, warn) -> torch.Tensor:
    """``run(settings)``; on running out of memory, again with half the windows per batch, down to one,
    then (from a GPU) on the CPU, each step with a warning through ``warn``. Out of memory with one
    window on the CPU is a clear error."""
    import dataclasses

    while True:
        try:
            return run(settings)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
            if settings.batch_size > 1:
                smaller = max(1, settings.batch_size // 2)
                warn(
                    f"out of memory on {settings.device.type} with {settings.batch_size} windows per batch; "
                    f"retrying with {smaller}"
                )
                settings = dataclasses.replace(settings, batch_size=smaller)
            elif settings.device.type != "cpu":
                warn(f"out of memory on {settings.device} even with one window per batch; retrying on the CPU")
                settings = dataclasses.replace(settings, device=torch.device("cpu"))
            else:
                raise KidneyTumorSegError(
                    "out of memory on the CPU even with one window per batch; close other programs, or use a "
                    "machine with more memory."
                ) from None
