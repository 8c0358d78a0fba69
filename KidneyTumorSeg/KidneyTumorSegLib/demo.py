"""``kidneytumorseg demo``: a synthetic abdominal CT with known labels, segmented end to end.

Writes the CT, the true labels, the predicted labels and a PNG (axial and coronal slices: CT, truth,
prediction), then prints volumes and the KiTS19 Dice against the truth. The phantom is synthetic, so
the Dice it prints says how the model does on phantoms, nothing about real patients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import SimpleITK as sitk

from .errors import OutputError
from .metrics import format_volumes, kits19_dice, label_volumes_ml


def run_demo(output: Path, model_spec: str | None, seed: int, device: str, progress: str) -> int:
    from .cli import ProgressPrinter, _load_model
    from .io import write_image_atomic, write_labels
    from .overlay import overlay_panels, write_png
    from .phantom import make_phantom
    from .pipeline import SegmentOptions, predict_file

    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{output}: cannot create the demo folder ({exc.strerror}); choose another with -o."
        ) from None
    model = _load_model(model_spec, device)
    phantom = make_phantom(seed, n_tumors=1)
    ct_path, truth_path, labels_path = output / "ct.nii.gz", output / "truth.nii.gz", output / "labels.nii.gz"
    write_image_atomic(phantom.image, ct_path)
    write_labels(phantom.labels, truth_path)
    size = "x".join(str(n) for n in phantom.image.GetSize())
    spacing = "x".join(f"{s:.2f}" for s in phantom.image.GetSpacing())
    print(f"phantom (seed {seed}): {size} voxels at {spacing} mm -> {ct_path}")

    printer = ProgressPrinter(progress, 1)
    printer.start_case("demo", 0)
    result = predict_file(ct_path, labels_path, model, SegmentOptions(device=device), printer)
    printer.end_case()

    truth = sitk.GetArrayViewFromImage(phantom.labels)
    predicted = sitk.GetArrayViewFromImage(result.labels)
    scores = kits19_dice(predicted, truth)
    png_path = output / "overlay.png"
    write_png(overlay_panels(phantom.image, [None, phantom.labels, result.labels]), png_path)

    print(f"labels   -> {labels_path} ({sum(result.timings_s.values()):.1f} s on {result.device})")
    print(f"picture  -> {png_path} (columns: CT, truth, prediction; rows: axial, coronal)")
    print(f"truth      {format_volumes(label_volumes_ml(truth, phantom.image.GetSpacing()))}")
    print(f"predicted  {format_volumes(result.volumes_ml)}")
    print(f"Dice vs truth: kidney {scores['kidney_dice']:.3f}, tumor {scores['tumor_dice']:.3f}")
    meta = model.metadata
    if not meta.trained:
        print(
            f"NOTE: model {meta.name} is UNTRAINED (random weights), so these labels and Dice values are "
            "meaningless; the demo shows the pipeline, not a result.",
            file=sys.stderr,
        )
    else:
        print("Dice on a synthetic phantom says nothing about accuracy on real CT.")
    return 0
