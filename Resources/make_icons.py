"""Draw the module and extension icons (128 x 128 RGBA PNG) with numpy, written by SimpleITK.

    python Resources/make_icons.py            # writes both icons
    python Resources/make_icons.py --check    # exit 1 if the icons in the tree differ from a fresh drawing

The picture: an axial CT slice seen in miniature, a gray body with the spine, two kidneys in Slicer's
kidney color and a tumor in its tumor color on the patient's left kidney (the viewer's right). Drawn at
4x and averaged down, so the edges are smooth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
ICONS = (
    ROOT / "KidneyTumorSeg" / "Resources" / "Icons" / "KidneyTumorSeg.png",  # the module's
    ROOT / "Resources" / "Icons" / "KidneyTumorSeg.png",  # the extension's (catalog)
)
SIZE = 128
SUPERSAMPLE = 4
KIDNEY = (185, 102, 83)  # Slicer's generic anatomy colors, as the segments use
TUMOR = (144, 238, 144)
BODY = (96, 96, 100)
FAT = (70, 70, 74)
BONE = (236, 232, 220)
OUTLINE = (40, 24, 20)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    n = SIZE * SUPERSAMPLE
    centers = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel units of the final icon
    return np.meshgrid(centers, centers)  # x (columns), y (rows)


def _ellipse(x, y, cx, cy, rx, ry, angle_deg: float = 0.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    u = (x - cx) * np.cos(a) + (y - cy) * np.sin(a)
    v = -(x - cx) * np.sin(a) + (y - cy) * np.cos(a)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _kidney(x, y, cx, cy, medial_sign: float, angle: float) -> np.ndarray:
    """A bean: an ellipse with a notch (the hilum) on its medial side."""
    bean = _ellipse(x, y, cx, cy, 15, 25, angle)
    hilum = _ellipse(x, y, cx + medial_sign * 14, cy + 2, 8, 9)
    return bean & ~hilum


def draw() -> np.ndarray:
    """The icon as a (128, 128, 4) uint8 RGBA array."""
    x, y = _grid()
    n = x.shape[0]
    rgba = np.zeros((n, n, 4), float)

    def paint(mask: np.ndarray, color: tuple[int, int, int]) -> None:
        rgba[mask, :3] = color
        rgba[mask, 3] = 255

    body = _ellipse(x, y, 64, 66, 61, 50)
    paint(body, FAT)
    paint(_ellipse(x, y, 64, 66, 55, 44), BODY)
    paint(_ellipse(x, y, 64, 92, 12, 10) | _ellipse(x, y, 64, 108, 4, 9), BONE)  # vertebral body, spinous process
    right = _kidney(x, y, 34, 70, +1, -18)  # the patient's right: the viewer's left
    left = _kidney(x, y, 94, 70, -1, 18)
    for kidney in (right, left):
        paint(_ellipse_outline(kidney), OUTLINE)
        paint(kidney, KIDNEY)
    tumor = _ellipse(x, y, 104, 52, 13, 12)
    paint(_ellipse_outline(tumor), OUTLINE)
    paint(tumor, TUMOR)

    # Average each 4x4 block, weighting colors by coverage (premultiplied alpha).
    premultiplied = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    shape = (SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE)
    alpha = rgba[..., 3].reshape(shape).mean(axis=(1, 3))
    color = premultiplied.reshape(*shape, 3).mean(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        color = np.where(alpha[..., None] > 0, color / (alpha[..., None] / 255.0), 0)
    out = np.concatenate([color, alpha[..., None]], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _ellipse_outline(mask: np.ndarray, width: int = 2 * SUPERSAMPLE // 2) -> np.ndarray:
    """The mask grown by ``width`` subpixels (drawn first, in the outline color, under the shape)."""
    grown = mask.copy()
    for _ in range(width):
        grown[1:, :] |= grown[:-1, :].copy()
        grown[:-1, :] |= grown[1:, :].copy()
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
    return grown


def write(path: Path, rgba: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the icons in the tree instead")
    args = parser.parse_args(argv)
    rgba = draw()
    if args.check:
        with tempfile.TemporaryDirectory() as folder:
            fresh = Path(folder) / "icon.png"
            write(fresh, rgba)
            stale = [str(p) for p in ICONS if not p.is_file() or p.read_bytes() != fresh.read_bytes()]
        if stale:
            print("out of date: " + ", ".join(stale) + "; run python Resources/make_icons.py", file=sys.stderr)
            return 1
        return 0
    for path in ICONS:
        write(path, rgba)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
