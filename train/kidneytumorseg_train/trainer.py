"""The training loop: one process, or data-parallel under ``torchrun`` (DDP).

- Patches from the preprocessed cache (``sampling``), augmented on the device in batch (``augment``),
  Dice + cross-entropy (``loss``), SGD with Nesterov momentum and a poly schedule, or AdamW; mixed
  precision and gradient scaling on CUDA; gradient clipping; seeds.
- Every ``validate_every`` epochs, rank 0 segments whole validation cases through the core's
  ``pipeline.segment`` (the exact inference users run) and computes KiTS19 kidney and tumor Dice; the
  best mean is kept.
- Checkpoints are written atomically at each epoch's end and hold everything a resume needs (model,
  optimizer, scaler, scheduler, RNG state, step). Samples and augmentations are a function of their global
  index, so ``--resume`` continues exactly where the run stopped.
- Scalars go to TensorBoard (when installed) and to ``metrics.csv``; ``curves.png`` is drawn at the end.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from KidneyTumorSegLib.metrics import kits19_dice
from KidneyTumorSegLib.model import DeepLabV3Plus3D
from KidneyTumorSegLib.modelfile import LoadedModel
from KidneyTumorSegLib.pipeline import SegmentOptions, segment

from .augment import augment_batch
from .config import Recipe
from .errors import ConfigError
from .loss import dice_ce_loss
from .sampling import PatchDataset, StepSampler

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    info = Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def _device(info: Distributed, requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch finds no GPU; use --device cpu or auto.")
    return torch.device("cuda", info.local_rank)


def poly_lambda(total_steps: int, exponent: float):
    return lambda step: max(0.0, 1.0 - step / total_steps) ** exponent


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.momentum > 0
        )
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half checkpoint."""
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is tensors, numbers and strings; nothing in it can run code.
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class ScalarLog:
    """metrics.csv (always) and TensorBoard (when the package is installed)."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = folder / "metrics.csv"
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: scalars go to metrics.csv only")

    def add(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for key, value in values.items():
                if new:
                    writer.writerow(["step", "name", "value"])
                    new = False
                writer.writerow([step, key, f"{value:.6g}"])
                if self.writer is not None:
                    self.writer.add_scalar(key, value, step)
        if self.writer is not None:
            self.writer.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, forget rows a killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def validation_model(network: torch.nn.Module, recipe: Recipe, plan) -> LoadedModel:
    from .export import model_metadata

    return LoadedModel(path=Path("<training>"), metadata=model_metadata(recipe, plan), network=network, sha256="")


def validate(network: torch.nn.Module, recipe: Recipe, plan, cases, mapping, device: torch.device) -> dict:
    """KiTS19 Dice of whole validation cases, segmented by the core pipeline."""
    from .datasets import read_case

    model = validation_model(network, recipe, plan)
    options = SegmentOptions(
        device=device.type, overlap=recipe.training.val_overlap, batch_size=recipe.training.batch_size
    )
    was_training = network.training
    network.eval()
    per_case = []
    for case in cases:
        image, labels = read_case(case, mapping)
        result = segment(image, model, options)
        import SimpleITK as sitk

        scores = kits19_dice(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(labels))
        per_case.append({"case": case.case_id, **scores})
    network.train(was_training)
    kidney = float(np.mean([c["kidney_dice"] for c in per_case]))
    tumor = float(np.mean([c["tumor_dice"] for c in per_case]))
    with_tumor = [c["tumor_dice"] for c in per_case if "tumor" not in c["both_empty"]]
    return {
        "kidney_dice": kidney,
        "tumor_dice": tumor,
        "mean_dice": (kidney + tumor) / 2,
        "tumor_dice_cases_with_tumor": float(np.mean(with_tumor)) if with_tumor else float("nan"),
        "cases": per_case,
    }


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    recipe: Recipe,
    device: torch.device,
) -> torch.Tensor:
    """One optimisation step on one batch from the loader: to the device, augmentation there (seeded per
    sample), forward (float16 autocast on CUDA when the recipe asks for it), Dice + cross-entropy,
    backward, gradient clipping, optimizer step. Returns the loss. Also timed by ``bench/training.py``."""
    t = recipe.training
    use_amp = t.amp and device.type == "cuda"
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    seeds = [t.seed * 1_000_003 + int(i) for i in indices]
    images, labels = augment_batch(images, labels, seeds, recipe.augmentation)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        logits = model(images)
    loss = dice_ce_loss(logits, labels)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss


def train(
    recipe: Recipe,
    plan,
    cache_dir: Path,
    train_ids: list[str],
    val_cases: list,
    mapping,
    run_dir: Path,
    resume: bool = False,
    device_name: str = "auto",
    stop_after_steps: int | None = None,
) -> dict:
    """Train; return the final summary. ``stop_after_steps`` ends early (tests of resume)."""
    info = setup_distributed()
    device = _device(info, device_name)
    t = recipe.training
    run_dir.mkdir(parents=True, exist_ok=True)
    total_steps = t.epochs * t.steps_per_epoch

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    network = DeepLabV3Plus3D(recipe.model).to(device)
    optimizer = make_optimizer(network, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(total_steps, t.poly_exponent))
    use_amp = t.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_step, best, history = 0, -1.0, []
    last_path = run_dir / CHECKPOINT_LAST
    if resume:
        if not last_path.exists():
            raise ConfigError(f"{last_path}: no checkpoint to resume from; start without --resume.")
        state = load_checkpoint(last_path)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0], device)
        start_step, best, history = state["step"], state["best"], list(state["history"])
    elif last_path.exists():
        raise ConfigError(
            f"{run_dir}: already holds a training run; pass --resume to continue it, or choose another --output."
        )
    for stale in run_dir.glob(".checkpoint_*.partial-*"):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    scalars = ScalarLog(run_dir, info.main)
    scalars.truncate_after(start_step)

    model = DistributedDataParallel(network) if info.world > 1 else network
    norm_background = (plan.clip_hu[0] - plan.mean) / plan.std
    dataset = PatchDataset(
        cache_dir, train_ids, plan.patch_size_zyx, t.foreground_fraction, t.seed, pad_value=norm_background
    )
    sampler = StepSampler(start_step, total_steps, t.batch_size, info.rank, info.world)
    loader = DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=t.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=t.num_workers > 0,
        prefetch_factor=4 if t.num_workers > 0 else None,
    )
    model.train()
    step = start_step
    epoch_loss, data_wait, compute = [], 0.0, 0.0
    waited = time.perf_counter()
    summary: dict[str, Any] = {}
    for images, labels, indices in loader:
        data_wait += time.perf_counter() - waited
        began = time.perf_counter()
        loss = train_step(model, optimizer, scaler, images, labels, indices, recipe, device)
        scheduler.step()
        compute += time.perf_counter() - began
        epoch_loss.append(loss.item())
        step += 1

        if step % t.steps_per_epoch == 0:
            epoch = step // t.steps_per_epoch
            record: dict[str, Any] = {
                "epoch": epoch,
                "step": step,
                "loss": float(np.mean(epoch_loss)),
                "lr": optimizer.param_groups[0]["lr"],
                "data_wait_s_per_step": data_wait / len(epoch_loss),
                "compute_s_per_step": compute / len(epoch_loss),
            }
            if info.world > 1:
                loss_t = torch.tensor(record["loss"], device=device)
                dist.all_reduce(loss_t)
                record["loss"] = float(loss_t) / info.world
            if info.main and (epoch % t.validate_every == 0 or epoch == t.epochs):
                cases = val_cases[: t.val_cases] if t.val_cases else val_cases
                if cases:
                    scores = validate(network, recipe, plan, cases, mapping, device)
                    record.update({k: v for k, v in scores.items() if k != "cases"})
                    if scores["mean_dice"] > best:
                        best = scores["mean_dice"]
                        save_atomic(
                            {"model": network.state_dict(), "epoch": epoch, "step": step, "scores": scores},
                            run_dir / CHECKPOINT_BEST,
                        )
            history.append(record)
            if info.main:
                scalars.add(step, {k: v for k, v in record.items() if isinstance(v, float) and math.isfinite(v)})
                print(json.dumps({"event": "epoch", **record}), flush=True)
            rng = _gather_rng(info, device)
            if info.main:
                save_atomic(
                    {
                        "model": network.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rng,
                        "step": step,
                        "best": best,
                        "history": history,
                        "recipe": recipe.name,
                    },
                    last_path,
                )
            if info.world > 1:
                dist.barrier()
            epoch_loss, data_wait, compute = [], 0.0, 0.0
        if stop_after_steps is not None and step >= stop_after_steps:
            break
        waited = time.perf_counter()

    if info.main:
        scalars.close()
        summary = {"steps": step, "best_mean_dice": best, "history": history}
        if history:
            from .curves import write_curves

            write_curves(run_dir / "metrics.csv", run_dir / "curves.png")
    if info.world > 1:
        identical = _replicas_identical(network, device, info)
        if info.main:
            print(json.dumps({"event": "replicas", "world": info.world, "identical": identical}), flush=True)
        if not identical:
            log.error("data-parallel replicas hold different weights: training is broken")
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _replicas_identical(network: torch.nn.Module, device: torch.device, info: Distributed) -> bool:
    """Compare a SHA-256 of every rank's parameters, bit for bit."""
    digest = hashlib.sha256()
    for tensor in network.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()), dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(info.world)]
    dist.all_gather(parts, mine)
    return all(torch.equal(parts[0], part) for part in parts)


def _gather_rng(info: Distributed, device: torch.device) -> list[dict]:
    """Every rank's RNG state (dropout draws differ per rank), collected on every rank as tensors."""
    state = _rng_state(device)
    if info.world == 1:
        return [state]
    gathered: list[dict] = [{} for _ in range(info.world)]
    for key, tensor in state.items():
        on_device = tensor.to(device)
        parts = [torch.empty_like(on_device) for _ in range(info.world)]
        dist.all_gather(parts, on_device)
        for rank, part in enumerate(parts):
            gathered[rank][key] = part.cpu()
    return gathered
