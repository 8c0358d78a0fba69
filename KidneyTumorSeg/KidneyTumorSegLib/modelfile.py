"""Model files: one ``.safetensors`` file holding the weights and a metadata JSON.

The metadata (safetensors' string metadata, key ``kidneytumorseg``) says everything needed to run the
model: format version, architecture and its hyper-parameters, label names and values, target spacing,
patch size, intensity clipping and normalisation, and provenance. A model file is never a pickle, so
loading one cannot run code; ``.pt``/``.pth`` checkpoints are refused with an explanation.

Loading checks, in order, and stops at the first problem with a message that says exactly what is wrong:
the file exists and is safetensors (not a pickle, not truncated), the format version, the metadata's
types and ranges, the architecture, and every tensor's name and shape against the model that the
metadata describes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import torch

from . import __version__
from .errors import ModelFileError
from .io import publish
from .model import ARCHITECTURE, DeepLabConfig, DeepLabV3Plus3D
from .preprocessing import IntensityNormalization

FORMAT_VERSION = 1
METADATA_KEY = "kidneytumorseg"
REQUIRED_LABELS = {"background": 0, "kidney": 1, "tumor": 2}
INTENDED_USE = "Research use only. Not for clinical diagnosis or treatment decisions."
_MAX_HEADER_BYTES = 100 << 20
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")


@dataclass
class ModelMetadata:
    """The validated metadata of a model file."""

    name: str
    version: str
    config: DeepLabConfig
    labels: dict[str, int]
    target_spacing_zyx: tuple[float, float, float]
    patch_size_zyx: tuple[int, int, int]
    normalization: IntensityNormalization
    trained: bool
    provenance: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    intended_use: str = INTENDED_USE

    def to_json(self) -> dict[str, Any]:
        n = self.normalization
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "intended_use": self.intended_use,
            "architecture": {"name": ARCHITECTURE, "config": self.config.to_dict()},
            "labels": dict(self.labels),
            "target_spacing_zyx_mm": list(self.target_spacing_zyx),
            "patch_size_zyx": list(self.patch_size_zyx),
            "intensity": {"clip_hu": [n.clip_low, n.clip_high], "mean": n.mean, "std": n.std},
            "trained": self.trained,
            "provenance": self.provenance,
        }


@dataclass
class LoadedModel:
    path: Path
    metadata: ModelMetadata
    network: DeepLabV3Plus3D
    sha256: str


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- validation


def _fail(path: Path, message: str) -> ModelFileError:
    return ModelFileError(f"{path}: {message}")


def _number_list(value: Any, count: int, kind: type, what: str, path: Path, positive: bool = True) -> tuple:
    ok = isinstance(value, list) and len(value) == count
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if ok and kind is int:
        ok = all(float(v).is_integer() for v in value)
    if ok and positive:
        ok = all(v > 0 for v in value)
    if not ok:
        sign = "positive " if positive else ""
        raise _fail(path, f"metadata '{what}' must be a list of {count} {sign}{kind.__name__}s; got {value!r}.")
    return tuple(kind(v) for v in value)


def _require(meta: dict, key: str, kind: type | tuple, path: Path) -> Any:
    if key not in meta:
        raise _fail(path, f"metadata has no '{key}'; the file is not a complete KidneyTumorSeg model file.")
    value = meta[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(path, f"metadata '{key}' must be a {names}; got {type(value).__name__} {value!r}.")
    return value


def parse_metadata(meta: dict, path: Path) -> ModelMetadata:
    """Validate a metadata dict (types and ranges) and turn it into ``ModelMetadata``."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            path,
            f"model file format version {version!r} is not supported (this KidneyTumorSeg {__version__} reads "
            f"version {FORMAT_VERSION}); update KidneyTumorSeg or get a model file made for this version.",
        )
    name = _require(meta, "name", str, path)
    model_version = _require(meta, "version", str, path)
    architecture = _require(meta, "architecture", dict, path)
    if architecture.get("name") != ARCHITECTURE:
        raise _fail(
            path,
            f"architecture {architecture.get('name')!r} is not supported; this version runs {ARCHITECTURE} only. "
            "Use a model file made for KidneyTumorSeg (see `kidneytumorseg model-info`).",
        )
    if not isinstance(architecture.get("config"), dict):
        raise _fail(path, "metadata 'architecture.config' must be an object of hyper-parameters.")
    try:
        config = DeepLabConfig.from_dict(architecture["config"])
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"metadata 'architecture.config' is invalid: {exc}.") from None

    labels = _require(meta, "labels", dict, path)
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise _fail(path, f"metadata 'labels' must map names to integer values; got {labels!r}.")
    if sorted(labels.values()) != list(range(config.num_classes)):
        raise _fail(
            path,
            f"metadata 'labels' {labels!r} must give each of the {config.num_classes} output classes one value "
            f"0..{config.num_classes - 1}.",
        )
    for label, value in REQUIRED_LABELS.items():
        if labels.get(label) != value:
            raise _fail(path, f"metadata 'labels' must have {label} = {value} (the KiTS convention); got {labels!r}.")

    spacing = _number_list(meta.get("target_spacing_zyx_mm"), 3, float, "target_spacing_zyx_mm", path)
    if not all(0.1 <= s <= 20 for s in spacing):
        raise _fail(path, f"metadata 'target_spacing_zyx_mm' {list(spacing)} must be within 0.1-20 mm.")
    patch = _number_list(meta.get("patch_size_zyx"), 3, int, "patch_size_zyx", path)
    divisor = config.divisor()
    if any(p % d for p, d in zip(patch, divisor, strict=True)) or max(patch) > 512:
        raise _fail(
            path,
            f"metadata 'patch_size_zyx' {list(patch)} must be multiples of {list(divisor)} (the network's "
            "total stride) and at most 512.",
        )

    intensity = _require(meta, "intensity", dict, path)
    clip = _number_list(intensity.get("clip_hu"), 2, float, "intensity.clip_hu", path, positive=False)
    mean = intensity.get("mean")
    std = intensity.get("std")
    if clip[0] >= clip[1] or not -2000 <= clip[0] <= 5000 or not -2000 <= clip[1] <= 5000:
        raise _fail(path, f"metadata 'intensity.clip_hu' {list(clip)} must be increasing and within -2000..5000 HU.")
    if not isinstance(mean, (int, float)) or isinstance(mean, bool) or not isinstance(std, (int, float)) or std <= 0:
        raise _fail(path, f"metadata 'intensity' needs a number 'mean' and a positive 'std'; got {intensity!r}.")

    trained = _require(meta, "trained", bool, path)
    provenance = meta.get("provenance", {})
    if not isinstance(provenance, dict):
        raise _fail(path, "metadata 'provenance' must be an object.")
    return ModelMetadata(
        name=name,
        version=model_version,
        config=config,
        labels=dict(labels),
        target_spacing_zyx=spacing,  # type: ignore[arg-type]
        patch_size_zyx=patch,  # type: ignore[arg-type]
        normalization=IntensityNormalization(clip[0], clip[1], float(mean), float(std)),
        trained=trained,
        provenance=provenance,
        description=str(meta.get("description", "")),
        intended_use=str(meta.get("intended_use", INTENDED_USE)),
    )


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5
    if path.suffix.lower() in _PICKLE_SUFFIXES or is_zip or is_pickle:
        raise _fail(
            path,
            "is a PyTorch pickle checkpoint, not a model file. Loading a pickle can run any code hidden in it, "
            "so KidneyTumorSeg never does; use a .safetensors model file (the training folder's export step "
            "writes one from a checkpoint).",
        )


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict]]:
    """The metadata JSON and the tensor table (name -> dtype, shape) of a model file, without reading the
    weights. Raises ``ModelFileError`` for anything that is not a complete safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise _fail(
            path,
            "model file not found; check the path, or give a model name from the registry (--model NAME).",
        )
    _refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _fail(path, f"is not a model file ({size} bytes: truncated or empty).")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise _fail(
                path, "is not a safetensors model file (its header is missing or truncated); download or copy it again."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _fail(
                path,
                "is not a safetensors model file (its header is not valid JSON); give a .safetensors "
                "model file made for KidneyTumorSeg.",
            ) from None
    if not isinstance(header, dict):
        raise _fail(path, "is not a safetensors model file (its header is not a JSON object).")
    raw_meta = header.pop("__metadata__", None) or {}
    tensors = header
    data_end = max((int(t.get("data_offsets", [0, 0])[1]) for t in tensors.values()), default=0)
    if 8 + header_len + data_end > size:
        raise _fail(
            path,
            f"is truncated: its header promises {8 + header_len + data_end} bytes but the file has {size}; "
            "download or copy it again.",
        )
    if METADATA_KEY not in raw_meta:
        raise _fail(
            path,
            "is a safetensors file without KidneyTumorSeg metadata; it is not a model file of this tool.",
        )
    try:
        meta = json.loads(raw_meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise _fail(path, f"metadata is not valid JSON ({exc}).") from None
    if not isinstance(meta, dict):
        raise _fail(path, "metadata must be a JSON object.")
    return meta, tensors


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    meta, _ = read_header(path)
    return parse_metadata(meta, Path(path))


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Load and fully validate a model file; the network comes back in eval mode, float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    raw_meta, table = read_header(path)
    metadata = parse_metadata(raw_meta, path)
    network = DeepLabV3Plus3D(metadata.config)
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    found = {name: tuple(entry.get("shape", ())) for name, entry in table.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]})")
        if wrong:
            n = wrong[0]
            parts.append(
                f"{len(wrong)} tensor(s) of the wrong shape "
                f"(first: {n} is {list(found[n])}, expected {list(expected[n])})"
            )
        raise _fail(
            path,
            "weights do not match the architecture its metadata describes: "
            + "; ".join(parts)
            + ". The file is damaged or was written by other code; download or export it again.",
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(path, f"weights cannot be read ({exc}); the file is damaged, download or copy it again.") from None
    state = {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise _fail(path, f"tensor {name} holds NaN or infinite values; the model file is damaged.")
    network.load_state_dict(state, strict=True)
    network.eval().to(device)
    return LoadedModel(path=path, metadata=metadata, network=network, sha256=sha256_of(path))


def save_model(path: str | os.PathLike, network: DeepLabV3Plus3D, metadata: ModelMetadata, half: bool = False) -> None:
    """Write a model file atomically. ``half`` stores float16 weights (half the size; loaded as float32)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"{path}: a model file's name must end in .safetensors.")
    meta = metadata.to_json()
    meta.setdefault("provenance", {})
    meta["provenance"].setdefault("code_version", __version__)
    meta["provenance"].setdefault("date", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    state = {
        name: (t.half() if half and t.is_floating_point() else t).contiguous().cpu()
        for name, t in network.state_dict().items()
    }
    folder = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        save_file(state, temporary, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        publish(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def untrained_metadata(
    config: DeepLabConfig | None = None, name: str = "untrained", seed: int = 0, version: str = "0.0.0"
) -> ModelMetadata:
    """Metadata for randomly initialised weights: for tests, benchmarks and the demo until trained weights
    exist. The defaults (spacing, patch, intensity) are the KiTS19 recipe's."""
    return ModelMetadata(
        name=name,
        version=version,
        config=config or DeepLabConfig(),
        labels=dict(REQUIRED_LABELS),
        target_spacing_zyx=(3.0, 1.6, 1.6),
        patch_size_zyx=(80, 160, 160),
        # nnU-Net's published KiTS19 foreground statistics: 0.5/99.5 percentiles, mean and std in HU.
        normalization=IntensityNormalization(-79.0, 304.0, 101.0, 76.9),
        trained=False,
        provenance={"dataset": "none (random initialisation)", "seed": seed, "epochs": 0},
        description="Randomly initialised weights: the output is meaningless. For tests and timing only.",
    )


def create_untrained_model(path: str | os.PathLike, metadata: ModelMetadata, seed: int = 0, half: bool = False) -> None:
    torch.manual_seed(seed)
    save_model(path, DeepLabV3Plus3D(metadata.config), metadata, half=half)


# ------------------------------------------------------------------------------------------------ registry

REGISTRY_ENV = "KIDNEYTUMORSEG_MODELS"


def registry_path() -> Path:
    """``Resources/Models/models.json`` of the Slicer module, which ships beside this package (in the
    source tree, in an editable install and inside Slicer); ``$KIDNEYTUMORSEG_MODELS`` overrides it."""
    override = os.environ.get(REGISTRY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / "models.json"


def model_cache_dir() -> Path:
    """Per-user folder for downloaded models."""
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "kidneytumorseg" / "models"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    version: str
    sha256: str
    file: str | None
    url: str | None
    labels: dict[str, int]
    description: str
    license: str
    intended_use: str
    trained: bool
    default: bool


def read_registry(path: Path | None = None) -> list[RegistryEntry]:
    path = path or registry_path()
    if not path.is_file():
        raise ModelFileError(
            f"{path}: model registry not found; pass --model PATH to a .safetensors model file, or reinstall "
            "with `pip install -e .` from the source tree so the registry ships with the package."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = []
        for item in data["models"]:
            entries.append(
                RegistryEntry(
                    name=item["name"],
                    version=item["version"],
                    sha256=item["sha256"].lower(),
                    file=item.get("file"),
                    url=item.get("url"),
                    labels=dict(item["labels"]),
                    description=item["description"],
                    license=item["license"],
                    intended_use=item["intended_use"],
                    trained=bool(item["trained"]),
                    default=bool(item.get("default", False)),
                )
            )
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: model registry is malformed ({type(exc).__name__}: {exc}).") from None
    return entries


def default_model_name(path: Path | None = None) -> str:
    entries = read_registry(path)
    return next((e.name for e in entries if e.default), entries[0].name)


Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def fetch_model(entry: RegistryEntry, progress: Progress | None = None, opener: Callable | None = None) -> Path:
    """Download a registry model into the per-user cache, over https only, and check its SHA-256.

    The download goes to a temporary file in the cache folder and is renamed into place only when its
    SHA-256 matches the registry's; a mismatch deletes it and says so. An already cached, intact file is
    returned without downloading. ``opener`` is ``urllib.request.urlopen`` (tests pass their own).
    """
    if not entry.url or not entry.url.lower().startswith("https://"):
        raise ModelFileError(
            f"model {entry.name}: registry URL {entry.url!r} is not https; models are only downloaded over https."
        )
    target = model_cache_dir() / f"{entry.name}-{entry.version}.safetensors"
    if target.is_file() and sha256_of(target) == entry.sha256:
        return target
    opener = opener or urlopen
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, opener(entry.url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if digest.hexdigest() != entry.sha256:
            raise ModelFileError(
                f"model {entry.name}: the download from {entry.url} has SHA-256 {digest.hexdigest()[:16]}..., not "
                f"the registry's {entry.sha256[:16]}...; it was deleted. Try again later, or report it."
            )
        publish(temporary, target)
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"model {entry.name}: download from {entry.url} failed ({exc}); check the network connection, or "
            f"download the file yourself to {target}."
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return target


def resolve_model(
    spec: str | None, registry: Path | None = None, download: bool = False, progress: Progress | None = None
) -> Path:
    """A model file path from ``--model``: an existing path, or a registry name (None: the default model).

    A registry model is checked against its SHA-256 before use; a bundled file is taken from beside the
    registry, a downloadable one from the user's cache, fetched there first when ``download`` is set
    (see ``fetch_model``; ``progress`` follows the download).
    """
    if spec is not None and (
        Path(spec).exists() or os.sep in spec or spec.endswith((".safetensors", *_PICKLE_SUFFIXES))
    ):
        return Path(spec)
    registry = registry or registry_path()
    entries = read_registry(registry)
    name = spec or default_model_name(registry)
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        known = ", ".join(e.name for e in entries)
        raise ModelFileError(f"{name}: no such model file, and no model of that name in the registry (known: {known}).")
    if entry.file:
        candidate = registry.parent / entry.file
    else:
        candidate = model_cache_dir() / f"{entry.name}-{entry.version}.safetensors"
        if not candidate.is_file() and download:
            print(f"downloading model {entry.name} {entry.version} from {entry.url} ...", file=sys.stderr, flush=True)
            candidate = fetch_model(entry, progress)
        if not candidate.is_file():
            raise ModelFileError(
                f"model {entry.name} {entry.version} is not downloaded yet ({candidate}); the Slicer module fetches "
                f"it on first use, or download {entry.url} there yourself."
            )
    if not candidate.is_file():
        raise ModelFileError(f"{candidate}: registry model {entry.name} is missing from the installation; reinstall.")
    actual = sha256_of(candidate)
    if actual != entry.sha256:
        raise ModelFileError(
            f"{candidate}: SHA-256 {actual[:16]}... does not match the registry's {entry.sha256[:16]}... for model "
            f"{entry.name}; the file is damaged or not the published one. Delete it and get it again."
        )
    return candidate
