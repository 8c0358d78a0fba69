"""Synthetic contrast-enhanced abdominal CT volumes with exact kidney and tumor labels.

``make_phantom(seed)`` builds a small abdomen in patient coordinates (LPS, millimetres: +x patient left,
+y posterior, +z superior; the body's axis is the z axis): air, subcutaneous fat, abdominal wall muscle,
visceral fat, a lumbar spine with discs, psoas and paraspinal muscles, aorta and IVC, liver, spleen,
stomach, colon and small-bowel loops with gas and fluid, two kidneys (enhancing cortex, medullary
pyramids, a renal sinus with fat and pelvis, renal vessels), simple cysts and tumors (0 to 2 unless
asked for up to 4). It then
samples that anatomy on an image grid of any size, spacing and orientation: each voxel's physical
point (origin + direction . (index * spacing)) decides the structure it falls in. So a tumor sits at the
same physical place whatever the layout of the image, which is what the orientation tests rely on.

Labels follow KiTS19: 0 background, 1 kidney (cortex, medulla, sinus and cysts inside the kidney outline),
2 tumor (the whole tumor, including any part outside the kidney). They come from the exact geometry at
voxel centres; the image gets a small Gaussian blur (partial volume) and Gaussian noise on top.

The same arguments always give bit-identical volumes. Independent random streams are drawn from the seed
for the anatomy, the tumors, the grid, the orientation and the noise, so changing ``size``, ``spacing``,
``orientation``, ``n_tumors`` or ``noise_hu`` never moves the kidneys, and only ``n_tumors`` changes the
tumors. Large grids are evaluated slab by slab (along the slowest array axis) and each structure only
inside its bounding box, which keeps a 512x512x200 volume to seconds and a few hundred MB.

The phantom is a test and training fixture, not a model of any patient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = ["Phantom", "make_phantom"]

_ORIENTATIONS = ("LPS", "RAS", "IPL", "random", "oblique")
_MAX_TUMORS = 4
_AIR_HU = -1000.0
_GAS_HU = -900.0
_HU_MIN, _HU_MAX = -1024, 3071
# Voxels per slab while painting: a few MB of float32 temporaries, small enough to stay near the CPU
# caches and to keep the peak memory far below a full-volume coordinate array.
_SLAB_VOXELS = 1 << 18
# Blur sigma in voxels: enough for partial-volume edges, small enough to keep thin cortex visible.
_BLUR_SIGMA_VOXELS = 0.7
# The blur runs on blocks of about this many voxels, each with this many slices of context per side
# (the kernel's radius is 2 voxels at this sigma).
_BLUR_BLOCK_VOXELS = 1 << 24
_BLUR_PAD = 4
_F32 = np.float32


@dataclass
class Phantom:
    """A synthetic CT volume, its labels on the same grid, and the ground truth that made them.

    ``image`` is int16 Hounsfield units; ``labels`` is uint8 (0 background, 1 kidney, 2 tumor) with the
    same size, spacing, origin and direction. ``info`` is JSON-serialisable: the arguments, the grid,
    and per structure its geometry in LPS millimetres (see ``make_phantom``).
    """

    image: sitk.Image
    labels: sitk.Image
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Geometry


@dataclass
class _Frame:
    """A local frame: u_m = axes[m] . (p - center) / semi[m] for a point p in LPS mm.

    ``axes`` rows are orthonormal LPS unit vectors. An infinite semi-axis means the coordinate is
    ignored, which turns an ellipsoid into an elliptic cylinder along that axis.
    """

    center: np.ndarray
    axes: np.ndarray
    semi: np.ndarray

    def world(self, local: np.ndarray) -> np.ndarray:
        """LPS points of (n, 3) normalised local coordinates (finite axes only)."""
        return self.center + (local * self.semi) @ self.axes


def _frame(center: Sequence[float], semi: Sequence[float], axes: np.ndarray | None = None) -> _Frame:
    return _Frame(
        np.asarray(center, float),
        np.eye(3) if axes is None else np.asarray(axes, float),
        np.asarray(semi, float),
    )


def _rotation(axis: Sequence[float], angle: float) -> np.ndarray:
    """Active rotation matrix by ``angle`` radians about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, float)
    k = k / np.linalg.norm(k)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * (cross @ cross)


def _random_axes(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random orthonormal frame (rows)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).T


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _sphere_points(n: int) -> np.ndarray:
    """n nearly uniform unit vectors (Fibonacci sphere): deterministic, no random draws."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(1.0 - z * z)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _in_ellipse_xy(points: np.ndarray, semi_x: float, semi_y: float) -> bool:
    """Whether all (n, 3) points lie inside the axial ellipse centred on the body axis."""
    return bool(np.all((points[:, 0] / semi_x) ** 2 + (points[:, 1] / semi_y) ** 2 <= 1.0))


# ----------------------------------------------------------------------------------------------------
# Anatomy (drawn from the seed, independent of the image grid)


@dataclass
class _Kidney:
    side: str  # "left" (x > 0) or "right"
    outline: _Frame
    medulla: _Frame
    sinus: _Frame
    pelvis: _Frame
    cortex_thickness: float
    cortex_hu: float
    medulla_hu: float
    sinus_hu: float
    pelvis_hu: float
    n_pyramids: int
    pyramid_phase: float
    hilum: np.ndarray

    @property
    def volume_ml(self) -> float:
        return 4.0 / 3.0 * math.pi * float(np.prod(self.outline.semi)) / 1000.0


@dataclass
class _Tumor:
    kidney: int
    frame: _Frame  # semi-axes = radius * shape scales
    radius: float
    exophytic: bool
    lobe_amplitude: float  # surface radius 1 + amplitude * sum_k w_k (d_k . u)^3 in the local frame
    lobe_dirs: np.ndarray
    lobe_weights: np.ndarray
    mean_hu: float
    texture_hu: float
    waves: np.ndarray  # (K, 3) wave vectors, radians per mm (LPS)
    wave_phases: np.ndarray
    necrosis_scale: float  # 0: none; else the necrotic core is the same shape scaled by this
    necrosis_hu: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def extent(self) -> float:
        """Largest distance (mm) from the centre to the surface."""
        return float(np.max(self.frame.semi)) * (1.0 + self.lobe_amplitude)


@dataclass
class _Cyst:
    kidney: int
    center: np.ndarray
    radius: float
    hu: float


@dataclass
class _Loop:
    """A bowel segment: a wall and a lumen with fluid, or gas above an air-fluid level (supine patient)."""

    outer: _Frame
    inner: _Frame
    wall_hu: float
    fluid_hu: float
    gas_level_y: float | None  # gas where LPS y < level (anterior is up); None: no gas
    collapsed: bool


@dataclass
class _Anatomy:
    body: dict[str, float]
    spine: dict[str, float]
    muscles: list[tuple[_Frame, str]]  # (frame, clip) with clip "cavity" or "wall"
    vessels: list[tuple[_Frame, float, str]]  # (frame, HU, shape) with shape "ellipsoid" or "rod"
    liver: list[_Frame]
    liver_hu: float
    spleen: _Frame
    spleen_hu: float
    loops: list[_Loop]
    kidneys: list[_Kidney]
    cysts: list[_Cyst]
    tumors: list[_Tumor] = field(default_factory=list)

    @property
    def cavity(self) -> _Frame:
        b = self.body
        return _frame((0, 0, 0), (b["cavity_x"], b["cavity_y"], np.inf))

    @property
    def wall(self) -> _Frame:
        b = self.body
        return _frame((0, 0, 0), (b["wall_x"], b["wall_y"], np.inf))


def _make_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    # Body: an elliptic cylinder along z, with subcutaneous fat, a muscular wall and a fat-filled cavity.
    a, b = u(160, 180), u(118, 135)
    t_fat, t_wall = u(8, 22), u(8, 12)
    body = {
        "semi_x": a,
        "semi_y": b,
        "wall_x": a - t_fat,
        "wall_y": b - t_fat,
        "cavity_x": a - t_fat - t_wall,
        "cavity_y": b - t_fat - t_wall,
        "fat_hu": u(-110, -90),
        "muscle_hu": u(40, 60),
        "visceral_fat_hu": u(-100, -80),
    }

    # Lumbar spine: vertebral body (cortical shell, cancellous core, discs), canal, arch, spinous process.
    vb_y, vb_sx, vb_sy = u(35, 45), u(20, 25), u(15, 18)
    canal_y = vb_y + vb_sy + u(8, 12)
    canal_sx, canal_sy = u(8, 11), u(7, 9)
    cortical_hu = u(600, 800)
    spine = {
        "body_y": vb_y,
        "body_sx": vb_sx,
        "body_sy": vb_sy,
        "cortical_mm": u(1.5, 2.5),
        "cortical_hu": cortical_hu,
        "cancellous_hu": u(200, 300),
        "disc_period": u(32, 38),
        "disc_mm": u(7, 10),
        "disc_hu": u(70, 90),
        "disc_phase": u(0, 32),
        "canal_y": canal_y,
        "canal_sx": canal_sx,
        "canal_sy": canal_sy,
        "canal_hu": u(5, 20),
        "arch_margin": u(5, 7),
        "arch_hu": 0.8 * cortical_hu,
        "spinous_y": canal_y + u(20, 28),
        "spinous_sx": u(4, 6),
        "spinous_sy": u(15, 20),
    }

    muscles: list[tuple[_Frame, str]] = []
    for side in (1.0, -1.0):
        psoas = _frame((side * u(30, 40), vb_y + u(-5, 5), 0), (u(12, 20), u(12, 18), np.inf))
        paraspinal = _frame((side * u(25, 35), canal_y + u(10, 20), 0), (u(20, 28), u(18, 24), np.inf))
        muscles += [(psoas, "cavity"), (paraspinal, "wall")]

    aorta = _frame((u(5, 20), vb_y - vb_sy - u(12, 16), 0), (r := u(9, 13), r, np.inf))
    aorta_hu = u(220, 320)
    ivc = _frame((-u(18, 28), vb_y - vb_sy - u(10, 15), 0), (u(10, 14), u(7, 10), np.inf))
    ivc_hu = u(100, 170)

    # Liver (two lobes) on the patient's right, anterior and superior; spleen left, posterior, superior.
    right_lobe = _frame(
        (-u(55, 75), u(-25, 5), z_liver := u(70, 100)),
        (u(70, 85), u(65, 80), u(70, 90)),
        _rotation((0, 0, 1), math.radians(u(-10, 10))).T,
    )
    left_lobe = _frame((u(-10, 20), u(-55, -35), z_liver + u(0, 15)), (u(50, 70), u(25, 35), u(40, 55)))
    liver_hu = u(55, 70)
    spleen = _frame(
        (u(75, 95), u(25, 50), u(60, 90)),
        (u(25, 35), u(45, 60), u(40, 55)),
        _rotation((0, 0, 1), math.radians(u(-35, -15))).T,
    )
    spleen_hu = u(90, 120)

    kidneys = [_make_kidney(rng, side, body, spine) for side in ("left", "right")]
    # The left kidney usually lies a little higher than the right (the liver pushes the right one down).
    dz = u(5, 25)
    for k, shift in zip(kidneys, (dz / 2, -dz / 2), strict=True):
        for f in (k.outline, k.medulla, k.sinus, k.pelvis):
            f.center = f.center + np.array([0.0, 0.0, shift])
        k.hilum = k.hilum + np.array([0.0, 0.0, shift])

    # Renal veins to the IVC and arteries from the aorta; painted before the kidneys, so inside the
    # kidney outline the kidney wins and only the extrarenal part shows.
    vessels: list[tuple[_Frame, float, str]] = []
    for k in kidneys:
        inner_end = k.outline.center + 0.6 * (k.hilum - k.outline.center)
        vein_end = np.array([ivc.center[0], ivc.center[1], k.hilum[2]])
        vessels.append((_rod(inner_end, vein_end, u(4, 6)), ivc_hu + u(0, 40), "rod"))
        artery_end = np.array([aorta.center[0], aorta.center[1], k.hilum[2] + u(5, 15)])
        vessels.append((_rod(artery_end, inner_end + np.array([0, 0, 4.0]), u(2.5, 3.5)), aorta_hu, "rod"))
    vessels += [(ivc, ivc_hu, "ellipsoid"), (aorta, aorta_hu, "ellipsoid")]

    cavity = _frame((0, 0, 0), (body["cavity_x"], body["cavity_y"], np.inf))
    loops = _make_bowel(rng, body, kidneys, cavity)

    cysts: list[_Cyst] = []
    for i, k in enumerate(kidneys):
        for _ in range(int(rng.choice([0, 1, 2], p=[0.65, 0.25, 0.10]))):
            radius = u(4, 12)
            # A ball of radius R centred at normalised position c' lies inside the ellipsoid if
            # |c'| <= 1 - R / (smallest semi-axis): keeps the cyst (labelled kidney) inside the outline.
            room = max(0.0, 1.0 - radius / float(np.min(k.outline.semi)) - 0.02)
            local = _unit(rng) * room * u(0, 1) ** (1 / 3)
            cysts.append(_Cyst(i, k.outline.world(local[None])[0], radius, u(0, 20)))

    return _Anatomy(
        body,
        spine,
        muscles,
        vessels,
        [right_lobe, left_lobe],
        liver_hu,
        spleen,
        spleen_hu,
        loops,
        kidneys,
        cysts,
    )


def _rod(a: np.ndarray, b: np.ndarray, radius: float) -> _Frame:
    """A cylinder of ``radius`` from a to b (local axis 0 along the segment)."""
    d = b - a
    length = float(np.linalg.norm(d))
    e0 = d / length
    helper = np.array([0.0, 0.0, 1.0]) if abs(e0[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(e0, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e0, e1)
    return _frame((a + b) / 2, (length / 2, radius, radius), np.stack([e0, e1, e2]))


def _make_kidney(rng: np.random.Generator, side: str, body: dict[str, float], spine: dict[str, float]) -> _Kidney:
    u = rng.uniform
    semi = np.array([u(25, 32), u(20, 26), u(45, 60)])
    # Built for a left kidney, mirrored for the right. Local axis 0 points laterally, 2 along the long
    # axis. The hilum faces anteromedially, the upper pole tilts medially and posteriorly.
    rot = (
        _rotation((1, 0, 0), -math.radians(u(5, 15)))
        @ _rotation((0, 1, 0), -math.radians(u(5, 15)))
        @ _rotation((0, 0, 1), math.radians(u(20, 40)))
    )
    axes = rot.T
    sign = 1.0
    if side == "right":
        axes = axes @ np.diag([-1.0, 1.0, 1.0])
        sign = -1.0
    center = np.array([sign * u(55, 85), u(20, 50), 0.0])

    # Keep the kidney inside the abdominal cavity and clear of the vertebral body (perirenal fat between).
    surface = _sphere_points(200) * semi @ axes
    for _ in range(100):
        pts = center + surface
        in_cavity = _in_ellipse_xy(pts, body["cavity_x"] - 6, body["cavity_y"] - 6)
        spine_d = ((pts[:, 0] / (spine["body_sx"] + 6)) ** 2) + (
            ((pts[:, 1] - spine["body_y"]) / (spine["body_sy"] + 6)) ** 2
        )
        clear_of_spine = bool(np.all(spine_d > 1.0))
        if in_cavity and clear_of_spine:
            break
        if not clear_of_spine:
            center[0] += sign * 1.5  # laterally, away from the spine
        if not in_cavity:
            center[1] -= 1.5  # anteriorly, where the elliptic cavity is wider

    outline = _Frame(center, axes, semi)
    t = u(5, 8)
    medulla = _Frame(center, axes, semi - t)
    sinus = _Frame(outline.world(np.array([[-0.5, -0.15, 0.0]]))[0], axes, semi * np.array([0.42, 0.4, 0.55]))
    pelvis = _Frame(outline.world(np.array([[-0.7, -0.1, -0.1]]))[0], axes, semi * np.array([0.28, 0.22, 0.25]))
    hilum = outline.world(np.array([[-1.0, -0.15, 0.0]]))[0]
    return _Kidney(
        side=side,
        outline=outline,
        medulla=medulla,
        sinus=sinus,
        pelvis=pelvis,
        cortex_thickness=t,
        cortex_hu=u(150, 220),
        medulla_hu=u(80, 120),
        sinus_hu=u(-100, -70),
        pelvis_hu=u(0, 20),
        n_pyramids=int(rng.integers(5, 8)),
        pyramid_phase=u(0, 2 * math.pi),
        hilum=hilum,
    )


def _loop(rng: np.random.Generator, outer: _Frame, wall_mm: float, p_gas: float, p_collapsed: float) -> _Loop:
    u = rng.uniform
    inner = _Frame(outer.center, outer.axes, outer.semi - wall_mm)
    kind = rng.choice(3, p=[1.0 - p_gas - p_collapsed, p_gas, p_collapsed])
    level = None
    if kind == 1:
        # Supine: gas rises anteriorly (towards -y), above a horizontal (constant y) air-fluid level.
        finite = np.isfinite(inner.semi)
        reach_y = float(np.sqrt(np.sum((inner.axes[finite, 1] * inner.semi[finite]) ** 2)))
        level = float(inner.center[1] + u(-0.7, 0.3) * reach_y)
    return _Loop(outer, inner, u(30, 50), u(0, 30), level, bool(kind == 2))


def _make_bowel(
    rng: np.random.Generator, body: dict[str, float], kidneys: list[_Kidney], cavity: _Frame
) -> list[_Loop]:
    u = rng.uniform
    inf = np.inf
    loops = [
        # Stomach: left upper quadrant, usually with gas over fluid.
        _loop(
            rng,
            _frame((u(30, 60), u(-65, -45), u(100, 130)), (u(40, 55), u(28, 38), u(45, 60))),
            4.0,
            0.8,
            0.0,
        ),
        # Ascending (right) and descending (left) colon along z, transverse colon along x.
        _loop(rng, _frame((-u(85, 105), u(-25, 5), 0), (r := u(18, 24), r, inf)), 3.0, 0.6, 0.0),
        _loop(rng, _frame((u(88, 108), u(-15, 10), 0), (r := u(15, 20), r, inf)), 3.0, 0.6, 0.0),
        _loop(
            rng,
            _frame(
                (0, -u(55, 75), u(40, 70)),
                (r := u(18, 24), r, inf),
                np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]),
            ),
            3.0,
            0.6,
            0.0,
        ),
    ]
    # Small-bowel loops fill the anterior abdomen below the liver; they keep clear of the kidneys, which
    # real anatomy wraps in perirenal fat (and which keeps gas off the kidney edge).
    wanted, tries = int(rng.integers(40, 70)), 0
    while len(loops) - 4 < wanted and tries < 10 * wanted:
        tries += 1
        center = np.array([u(-95, 95), u(-body["cavity_y"] + 15, 15), u(-170, 50)])
        semi = rng.uniform(10, 20, 3)
        reach = float(np.max(semi))
        if (center[0] / (cavity.semi[0] - reach)) ** 2 + (center[1] / (cavity.semi[1] - reach)) ** 2 > 1.0:
            continue
        near = False
        for k in kidneys:
            q = (center - k.outline.center) @ k.outline.axes.T / (k.outline.semi + reach + 5.0)
            near |= bool(np.sum(q * q) <= 1.0)
        if near:
            continue
        loops.append(_loop(rng, _Frame(center, _random_axes(rng), semi), 3.0, 0.3, 0.15))
    return loops


def _lobulated_inside(
    u0: np.ndarray, u1: np.ndarray, u2: np.ndarray, dirs: np.ndarray, weights: np.ndarray, amplitude: float
) -> np.ndarray:
    """Inside test for rho <= 1 + a * sum_k w_k (d_k . u / rho)^3 in normalised local coordinates.

    Multiplied through by rho^3 so the centre (rho = 0) needs no special case. The cubic terms are odd,
    so the surface bulges on one side and dents on the other: an irregular tumor outline whose volume
    stays within a few per cent of the ellipsoid's.
    """
    rho2 = u0 * u0 + u1 * u1 + u2 * u2
    rho = np.sqrt(rho2)
    bumps = 0.0
    for d, w in zip(dirs, weights, strict=True):
        proj = u0 * d[0] + u1 * d[1] + u2 * d[2]
        bumps = bumps + w * proj * proj * proj
    return rho2 * rho2 - rho2 * rho <= amplitude * bumps


def _make_tumors(rng: np.random.Generator, anat: _Anatomy, n_tumors: int | None) -> list[_Tumor]:
    # Always drawn, so that asking for an explicit count leaves the rest of the stream unchanged.
    n_default = int(rng.choice(3, p=[0.35, 0.45, 0.20]))
    n = n_default if n_tumors is None else n_tumors
    tumors: list[_Tumor] = []
    for _ in range(n):
        for _attempt in range(500):
            t = _draw_tumor(rng, anat, tumors)
            if t is not None:
                tumors.append(t)
                break
        else:  # pragma: no cover - with at most 4 tumors on two kidneys this does not happen
            raise RuntimeError(f"could not place {n} non-overlapping tumors")
    for t in tumors:
        t.stats = _tumor_stats(t, anat.kidneys[t.kidney])
    return tumors


def _draw_tumor(rng: np.random.Generator, anat: _Anatomy, others: list[_Tumor]) -> _Tumor | None:
    """One candidate tumor, or None when it falls somewhere implausible (the caller draws again)."""
    u = rng.uniform
    ki = int(rng.integers(2))
    kidney = anat.kidneys[ki]
    outline = kidney.outline
    exophytic = bool(rng.random() < 0.55)
    scales = rng.uniform(0.85, 1.15, 3)
    scales /= float(np.prod(scales)) ** (1.0 / 3.0)  # so the volume stays that of the radius-r sphere
    amplitude = u(0.0, 0.12)
    dirs = np.stack([_unit(rng) for _ in range(3)])
    weights = rng.uniform(-1.0, 1.0, 3)
    weights /= float(np.sum(np.abs(weights)))  # |bumps| <= 1: the surface stays within (1 +- a) r
    axes = _random_axes(rng)
    grow = float(np.max(scales)) * (1.0 + amplitude)
    semi_min = float(np.min(outline.semi))
    if exophytic:
        radius = u(10, 35)
    else:
        r_fit = min(20.0, 0.9 * semi_min / grow)
        if r_fit < 8.0:
            return None
        radius = u(8.0, r_fit)
    extent = radius * grow
    # Kind and size stay while the position is redrawn: rejecting whole tumors instead would favour
    # the small endophytic ones, which fit anywhere.
    for _ in range(50):
        center = _tumor_center(rng, kidney, radius, grow, exophytic)
        if center is not None and _tumor_fits(anat, center, extent, others):
            break
    else:
        return None
    frame = _Frame(center, axes, radius * scales)
    # Tumors enhance less than the cortex in this phase: keep the solid part below the kidney's average.
    mean_hu = u(30.0, min(120.0, 0.5 * (kidney.cortex_hu + kidney.medulla_hu) - 40.0))
    n_waves = 4
    waves = np.stack([_unit(rng) * (2 * math.pi / u(6, 20)) for _ in range(n_waves)])
    phases = rng.uniform(0, 2 * math.pi, n_waves)
    necrosis_scale, necrosis_hu = 0.0, 0.0
    if radius >= 18 and rng.random() < 0.5:
        necrosis_scale, necrosis_hu = u(0.35, 0.6), u(5, 30)
    return _Tumor(
        kidney=ki,
        frame=frame,
        radius=radius,
        exophytic=exophytic,
        lobe_amplitude=amplitude,
        lobe_dirs=dirs,
        lobe_weights=weights,
        mean_hu=mean_hu,
        texture_hu=u(8, 20),
        waves=waves,
        wave_phases=phases,
        necrosis_scale=necrosis_scale,
        necrosis_hu=necrosis_hu,
    )


def _tumor_center(
    rng: np.random.Generator, kidney: _Kidney, radius: float, grow: float, exophytic: bool
) -> np.ndarray | None:
    """A candidate tumor centre, or None for an exophytic direction that points somewhere implausible."""
    outline = kidney.outline
    if not exophytic:
        room = 1.0 - radius * grow / float(np.min(outline.semi)) - 0.02  # fully inside, as for cysts
        return outline.world((_unit(rng) * room * rng.uniform(0, 1) ** (1 / 3))[None])[0]
    d = _unit(rng)
    surface = outline.world(d[None])[0]
    normal = (d / outline.semi) @ outline.axes
    normal /= np.linalg.norm(normal)
    medial = -1.0 if kidney.side == "left" else 1.0
    # Grow away from the spine and the back muscles, not straight up or down the long axis.
    if normal[0] * medial > 0.3 or normal[1] > 0.5 or abs(normal[2]) > 0.8:
        return None
    # Centre near the surface, from 0.2 r inside to 0.4 r outside: 40-90 % of the tumor lies outside.
    return surface + normal * radius * rng.uniform(-0.2, 0.4)


def _tumor_fits(anat: _Anatomy, center: np.ndarray, extent: float, others: list[_Tumor]) -> bool:
    """Inside the abdominal cavity, off the vertebral body, and apart from the other tumors."""
    ball = center + _sphere_points(64) * extent
    body, spine = anat.body, anat.spine
    if not _in_ellipse_xy(ball, body["cavity_x"] - 3, body["cavity_y"] - 3):
        return False
    vb = (ball[:, 0] / spine["body_sx"]) ** 2 + ((ball[:, 1] - spine["body_y"]) / spine["body_sy"]) ** 2
    if np.any(vb <= 1.0):
        return False
    return all(np.linalg.norm(center - o.frame.center) > extent + o.extent + 2.0 for o in others)


def _tumor_stats(t: _Tumor, kidney: _Kidney, n: int = 64) -> dict[str, Any]:
    """Volume, centroid and share outside the kidney, on a fine lattice (the shape has no closed form)."""
    f = 1.0 + t.lobe_amplitude
    g = ((np.arange(n) + 0.5) / n * 2.0 - 1.0) * f
    u0, u1, u2 = (a.ravel() for a in np.meshgrid(g, g, g, indexing="ij"))
    inside = _lobulated_inside(u0, u1, u2, t.lobe_dirs, t.lobe_weights, t.lobe_amplitude)
    local = [v[inside] * s for v, s in zip((u0, u1, u2), t.frame.semi, strict=True)]
    # Component by component: (n, 3) @ (3, 3) products are needlessly slow for this many points.
    xyz = [t.frame.center[k] + sum(local[m] * t.frame.axes[m, k] for m in range(3)) for k in range(3)]
    k_frame = kidney.outline
    rel = [xyz[k] - k_frame.center[k] for k in range(3)]
    in_kidney = sum((sum(rel[k] * k_frame.axes[m, k] for k in range(3)) / k_frame.semi[m]) ** 2 for m in range(3))
    cell_mm3 = (2.0 * f / n) ** 3 * float(np.prod(t.frame.semi))
    return {
        "volume_ml": float(inside.sum() * cell_mm3 / 1000.0),
        "centroid": np.array([float(v.mean()) for v in xyz]),
        "outside_kidney_fraction": float(np.mean(in_kidney > 1.0)),
    }


# ----------------------------------------------------------------------------------------------------
# Image grid


@dataclass
class _Grid:
    size: np.ndarray  # index order (SimpleITK x, y, z)
    spacing: np.ndarray
    direction: np.ndarray  # columns: LPS unit vector of each index axis
    origin: np.ndarray

    @property
    def steps(self) -> np.ndarray:
        """Column j: the LPS displacement (mm) of one step along index axis j."""
        return self.direction * self.spacing[None, :]

    def index_of(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices of (n, 3) LPS points (the direction matrix is orthonormal)."""
        return ((points - self.origin) @ self.direction) / self.spacing

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction.ravel()])
        return image


def _direction(orientation: str, rng: np.random.Generator) -> np.ndarray:
    if orientation == "LPS":
        return np.eye(3)
    if orientation == "RAS":
        return np.diag([-1.0, -1.0, 1.0])
    if orientation == "IPL":
        # KiTS19's NIfTI layout: index axis 0 runs inferiorly (slices), 1 posteriorly (rows), 2 to the
        # patient's left (columns), as nibabel's (slices, 512, 512) arrays show; SimpleITK's numpy view
        # reverses that to (columns, rows, slices).
        return np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    if orientation == "random":
        perm = rng.permutation(3)
        flips = rng.choice([-1.0, 1.0], size=3)
        d = np.zeros((3, 3))
        d[perm, np.arange(3)] = flips
        return d
    # "oblique": LPS tilted by 5-20 degrees about a random axis (a gantry tilt, or a resampled volume).
    return _rotation(_unit(rng), math.radians(rng.uniform(5, 20)))


def _make_grid(
    rng: np.random.Generator,
    anat: _Anatomy,
    size: Sequence[int] | None,
    spacing: Sequence[float] | None,
    direction: np.ndarray,
) -> _Grid:
    u = rng.uniform
    # All drawn every time so explicit arguments do not shift the other draws.
    sp_xy, sp_z = round(u(2.4, 3.2), 3), round(u(2.5, 5.0), 3)
    margin, fov_z, z_center = u(10, 40), u(200, 300), u(-10, 10)
    sp_lps = np.array([sp_xy, sp_xy, sp_z] if spacing is None else spacing, float)
    if size is None:
        fov_xy = 2.0 * max(anat.body["semi_x"], anat.body["semi_y"]) + margin
        # Keep every kidney and tumor inside the slab range with 15 mm to spare.
        reach = 0.0
        for k in anat.kidneys:
            half_z = float(np.sqrt(np.sum((k.outline.axes[:, 2] * k.outline.semi) ** 2)))
            reach = max(reach, abs(k.outline.center[2] - z_center) + half_z)
        for t in anat.tumors:
            reach = max(reach, abs(t.frame.center[2] - z_center) + t.extent)
        fov = np.array([fov_xy, fov_xy, max(fov_z, 2.0 * reach + 30.0)])
        size_lps = np.ceil(fov / sp_lps).astype(int)
    else:
        size_lps = np.array(size, int)
    # size and spacing are given along the patient axes (L-R, P-A, I-S); each index axis takes those of
    # the patient axis it runs along, so every orientation covers the same physical box.
    along = np.argmax(np.abs(direction), axis=0)
    size_idx, sp_idx = size_lps[along], sp_lps[along]
    center = np.array([0.0, 0.0, z_center])
    origin = center - direction @ ((size_idx - 1) / 2.0 * sp_idx)
    return _Grid(size_idx, sp_idx, direction, origin)


# ----------------------------------------------------------------------------------------------------
# Rendering: every structure is a list of affine functions of the voxel index (its local coordinates),
# evaluated only inside its index bounding box, one slab of slices at a time.

_Row = tuple[np.ndarray, float]  # value = beta + gamma . index
_Paint = Callable[["_Block"], None]


class _Block:
    """A box of voxels [lo, hi) (index order) with views on the volume's arrays (numpy order z, y, x)."""

    def __init__(self, hu: np.ndarray, lab: np.ndarray, lo: Sequence[int], hi: Sequence[int]) -> None:
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        self.hu = hu[box]
        self.lab = lab[box]
        # Index vectors shaped to broadcast: axis 0 of the index is the last numpy axis.
        self.r = (
            np.arange(lo[0], hi[0], dtype=_F32).reshape(1, 1, -1),
            np.arange(lo[1], hi[1], dtype=_F32).reshape(1, -1, 1),
            np.arange(lo[2], hi[2], dtype=_F32).reshape(-1, 1, 1),
        )

    def affine(self, row: _Row) -> np.ndarray:
        """beta + gamma . index on the block, built from the smallest shapes up.

        Axes with a zero coefficient are left out, so a structure that does not vary along an axis (a
        z-cylinder on an axial grid) costs a 2D array broadcast over the slices, not a 3D one.
        """
        gamma, beta = row
        out = None
        for j in (2, 1, 0):
            if gamma[j] == 0.0:
                continue
            term = self.r[j] * _F32(gamma[j])
            out = term + _F32(beta) if out is None else out + term
        return np.full((1, 1, 1), beta, _F32) if out is None else out

    def quad(self, rows: list[_Row]) -> np.ndarray:
        """Sum of squared local coordinates (<= 1 inside the ellipsoid or cylinder)."""
        acc = None
        for row in rows:
            v = self.affine(row)
            v = v * v
            acc = v if acc is None else acc + v
        assert acc is not None
        return acc


def _rows(grid: _Grid, frame: _Frame) -> list[_Row]:
    """The frame's finite normalised coordinates as affine functions of the voxel index."""
    rows = []
    for e, s in zip(frame.axes, frame.semi, strict=True):
        if np.isfinite(s):
            rows.append((e @ grid.steps / s, float(e @ (grid.origin - frame.center)) / s))
    return rows


def _bbox(grid: _Grid, frame: _Frame, grow: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Index box [lo, hi) that holds the frame's ellipsoid scaled by ``grow``; None if off the grid."""
    grid_center = grid.origin + grid.steps @ ((grid.size - 1) / 2.0)
    reach = float(np.linalg.norm(grid.steps @ (grid.size - 1))) / 2.0 + float(
        np.linalg.norm(frame.center - grid_center)
    )
    semi = np.where(np.isfinite(frame.semi), frame.semi * grow, reach + 1.0)
    half = np.sqrt(np.sum((frame.axes * semi[:, None]) ** 2, axis=0))
    corners = frame.center + np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)]) * half
    idx = np.clip(grid.index_of(corners), -2.0, grid.size + 2.0)
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, grid.size)
    if np.any(lo >= hi):
        return None
    return lo, hi


def _build_ops(anat: _Anatomy, grid: _Grid) -> list[tuple[np.ndarray, np.ndarray, _Paint]]:
    """The painting program, in order: later structures overwrite earlier ones."""
    ops: list[tuple[np.ndarray, np.ndarray, _Paint]] = []

    def add(frame: _Frame, paint: _Paint, grow: float = 1.0) -> None:
        box = _bbox(grid, frame, grow)
        if box is not None:
            ops.append((box[0], box[1], paint))

    clips = {"cavity": _rows(grid, anat.cavity), "wall": _rows(grid, anat.wall)}
    y_row: _Row = (grid.steps[1].copy(), float(grid.origin[1]))
    z_row: _Row = (grid.steps[2].copy(), float(grid.origin[2]))

    def solid(frame: _Frame, hu: float, clip: str | None = None, rod: bool = False) -> None:
        rows = _rows(grid, frame)
        clip_rows = clips.get(clip) if clip else None

        def paint(blk: _Block) -> None:
            if rod:  # finite cylinder along local axis 0
                along = blk.affine(rows[0])
                mask = (along * along <= 1.0) & (blk.quad(rows[1:]) <= 1.0)
            else:
                mask = blk.quad(rows) <= 1.0
            if clip_rows is not None:
                mask = mask & (blk.quad(clip_rows) <= 1.0)
            np.copyto(blk.hu, _F32(hu), where=mask)

        add(frame, paint)

    def loop(lp: _Loop) -> None:
        outer, inner = _rows(grid, lp.outer), _rows(grid, lp.inner)

        def paint(blk: _Block) -> None:
            clip = blk.quad(clips["cavity"]) <= 1.0
            np.copyto(blk.hu, _F32(lp.wall_hu), where=(blk.quad(outer) <= 1.0) & clip)
            if lp.collapsed:
                return
            lumen = (blk.quad(inner) <= 1.0) & clip
            np.copyto(blk.hu, _F32(lp.fluid_hu), where=lumen)
            if lp.gas_level_y is not None:
                np.copyto(blk.hu, _F32(_GAS_HU), where=lumen & (blk.affine(y_row) < lp.gas_level_y))

        add(lp.outer, paint)

    body, spine, inf = anat.body, anat.spine, np.inf
    solid(_frame((0, 0, 0), (body["semi_x"], body["semi_y"], inf)), body["fat_hu"])
    solid(anat.wall, body["muscle_hu"])
    solid(anat.cavity, body["visceral_fat_hu"])
    for lp in anat.loops:
        loop(lp)
    for lobe in anat.liver:
        solid(lobe, anat.liver_hu, "cavity")
    solid(anat.spleen, anat.spleen_hu, "cavity")
    for frame, clip in anat.muscles:
        solid(frame, body["muscle_hu"], clip)

    # Spine: posterior arch and canal, spinous process, then the vertebral body with its discs.
    canal_c = (0, spine["canal_y"], 0)
    margin = spine["arch_margin"]
    solid(_frame(canal_c, (spine["canal_sx"] + margin, spine["canal_sy"] + margin, inf)), spine["arch_hu"])
    solid(_frame(canal_c, (spine["canal_sx"], spine["canal_sy"], inf)), spine["canal_hu"])
    solid(
        _frame((0, spine["spinous_y"], 0), (spine["spinous_sx"], spine["spinous_sy"], inf)),
        spine["arch_hu"],
        "wall",
    )
    vb_outer = _frame((0, spine["body_y"], 0), (spine["body_sx"], spine["body_sy"], inf))
    cortical = spine["cortical_mm"]
    vb_inner_rows = _rows(grid, _frame(vb_outer.center, vb_outer.semi - [cortical, cortical, 0], None))
    vb_outer_rows = _rows(grid, vb_outer)

    def vertebral_body(blk: _Block) -> None:
        outer = blk.quad(vb_outer_rows) <= 1.0
        np.copyto(blk.hu, _F32(spine["cortical_hu"]), where=outer)
        np.copyto(blk.hu, _F32(spine["cancellous_hu"]), where=blk.quad(vb_inner_rows) <= 1.0)
        # Discs at a regular period along z replace the bone of the vertebral body.
        disc = np.mod(blk.affine(z_row) - _F32(spine["disc_phase"]), _F32(spine["disc_period"])) < spine["disc_mm"]
        np.copyto(blk.hu, _F32(spine["disc_hu"]), where=outer & disc)

    add(vb_outer, vertebral_body)
    for frame, hu, shape in anat.vessels:
        solid(frame, hu, rod=shape == "rod")

    for k in anat.kidneys:
        add(k.outline, _kidney_paint(grid, k))
    for c in anat.cysts:
        sphere = _frame(c.center, (c.radius, c.radius, c.radius))
        rows = _rows(grid, sphere)

        def cyst(blk: _Block, rows: list[_Row] = rows, hu: float = c.hu) -> None:
            mask = blk.quad(rows) <= 1.0
            np.copyto(blk.hu, _F32(hu), where=mask)
            np.copyto(blk.lab, np.uint8(1), where=mask)

        add(sphere, cyst)
    for t in anat.tumors:
        add(t.frame, _tumor_paint(grid, t), 1.0 + t.lobe_amplitude)
    return ops


def _kidney_paint(grid: _Grid, k: _Kidney) -> _Paint:
    outline, medulla = _rows(grid, k.outline), _rows(grid, k.medulla)
    sinus, pelvis = _rows(grid, k.sinus), _rows(grid, k.pelvis)

    def paint(blk: _Block) -> None:
        kidney = blk.quad(outline) <= 1.0
        if not kidney.any():
            return
        np.copyto(blk.hu, _F32(k.cortex_hu), where=kidney)
        np.copyto(blk.lab, np.uint8(1), where=kidney)
        u = [blk.affine(row) for row in medulla]
        inner = u[0] * u[0] + u[1] * u[1] + u[2] * u[2] <= 1.0
        # Medullary pyramids: the inner region split by cortical columns at regular angles around the
        # long axis, which gives the corticomedullary-phase pattern of bright septa between dark pyramids.
        angle = np.arctan2(u[1], u[0])
        pyramids = inner & (np.cos(angle * _F32(k.n_pyramids) + _F32(k.pyramid_phase)) < 0.5)
        np.copyto(blk.hu, _F32(k.medulla_hu), where=pyramids)
        np.copyto(blk.hu, _F32(k.sinus_hu), where=kidney & (blk.quad(sinus) <= 1.0))
        np.copyto(blk.hu, _F32(k.pelvis_hu), where=kidney & (blk.quad(pelvis) <= 1.0))

    return paint


def _tumor_paint(grid: _Grid, t: _Tumor) -> _Paint:
    rows = _rows(grid, t.frame)
    waves = [(w @ grid.steps, float(w @ grid.origin) + ph) for w, ph in zip(t.waves, t.wave_phases, strict=True)]
    # Sum of K unit cosines with random phases has variance K / 2: scale it to a standard deviation of 1.
    norm = _F32(t.texture_hu * math.sqrt(2.0 / len(waves)))

    def paint(blk: _Block) -> None:
        u = [blk.affine(row) for row in rows]
        mask = _lobulated_inside(*u, t.lobe_dirs, t.lobe_weights, t.lobe_amplitude)
        if not mask.any():
            return
        texture = sum(np.cos(blk.affine(row)) for row in waves)
        value = _F32(t.mean_hu) + norm * texture
        if t.necrosis_scale > 0:
            s = _F32(1.0 / t.necrosis_scale)
            core = _lobulated_inside(*(x * s for x in u), t.lobe_dirs, t.lobe_weights, t.lobe_amplitude)
            value = np.where(core, _F32(t.necrosis_hu) + _F32(0.3) * norm * texture, value)
        np.copyto(blk.hu, value, where=mask)
        np.copyto(blk.lab, np.uint8(2), where=mask)

    return paint


def _slab(grid: _Grid) -> int:
    return max(1, _SLAB_VOXELS // int(grid.size[0] * grid.size[1]))


def _render(anat: _Anatomy, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    ops = _build_ops(anat, grid)
    n0, n1, n2 = (int(n) for n in grid.size)
    hu = np.empty((n2, n1, n0), _F32)
    lab = np.zeros((n2, n1, n0), np.uint8)
    step = _slab(grid)
    for k0 in range(0, n2, step):
        k1 = min(n2, k0 + step)
        hu[k0:k1] = _AIR_HU
        for lo, hi, paint in ops:
            a, b = max(int(lo[2]), k0), min(int(hi[2]), k1)
            if a < b:
                paint(_Block(hu, lab, (lo[0], lo[1], a), (hi[0], hi[1], b)))
    return hu, lab


def _blur_noise_round(hu: np.ndarray, grid: _Grid, noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, Gaussian noise, rounding and clipping to int16, a block of slices at a time.

    Each block is blurred with ``_BLUR_PAD`` extra slices of context on both sides, more than the
    kernel's radius, so the result is bit-identical to blurring the whole volume at once, without the
    two or three full-size float copies that DiscreteGaussian would hold for a whole volume.
    """
    variance = [float(v) for v in (_BLUR_SIGMA_VOXELS * grid.spacing) ** 2]
    spacing = [float(s) for s in grid.spacing]
    n2 = hu.shape[0]
    out = np.empty(hu.shape, np.int16)
    step = max(1, _BLUR_BLOCK_VOXELS // int(grid.size[0] * grid.size[1]))
    for k0 in range(0, n2, step):
        k1 = min(n2, k0 + step)
        a0, a1 = max(0, k0 - _BLUR_PAD), min(n2, k1 + _BLUR_PAD)
        block = sitk.GetImageFromArray(hu[a0:a1])
        block.SetSpacing(spacing)
        blurred = sitk.DiscreteGaussian(block, variance, 32, 0.01, True)
        x = np.array(sitk.GetArrayViewFromImage(blurred)[k0 - a0 : k1 - a0], dtype=_F32)
        del block, blurred
        if noise_hu > 0:
            x += rng.standard_normal(x.shape, dtype=_F32) * _F32(noise_hu)
        np.rint(x, out=x)
        np.clip(x, _HU_MIN, _HU_MAX, out=x)
        out[k0:k1] = x
    return out


# ----------------------------------------------------------------------------------------------------
# Public entry point


def make_phantom(
    seed: int = 0,
    *,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str = "LPS",
    n_tumors: int | None = None,
    noise_hu: float = 12.0,
) -> Phantom:
    """A synthetic contrast-enhanced abdominal CT with its kidney/tumor labels and ground truth.

    Args:
        seed: any non-negative integer; the same arguments always give bit-identical volumes.
        size: voxels along the patient's left-right, posterior-anterior and inferior-superior axes,
            i.e. the SimpleITK (x, y, z) size of the LPS image. For other orientations each index axis
            takes the size of the patient axis it runs along (with ``orientation="IPL"``,
            ``size=(512, 512, 200)`` gives a SimpleITK size of (200, 512, 512)), so one set of arguments
            covers the same physical box in every orientation. None: chosen from the seed to cover the
            body in-plane and 200-300 mm (at least the kidneys and tumors) in z.
        spacing: millimetres along the same patient axes; None: chosen from the seed (2.4-3.2 mm
            in-plane, 2.5-5 mm between slices).
        orientation: "LPS", "RAS", "IPL" (KiTS19's layout: index axes slices, rows, columns), "random" (a
            seeded axis permutation with flips) or "oblique" (LPS rotated 5-20 degrees about a seeded
            axis).
        n_tumors: 0 to 4; None: 0, 1 or 2 from the seed (about a third of the seeds have none).
        noise_hu: standard deviation of the added Gaussian noise (0: none).

    Returns:
        A ``Phantom``. ``info`` holds the arguments, the grid (``size``, ``spacing``, ``origin``,
        ``direction`` as SimpleITK reports them), and in LPS mm: ``body``, ``spine``, ``liver``,
        ``spleen``, ``kidneys`` (side, center, semi-axes, ``axes_lps`` rows such that the local
        coordinate m of a point p is axes_lps[m] . (p - center), medulla semi-axes, HU, volume),
        ``tumors`` (host kidney side, center, centroid, radius, semi-axes, axes, lobulation, exophytic,
        share outside the kidney, volume, HU), ``cysts``, and ``volumes_ml`` expected from the labels.
    """
    _check_arguments(seed, size, spacing, orientation, n_tumors, noise_hu)
    anat_rng, tumor_rng, grid_rng, orient_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(5)
    )
    anat = _make_anatomy(anat_rng)
    anat.tumors = _make_tumors(tumor_rng, anat, None if n_tumors is None else int(n_tumors))
    direction = _direction(orientation, orient_rng)
    grid = _make_grid(grid_rng, anat, size, spacing, direction)

    hu, lab = _render(anat, grid)
    labels = grid.apply(sitk.GetImageFromArray(lab))
    del lab  # each full-size array is dropped as soon as its copy exists: keeps the peak memory low
    hu16 = _blur_noise_round(hu, grid, float(noise_hu), noise_rng)
    del hu
    image = grid.apply(sitk.GetImageFromArray(hu16))
    del hu16
    return Phantom(image, labels, _info(seed, orientation, float(noise_hu), anat, grid))


def _check_arguments(seed: Any, size: Any, spacing: Any, orientation: Any, n_tumors: Any, noise_hu: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not is_int(seed) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    if size is not None:
        if not isinstance(size, Sequence | np.ndarray) or len(size) != 3 or not all(is_int(n) and n >= 1 for n in size):
            raise ValueError(f"size must be three positive integers (x, y, z), not {size!r}")
    if spacing is not None:
        ok = isinstance(spacing, Sequence | np.ndarray) and len(spacing) == 3
        if not ok or not all(isinstance(s, int | float | np.number) and math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be three positive finite numbers in mm, not {spacing!r}")
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(_ORIENTATIONS)}, not {orientation!r}")
    if n_tumors is not None and (not is_int(n_tumors) or not 0 <= int(n_tumors) <= _MAX_TUMORS):
        raise ValueError(f"n_tumors must be None or an integer from 0 to {_MAX_TUMORS}, not {n_tumors!r}")
    if not isinstance(noise_hu, int | float | np.number) or not math.isfinite(noise_hu) or noise_hu < 0:
        raise ValueError(f"noise_hu must be a finite number >= 0, not {noise_hu!r}")


def _floats(a: Any) -> list[float]:
    return [float(v) for v in np.ravel(a)]


def _frame_info(frame: _Frame) -> dict[str, Any]:
    return {
        "center_lps_mm": _floats(frame.center),
        "semi_axes_mm": [float(s) if math.isfinite(s) else None for s in frame.semi],
        "axes_lps": [_floats(e) for e in frame.axes],
    }


def _info(seed: int, orientation: str, noise_hu: float, anat: _Anatomy, grid: _Grid) -> dict[str, Any]:
    sides = [k.side for k in anat.kidneys]
    kidneys = []
    for k in anat.kidneys:
        kidneys.append(
            {
                "side": k.side,
                **_frame_info(k.outline),
                "volume_ml": k.volume_ml,
                "cortex_thickness_mm": float(k.cortex_thickness),
                "medulla_semi_axes_mm": _floats(k.medulla.semi),
                "cortex_hu": float(k.cortex_hu),
                "medulla_hu": float(k.medulla_hu),
                "sinus_fat_hu": float(k.sinus_hu),
                "hilum_lps_mm": _floats(k.hilum),
            }
        )
    tumors = []
    for t in anat.tumors:
        tumors.append(
            {
                "kidney": sides[t.kidney],
                **_frame_info(t.frame),
                "radius_mm": float(t.radius),
                "centroid_lps_mm": _floats(t.stats["centroid"]),
                "lobulation": {
                    "amplitude": float(t.lobe_amplitude),
                    "directions": [_floats(d) for d in t.lobe_dirs],
                    "weights": _floats(t.lobe_weights),
                },
                "exophytic": t.exophytic,
                "outside_kidney_fraction": t.stats["outside_kidney_fraction"],
                "volume_ml": t.stats["volume_ml"],
                "mean_hu": float(t.mean_hu),
                "texture_sd_hu": float(t.texture_hu),
                "necrosis_scale": float(t.necrosis_scale),
                "necrosis_hu": float(t.necrosis_hu) if t.necrosis_scale > 0 else None,
            }
        )
    cysts = [
        {
            "kidney": sides[c.kidney],
            "center_lps_mm": _floats(c.center),
            "radius_mm": float(c.radius),
            "hu": float(c.hu),
            "volume_ml": 4.0 / 3.0 * math.pi * c.radius**3 / 1000.0,
        }
        for c in anat.cysts
    ]
    tumor_ml = sum(t["volume_ml"] for t in tumors)
    # Tumors never overlap each other or the other kidney, and cysts are inside their kidney, so the
    # kidney label is the ellipsoids minus the tumor parts inside them.
    kidney_ml = sum(k.volume_ml for k in anat.kidneys) - sum(
        t["volume_ml"] * (1.0 - t["outside_kidney_fraction"]) for t in tumors
    )
    return {
        "seed": int(seed),
        "orientation": orientation,
        # The closest of the 48 axis-aligned codes ("LPS", "IPL", ...); for "oblique" only approximate.
        "orientation_code": sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(_floats(grid.direction)),
        "noise_hu": noise_hu,
        "size": [int(n) for n in grid.size],
        "spacing": _floats(grid.spacing),
        "origin": _floats(grid.origin),
        "direction": _floats(grid.direction),
        "body": {k: float(v) for k, v in anat.body.items()},
        "spine": {k: float(v) for k, v in anat.spine.items()},
        "liver": {"lobes": [_frame_info(f) for f in anat.liver], "hu": float(anat.liver_hu)},
        "spleen": {**_frame_info(anat.spleen), "hu": float(anat.spleen_hu)},
        "bowel_segments": len(anat.loops),
        "kidneys": kidneys,
        "tumors": tumors,
        "cysts": cysts,
        "volumes_ml": {"kidney": kidney_ml, "tumor": tumor_ml, "kidney_and_tumor": kidney_ml + tumor_ml},
    }
