"""The ``kidneytumorseg`` command (also ``python -m KidneyTumorSegLib``).

Sub-commands: ``predict`` (CT files or folders to label files), ``evaluate`` (KiTS19 Dice of a prediction),
``demo`` (a synthetic CT segmented end to end), ``model-info`` and ``init-model``.

Exit status: 0 success; 1 a batch where some cases failed; 2 bad input (the message on stderr says what,
which file and what to do; no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import InputImageError, KidneyTumorSegError, OutputError

EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT = 0, 1, 2
RESEARCH_ONLY = "For research use only; not for clinical diagnosis."


# ------------------------------------------------------------------------------------------------ progress


class ProgressPrinter:
    """Shows a case's progress as a tqdm bar (stderr), JSON lines (stdout) or nothing."""

    def __init__(self, mode: str, cases: int) -> None:
        self.mode = mode
        self.cases = cases
        self.case = ""
        self.index = 0
        self._bar = None
        self._started = 0.0

    def start_case(self, case: str, index: int) -> None:
        self.case, self.index = case, index
        self._started = time.perf_counter()
        if self.mode == "bar":
            from tqdm import tqdm

            prefix = f"[{index + 1}/{self.cases}] " if self.cases > 1 else ""
            self._bar = tqdm(
                total=100,
                desc=f"{prefix}{case}",
                unit="%",
                file=sys.stderr,
                leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
            )

    def __call__(self, stage: str, fraction: float) -> None:
        if self.mode == "bar" and self._bar is not None:
            self._bar.set_description_str(f"{self.case} ({stage})", refresh=False)
            self._bar.update(round(100 * fraction) - self._bar.n)
        elif self.mode == "json":
            elapsed = time.perf_counter() - self._started
            eta = elapsed * (1.0 - fraction) / fraction if fraction > 0.02 else None
            self.emit(
                {
                    "event": "progress",
                    "case": self.case,
                    "case_index": self.index,
                    "cases": self.cases,
                    "stage": stage,
                    "fraction": round(fraction, 4),
                    "eta_s": None if eta is None else round(eta, 1),
                }
            )

    def download(self, done: int, total: int | None) -> None:
        """A model download's progress (bytes so far, total or None), before the first case."""
        if self.mode == "json":
            if not self._started:
                self._started = time.perf_counter()
            fraction = done / total if total else 0.0
            elapsed = time.perf_counter() - self._started
            eta = elapsed * (1.0 - fraction) / fraction if fraction > 0.02 else None
            self.emit(
                {
                    "event": "progress",
                    "case": "",
                    "case_index": -1,
                    "cases": self.cases,
                    "stage": "download model",
                    "fraction": round(min(1.0, fraction), 4),
                    "eta_s": None if eta is None else round(eta, 1),
                    "bytes": done,
                    "total_bytes": total,
                }
            )
        elif self.mode == "bar":
            from tqdm import tqdm

            if self._bar is None:
                self._bar = tqdm(
                    total=total, desc="download model", unit="B", unit_scale=True, file=sys.stderr, leave=False
                )
            self._bar.update(done - self._bar.n)
            if total is not None and done >= total:
                self.end_case()

    def end_case(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def emit(self, record: dict) -> None:
        if self.mode == "json":
            _write_line(json.dumps(record))


def _write_line(text: str) -> None:
    """One line on stdout in a single write: processes sharing the stream (torchrun's ranks) never
    interleave inside a line."""
    sys.stdout.flush()
    try:
        os.write(sys.stdout.fileno(), (text + "\n").encode("utf-8"))
    except (AttributeError, OSError, ValueError):  # a stream without a file descriptor (tests capturing it)
        print(text, flush=True)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- predict


@dataclass
class Case:
    name: str
    input: Path
    output: Path


def _expand_inputs(inputs: Sequence[str]) -> list[tuple[str, Path]]:
    """(case name, input) for each input: a file; a folder of image files (each one a case); or a folder
    holding one DICOM series (one case)."""
    from .io import case_name, image_suffix

    found = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputImageError(f"{path}: no such file or folder; check the path.")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith("."))
            if files:
                found += [(case_name(p), p) for p in files]
                continue
        found.append((case_name(path), path))
    return found


def plan_cases(inputs: Sequence[str], output: str, out_format: str) -> list[Case]:
    """Pair inputs with outputs: a file to a file, or several inputs (or a folder) into a folder."""
    from .io import LABEL_SUFFIXES

    cases = _expand_inputs(inputs)
    out = Path(output)
    is_file_target = out.name.lower().endswith(LABEL_SUFFIXES) and not out.is_dir()
    if is_file_target:
        if len(cases) != 1:
            raise OutputError(
                f"{out}: {len(cases)} inputs cannot go into one file; give an output folder (-o FOLDER) instead."
            )
        planned = [Case(cases[0][0], cases[0][1], out)]
    else:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder; give a folder, or a .nii.gz/.nrrd file name.")
        names = [name for name, _ in cases]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputImageError(
                f"several inputs share the case name {duplicates[0]!r}; their outputs would overwrite each other. "
                "Rename them or run them separately."
            )
        planned = [Case(name, path, out / f"{name}.{out_format}") for name, path in cases]
    for case in planned:
        if case.output.resolve() == case.input.resolve():
            raise OutputError(f"{case.output}: the output would overwrite its input; choose another name.")
    return planned


def _segment_options(args: argparse.Namespace):
    from .pipeline import SegmentOptions

    return SegmentOptions(
        device=args.device,
        overlap=args.overlap,
        batch_size=args.batch_size,
        tta=args.tta,
        postprocess=not args.no_postprocess,
        crop_to_body=not args.no_crop,
        split_kidneys=args.split_kidneys,
        mixed_precision=not args.full_precision,
    )


def _load_model(spec: str | None, device: str = "cpu", progress=None):
    from .inference import resolve_device
    from .modelfile import load_model, resolve_model

    return load_model(resolve_model(spec, download=True, progress=progress), resolve_device(device))


def _current_rss_mb() -> float | None:
    """This process's resident memory now (Linux; None elsewhere): reported after each case, so that a
    batch shows whether memory stays flat."""
    try:
        with open("/proc/self/statm") as statm:
            return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


class _Ranks:
    """Data-parallel ``predict`` under torchrun: rank r of N takes cases r, r + N, ... and rank 0 prints one
    summary over all of them. Without torchrun (no WORLD_SIZE, or 1) a single rank does everything."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._group = False
        if self.world > 1:
            import torch.distributed as dist

            # gloo carries only the small end-of-run summary, so it serves GPU runs as well.
            dist.init_process_group("gloo")
            self._group = True

    def device(self, requested: str) -> str:
        """Each rank on its own GPU (LOCAL_RANK) when the run uses CUDA."""
        import torch

        if self.world > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        return requested

    def gather(self, item: object) -> list:
        if not self._group:
            return [item]
        import torch.distributed as dist

        items: list = [None] * self.world
        dist.all_gather_object(items, item)
        return items

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False


def cmd_predict(args: argparse.Namespace) -> int:
    ranks = _Ranks()
    try:
        return _predict(args, ranks)
    finally:
        ranks.close()


def _predict(args: argparse.Namespace, ranks: _Ranks) -> int:
    from .io import ALLOW_LARGE_ENV, LABEL_SUFFIXES

    if args.allow_large:
        os.environ[ALLOW_LARGE_ENV] = "1"
    from .metrics import format_volumes
    from .pipeline import _validate_options, predict_file

    options = _segment_options(args)
    options.device = ranks.device(options.device)
    _validate_options(options)  # once, before any work: not once per case
    cases = plan_cases(args.inputs, args.output, args.format)
    all_cases = len(cases)
    skipped = [c for c in cases if args.skip_existing and c.output.is_file()]
    todo = [c for c in cases if c not in skipped]
    mine = todo[ranks.rank :: ranks.world]
    printer = ProgressPrinter(args.progress, len(mine))
    model = _load_model(args.model, options.device, printer.download)
    printer.end_case()
    folder = cases[0].output.parent
    if not Path(args.output).name.lower().endswith(LABEL_SUFFIXES) and not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"{folder}: cannot create the output folder ({exc.strerror}); choose another -o."
            ) from None
    if not model.metadata.trained and ranks.rank == 0:
        _warn(f"model {model.metadata.name} is UNTRAINED (random weights): its labels are meaningless.")
    if skipped and ranks.rank == 0:
        print(
            f"{len(skipped)} of {all_cases} outputs exist already and are skipped (--skip-existing)",
            file=sys.stderr if args.progress == "json" else sys.stdout,
            flush=True,
        )
    failures: list[tuple[str, str]] = []
    done_here: list[str] = []
    rows_here: list[dict] = []
    for index, case in enumerate(mine):
        printer.start_case(case.name, index)
        try:
            result = predict_file(
                case.input,
                case.output,
                model,
                options,
                printer,
                report=args.report,
                seg_nrrd=args.seg_nrrd,
                dicom_seg=args.dicom_seg,
            )
        except KidneyTumorSegError as exc:
            printer.end_case()
            failures.append((case.name, str(exc)))
            _error(str(exc))
            printer.emit({"event": "case_failed", "case": case.name, "error": str(exc), "rank": ranks.rank})
            continue
        printer.end_case()
        done_here.append(case.name)
        if result.measurements is not None:
            from .report import csv_row

            rows_here.append(csv_row(case.name, result.measurements, result.warnings))
        for warning in result.warnings:
            _warn(warning)
        total = sum(result.timings_s.values())
        if args.progress == "json":
            printer.emit(
                {
                    "event": "case_done",
                    "case": case.name,
                    "output": str(case.output),
                    "volumes_ml": {k: round(v, 3) for k, v in result.volumes_ml.items()},
                    "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
                    "device": result.device,
                    "warnings": result.warnings,
                    "rank": ranks.rank,
                    "rss_mb": _current_rss_mb(),
                    "report": result.report_files,
                }
            )
        else:
            print(
                f"{case.name}: {format_volumes(result.volumes_ml)} -> {case.output} ({total:.1f} s)",
                flush=True,
            )
    gathered = ranks.gather((done_here, failures, rows_here))
    done_all = [name for names, _, _ in gathered for name in names]
    failures_all = [f for _, fails, _ in gathered for f in fails]
    rows_all = sorted((row for _, _, rows in gathered for row in rows), key=lambda row: row["case"])
    batch = all_cases > 1 or not Path(args.output).name.lower().endswith(LABEL_SUFFIXES)
    if args.report and batch and ranks.rank == 0 and rows_all:
        from .report import write_batch_csv

        csv_path = write_batch_csv(folder / "report.csv", rows_all)
        print(f"report: {csv_path}", file=sys.stderr if args.progress == "json" else sys.stdout, flush=True)
    if (all_cases > 1 or ranks.world > 1) and ranks.rank == 0:
        summary = f"{len(done_all)} of {len(todo)} cases segmented"
        if skipped:
            summary += f" ({len(skipped)} skipped: output exists)"
        if ranks.world > 1:
            summary += f" by {ranks.world} processes"
        if failures_all:
            summary += "; failed: " + "; ".join(f"{name} ({msg})" for name, msg in failures_all)
        print(summary, file=sys.stderr if args.progress == "json" else sys.stdout, flush=True)
        printer.emit(
            {
                "event": "summary",
                "done": len(done_all),
                "done_cases": sorted(done_all),
                "skipped": [c.name for c in skipped],
                "failed": [name for name, _ in failures_all],
                "processes": ranks.world,
            }
        )
    if not failures_all:
        return EXIT_OK
    return EXIT_BAD_INPUT if len(failures_all) == len(todo) else EXIT_PARTIAL


# ------------------------------------------------------------------------------------------------ evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import SimpleITK as sitk

    from .io import read_image
    from .metrics import kits19_dice

    prediction, reference = read_image(args.prediction), read_image(args.reference)
    if prediction.GetSize() != reference.GetSize():
        raise InputImageError(
            f"{args.prediction}: size {prediction.GetSize()} differs from the reference's {reference.GetSize()} "
            f"({args.reference}); the KiTS19 metric compares voxel for voxel, so both must be on the same grid."
        )
    same_grid = (
        np.allclose(prediction.GetSpacing(), reference.GetSpacing(), atol=1e-3)
        and np.allclose(prediction.GetOrigin(), reference.GetOrigin(), atol=1e-2)
        and np.allclose(prediction.GetDirection(), reference.GetDirection(), atol=1e-4)
    )
    if not same_grid:
        _warn(
            "prediction and reference headers differ (spacing, origin or direction); compared voxel for voxel "
            "as the official KiTS19 evaluation does, which ignores the affine."
        )
    pred = sitk.GetArrayViewFromImage(prediction)
    ref = sitk.GetArrayViewFromImage(reference)
    if args.merge_sides:
        from .laterality import merge_sides

        pred = merge_sides(pred)
    elif int(pred.max(initial=0)) > 2:
        _warn(
            f"{args.prediction}: holds label values above 2, which count as tumor as in the official KiTS19 "
            "code; for a file written with --split-kidneys (3 = left kidney) pass --merge-sides."
        )
    result = kits19_dice(pred, ref)
    result.update({"prediction": str(args.prediction), "reference": str(args.reference)})
    print(json.dumps(result))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- model info


def cmd_model_info(args: argparse.Namespace) -> int:
    from .model import count_parameters, gflops_per_patch
    from .modelfile import load_model, resolve_model

    loaded = load_model(resolve_model(args.model))
    meta = loaded.metadata
    info = {
        "file": str(loaded.path),
        "sha256": loaded.sha256,
        "name": meta.name,
        "version": meta.version,
        "trained": meta.trained,
        "architecture": "DeepLabV3Plus3D",
        "config": meta.config.to_dict(),
        "parameters": count_parameters(loaded.network),
        "gflops_per_patch": round(gflops_per_patch(loaded.network, meta.patch_size_zyx), 2),
        "labels": meta.labels,
        "target_spacing_zyx_mm": list(meta.target_spacing_zyx),
        "patch_size_zyx": list(meta.patch_size_zyx),
        "intensity": meta.to_json()["intensity"],
        "provenance": meta.provenance,
        "description": meta.description,
        "intended_use": meta.intended_use,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    c = meta.config
    lines = [
        f"Model        {meta.name} {meta.version}{'' if meta.trained else '  (UNTRAINED: random weights)'}",
        f"File         {loaded.path}",
        f"SHA-256      {loaded.sha256}",
        f"Architecture DeepLabV3Plus3D: output stride {c.output_stride}, stages {list(c.stage_channels)} x "
        f"{list(c.stage_blocks)} blocks, ASPP {c.aspp_channels} ch rates {list(c.aspp_rates)}, "
        f"{c.norm} norm, anisotropic stages {c.anisotropic_stages}",
        f"Parameters   {info['parameters']:,}",
        f"Cost         {info['gflops_per_patch']} GFLOPs per patch",
        f"Labels       {', '.join(f'{v} {k}' for k, v in sorted(meta.labels.items(), key=lambda kv: kv[1]))}",
        f"Spacing      {' x '.join(f'{s:g}' for s in meta.target_spacing_zyx)} mm (z, y, x)",
        f"Patch        {' x '.join(str(p) for p in meta.patch_size_zyx)} voxels (z, y, x)",
        f"Intensity    clip {info['intensity']['clip_hu']} HU, "
        f"mean {meta.normalization.mean:g}, std {meta.normalization.std:g}",
        f"Provenance   {json.dumps(meta.provenance, sort_keys=True)}",
        f"Description  {meta.description}",
        f"Intended use {meta.intended_use}",
    ]
    print("\n".join(lines))
    return EXIT_OK


def cmd_init_model(args: argparse.Namespace) -> int:
    from .model import DeepLabConfig
    from .modelfile import create_untrained_model, untrained_metadata

    config = DeepLabConfig(output_stride=args.output_stride)
    meta = untrained_metadata(config, name=args.name, seed=args.seed, version=args.model_version)
    create_untrained_model(args.output, meta, seed=args.seed, half=args.half)
    print(f"wrote {args.output} (untrained {meta.name}, seed {args.seed})")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), args.model, args.seed, args.device, args.progress)


# -------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kidneytumorseg",
        description=f"Kidney and kidney tumor segmentation in CT with a 3D DeepLab v3+. {RESEARCH_ONLY}",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=None,
            help="registry name or .safetensors path (default: the registry's default)",
        )
        p.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="default: CUDA if usable, else CPU",
        )
        p.add_argument(
            "--progress",
            choices=("bar", "json", "none"),
            default="bar",
            help="progress as a bar (stderr), JSON lines (stdout, for programs) or not at all",
        )

    p = sub.add_parser(
        "predict",
        help="segment CT files or folders",
        description="Segment CT volumes into 0 background, "
        f"1 kidney, 2 tumor; labels land on exactly the input grid. {RESEARCH_ONLY}",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="CT file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd), a folder of them, or a DICOM series folder",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file (.nii.gz, .nii, .nrrd) for one input, else a folder",
    )
    add_run_options(p)
    p.add_argument(
        "--tta",
        action="store_true",
        help="mirroring test-time augmentation (8 passes: slower, a little better)",
    )
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, 0 to <1 (default 0.5)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    p.add_argument("--no-postprocess", action="store_true", help="keep every component the network found")
    p.add_argument("--no-crop", action="store_true", help="run the network on the whole volume, not only the body")
    p.add_argument(
        "--full-precision",
        action="store_true",
        help="run the network in float32 only (default: float16 on CUDA, bfloat16 on CPUs with native bf16)",
    )
    p.add_argument(
        "--split-kidneys",
        action="store_true",
        help="label the kidneys by side, from the patient's anatomy: 1 right kidney, 2 tumor, 3 left kidney",
    )
    p.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz", help="output type when -o is a folder")
    p.add_argument(
        "--report",
        action="store_true",
        help="also write per case NAME.report.json (kidney and tumor measurements, R.E.N.A.L. parts) and "
        "NAME.report.png (QC montage), and for a batch report.csv",
    )
    p.add_argument(
        "--seg-nrrd",
        action="store_true",
        help="also write NAME.seg.nrrd: a Slicer segmentation with segment names, colours and terminology",
    )
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="also write NAME.seg.dcm: a DICOM Segmentation referencing the input DICOM series (DICOM input only)",
    )
    p.add_argument(
        "--allow-large",
        action="store_true",
        help="read volumes whose header declares more voxels than the memory available (refused otherwise)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave cases whose output file exists alone (rerun a batch: only what is missing is done)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate",
        help="KiTS19 Dice of a prediction against a reference (JSON)",
        description="Kidney Dice on label > 0 and tumor Dice on label > 1, voxel for voxel, as the "
        "official KiTS19 evaluation. When both masks are empty the Dice is 1.0 (the official code "
        "gives NaN); 'both_empty' lists where that rule applied.",
    )
    p.add_argument("prediction")
    p.add_argument("reference")
    p.add_argument(
        "--merge-sides",
        action="store_true",
        help="the prediction was written with --split-kidneys: count label 3 (left kidney) as kidney",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="segment a synthetic CT and write CT, labels, truth and a PNG")
    p.add_argument(
        "-o", "--output", default="kidneytumorseg-demo", help="output folder (default ./kidneytumorseg-demo)"
    )
    p.add_argument("--seed", type=int, default=3, help="phantom seed")
    add_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("model-info", help="architecture, size, cost, labels, spacing and provenance of a model")
    p.add_argument(
        "model", nargs="?", default=None, help="registry name or .safetensors path (default model if absent)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("init-model", help="write a model file with random weights (for tests and timing)")
    p.add_argument("output", help="path ending in .safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="untrained")
    p.add_argument("--model-version", default="0.0.0")
    p.add_argument("--output-stride", type=int, choices=(8, 16), default=8)
    p.add_argument("--half", action="store_true", help="store float16 weights (half the size)")
    p.set_defaults(func=cmd_init_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run ``args.func``, and turn user errors into one stderr line and exit status 2 (shared with
    the training folder's command)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except KidneyTumorSegError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted; no output was left half-written.")
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
