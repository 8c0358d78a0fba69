"""Dataset folders: finding the cases, mapping their labels, checking them, reading them.

Layouts (``find_cases(root, layout)``):

``kits19``
    ``root/case_XXXXX/{imaging,segmentation}.nii.gz`` as in github.com/neheller/kits19, where ``root`` is the
    repository's ``data/`` folder (the repository itself is accepted too). Labels 0 background, 1 kidney, 2 tumor.
``kits23``
    the same per-case layout, in KiTS23's ``dataset/`` folder (or KiTS21's ``data/`` folder, whose majority-vote
    labels are ``aggregated_MAJ_seg.nii.gz``). Labels add 3, cyst.
``nnunet``
    an nnU-Net v2 raw dataset: ``imagesTr/<id>_0000.nii.gz``, ``labelsTr/<id>.nii.gz`` and ``dataset.json``
    with ``labels`` and ``channel_names`` (one channel: the CT). The label values are read from ``dataset.json``.
``auto``
    ``dataset.json`` or ``imagesTr/`` means nnU-Net; ``case_*`` folders mean KiTS, and KiTS21/23 when the folder
    is called ``dataset``, holds ``kits21.json``/``kits23.json``, or its cases hold ``aggregated_MAJ_seg`` files.

Label mapping (``LabelMapping``): source label values become 0 background, 1 kidney, 2 tumor, the classes of
KiTS19 and of every KidneyTumorSeg model. A KiTS21/23 cyst (3) becomes kidney by default (``cyst="kidney"``): in
KiTS19, cysts were not a class of their own and were annotated as part of the kidney, and the official metric
counts "kidney" as everything that is not background. ``cyst="background"`` or ``cyst="tumor"`` choose otherwise.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from KidneyTumorSegLib.errors import InputImageError, KidneyTumorSegError
from KidneyTumorSegLib.io import IMAGE_SUFFIXES, intensity_warnings, read_image, write_image_atomic
from KidneyTumorSegLib.phantom import make_phantom
from KidneyTumorSegLib.preprocessing import canonical_orientation

from .errors import ConfigError, DatasetError

__all__ = [
    "CYST_CHOICES",
    "LAYOUTS",
    "Case",
    "LabelMapping",
    "check_case",
    "check_dataset",
    "detect_layout",
    "find_cases",
    "map_cases",
    "mapping_for",
    "read_case",
    "write_phantom_dataset",
]

LAYOUTS = ("auto", "kits19", "kits23", "nnunet")
CYST_CHOICES = ("kidney", "background", "tumor")
CLASS_NAMES = ("background", "kidney", "tumor")
DIRECTION_TOLERANCE = 1e-4
_CASE_DIR = re.compile(r"^case_\d+$")
_KITS_IMAGE_STEMS = ("imaging",)
# KiTS19/KiTS23 name the reference ``segmentation``; KiTS21 ships the majority vote of its annotators.
_KITS_LABEL_STEMS = ("segmentation", "aggregated_MAJ_seg")
_MAX_LISTED = 10
# Names in an nnU-Net dataset.json that mean one of our classes (after lower-casing; "cyst" is resolved by the
# ``cyst`` option).
_NAME_TO_CLASS = {
    "background": 0,
    "kidney": 1,
    "kidneys": 1,
    "tumor": 2,
    "tumors": 2,
    "tumour": 2,
    "tumours": 2,
    "cyst": "cyst",
    "cysts": "cyst",
}


@dataclass(frozen=True)
class Case:
    """One case of a dataset: its id, its CT image file and its label file (None: no reference labels)."""

    case_id: str
    image: Path
    label: Path | None


# ----------------------------------------------------------------------------------------------------
# Label mapping


@dataclass(frozen=True)
class LabelMapping:
    """How source label values become the model's classes 0 background, 1 kidney, 2 tumor.

    ``pairs`` holds (source value, class) for every value a label file may contain; any other value is an
    error. ``names`` gives the source's name of a value, for messages; ``source`` says where the mapping came
    from ("KiTS19", "KiTS23 (cyst -> kidney)", a dataset.json, "--label-map").
    """

    pairs: tuple[tuple[int, int], ...]
    names: tuple[tuple[int, str], ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        values = [v for v, _ in self.pairs]
        if len(set(values)) != len(values):
            raise ConfigError(f"label mapping {self.source}: a source value is listed twice ({values}).")
        for value, target in self.pairs:
            if target not in (0, 1, 2):
                raise ConfigError(
                    f"label mapping {self.source}: source value {value} maps to {target}; the classes are "
                    "0 background, 1 kidney, 2 tumor."
                )

    # --- constructors

    @classmethod
    def kits19(cls) -> LabelMapping:
        """KiTS19: the identity on 0 background, 1 kidney, 2 tumor."""
        return cls(((0, 0), (1, 1), (2, 2)), ((0, "background"), (1, "kidney"), (2, "tumor")), "KiTS19")

    @classmethod
    def kits23(cls, cyst: str = "kidney") -> LabelMapping:
        """KiTS21/KiTS23: 0 background, 1 kidney, 2 tumor, 3 cyst; the cyst becomes ``cyst`` (default kidney,
        as in KiTS19, where cysts were annotated as kidney)."""
        target = _cyst_target(cyst)
        names = ((0, "background"), (1, "kidney"), (2, "tumor"), (3, "cyst"))
        return cls(((0, 0), (1, 1), (2, 2), (3, target)), names, f"KiTS21/23 (cyst -> {cyst})")

    @classmethod
    def from_dict(cls, label_map: Mapping[Any, Any], source: str = "--label-map") -> LabelMapping:
        """An explicit mapping {source value: class}; keys may be strings of integers (JSON), classes may be
        0/1/2 or "background"/"kidney"/"tumor"."""
        if not isinstance(label_map, Mapping) or not label_map:
            raise ConfigError(
                f"{source}: must be a non-empty mapping from label value to class, e.g. "
                '{"0": "background", "1": "kidney", "2": "tumor", "3": "kidney"}.'
            )
        pairs = []
        for key, value in label_map.items():
            source_value = _as_int(key)
            if source_value is None:
                raise ConfigError(f"{source}: key {key!r} is not an integer label value.")
            target = _as_int(value)
            if target is None and isinstance(value, str):
                target = {name: i for i, name in enumerate(CLASS_NAMES)}.get(value.strip().lower())
            if target not in (0, 1, 2):
                raise ConfigError(
                    f"{source}: label value {key} maps to {value!r}; give 0/background, 1/kidney or 2/tumor."
                )
            pairs.append((source_value, target))
        return cls(tuple(sorted(pairs)), (), source)

    @classmethod
    def from_dataset_json(cls, dataset: Mapping[str, Any] | str | os.PathLike, cyst: str = "kidney") -> LabelMapping:
        """From an nnU-Net ``dataset.json`` (its path, or its parsed content): the label names background,
        kidney, tumor and cyst (any case) are understood; any other name needs an explicit ``--label-map``."""
        where = "dataset.json"
        if not isinstance(dataset, Mapping):
            where = str(dataset)
            dataset = read_json(Path(dataset), DatasetError)
        labels = dataset.get("labels") if isinstance(dataset, Mapping) else None
        if not isinstance(labels, Mapping) or not labels:
            raise DatasetError(f"{where}: has no 'labels' entry (name -> value); it is not an nnU-Net dataset.json.")
        if all(isinstance(k, str) and k.strip().isdigit() and isinstance(v, str) for k, v in labels.items()):
            named = {int(k): str(v) for k, v in labels.items()}  # nnU-Net v1: {"0": "background", ...}
        else:
            named = {}
            for name, value in labels.items():
                if isinstance(value, list | tuple) or "regions_class_order" in dataset:
                    raise DatasetError(
                        f"{where}: is region-based (label {name!r} is {value!r}); its file values cannot be "
                        "named from dataset.json. Give --label-map with a class for every value in the label "
                        'files, e.g. {"0": 0, "1": 1, "2": 2, "3": 1}.'
                    )
                v = _as_int(value)
                if v is None or v < 0:
                    raise DatasetError(
                        f"{where}: label {name!r} has value {value!r}; a label value is an integer >= 0."
                    )
                if v in named:
                    raise DatasetError(f"{where}: labels {named[v]!r} and {name!r} both have value {v}.")
                named[v] = str(name)
        target_of_cyst = _cyst_target(cyst)
        pairs, unknown = [], []
        for value, name in sorted(named.items()):
            target = _NAME_TO_CLASS.get(name.strip().lower().replace(" ", "_").replace("-", "_"))
            if target is None:
                unknown.append((value, name))
                continue
            pairs.append((value, target_of_cyst if target == "cyst" else target))
        if unknown:
            example = {str(v): (t if isinstance(t, int) else 0) for v, t in pairs} | {str(v): 0 for v, _ in unknown}
            listed = ", ".join(f"{name!r} (value {value})" for value, name in unknown)
            raise DatasetError(
                f"{where}: label {listed} is not one of background, kidney, tumor, cyst, so it is unclear which class "
                "it becomes. Give --label-map with a class (0 background, 1 kidney, 2 tumor) for every label value, "
                f"for example {json.dumps(example)}."
            )
        cyst_note = f" (cyst -> {cyst})" if any(_NAME_TO_CLASS.get(n.lower()) == "cyst" for n in named.values()) else ""
        return cls(tuple(pairs), tuple(sorted(named.items())), f"{where}{cyst_note}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelMapping:
        """The inverse of ``to_json``."""
        if not isinstance(data, Mapping) or not isinstance(data.get("values"), Mapping):
            raise ConfigError(f"label mapping: expected {{'values': {{value: class}}}}, not {data!r}.")
        mapping = cls.from_dict(data["values"], str(data.get("source", "label mapping")))
        names = tuple(sorted((int(k), str(v)) for k, v in dict(data.get("names", {})).items()))
        return cls(mapping.pairs, names, mapping.source)

    # --- use

    def as_dict(self) -> dict[int, int]:
        return dict(self.pairs)

    @property
    def known_values(self) -> tuple[int, ...]:
        return tuple(v for v, _ in self.pairs)

    def to_json(self) -> dict[str, Any]:
        return {
            "values": {str(v): t for v, t in self.pairs},
            "names": {str(v): n for v, n in self.names},
            "source": self.source,
        }

    def describe(self) -> str:
        names = dict(self.names)
        parts = []
        for value, target in self.pairs:
            name = names.get(value)
            label = f"{value} {name}" if name else str(value)
            if name is None or name.lower() != CLASS_NAMES[target]:
                label += f" -> {CLASS_NAMES[target]}"
            parts.append(label)
        return f"{self.source}: {', '.join(parts)}" if self.source else ", ".join(parts)

    def count_values(self, array: np.ndarray) -> tuple[dict[int, int], list[float]]:
        """Voxel counts of the known values present in ``array``, and the sorted values it holds that the
        mapping does not know."""
        counts = {}
        for value in self.known_values:
            n = int(np.count_nonzero(array == value))
            if n:
                counts[value] = n
        unknown: list[float] = []
        if sum(counts.values()) != array.size:
            rest = np.unique(array[np.isin(array, self.known_values, invert=True)])
            unknown = [int(v) if float(v).is_integer() else float(v) for v in rest]
        return counts, unknown

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The classes (uint8) of a label array that holds only known values."""
        if array.dtype == np.uint8 and all(v == t for v, t in self.pairs):
            return np.array(array, dtype=np.uint8)
        out = np.zeros(array.shape, dtype=np.uint8)
        for value, target in self.pairs:
            if target:
                out[array == value] = target
        return out


def _cyst_target(cyst: str) -> int:
    if cyst not in CYST_CHOICES:
        raise ConfigError(f"cyst must be one of {', '.join(CYST_CHOICES)}, not {cyst!r}.")
    return CLASS_NAMES.index(cyst)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    return None


def read_json(path: Path, error: type[KidneyTumorSegError], what: str = "file", remedy: str = "") -> Any:
    """A JSON file's content; a missing or unreadable file is ``error`` naming it (``what``, ``remedy``)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}{'; ' + remedy if remedy else ''}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot be read as JSON ({exc}); {remedy or 'fix or recreate the file'}.") from None


# ----------------------------------------------------------------------------------------------------
# Finding cases


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _case_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and _CASE_DIR.match(p.name))
    except OSError:
        return []


def _first_file(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _kits_flavour(folder: Path, dirs: list[Path]) -> str:
    if folder.name == "dataset" or (folder / "kits23.json").exists() or (folder / "kits21.json").exists():
        return "kits23"
    if dirs and _first_file(dirs[0], ("aggregated_MAJ_seg",)) is not None:
        return "kits23"
    return "kits19"


def _resolve(root: Path, layout: str) -> tuple[str, Path]:
    """The layout and the folder that holds the cases (``root`` or its ``data``/``dataset`` subfolder)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}.")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; give the dataset folder.")
    if layout in ("auto", "nnunet"):
        if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
            return "nnunet", root
        if layout == "nnunet":
            raise DatasetError(
                f"{root}: is not an nnU-Net raw dataset (no dataset.json or imagesTr/); give the "
                "Dataset<ID>_<name> folder."
            )
    for folder in (root, root / "data", root / "dataset"):
        dirs = _case_dirs(folder)
        if dirs:
            return (_kits_flavour(folder, dirs) if layout == "auto" else layout), folder
    expected = {
        "auto": "case_XXXXX/ folders (KiTS), or imagesTr/, labelsTr/ and dataset.json (nnU-Net)",
        "kits19": "case_XXXXX/ folders holding imaging.nii.gz and segmentation.nii.gz (KiTS19's data/ folder)",
        "kits23": "case_XXXXX/ folders holding imaging.nii.gz and segmentation.nii.gz (KiTS23's dataset/ folder)",
    }[layout]
    raise DatasetError(f"{root}: no cases found; expected {expected}.")


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of a dataset folder: "kits19", "kits23" or "nnunet" (DatasetError when none fits)."""
    return _resolve(Path(root), "auto")[0]


def find_cases(root: str | os.PathLike, layout: str = "auto", require_labels: bool = True) -> list[Case]:
    """The cases of a dataset folder, sorted by case id.

    Every case needs an image; a case without a label file is accepted only with ``require_labels=False``.
    All problems are reported at once, each naming its case.
    """
    layout, folder = _resolve(Path(root), layout)
    if layout == "nnunet":
        cases, missing_images = _nnunet_cases(folder)
        hint = "each labelsTr/<id> needs its image imagesTr/<id>_0000"
    else:
        cases, missing_images = [], []
        for d in _case_dirs(folder):
            image = _first_file(d, _KITS_IMAGE_STEMS)
            if image is None:
                missing_images.append(d.name)
                continue
            cases.append(Case(d.name, image, _first_file(d, _KITS_LABEL_STEMS)))
        hint = (
            "download the images with the KiTS19 repository's starter_code/get_imaging.py"
            if layout == "kits19"
            else "download the images with the KiTS21/23 repository's download script (kits23_download_data for KiTS23)"
        )
    if missing_images:
        raise DatasetError(
            f"{folder}: {len(missing_images)} case(s) have no image ({_listing(missing_images)}); {hint}, or "
            "remove those cases."
        )
    if require_labels:
        unlabelled = [c.case_id for c in cases if c.label is None]
        if unlabelled:
            raise DatasetError(
                f"{folder}: {len(unlabelled)} case(s) have no label file ({_listing(unlabelled)}); training needs "
                "reference labels for every case: add them or remove those cases (KiTS19's cases 210-299 are "
                "its unlabelled test set)."
            )
    if not cases:
        raise DatasetError(f"{folder}: the dataset holds no cases.")
    return sorted(cases, key=lambda c: c.case_id)


def _nnunet_cases(root: Path) -> tuple[list[Case], list[str]]:
    meta = read_json(root / "dataset.json", DatasetError)
    if not isinstance(meta, Mapping):
        raise DatasetError(f"{root / 'dataset.json'}: is not a JSON object; it is not an nnU-Net dataset.json.")
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, Mapping) or not channels:
        raise DatasetError(
            f"{root / 'dataset.json'}: has no 'channel_names' entry; an nnU-Net v2 dataset.json names its input "
            'channels, e.g. "channel_names": {"0": "CT"}.'
        )
    if len(channels) != 1:
        listed = ", ".join(f"{k}: {v}" for k, v in channels.items())
        raise DatasetError(
            f"{root / 'dataset.json'}: declares {len(channels)} input channels ({listed}); KidneyTumorSeg models take "
            "one channel, the CT. Make a dataset with the CT channel only (imagesTr/<id>_0000 files)."
        )
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetError(f"{root / 'dataset.json'}: 'file_ending' is {ending!r}; expected e.g. \".nii.gz\".")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: has no imagesTr/ folder; an nnU-Net raw dataset keeps its training images there.")
    pattern = re.compile(rf"^(?P<id>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    ids, other_channels, strays = [], set(), []
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith("."):
            continue
        m = pattern.match(p.name)
        if m is None:
            strays.append(p.name)
        elif m["channel"] == "0000":
            ids.append(m["id"])
        else:
            other_channels.add(m["channel"])
    if other_channels:
        raise DatasetError(
            f"{images_dir}: holds channel(s) {', '.join(sorted(other_channels))} besides 0000; KidneyTumorSeg models "
            "take one channel, the CT. Make a dataset with the CT channel only."
        )
    if strays:
        raise DatasetError(
            f"{images_dir}: file(s) {_listing(strays)} are not named <id>_0000{ending}; rename them as nnU-Net "
            "expects, or move them out."
        )
    known = set(ids)
    cases = []
    for case_id in ids:
        label = labels_dir / f"{case_id}{ending}"
        cases.append(Case(case_id, images_dir / f"{case_id}_0000{ending}", label if label.is_file() else None))
    orphans = []
    if labels_dir.is_dir():
        orphans = sorted(
            p.name[: -len(ending)]
            for p in labels_dir.iterdir()
            if p.name.endswith(ending) and not p.name.startswith(".") and p.name[: -len(ending)] not in known
        )
    return cases, orphans


def mapping_for(
    root: str | os.PathLike,
    layout: str = "auto",
    *,
    cyst: str = "kidney",
    label_map: Mapping[Any, Any] | None = None,
) -> LabelMapping:
    """The label mapping of a dataset folder: ``label_map`` when given, else the layout's (KiTS19 identity,
    KiTS21/23 with ``cyst``, or the nnU-Net dataset.json's label names)."""
    _cyst_target(cyst)
    if label_map is not None:
        return LabelMapping.from_dict(label_map)
    layout, folder = _resolve(Path(root), layout)
    if layout == "kits19":
        return LabelMapping.kits19()
    if layout == "kits23":
        return LabelMapping.kits23(cyst)
    return LabelMapping.from_dataset_json(folder / "dataset.json", cyst)


# ----------------------------------------------------------------------------------------------------
# Checking and reading cases


def _read(case_id: str, path: Path, what: str) -> sitk.Image:
    try:
        return read_image(path)
    except InputImageError as exc:
        raise DatasetError(f"{case_id}: {what}: {exc}") from None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _check_grid(case: Case, image: sitk.Image, labels: sitk.Image, tolerance_mm: float) -> None:
    problems = []
    if image.GetSize() != labels.GetSize():
        problems.append(f"size {labels.GetSize()} vs {image.GetSize()}")
    for what, a, b, tol, unit in (
        ("spacing", labels.GetSpacing(), image.GetSpacing(), tolerance_mm, " mm"),
        ("origin", labels.GetOrigin(), image.GetOrigin(), tolerance_mm, " mm"),
        ("direction", labels.GetDirection(), image.GetDirection(), DIRECTION_TOLERANCE, ""),
    ):
        diff = float(np.max(np.abs(np.subtract(a, b))))
        if not diff <= tol:
            problems.append(f"{what} {_fmt(a)} vs {_fmt(b)}{unit} (off by {diff:.3g}, more than {tol:g})")
    if problems:
        raise DatasetError(
            f"{case.case_id}: the labels are not on the image's grid (labels vs image: {'; '.join(problems)}); "
            f"labels {case.label}, image {case.image}. Resample the labels onto the image grid or fix the header, "
            "or remove the case."
        )


def _unknown_values_message(case: Case, unknown: list[float], mapping: LabelMapping) -> str:
    values = ", ".join(str(v) for v in unknown[:_MAX_LISTED]) + (" ..." if len(unknown) > _MAX_LISTED else "")
    hint = (
        "check that this is the right label file, or give --label-map with a class (0 background, 1 kidney, "
        "2 tumor) for every label value"
    )
    if 3 in unknown and 3 not in mapping.known_values and mapping.source == "KiTS19":
        hint = "3 is a cyst in KiTS21/KiTS23 labels: use layout 'kits23' (and --cyst to choose its class)"
    return (
        f"{case.case_id}: {case.label}: holds label value(s) {values} that the label mapping does not know "
        f"({mapping.describe()}); {hint}."
    )


def _load(
    case: Case, mapping: LabelMapping, tolerance_mm: float
) -> tuple[sitk.Image, sitk.Image | None, dict[int, int]]:
    image = _read(case.case_id, case.image, "image")
    if case.label is None:
        return image, None, {}
    labels = _read(case.case_id, case.label, "labels")
    _check_grid(case, image, labels, tolerance_mm)
    counts, unknown = mapping.count_values(sitk.GetArrayViewFromImage(labels))
    if unknown:
        raise DatasetError(_unknown_values_message(case, unknown, mapping))
    return image, labels, counts


def canonical_geometry(image: sitk.Image) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The array shape and spacing (z, y, x) of ``image`` in the core's canonical orientation."""
    orientation = canonical_orientation(image)
    size_zyx = tuple(reversed(image.GetSize()))
    shape = tuple(int(size_zyx[p]) for p in orientation.permutation)
    return shape, orientation.canonical_spacing(image)  # type: ignore[return-value]


def check_case(case: Case, mapping: LabelMapping, tolerance_mm: float = 1e-3) -> dict[str, Any]:
    """Check one case: image (and labels) present and readable, labels on the image grid (size equal; spacing
    and origin within ``tolerance_mm``; direction within 1e-4), every label value known to ``mapping``.

    Returns ``case_id``, ``size`` and ``spacing`` (SimpleITK's x, y, z order, as stored), ``shape_zyx`` and
    ``spacing_zyx`` (canonical orientation), ``label_values`` (value -> voxels), ``class_voxels`` (after
    mapping) and ``warnings`` (intensities that do not look like CT). Raises ``DatasetError`` naming the case.
    """
    image, _, counts = _load(case, mapping, tolerance_mm)
    shape, spacing = canonical_geometry(image)
    classes = dict.fromkeys(CLASS_NAMES, 0)
    targets = mapping.as_dict()
    for value, n in counts.items():
        classes[CLASS_NAMES[targets[value]]] += n
    return {
        "case_id": case.case_id,
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "shape_zyx": list(shape),
        "spacing_zyx": list(spacing),
        "label_values": {int(v): int(n) for v, n in sorted(counts.items())},
        "class_voxels": classes if case.label is not None else {},
        "warnings": intensity_warnings(image, f"{case.case_id}: {case.image}"),
    }


def read_case(case: Case, mapping: LabelMapping, tolerance_mm: float = 1e-3) -> tuple[sitk.Image, sitk.Image]:
    """The image and its labels mapped to 0/1/2 (uint8), carrying exactly the image's grid."""
    if case.label is None:
        raise DatasetError(f"{case.case_id}: has no label file; training and validation need reference labels.")
    image, labels, _ = _load(case, mapping, tolerance_mm)
    mapped = sitk.GetImageFromArray(mapping.apply(sitk.GetArrayViewFromImage(labels)))
    mapped.CopyInformation(image)
    return image, mapped


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _guarded(function: Callable[[Any], Any], item: Any) -> tuple[bool, Any]:
    try:
        return True, function(item)
    except KidneyTumorSegError as exc:
        return False, str(exc)


def map_cases(
    function: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int = 1,
    progress: bool = False,
    desc: str = "cases",
) -> list[tuple[bool, Any]]:
    """``function`` over ``items``, in order: (True, result), or (False, message) for a ``KidneyTumorSegError``.

    Any other exception is a bug and propagates. ``workers`` > 1 runs in that many fresh ("spawn") processes,
    since forking a process that has used torch's thread pool can hang; ``function`` must then be picklable
    (a module-level function or a ``functools.partial`` of one).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, not {workers!r}.")
    out: list[tuple[bool, Any]] = [(False, "not run")] * len(items)
    with tqdm(total=len(items), desc=desc, unit="case", file=sys.stderr, disable=not progress) as bar:
        if workers == 1 or len(items) <= 1:
            for i, item in enumerate(items):
                out[i] = _guarded(function, item)
                bar.update()
            return out
        workers = min(workers, len(items))
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(_guarded, function, item): i for i, item in enumerate(items)}
            try:
                for future in as_completed(futures):
                    out[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return out


def failures_message(what: str, cases: Sequence[Case], results: Sequence[tuple[bool, Any]]) -> str | None:
    """One message listing every failed case with its reason, or None when all succeeded."""
    bad = [message for ok, message in results if not ok]
    if not bad:
        return None
    lines = "\n".join(f"  - {m}" for m in bad)
    return f"{len(bad)} of {len(cases)} case(s) failed {what}; fix or remove them:\n{lines}"


def _check_item(item: tuple[Case, LabelMapping, float]) -> dict[str, Any]:
    return check_case(*item)


def check_dataset(
    cases: Sequence[Case],
    mapping: LabelMapping,
    workers: int = 1,
    tolerance_mm: float = 1e-3,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """``check_case`` on every case; one ``DatasetError`` listing every bad case with its reason."""
    if not cases:
        raise DatasetError("the dataset holds no cases; check the dataset folder and its layout.")
    results = map_cases(_check_item, [(c, mapping, tolerance_mm) for c in cases], workers, progress, "checking")
    message = failures_message("the check", cases, results)
    if message:
        raise DatasetError(message)
    return [r for _, r in results]


# ----------------------------------------------------------------------------------------------------
# Phantom datasets


def _mark_cysts(labels: sitk.Image, cysts: Sequence[Mapping[str, Any]]) -> sitk.Image:
    """The phantom's labels with its cysts as 3 (KiTS21/23); the phantom draws them as kidney (1)."""
    array = sitk.GetArrayFromImage(labels)
    kidney = np.argwhere(array == 1)  # (z, y, x) = SimpleITK index reversed
    if not len(kidney) or not cysts:
        return labels
    spacing = np.array(labels.GetSpacing())
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    points = np.asarray(labels.GetOrigin()) + (kidney[:, ::-1] * spacing) @ direction.T
    for cyst in cysts:
        inside = np.sum((points - np.asarray(cyst["center_lps_mm"])) ** 2, axis=1) <= float(cyst["radius_mm"]) ** 2
        z, y, x = kidney[inside].T
        array[z, y, x] = 3
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out


def write_phantom_dataset(
    root: str | os.PathLike,
    n: int,
    seed: int = 0,
    layout: str = "kits19",
    thick_fraction: float = 0.3,
    oblique_fraction: float = 0.3,
    *,
    spacing_scale: float = 1.0,
    n_tumors: int | None = None,
    noise_hu: float = 12.0,
) -> list[Case]:
    """Write ``n`` synthetic CT cases (``make_phantom`` seeds ``seed`` .. ``seed + n - 1``) in ``layout``.

    Orientations are mostly "IPL" (KiTS's layout); ``round(oblique_fraction * n)`` cases are "oblique",
    "random" or "RAS" in turn. ``round(thick_fraction * n)`` cases have thick slices (4.5-5.5 mm), the others
    2-3 mm; in-plane spacing is 2.4-3.2 mm. ``spacing_scale`` multiplies every spacing (2: about 8 times fewer
    voxels, for quick tests). In "kits23" and "nnunet" layouts the phantom's cysts are labelled 3, as in
    KiTS21/23 (the phantom itself labels them kidney); "nnunet" also gets its dataset.json and "kits23" a
    ``kits23.json`` so that the layout is detected. Returns the cases, sorted by id.
    """
    if layout not in ("kits19", "kits23", "nnunet"):
        raise ConfigError(f"layout must be kits19, kits23 or nnunet, not {layout!r}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, not {n!r}.")
    for name, value in (("thick_fraction", thick_fraction), ("oblique_fraction", oblique_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be between 0 and 1, not {value!r}.")
    if not (math.isfinite(spacing_scale) and spacing_scale > 0):
        raise ConfigError(f"spacing_scale must be a positive number, not {spacing_scale!r}.")
    root = Path(root)
    rng = np.random.default_rng([int(seed), zlib.crc32(b"phantom-dataset")])
    thick = set(rng.permutation(n)[: round(thick_fraction * n)].tolist())
    other = rng.permutation(n)[: round(oblique_fraction * n)].tolist()
    orientations = ["IPL"] * n
    for k, i in enumerate(other):
        orientations[i] = ("oblique", "random", "RAS")[k % 3]
    if layout == "nnunet":
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    else:
        root.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        in_plane = float(rng.uniform(2.4, 3.2))
        between = float(rng.uniform(4.5, 5.5) if i in thick else rng.uniform(2.0, 3.0))
        spacing = tuple(round(s * spacing_scale, 3) for s in (in_plane, in_plane, between))
        phantom = make_phantom(
            seed + i, spacing=spacing, orientation=orientations[i], n_tumors=n_tumors, noise_hu=noise_hu
        )
        labels = phantom.labels
        if layout != "kits19":
            labels = _mark_cysts(labels, phantom.info["cysts"])
        if layout == "nnunet":
            case_id = f"phantom_{seed + i:05d}"
            case = Case(case_id, root / "imagesTr" / f"{case_id}_0000.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz")
        else:
            case_id = f"case_{seed + i:05d}"
            (root / case_id).mkdir(exist_ok=True)
            case = Case(case_id, root / case_id / "imaging.nii.gz", root / case_id / "segmentation.nii.gz")
        write_image_atomic(phantom.image, case.image)
        write_image_atomic(labels, case.label)
        cases.append(case)
    if layout == "nnunet":
        dataset = {
            "name": "KidneyTumorSeg phantoms",
            "description": "Synthetic CT volumes from KidneyTumorSegLib.phantom (not patient data).",
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
            "numTraining": n,
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    elif layout == "kits23":
        index = [{"case_id": c.case_id, "phantom_seed": seed + i} for i, c in enumerate(cases)]
        (root / "kits23.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return sorted(cases, key=lambda c: c.case_id)
