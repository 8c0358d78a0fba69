"""``python -m kidneytumorseg_train``: dataset to model file, one command per step.

    make-phantoms OUT --n 40                 a synthetic dataset in the KiTS19 layout (for the phantom recipe)
    prepare --data DIR --recipe R --work W   check every case, fingerprint, plan, splits, preprocessed cache
    train --work W --recipe R [--split S]    train (torchrun --nproc_per_node=N ... for data-parallel)
    export --work W --recipe R -o M          best checkpoint -> model file with provenance

Bad input (missing images, mismatched grids, unknown labels, an empty dataset, a bad recipe) gets one
message naming the case or key and exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Recipe, load_recipe
from .errors import ConfigError, DatasetError

DATASET_FILE = "dataset.json"


def _write_json(path: Path, data: dict) -> None:
    from .plan import write_json_atomic

    write_json_atomic(path, data)


def _dataset(work: Path) -> tuple[list, object, dict]:
    from .datasets import find_cases, mapping_for

    path = work / DATASET_FILE
    if not path.exists():
        raise ConfigError(f"{work}: not a prepared work folder (no {DATASET_FILE}); run `prepare` first.")
    info = json.loads(path.read_text())
    cases = [c for c in find_cases(info["root"], info["layout"], require_labels=False) if c.label is not None]
    mapping = mapping_for(info["root"], info["layout"], cyst=info["cyst"])
    return cases, mapping, info


def _effective_plan(work: Path, recipe: Recipe):
    """The work folder's plan, with the recipe's patch size if it sets one (the cache does not depend on it)."""
    import dataclasses

    from .cache import cached_case_ids, open_case
    from .plan import load_plan

    plan = load_plan(work / "plan.json")
    patch = recipe.plan.get("patch_size_zyx") or plan.patch_size_zyx
    # Plan validates itself: a patch that is not a multiple of this network's stride is refused here.
    plan = dataclasses.replace(plan, patch_size_zyx=tuple(int(v) for v in patch), divisor=recipe.model.divisor())
    shapes = [open_case(work / "cache", i).shape for i in cached_case_ids(work / "cache")]
    if shapes:
        largest = [max(s[axis] for s in shapes) for axis in range(3)]
        if any(p > n for p, n in zip(plan.patch_size_zyx, largest, strict=True)):
            raise ConfigError(
                f"plan.patch_size_zyx {list(plan.patch_size_zyx)} is larger than every case after resampling "
                f"(largest {largest} voxels, z y x); choose a smaller patch in the recipe."
            )
    return plan


def _run_dir(given: str | None, work: Path, recipe: Recipe, split_name: str) -> Path:
    """A run's folder: as given, else WORK/runs/RECIPE-SPLIT."""
    return Path(given) if given else work / "runs" / f"{recipe.name}-{split_name}"


def cmd_make_phantoms(args: argparse.Namespace) -> int:
    from .datasets import write_phantom_dataset

    cases = write_phantom_dataset(Path(args.output), args.n, seed=args.seed, layout=args.layout)
    print(f"wrote {len(cases)} phantom cases to {args.output} ({args.layout} layout)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .cache import preprocess_dataset
    from .datasets import check_dataset, detect_layout, find_cases, mapping_for
    from .plan import fingerprint, make_plan, save_plan
    from .splits import holdout, kfold, save_splits

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    layout = args.layout or recipe.layout
    if layout == "auto":
        layout = detect_layout(args.data)
    found = find_cases(args.data, layout, require_labels=False)
    cases = [c for c in found if c.label is not None]
    if len(cases) < len(found):  # the KiTS19 download holds the 90 unlabelled test cases too
        print(f"leaving out {len(found) - len(cases)} case(s) without labels", file=sys.stderr)
    if not cases:
        raise DatasetError(f"{args.data}: no case has a label file; there is nothing to train on.")
    mapping = mapping_for(args.data, layout, cyst=recipe.cyst)
    print(f"{len(cases)} cases ({layout} layout) in {args.data}; checking each ...", file=sys.stderr)
    check_dataset(cases, mapping, workers=args.workers)
    work.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cases, mapping, workers=args.workers)
    _write_json(work / "fingerprint.json", fp)
    plan = make_plan(
        fp,
        divisor=recipe.model.divisor(),
        patch_size_zyx=recipe.plan.get("patch_size_zyx"),
        target_spacing_zyx=recipe.plan.get("target_spacing_zyx"),
        max_patch_voxels=recipe.plan.get("max_patch_voxels", 80 * 160 * 160),
    )
    plan_path = work / "plan.json"
    if not plan_path.exists():
        save_plan(plan, plan_path)
    ids = [c.case_id for c in cases]
    splits = {**kfold(ids, k=min(5, len(ids)), seed=args.seed), **holdout(ids, val_fraction=0.2, seed=args.seed)}
    save_splits(work / "splits.json", splits)
    _write_json(work / DATASET_FILE, {"root": str(Path(args.data).resolve()), "layout": layout, "cyst": recipe.cyst})
    preprocess_dataset(cases, mapping, plan, work / "cache", workers=args.workers, progress=not args.quiet)
    print(
        json.dumps(
            {
                "event": "prepared",
                "cases": len(cases),
                "target_spacing_zyx": list(plan.target_spacing_zyx),
                "patch_size_zyx": list(plan.patch_size_zyx),
                "clip_hu": list(plan.clip_hu),
                "mean": plan.mean,
                "std": plan.std,
                "splits": sorted(splits),
            }
        )
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .splits import load_splits
    from .trainer import train

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    cases, mapping, _ = _dataset(work)
    plan = _effective_plan(work, recipe)
    split_name = args.split or recipe.split
    split = load_splits(work / "splits.json", split_name)
    by_id = {c.case_id: c for c in cases}
    val_cases = [by_id[i] for i in split["val"]]
    run_dir = _run_dir(args.output, work, recipe, split_name)
    summary = train(
        recipe,
        plan,
        work / "cache",
        split["train"],
        val_cases,
        mapping,
        run_dir,
        resume=args.resume,
        device_name=args.device,
        stop_after_steps=args.stop_after_steps,
    )
    if summary:
        print(
            json.dumps(
                {
                    "event": "trained",
                    "run": str(run_dir),
                    "steps": summary["steps"],
                    "best_mean_dice": summary["best_mean_dice"],
                }
            )
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    _, _, dataset = _dataset(work)
    plan = _effective_plan(work, recipe)
    split_name = args.split or recipe.split
    run_dir = _run_dir(args.run, work, recipe, split_name)
    provenance = {
        "dataset": args.dataset_name or Path(dataset["root"]).name,
        "layout": dataset["layout"],
        "split": split_name,
        "cyst_mapped_to": dataset["cyst"],
    }
    result = export_run(run_dir, Path(args.output), recipe, plan, provenance, half=not args.float32)
    size_mb = Path(args.output).stat().st_size / 1e6
    print(json.dumps({"event": "exported", "model": args.output, "size_mb": round(size_mb, 2), **result}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Segment every case of a dataset with a model file and report KiTS19 Dice per case and on average."""
    import numpy as np
    import SimpleITK as sitk

    from KidneyTumorSegLib.metrics import kits19_dice
    from KidneyTumorSegLib.modelfile import load_model, resolve_model
    from KidneyTumorSegLib.pipeline import SegmentOptions, segment

    from .datasets import find_cases, mapping_for, read_case

    model = load_model(resolve_model(args.model))
    cases = find_cases(args.data, args.layout)
    mapping = mapping_for(args.data, args.layout, cyst=args.cyst)
    options = SegmentOptions(device=args.device, overlap=args.overlap, tta=args.tta)
    rows = []
    for case in cases:
        image, labels = read_case(case, mapping)
        result = segment(image, model, options)
        scores = kits19_dice(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(labels))
        direction = np.array(image.GetDirection()).reshape(3, 3)
        oblique = bool(np.abs(direction).max(axis=0).min() < 0.999)
        row = {
            "case": case.case_id,
            "kidney_dice": round(scores["kidney_dice"], 4),
            "tumor_dice": round(scores["tumor_dice"], 4),
            "tumor_in_reference": "tumor" not in scores["both_empty"]
            and bool((sitk.GetArrayViewFromImage(labels) == 2).any()),
            "max_spacing_mm": round(max(image.GetSpacing()), 2),
            "oblique": oblique,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    with_tumor = [r["tumor_dice"] for r in rows if r["tumor_in_reference"]]
    summary = {
        "event": "evaluated",
        "model": str(model.path),
        "cases": len(rows),
        "kidney_dice_mean": round(float(np.mean([r["kidney_dice"] for r in rows])), 4),
        "tumor_dice_mean": round(float(np.mean([r["tumor_dice"] for r in rows])), 4),
        "tumor_dice_mean_cases_with_tumor": round(float(np.mean(with_tumor)), 4) if with_tumor else None,
        "cases_with_tumor": len(with_tumor),
        "oblique_cases": sum(r["oblique"] for r in rows),
        "thick_slice_cases": sum(r["max_spacing_mm"] >= 4.5 for r in rows),
    }
    print(json.dumps(summary))
    if args.json_out:
        _write_json(Path(args.json_out), {**summary, "per_case": rows})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kidneytumorseg_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-phantoms", help="write a synthetic dataset with known labels")
    p.add_argument("output")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--layout", choices=("kits19", "kits23", "nnunet"), default="kits19")
    p.set_defaults(func=cmd_make_phantoms)

    p = sub.add_parser("prepare", help="check, fingerprint, plan, split and preprocess a dataset")
    p.add_argument("--data", required=True, help="dataset folder (KiTS19 data/, KiTS21/23 dataset/, or nnU-Net raw)")
    p.add_argument("--recipe", required=True, help="recipe JSON (train/configs/*.json)")
    p.add_argument("--work", required=True, help="work folder for the plan, splits, cache and runs")
    p.add_argument("--layout", choices=("auto", "kits19", "kits23", "nnunet"), default=None)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0, help="seed of the splits")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train on a prepared work folder (torchrun for several GPUs or machines)")
    p.add_argument("--work", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--split", default=None, help="fold0..fold4 or holdout (default: the recipe's)")
    p.add_argument("--output", default=None, help="run folder (default WORK/runs/RECIPE-SPLIT)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder exactly")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="best checkpoint -> .safetensors model file")
    p.add_argument("--work", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--run", default=None)
    p.add_argument("--dataset-name", default=None)
    p.add_argument("--float32", action="store_true", help="store float32 weights (default float16)")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="KiTS19 Dice of a model file on every case of a dataset")
    p.add_argument("--model", required=True, help="model file or registry name")
    p.add_argument("--data", required=True)
    p.add_argument("--layout", choices=("auto", "kits19", "kits23", "nnunet"), default="auto")
    p.add_argument("--cyst", choices=("kidney", "background", "tumor"), default="kidney")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from KidneyTumorSegLib.cli import run_command

    return run_command(build_parser(), argv)
