"""CT to labels: the one place that knows how a CT becomes a label map.

``segment`` is the Python API (image in memory -> labels + volumes); ``predict_file`` adds reading and
atomic writing. The CLI, the Slicer module and the training validation all call these.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import io, laterality, metrics
from .errors import KidneyTumorSegError, OutputError
from .inference import InferenceSettings, resolve_device, segment_model_grid, with_memory_fallback
from .modelfile import LoadedModel
from .postprocessing import PostprocessSettings, postprocess
from .preprocessing import image_to_model_input, labels_like, logits_to_input_labels, model_grid_for

log = logging.getLogger(__name__)

# Rough share of a case's run time per stage on a CPU (bench/inference.py: the network about half,
# going back to the input grid a quarter with random weights, less with a trained model's small foreground),
# so that the overall fraction and the time remaining move evenly.
STAGE_WEIGHTS = {
    "read": 0.06,
    "preprocess": 0.04,
    "network": 0.60,
    "to_input_grid": 0.18,
    "postprocess": 0.08,
    "write": 0.04,
}
STAGES = tuple(STAGE_WEIGHTS)
# Voxels at or below this HU are air (and the table's foam): the body crop ignores them.
BODY_THRESHOLD_HU = -500.0

ProgressSink = Callable[[str, float], None]  # (stage, overall fraction of this case in [0, 1])


@dataclass
class SegmentOptions:
    device: str = "auto"
    overlap: float = 0.5
    batch_size: int = 2
    tta: bool = False
    postprocess: bool = True
    crop_to_body: bool = True
    mixed_precision: bool = True
    split_kidneys: bool = False  # labels 1 right kidney, 2 tumor, 3 left kidney (see laterality.py)


@dataclass
class SegmentResult:
    labels: sitk.Image
    volumes_ml: dict[str, float]
    timings_s: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: str = ""
    measurements: Any = None  # measurements.CaseMeasurements when a report was asked for
    report_files: list[str] = field(default_factory=list)


class _Stages:
    """Turns 'fraction of this stage' into 'fraction of the case' and times each stage."""

    def __init__(self, sink: ProgressSink | None) -> None:
        self.sink = sink
        self.timings: dict[str, float] = {}
        self._stage = ""
        self._started = 0.0

    def begin(self, stage: str) -> None:
        self._stage = stage
        self._started = time.perf_counter()
        self.report(0.0)

    def report(self, fraction: float) -> None:
        if self.sink is None:
            return
        done = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(self._stage)])
        self.sink(self._stage, min(1.0, done + STAGE_WEIGHTS[self._stage] * fraction))

    def end(self) -> None:
        self.timings[self._stage] = time.perf_counter() - self._started
        self.report(1.0)


def _validate_options(options: SegmentOptions) -> None:
    if not 0.0 <= options.overlap < 1.0:
        raise KidneyTumorSegError(f"--overlap {options.overlap} must be at least 0 and below 1 (0.5 is usual).")
    if options.batch_size < 1:
        raise KidneyTumorSegError(f"--batch-size {options.batch_size} must be at least 1.")


def segment(
    image: sitk.Image,
    model: LoadedModel,
    options: SegmentOptions | None = None,
    progress: ProgressSink | None = None,
    _stages: _Stages | None = None,
) -> SegmentResult:
    """Segment one CT volume; the labels come back on exactly the image's grid (0 background, 1 kidney,
    2 tumor)."""
    options = options or SegmentOptions()
    _validate_options(options)
    stages = _stages or _Stages(progress)
    meta = model.metadata
    device = resolve_device(options.device)
    warnings = io.intensity_warnings(image, "input image")

    stages.begin("preprocess")
    grid = model_grid_for(image, meta.target_spacing_zyx)
    volume = image_to_model_input(image, grid, meta.normalization)
    stages.end()

    stages.begin("network")
    settings = InferenceSettings(
        patch_size=meta.patch_size_zyx,
        overlap=options.overlap,
        batch_size=options.batch_size,
        tta=options.tta,
        device=device,
        mixed_precision=options.mixed_precision,
    )
    norm = meta.normalization
    body = (BODY_THRESHOLD_HU - norm.mean) / norm.std if options.crop_to_body else None
    if body is not None and BODY_THRESHOLD_HU <= norm.clip_low:
        body = norm.background_value + 1e-6  # the clip range starts above -500 HU: anything above air

    used = [device]  # the device the network finally ran on (the CPU after an out-of-memory fallback)

    def run(current: InferenceSettings, volume: torch.Tensor = volume) -> torch.Tensor:
        used[0] = current.device
        if current.device != device:
            model.network.to(current.device)
        return segment_model_grid(model.network, volume, current, norm.background_value, body, stages.report)

    logits = with_memory_fallback(run, settings, warnings.append)
    del run, volume
    stages.end()

    stages.begin("to_input_grid")
    labels = logits_to_input_labels(logits, grid)
    del logits
    stages.end()

    stages.begin("postprocess")
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    report = postprocess(labels, PostprocessSettings(enabled=options.postprocess), voxel_ml)
    notes = list(report.notes)
    if options.split_kidneys:
        sides = laterality.split_kidneys(labels, image, sitk.GetArrayViewFromImage(image))
        labels = sides.labels
        notes += [f"left/right by {sides.method}: " + note for note in sides.notes]
        warnings += sides.warnings
    label_image = labels_like(labels, image)
    volumes = metrics.label_volumes_ml(labels, image.GetSpacing())
    stages.end()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return SegmentResult(
        labels=label_image,
        volumes_ml=volumes,
        timings_s=dict(stages.timings),
        warnings=warnings,
        notes=notes,
        device=str(used[0]),
    )


def _write_extras(
    result: SegmentResult,
    input_path: str | os.PathLike,
    output_path: Path,
    image: sitk.Image,
    model: LoadedModel,
    report: bool,
    seg_nrrd: bool,
    dicom_seg: bool,
    written: list[Path],
) -> None:
    """The files asked for beside the labels; each one's path goes into ``written`` as soon as it exists."""
    name = output_path.name[: -len(io.label_suffix(output_path))]
    if report:
        from .report import report_paths, write_case_report

        written += report_paths(output_path)  # listed first: a failure half-way removes what exists
        _, _, result.measurements = write_case_report(
            name, input_path, output_path, image, result.labels, model.metadata, result.volumes_ml, result.warnings
        )
    if seg_nrrd:
        from .exports import write_seg_nrrd

        written.append(output_path.with_name(f"{name}.seg.nrrd"))
        write_seg_nrrd(result.labels, written[-1])
    if dicom_seg:
        from .exports import write_dicom_seg

        written.append(output_path.with_name(f"{name}.seg.dcm"))
        _, seg_warnings = write_dicom_seg(
            result.labels, input_path, written[-1], model.metadata.name, model.metadata.version
        )
        result.warnings += seg_warnings


def predict_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model: LoadedModel,
    options: SegmentOptions | None = None,
    progress: ProgressSink | None = None,
    report: bool = False,
    seg_nrrd: bool = False,
    dicom_seg: bool = False,
) -> SegmentResult:
    """Read a CT (file or DICOM folder), segment it, and write the labels atomically; with ``report``,
    also the measurements (JSON) and a QC montage (PNG) beside them (see ``report.py``); with ``seg_nrrd``
    a Slicer ``NAME.seg.nrrd``, with ``dicom_seg`` (DICOM series input only) a DICOM SEG ``NAME.seg.dcm``
    (see ``exports.py``)."""
    output_path = Path(output_path)
    io.label_suffix(output_path)  # a bad output name fails before any work
    if dicom_seg and not Path(input_path).is_dir():
        raise io.InputImageError(
            f"{input_path}: --dicom-seg needs a DICOM series folder as input (the SEG references its images); "
            "this is a file."
        )
    io._check_output_folder(output_path.parent, output_path)  # so does a missing or read-only folder
    stages = _Stages(progress)
    stages.begin("read")
    image = io.read_image(input_path)
    io.check_not_constant(image, input_path)
    stages.end()
    result = segment(image, model, options, _stages=stages)
    result.warnings = [w.replace("input image", str(input_path), 1) for w in result.warnings]
    stages.begin("write")
    # The extra files first, the labels last: when any of them fails, what was written is removed, so a
    # failed case leaves nothing behind (each file is itself written atomically).
    written: list[Path] = []
    try:
        _write_extras(result, input_path, output_path, image, model, report, seg_nrrd, dicom_seg, written)
        io.write_labels(result.labels, output_path)
    except Exception as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, KidneyTumorSegError):
            raise
        raise OutputError(
            f"{output_path}: the results could not be written ({type(exc).__name__}: {str(exc)[:200]}); nothing "
            "was left behind. Please report this."
        ) from None
    result.report_files = [str(path) for path in written]
    stages.end()
    result.timings_s = dict(stages.timings)
    return result
