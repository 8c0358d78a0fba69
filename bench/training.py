"""Training throughput: can the data loader keep the device busy?

For each recipe (``kits19`` and ``phantom`` by default) on a few phantom cases prepared with that recipe's
plan, it measures

* the data loader alone: patches per second delivered by the recipe's DataLoader (its workers, batch
  size, foreground oversampling), after the first batch;
* one training step alone: augmentation on the device, forward, Dice + cross-entropy, backward,
  gradient clipping, optimizer step (median of ``--steps`` steps after one warm-up step);

and reports the loader's headroom: patches per second it delivers over patches per second a step
consumes. Above 1 the device never waits for data. The last line printed is one JSON object.

    python bench/training.py                     # both recipes, on the CPU
    python bench/training.py --device cuda       # the same on a GPU (mixed precision as in training)
    python bench/training.py --recipes phantom --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(recipe_path: Path, data: Path, work: Path) -> None:
    command = [sys.executable, "-m", "kidneytumorseg_train", "prepare", "--data", str(data)]
    command += ["--recipe", str(recipe_path), "--work", str(work), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"prepare failed for {recipe_path.name}:\n{done.stderr[-2000:]}")


def measure(recipe_path: Path, work: Path, device_name: str, steps: int, loader_batches: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from kidneytumorseg_train.cache import cached_case_ids
    from kidneytumorseg_train.cli import _effective_plan
    from kidneytumorseg_train.config import load_recipe
    from kidneytumorseg_train.sampling import PatchDataset, StepSampler
    from kidneytumorseg_train.trainer import make_optimizer, train_step
    from KidneyTumorSegLib.inference import resolve_device
    from KidneyTumorSegLib.model import DeepLabV3Plus3D

    recipe = load_recipe(recipe_path)
    plan = _effective_plan(work, recipe)
    t = recipe.training
    device = resolve_device(device_name)
    ids = cached_case_ids(work / "cache")
    background = (plan.clip_hu[0] - plan.mean) / plan.std
    total = (loader_batches + 1) * t.batch_size

    def loader(batches: int):
        dataset = PatchDataset(work / "cache", ids, plan.patch_size_zyx, t.foreground_fraction, t.seed, background)
        return DataLoader(
            dataset,
            batch_size=t.batch_size,
            sampler=StepSampler(0, batches, t.batch_size),
            num_workers=t.num_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if t.num_workers > 0 else None,
        )

    # The loader alone (its workers start with the first batch, which is not counted).
    iterator = iter(loader(loader_batches + 1))
    next(iterator)
    began = time.perf_counter()
    for _ in iterator:
        pass
    loader_patches_per_s = loader_batches * t.batch_size / (time.perf_counter() - began)

    # Training steps alone, on batches taken beforehand.
    batches = list(loader(steps + 1))
    network = DeepLabV3Plus3D(recipe.model).to(device).train()
    optimizer = make_optimizer(network, recipe)
    use_amp = t.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    times = []
    for images, labels, indices in batches:
        began = time.perf_counter()
        train_step(network, optimizer, scaler, images, labels, indices, recipe, device)
        times.append(time.perf_counter() - began)
    step_s = statistics.median(times[1:])
    consumed = t.batch_size / step_s
    return {
        "recipe": recipe.name,
        "device": str(device),
        "patch_size_zyx": list(plan.patch_size_zyx),
        "batch_size": t.batch_size,
        "num_workers": t.num_workers,
        "loader_patches_per_s": round(loader_patches_per_s, 2),
        "step_s": round(step_s, 3),
        "step_patches_per_s": round(consumed, 2),
        "loader_headroom": round(loader_patches_per_s / consumed, 2),
        "loader_batches": loader_batches,
        "steps": len(times) - 1,
        "total_patches_loaded": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["kits19", "phantom"])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 for kits19, 10 otherwise)")
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--cases", type=int, default=6, help="phantom cases to prepare")
    args = parser.parse_args()

    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="kts-train-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        made = subprocess.run(
            [sys.executable, "-m", "kidneytumorseg_train", "make-phantoms", str(data), "--n", str(args.cases)],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            sys.exit(made.stderr[-2000:])
        for name in args.recipes:
            recipe_path = ROOT / "train" / "configs" / f"{name}.json"
            work = tmp / f"work-{name}"
            prepare(recipe_path, data, work)
            steps = args.steps or (3 if name == "kits19" and args.device == "cpu" else 10)
            result = measure(recipe_path, work, args.device, steps, args.loader_batches)
            results.append(result)
            print(json.dumps(result), file=sys.stderr)

    print(f"\n{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(
        "| recipe | device | patch | batch | loader workers | loader patches/s | step s | patches/s a step "
        "consumes | loader headroom |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['recipe']} | {r['device']} | {'x'.join(map(str, r['patch_size_zyx']))} | {r['batch_size']} | "
            f"{r['num_workers']} | {r['loader_patches_per_s']:.1f} | {r['step_s']:.2f} | "
            f"{r['step_patches_per_s']:.2f} | {r['loader_headroom']:.1f}x |"
        )
    print(json.dumps({"cpu_cores": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
