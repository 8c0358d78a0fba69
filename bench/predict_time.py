"""Time ``kidneytumorseg predict`` on a full-size synthetic CT: wall time per stage and peak memory.

Each run is a fresh process (so its peak RSS is its own) that runs the real command end to end: import,
model load, read, preprocess, network, back to the input grid, postprocess, atomic write. Three runs by
default; the table shows medians. The last line printed is one JSON object.

    python bench/predict_time.py                 # 512x512x200 at 0.8x0.8x2.5 mm, kits19 architecture
    python bench/predict_time.py --quick         # 256x256x100, under a minute
    python bench/predict_time.py --device cuda   # the same on a GPU
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


def child(args: list[str]) -> None:
    """Run the CLI in this process, then report this process's peak RSS."""
    from KidneyTumorSegLib.cli import main

    started = time.perf_counter()
    status = main(args)
    wall = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(json.dumps({"event": "bench_child", "status": status, "wall_s": wall, "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256x256x100 at 1.6x1.6x5 mm (same physical box)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=(512, 512, 200))
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=(0.8, 0.8, 2.5))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--model",
        default=None,
        help="model name or file (default: random weights in the kits19 recipe's architecture, the default config)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more predict options")
    args = parser.parse_args()
    if args.quick:
        args.size, args.spacing = (256, 256, 100), (1.6, 1.6, 5.0)

    from KidneyTumorSegLib.io import write_image_atomic
    from KidneyTumorSegLib.phantom import make_phantom

    with tempfile.TemporaryDirectory(prefix="kts-bench-") as tmp:
        ct = Path(tmp) / "ct.nii.gz"
        started = time.perf_counter()
        phantom = make_phantom(7, size=tuple(args.size), spacing=tuple(args.spacing))
        write_image_atomic(phantom.image, ct)
        del phantom
        print(
            f"phantom {args.size} at {args.spacing} mm written in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        if args.model is None:
            from KidneyTumorSegLib.modelfile import create_untrained_model, untrained_metadata

            args.model = str(Path(tmp) / "kits19-architecture-random.safetensors")
            create_untrained_model(args.model, untrained_metadata(), seed=0)

        runs = []
        for i in range(args.runs):
            out = Path(tmp) / f"labels{i}.nii.gz"
            cli_args = [
                "predict",
                str(ct),
                "-o",
                str(out),
                "--progress",
                "json",
                "--device",
                args.device,
                *args.extra,
            ]
            cli_args += ["--model", args.model]
            here = str(Path(__file__).parent)
            code = f"import sys; sys.path.insert(0, {here!r}); import predict_time; predict_time.child({cli_args!r})"
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            process_wall = time.perf_counter() - started
            records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            done = next((r for r in records if r.get("event") == "case_done"), None)
            stats = next((r for r in records if r.get("event") == "bench_child"), None)
            if proc.returncode != 0 or done is None or stats is None:
                sys.exit(f"run {i} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            runs.append(
                {
                    "process_wall_s": process_wall,
                    "peak_rss_mb": stats["peak_rss_mb"],
                    **done["timings_s"],
                    "device": done["device"],
                }
            )
            print(f"run {i + 1}: {process_wall:.1f} s, peak {stats['peak_rss_mb']:.0f} MB", file=sys.stderr)

    stages = ["read", "preprocess", "network", "to_input_grid", "postprocess", "write"]
    median = {key: statistics.median(r[key] for r in runs) for key in [*stages, "process_wall_s", "peak_rss_mb"]}
    voxels = args.size[0] * args.size[1] * args.size[2]
    print(
        f"\nkidneytumorseg predict, {args.size[0]}x{args.size[1]}x{args.size[2]} at "
        f"{'x'.join(f'{s:g}' for s in args.spacing)} mm, {runs[0]['device']}, {os.cpu_count()} CPU cores, "
        f"median of {len(runs)} runs"
    )
    print("| stage | seconds |\n|---|---|")
    for stage in stages:
        print(f"| {stage} | {median[stage]:.2f} |")
    print(f"| **total, process start to file written** | **{median['process_wall_s']:.2f}** |")
    print(f"| peak RSS | {median['peak_rss_mb']:.0f} MB |")
    summary = {
        "size": list(args.size),
        "spacing_mm": list(args.spacing),
        "device": runs[0]["device"],
        "cpu_cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "runs": len(runs),
        "total_s": round(median["process_wall_s"], 2),
        "peak_rss_mb": round(median["peak_rss_mb"]),
        "stages_s": {s: round(median[s], 3) for s in stages},
        "voxels_per_s": round(voxels / median["process_wall_s"]),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
