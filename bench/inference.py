"""This project's ``predict`` against a plain MONAI baseline, side by side, on the same CT and network.

Both variants use the same reader, the same preprocessing (canonical orientation, trilinear resampling
to the model grid, clip and z-score), the same network (the ``kits19`` recipe's architecture; random
weights unless ``--model``), the same window size, overlap (0.5), Gaussian blending (sigma 1/8 of the
window) and windows per forward pass (2), the same postprocessing and the same writer. They differ in
what a plain MONAI user does:

* baseline: ``monai.inferers.sliding_window_inference`` over the whole model grid, softmax and argmax at
  the model's resolution, labels back to the input grid by nearest neighbour;
* ours (``KidneyTumorSegLib.pipeline.predict_file``, what ``kidneytumorseg predict`` runs): the
  network only on the body's bounding box, logits (not labels) interpolated trilinearly to the input
  grid slab by slab and only around the foreground.

Each variant runs in its own process (its own peak RSS), alternating, ``--runs`` times; medians are
reported. The machine's convolution throughput is measured in the same run (a large float32 conv3d in
its own process) and the network stage's achieved GFLOP/s is set against it. The two outputs are
compared voxel for voxel with a trained model (``--agreement-model``, default the bundled demo model:
random weights label noise, which says nothing about agreement), once per input. The last line printed
is one JSON object.

    python bench/inference.py             # 512x512x200 at 0.8x0.8x2.5 mm and 512x512x600 at 0.8x0.8x1 mm
    python bench/inference.py --quick     # one small CT (160x160x60 at 1.6x1.6x4 mm), one run each
    python bench/inference.py --device cuda   # the same on a GPU (mixed precision in both variants)

Needs the ``bench`` extra (MONAI): ``pip install -c constraints.txt -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("read", "preprocess", "network", "to_input_grid", "postprocess", "write")
FULL_INPUTS = (((512, 512, 200), (0.8, 0.8, 2.5)), ((512, 512, 600), (0.8, 0.8, 1.0)))
QUICK_INPUTS = (((160, 160, 60), (1.6, 1.6, 4.0)),)
OVERLAP = 0.5
BATCH = 2


# ------------------------------------------------------------------------------------------- children


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _count_windows(network) -> list[int]:
    """A forward hook that counts the windows (batch elements) the network sees."""
    seen = [0]
    network.register_forward_hook(lambda module, inputs, output: seen.__setitem__(0, seen[0] + inputs[0].shape[0]))
    return seen


def child_ours(ct: str, out: str, model_path: str, device: str) -> dict:
    from KidneyTumorSegLib.inference import resolve_device
    from KidneyTumorSegLib.modelfile import load_model
    from KidneyTumorSegLib.pipeline import SegmentOptions, predict_file

    model = load_model(model_path, resolve_device(device))
    windows = _count_windows(model.network)
    started = time.perf_counter()
    result = predict_file(ct, out, model, SegmentOptions(device=device, overlap=OVERLAP, batch_size=BATCH))
    total = time.perf_counter() - started
    return {"stages_s": result.timings_s, "total_s": total, "windows": windows[0], "device": result.device}


def child_baseline(ct: str, out: str, model_path: str, device: str) -> dict:
    """The plain way: MONAI's sliding window over the whole model grid, argmax there, nearest neighbour back."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from KidneyTumorSegLib import io
    from KidneyTumorSegLib.inference import resolve_device
    from KidneyTumorSegLib.modelfile import load_model
    from KidneyTumorSegLib.postprocessing import PostprocessSettings, postprocess
    from KidneyTumorSegLib.preprocessing import image_to_model_input, labels_like, model_grid_for

    dev = resolve_device(device)
    model = load_model(model_path, dev)
    meta = model.metadata
    network = model.network.eval()
    windows = _count_windows(network)
    timings = {}
    started = t = time.perf_counter()

    image = io.read_image(ct)
    timings["read"], t = time.perf_counter() - t, time.perf_counter()

    grid = model_grid_for(image, meta.target_spacing_zyx)
    volume = image_to_model_input(image, grid, meta.normalization)
    timings["preprocess"], t = time.perf_counter() - t, time.perf_counter()

    use_amp = dev.type == "cuda"
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
        logits = sliding_window_inference(
            volume[None, None].to(dev),
            roi_size=meta.patch_size_zyx,
            sw_batch_size=BATCH,
            predictor=network,
            overlap=OVERLAP,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=meta.normalization.background_value,
        )
        labels_model = torch.softmax(logits.float(), dim=1).argmax(dim=1, keepdim=True).to(torch.uint8)
    del logits
    timings["network"], t = time.perf_counter() - t, time.perf_counter()

    back = F.interpolate(labels_model.float(), size=grid.input_shape, mode="nearest-exact")
    labels = np.ascontiguousarray(grid.orientation.from_canonical(back[0, 0].to(torch.uint8).cpu().numpy()))
    del back
    timings["to_input_grid"], t = time.perf_counter() - t, time.perf_counter()

    postprocess(labels, PostprocessSettings(), float(np.prod(image.GetSpacing())) / 1000.0)
    label_image = labels_like(labels, image)
    timings["postprocess"], t = time.perf_counter() - t, time.perf_counter()

    io.write_labels(label_image, out)
    timings["write"] = time.perf_counter() - t
    return {"stages_s": timings, "total_s": time.perf_counter() - started, "windows": windows[0], "device": str(dev)}


def child_conv(device: str) -> dict:
    """The machine's conv3d throughput: the best of a few large 3x3x3 convolutions, in float32 and in the
    mixed precision the pipeline uses on this device (bfloat16 on a CPU with native bf16, float16 on
    CUDA), so that each variant's network is measured against the precision it runs in."""
    import torch

    from KidneyTumorSegLib.inference import autocast_dtype, resolve_device

    dev = resolve_device(device)
    shapes = ((2, 32, 40, 80, 80), (2, 64, 20, 40, 40), (2, 128, 10, 20, 20))
    amp = autocast_dtype(dev)
    result = {"threads": torch.get_num_threads(), "amp_dtype": str(amp).replace("torch.", "") if amp else None}
    for key, dtype in (("conv_gflops", None), ("conv_gflops_amp", amp)):
        if key == "conv_gflops_amp" and amp is None:
            result[key] = result["conv_gflops"]
            continue
        best = 0.0
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for batch, channels, z, y, x in shapes:
                conv = torch.nn.Conv3d(channels, channels, 3, padding=1, bias=False).to(dev)
                inp = torch.randn(batch, channels, z, y, x, device=dev)
                flops = 2 * channels * channels * 27 * batch * z * y * x
                times = []
                for _ in range(6):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    conv(inp)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                best = max(best, flops / statistics.median(times[1:]) / 1e9)
        result[key] = best
    return result


def child_main(kind: str, argv: list[str]) -> None:
    if kind == "conv":
        record = child_conv(*argv)
    else:
        record = {"ours": child_ours, "baseline": child_baseline}[kind](*argv)
    record["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(record))


# --------------------------------------------------------------------------------------------- parent


def run_child(kind: str, *argv: str) -> dict:
    here = str(Path(__file__).resolve().parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import inference; inference.child_main({kind!r}, {list(argv)!r})"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads(lines[-1])
    record["process_wall_s"] = wall
    return record


def agreement(a_path: Path, b_path: Path, truth_path: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from KidneyTumorSegLib.metrics import dice, kits19_dice

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(a_path)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(b_path)))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path)))
    against_truth = {}
    for kind, labels in (("ours", a), ("baseline", b)):
        d = kits19_dice(labels, truth)
        against_truth[kind] = {"kidney_dice": round(d["kidney_dice"], 4), "tumor_dice": round(d["tumor_dice"], 4)}
    return {
        "dice_against_phantom_truth": against_truth,
        "label_agreement": float(np.count_nonzero(a == b)) / a.size,
        "kidney_dice_between": dice(a == 1, b == 1),
        "tumor_dice_between": dice(a == 2, b == 2),
        "foreground_voxels": [int(np.count_nonzero(a)), int(np.count_nonzero(b))],
    }


def bench_input(
    size, spacing, model: str, agreement_model: str, device: str, runs: int, tmp: Path, gflops_per_window: float
) -> dict:
    from KidneyTumorSegLib.io import write_image_atomic
    from KidneyTumorSegLib.phantom import make_phantom

    tag = "x".join(map(str, size))
    ct = tmp / f"ct-{tag}.nii.gz"
    phantom = make_phantom(7, size=tuple(size), spacing=tuple(spacing))
    write_image_atomic(phantom.image, ct)
    write_image_atomic(phantom.labels, tmp / f"truth-{tag}.nii.gz")
    del phantom
    results: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for i in range(runs):
        for kind in ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours"):
            out = tmp / f"{kind}-{tag}.nii.gz"
            record = run_child(kind, str(ct), str(out), model, device)
            results[kind].append(record)
            print(
                f"{tag} {kind} run {i + 1}: {record['total_s']:.1f} s in process, peak {record['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    voxels = size[0] * size[1] * size[2]
    summary = {"size": list(size), "spacing_mm": list(spacing)}
    for kind, records in results.items():
        median_stage = {s: statistics.median(r["stages_s"][s] for r in records) for s in STAGES}
        total = statistics.median(r["total_s"] for r in records)
        network_s = median_stage["network"]
        windows = records[0]["windows"]
        summary[kind] = {
            "total_s": round(total, 2),
            "process_wall_s": round(statistics.median(r["process_wall_s"] for r in records), 2),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in records)),
            "stages_s": {s: round(v, 3) for s, v in median_stage.items()},
            "voxels_per_s": round(voxels / total),
            "windows": windows,
            "network_gflops_per_s": round(windows * gflops_per_window / network_s, 1),
            "device": records[0]["device"],
        }
    for kind in ("ours", "baseline"):
        run_child(kind, str(ct), str(tmp / f"agree-{kind}-{tag}.nii.gz"), agreement_model, device)
    summary.update(
        agreement(tmp / f"agree-ours-{tag}.nii.gz", tmp / f"agree-baseline-{tag}.nii.gz", tmp / f"truth-{tag}.nii.gz")
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 256x256x100 CT, one run of each: under a minute")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=None, help="model file (default: random weights, kits19 architecture)")
    parser.add_argument(
        "--agreement-model", default=None, help="trained model for the label comparison (default: the bundled one)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args()
    inputs = QUICK_INPUTS if args.quick else FULL_INPUTS
    runs = 1 if args.quick else args.runs

    import torch

    from KidneyTumorSegLib.model import gflops_per_patch
    from KidneyTumorSegLib.modelfile import create_untrained_model, load_model, resolve_model, untrained_metadata

    with tempfile.TemporaryDirectory(prefix="kts-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model is None:
            model = str(tmp / "kits19-architecture-random.safetensors")
            create_untrained_model(model, untrained_metadata(), seed=0)
        loaded = load_model(model)
        gflops_per_window = gflops_per_patch(loaded.network, loaded.metadata.patch_size_zyx)
        conv = run_child("conv", args.device)
        print(
            f"conv3d throughput: {conv['conv_gflops']:.1f} GFLOP/s float32, {conv['conv_gflops_amp']:.1f} GFLOP/s "
            f"{conv['amp_dtype'] or 'float32'} ({conv['threads']} threads)",
            file=sys.stderr,
        )
        agreement_model = str(resolve_model(args.agreement_model))
        results = [
            bench_input(size, spacing, model, agreement_model, args.device, runs, tmp, gflops_per_window)
            for size, spacing in inputs
        ]

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"device {results[0]['ours']['device']}; kits19 architecture ({gflops_per_window:.1f} GFLOP per "
        f"{'x'.join(map(str, loaded.metadata.patch_size_zyx))} window); median of {runs} run(s) per variant; "
        f"conv3d throughput {conv['conv_gflops']:.1f} GFLOP/s float32, {conv['conv_gflops_amp']:.1f} GFLOP/s "
        f"{conv['amp_dtype'] or 'float32'}; ours runs the network in {conv['amp_dtype'] or 'float32'}, the "
        "baseline in float32"
    )
    print(
        "| input | variant | total s | read | resample | network | back to input grid | postprocess | write "
        "| peak RSS MB | Mvoxel/s | network GFLOP/s (of conv3d) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name = f"{'x'.join(map(str, r['size']))} @ {'x'.join(f'{s:g}' for s in r['spacing_mm'])} mm"
        for kind in ("ours", "baseline"):
            v = r[kind]
            s = v["stages_s"]
            reference = conv["conv_gflops_amp"] if kind == "ours" else conv["conv_gflops"]
            share = 100 * v["network_gflops_per_s"] / reference
            print(
                f"| {name} | {kind} | {v['total_s']:.2f} | {s['read']:.2f} | {s['preprocess']:.2f} | "
                f"{s['network']:.2f} | {s['to_input_grid']:.2f} | {s['postprocess']:.2f} | {s['write']:.2f} | "
                f"{v['peak_rss_mb']} | {v['voxels_per_s'] / 1e6:.2f} | {v['network_gflops_per_s']:.1f} ({share:.0f}%) |"
            )
        print(
            f"| {name} | ours/baseline | {r['ours']['total_s'] / r['baseline']['total_s']:.2f} | | | | | | | "
            f"{r['ours']['peak_rss_mb'] / r['baseline']['peak_rss_mb']:.2f} | | |"
        )
        print(
            f"\n{name}, {Path(agreement_model).name}: labels agree on {100 * r['label_agreement']:.3f}% of voxels "
            f"(Dice between the two: kidney "
            f"{r['kidney_dice_between']:.3f}, tumor {r['tumor_dice_between']:.3f}); KiTS19 Dice against the "
            f"phantom's truth: ours kidney {r['dice_against_phantom_truth']['ours']['kidney_dice']:.3f} / tumor "
            f"{r['dice_against_phantom_truth']['ours']['tumor_dice']:.3f}, baseline kidney "
            f"{r['dice_against_phantom_truth']['baseline']['kidney_dice']:.3f} / tumor "
            f"{r['dice_against_phantom_truth']['baseline']['tumor_dice']:.3f}"
        )
    first = results[0]
    summary = {
        "ours_s": first["ours"]["total_s"],
        "baseline_s": first["baseline"]["total_s"],
        "speedup": round(first["baseline"]["total_s"] / first["ours"]["total_s"], 2),
        "ours_peak_mb": first["ours"]["peak_rss_mb"],
        "baseline_peak_mb": first["baseline"]["peak_rss_mb"],
        "label_agreement": round(first["label_agreement"], 6),
        "conv_efficiency": round(first["ours"]["network_gflops_per_s"] / conv["conv_gflops_amp"], 3),
        "baseline_conv_efficiency": round(first["baseline"]["network_gflops_per_s"] / conv["conv_gflops"], 3),
        "conv_gflops": round(conv["conv_gflops"], 1),
        "conv_gflops_amp": round(conv["conv_gflops_amp"], 1),
        "amp_dtype": conv["amp_dtype"],
        "cpu_cores": os.cpu_count(),
        "runs": runs,
        "inputs": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
