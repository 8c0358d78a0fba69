"""Reading CT volumes and writing label files.

Inputs: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), or a folder holding one DICOM
series. Every problem becomes an ``InputImageError`` that names the file and says what to do. Label files
are written atomically: to a temporary file beside the target, then renamed, so that an interrupted run
never leaves a file that looks like a result.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import tempfile
import zlib
from collections.abc import Sequence
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError, OutputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

# Below this, most of an image's voxels are not CT numbers (HU start at -1024 for air).
_CT_AIR_HU = -500.0


def image_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def case_name(path: Path) -> str:
    """A case's name: the file name without its image suffix, or the DICOM folder's name."""
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputImageError(
            f"{folder}: folder holds no DICOM series and no image file; give a NIfTI/NRRD/MHA file or a folder "
            "with the DICOM files of one CT series."
        )
    if len(series) > 1:
        raise InputImageError(
            f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series)}); put each series in its "
            "own folder and give that folder."
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _check_slice_positions(folder: Path, files: Sequence[str]) -> None:
    """A series with a missing slice (a gap of more than 1.5 times the usual slice distance) would be
    stacked as if it were whole, silently shifting everything beyond the gap: refuse it."""
    if len(files) < 3:
        return
    positions = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0020|0032"):
            return  # no positions to compare (ITK then stacks the files by their order)
        try:
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        except ValueError:
            return
    points = np.array(positions)
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    usual = float(np.median(steps))
    if usual > 0 and steps.max() > 1.5 * usual:
        at = int(np.argmax(steps))
        raise InputImageError(
            f"{folder}: slices are {usual:.2f} mm apart but {steps[at]:.2f} mm between {Path(files[at]).name} and "
            f"{Path(files[at + 1]).name}: a slice is missing. Export the whole series again."
        )


# Bytes the pipeline needs per input voxel at its peak (the voxels as read, the labels, and a float slab
# budget): a volume whose declared size needs more than the memory available is refused before reading.
BYTES_PER_VOXEL_AT_PEAK = 8
ALLOW_LARGE_ENV = "KIDNEYTUMORSEG_ALLOW_LARGE"


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation now (Linux: MemAvailable; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _check_declared_size(path: Path, size: tuple[int, ...], components: int) -> None:
    """Refuse, before any voxel is allocated, a volume whose header declares more voxels than this machine
    can hold; ``--allow-large`` (or $KIDNEYTUMORSEG_ALLOW_LARGE=1) lets it through."""
    if any(n <= 0 for n in size):
        raise InputImageError(
            f"{path}: declares a size of {tuple(size)} voxels, with an empty axis: there is nothing to segment. "
            "Export the CT again."
        )
    if os.environ.get(ALLOW_LARGE_ENV) == "1":
        return
    voxels = int(np.prod([int(n) for n in size], dtype=np.float64)) * max(1, components)
    need = voxels * BYTES_PER_VOXEL_AT_PEAK
    available = available_memory_bytes()
    if available is not None and need > available:
        raise InputImageError(
            f"{path}: declares {' x '.join(str(n) for n in size)} voxels, about {need / 2**30:.1f} GiB to segment, "
            f"but {available / 2**30:.1f} GiB of memory is available; a corrupt header, or a volume too large "
            "for this machine. Check the file, or pass --allow-large to try anyway."
        )


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a CT volume and check that it is one: 3D, scalar, not empty, finite, positive spacing."""
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{path}: no such file or folder; check the path.")
    try:
        if path.is_dir():
            image = _read_dicom_folder(path)
        else:
            if image_suffix(path) is None:
                raise InputImageError(
                    f"{path}: unsupported file type; give a .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd file, or "
                    "a folder holding one DICOM series."
                )
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()  # the header only: nothing allocated yet
            _check_declared_size(path, reader.GetSize(), reader.GetNumberOfComponents())
            image = reader.Execute()
    except RuntimeError as exc:  # SimpleITK reports every read failure as RuntimeError
        detail = str(exc).strip().splitlines()
        reason = next((line.strip() for line in reversed(detail) if line.strip()), "unknown error")
        raise InputImageError(
            f"{path}: cannot be read as an image ({reason[:200]}); the file may be truncated or corrupt, "
            "or not the format its name says."
        ) from None
    check_volume(image, path)
    if path.is_file():
        _check_nifti_data(path)
    return image


def _nifti_layout(head: bytes) -> tuple[int, int, np.dtype | None] | None:
    """(voxel data offset, voxel data bytes, float dtype or None) from a NIfTI-1 header; None for a header
    this check does not understand (ITK has read the file already, so it is left at that)."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(f"{order}i", head[:4])[0] == 348:
            break
    else:
        return None
    dim = struct.unpack(f"{order}8h", head[40:56])
    datatype, bitpix = struct.unpack(f"{order}2h", head[70:74])
    offset = max(352, int(struct.unpack(f"{order}f", head[108:112])[0]))
    if not 1 <= dim[0] <= 7 or bitpix <= 0:
        return None
    voxels = 1
    for n in dim[1 : dim[0] + 1]:
        voxels *= max(1, int(n))
    dtype = {16: np.dtype(f"{order}f4"), 64: np.dtype(f"{order}f8")}.get(datatype)
    return offset, (voxels * bitpix + 7) // 8, dtype


def _check_nifti_data(path: Path, chunk_bytes: int = 16 << 20) -> None:
    """Check a NIfTI file's voxel data, which ITK's reader does not: a truncated file is read without a
    word (missing voxels become 0), and NaN/infinite float voxels are silently replaced by 0."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    compressed = name.endswith(".gz")
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as f:
            layout = _nifti_layout(f.read(348))
            if layout is None:
                return
            offset, nbytes, dtype = layout
            if not compressed and dtype is None:
                got = path.stat().st_size - offset
            else:
                f.seek(offset)
                got, bad = 0, 0
                while got < nbytes:
                    chunk = f.read(min(chunk_bytes, nbytes - got))
                    if not chunk:
                        break
                    got += len(chunk)
                    if dtype is not None:
                        values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype)
                        bad += int(np.count_nonzero(~np.isfinite(values)))
                if bad:
                    raise InputImageError(
                        f"{path}: holds {bad} NaN or infinite voxel value(s); a CT has none. Repair or "
                        "re-export the image."
                    )
    except (EOFError, OSError, zlib.error) as exc:
        raise InputImageError(
            f"{path}: is truncated or corrupt ({type(exc).__name__}: {str(exc)[:120]}); copy or export the file again."
        ) from None
    if got < nbytes:
        raise InputImageError(
            f"{path}: is truncated: it holds {max(got, 0)} of the {nbytes} bytes of voxel data its header "
            "promises; copy or export the file again."
        )


def check_volume(image: sitk.Image, path: str | os.PathLike) -> None:
    """Raise ``InputImageError`` unless ``image`` is a usable 3D scalar volume."""
    dim = image.GetDimension()
    size = image.GetSize()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} values per voxel (a vector or colour image); "
            "a CT volume has one. Give the CT itself, not a rendering or a multi-channel image."
        )
    if dim != 3:
        what = "2D image (one slice)" if dim == 2 else f"{dim}D image"
        hint = "give the whole CT series" if dim == 2 else "give one 3D CT volume (split the time points or channels)"
        raise InputImageError(f"{path}: is a {what} of size {size}; the model needs a 3D CT volume: {hint}.")
    if min(size) == 0:
        raise InputImageError(f"{path}: is empty (size {size}); the file holds no voxels.")
    if min(size) == 1:
        raise InputImageError(
            f"{path}: is a single slice (size {size}); the model needs a 3D CT volume: give the whole series."
        )
    spacing = image.GetSpacing()
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputImageError(
            f"{path}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm is not positive; the header is "
            "damaged. Fix the spacing in the header."
        )
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputImageError(
            f"{path}: direction matrix is not orthonormal (sheared or scaled axes); the header is damaged."
        )
    array = sitk.GetArrayViewFromImage(image)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        if not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise InputImageError(
                f"{path}: holds {bad} NaN or infinite voxel value(s); a CT has none. Repair or re-export the image."
            )


def check_not_constant(image: sitk.Image, path: str | os.PathLike) -> None:
    """A CT to segment whose voxels all hold one value is a blank or failed export, not a scan (label maps
    may well be constant: this check is for CT input only)."""
    array = sitk.GetArrayViewFromImage(image)
    first = array.flat[0]
    if (array == first).all():
        raise InputImageError(
            f"{path}: every voxel has the same value ({first}); this is not a CT scan (a blank or failed export). "
            "Give the CT itself."
        )


def intensity_warnings(image: sitk.Image, path: str | os.PathLike) -> list[str]:
    """Warnings when the voxel values do not look like CT Hounsfield units (an MR image, say)."""
    array = sitk.GetArrayViewFromImage(image)
    sample = array[:: max(1, array.shape[0] // 16), ::4, ::4]
    low, high = (float(v) for v in np.percentile(sample, [1, 99]))
    warnings = []
    if low > _CT_AIR_HU:
        warnings.append(
            f"{path}: intensities run from {low:.0f} to {high:.0f} (1st-99th percentile) and nothing looks like "
            "air at about -1000 HU: this may not be a CT in Hounsfield units (an MR image?). The model is "
            "trained on CT only; check the result carefully or do not use it."
        )
    elif high - low < 1.0:
        warnings.append(f"{path}: the image is (nearly) constant; there is nothing to segment.")
    return warnings


def _check_output_folder(folder: Path, target: Path) -> None:
    if not folder.is_dir():
        raise OutputError(f"{target}: output folder {folder} does not exist; create it or choose another.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: output folder {folder} is not writable; choose a folder you can write to.")


def label_suffix(path: Path) -> str:
    name = path.name.lower()
    suffix = next((s for s in LABEL_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise OutputError(f"{path}: unsupported output type; name the output .nii.gz, .nii or .nrrd.")
    return suffix


def publish(temporary: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes it private) and rename it onto
    ``path`` in one step."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` to ``path`` through a temporary file in the same folder and a rename, so the target
    either holds the complete image or does not exist/keeps its old content."""
    path = Path(path)
    suffix = image_suffix(path) or path.suffix
    folder = path.parent if str(path.parent) else Path(".")
    _check_output_folder(folder, path)
    for stale in folder.glob(f".{glob_escape(path.name)}.*.partial*"):  # left by a run killed while writing
        with contextlib.suppress(OSError):
            stale.unlink()
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=folder)
        os.close(fd)
        sitk.WriteImage(image, temporary, compress)
        publish(temporary, path)
    except (RuntimeError, OSError) as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise OutputError(
            f"{path}: could not be written ({reason[:200]}); check free disk space and permissions."
        ) from None


def write_labels(labels: sitk.Image, path: str | os.PathLike) -> None:
    """Write a label image as NIfTI or NRRD (chosen by the name's extension), atomically."""
    label_suffix(Path(path))
    write_image_atomic(labels, path, compress=True)
