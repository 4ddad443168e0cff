"""A small analytic demo scene, rendered exactly and written in nerfstudio's data format.

The scene is a handful of coloured solids (a plinth, two spheres, a cube and a column) inside a
sphere of radius :data:`SCENE_RADIUS` around the origin, world ``+Z`` up. Images are rendered by
exact ray-primitive intersection in numpy with Lambertian + ambient shading, hard shadows from one
directional light and a soft specular highlight, composited over a white background or, for unbounded
models (``--background textured``), inside a textured dome of radius :data:`DOME_RADIUS` (a real capture's
far background, in miniature).

The output directory looks like a scene produced by ``ns-process-data``::

    <output_dir>/
        transforms.json     # camera_model OPENCV, shared intrinsics, one frame per image,
                            # plus train_filenames / val_filenames / test_filenames
        scene.json          # the primitives, light and camera settings used (for reproducibility)
        images/train_000.png ... images/eval_000.png ...

so ``ns-train vqad --data <output_dir>`` (nerfstudio's default ``nerfstudio-data`` parser) trains on
it directly.

Train/eval split: nerfstudio 1.1.5's ``nerfstudio-data`` parser uses the ``{split}_filenames``
lists in ``transforms.json`` whenever they are present, *before* looking at ``eval_mode``; so with
the default ``eval_mode="fraction"`` (and with any other ``eval_mode``) training uses exactly the
``train_*`` images and evaluation (``val`` during ``ns-train``, ``test`` for ``ns-eval``) uses exactly
the ``eval_*`` images, which come from camera positions that are not in the training set. The file
names also contain ``train`` / ``eval``, so ``eval_mode="filename"`` would give the same split.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

SCENE_RADIUS = 0.6
"""Every solid of the demo scene lies inside this radius around the origin (world units)."""
CAMERAS = {"white": (2.6, 28.0), "textured": (1.4, 60.0)}
"""Default (camera_radius, fov_degrees) per background. Around an object on white, narrow views that frame it. Inside
the textured dome, wide views from nearer, as a capture walks around a subject: every part of the dome that an eval
view sees is seen by about 6 training views of 80 (with 28 degrees from 2.6, 13% of it by none and the rest by about
one, so its depth cannot be fitted and held-out views score ~15 dB while training views reach 28)."""

BACKGROUND = (1.0, 1.0, 1.0)
"""Background colour the images are composited over (white, nerfstudio's default for our model)."""

DOME_RADIUS = 20.0
"""Radius of the textured dome around the origin that ``background="textured"`` renders behind the solids."""

FORMAT_NAME = "vqad-demo-scene"
FORMAT_VERSION = 1

_EPS = 1e-6
_SHADOW_OFFSET = 1e-4
_RAYS_PER_CHUNK = 1 << 16

# Lighting (world space, +Z up): one directional light from above, on the +X/+Y side.
_LIGHT_DIR = np.array([0.45, 0.3, 1.0]) / np.linalg.norm([0.45, 0.3, 1.0])
_AMBIENT = 0.3
_DIFFUSE = 0.7
_SPECULAR = 0.25
_SHININESS = 32.0


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class DemoSceneConfig:
    """Settings of the demo scene generator. The solids themselves are fixed; these control the views."""

    resolution: int = 96
    """Width and height of every image in pixels (square images, at least 16)."""
    num_train: int = 60
    """Number of training views, spread evenly over a sphere around the scene (at least 1)."""
    num_eval: int = 10
    """Number of evaluation views, at camera positions distinct from the training ones (at least 1)."""
    seed: int = 0
    """Seed for the azimuthal turn of the train and eval camera sets; the same seed gives identical files."""
    camera_radius: Optional[float] = None
    """Distance of every camera from the origin (world units; the solids lie within 0.6 of the origin). None: 2.6,
    or 1.4 with the textured background (CAMERAS)."""
    fov_degrees: Optional[float] = None
    """Full field of view of the square pinhole camera in degrees. None: 28 (the scene fits the frame), or 60 with the
    textured background, as a phone sees (CAMERAS)."""
    supersample: int = 2
    """Anti-aliasing: each pixel averages supersample x supersample rays (1 disables it)."""
    background: Literal["white", "textured"] = "white"
    """What rays that miss the solids see: 'white' (an object scene: train with the default settings) or a
    'textured' dome far around them (an unbounded scene, which ns-train vqad finds in the images' borders)."""

    @property
    def radius(self) -> float:
        """``camera_radius``, or its default for the background."""
        return self._default_cameras[0] if self.camera_radius is None else self.camera_radius

    @property
    def field_of_view(self) -> float:
        """``fov_degrees``, or its default for the background."""
        return self._default_cameras[1] if self.fov_degrees is None else self.fov_degrees

    @property
    def _default_cameras(self) -> Tuple[float, float]:
        return CAMERAS["textured" if self.background == "textured" else "white"]

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line explanation if a setting is out of range.

        Called by :func:`write_demo_scene`; constructing a config does not validate it.
        """
        _require_int("resolution", self.resolution, minimum=16)
        _require_int("num_train", self.num_train, minimum=1)
        _require_int("num_eval", self.num_eval, minimum=1)
        _require_int("seed", self.seed, minimum=None)
        _require_int("supersample", self.supersample, minimum=1)
        if not _is_real(self.radius) or not self.radius > 1.5 * SCENE_RADIUS:
            raise ValueError(
                f"camera_radius must be a number greater than {1.5 * SCENE_RADIUS:g} (the solids reach "
                f"{SCENE_RADIUS:g} from the origin), got {self.radius!r}"
            )
        if not _is_real(self.field_of_view) or not 1.0 <= self.field_of_view <= 150.0:
            raise ValueError(f"fov_degrees must be a number between 1 and 150, got {self.field_of_view!r}")
        if self.background not in ("white", "textured"):
            raise ValueError(f"background must be 'white' or 'textured', got {self.background!r}")
        if self.background == "textured" and not self.radius < DOME_RADIUS / 2:
            raise ValueError(f"camera_radius must stay below {DOME_RADIUS / 2:g} inside the textured dome")

    @property
    def focal_length(self) -> float:
        """Focal length in pixels implied by ``fov_degrees`` and ``resolution``."""
        return 0.5 * self.resolution / math.tan(math.radians(self.field_of_view) / 2.0)

    def intrinsics(self) -> Dict[str, float]:
        """Pinhole intrinsics with the same keys as ``transforms.json`` (``fl_x, fl_y, cx, cy, w, h``)."""
        focal = self.focal_length
        return {
            "fl_x": focal,
            "fl_y": focal,
            "cx": self.resolution / 2.0,
            "cy": self.resolution / 2.0,
            "w": int(self.resolution),
            "h": int(self.resolution),
        }


def _is_real(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(value)


def _require_int(name: str, value: object, minimum: Union[int, None]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


# --------------------------------------------------------------------------------------------------
# Primitives: exact, vectorised ray intersection. Rays are (N, 3) origins and unit directions.
# Each ``intersect`` returns (t, normal) with t = inf where the ray misses (only t > _EPS counts).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sphere:
    """A sphere."""

    name: str
    color: Tuple[float, float, float]
    center: Tuple[float, float, float]
    radius: float

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        oc = origins - np.asarray(self.center)
        b = np.einsum("ij,ij->i", oc, dirs)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius**2
        disc = b * b - c
        hit = disc >= 0.0
        root = np.sqrt(np.where(hit, disc, 0.0))
        t_near = -b - root
        t_far = -b + root
        t = np.where(t_near > _EPS, t_near, np.where(t_far > _EPS, t_far, np.inf))
        t = np.where(hit, t, np.inf)
        points = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
        normals = (points - np.asarray(self.center)) / self.radius
        return t, normals

    def bounding_sphere(self) -> Tuple[np.ndarray, float]:
        return np.asarray(self.center, dtype=np.float64), float(self.radius)

    def bounding_radius(self) -> float:
        return float(np.linalg.norm(self.center) + self.radius)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box."""

    name: str
    color: Tuple[float, float, float]
    minimum: Tuple[float, float, float]
    maximum: Tuple[float, float, float]

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        safe = np.where(np.abs(dirs) < 1e-12, np.where(dirs < 0, -1e-12, 1e-12), dirs)
        inv = 1.0 / safe
        t1 = (np.asarray(self.minimum) - origins) * inv
        t2 = (np.asarray(self.maximum) - origins) * inv
        t_lo = np.minimum(t1, t2)
        t_hi = np.maximum(t1, t2)
        t_enter = t_lo.max(axis=1)
        t_exit = t_hi.min(axis=1)
        hit = (t_exit >= t_enter) & (t_exit > _EPS)
        entering = t_enter > _EPS
        t = np.where(hit, np.where(entering, t_enter, t_exit), np.inf)
        # The normal is along the axis of the slab that was crossed last (entering) or first (exiting).
        axis = np.where(entering, t_lo.argmax(axis=1), t_hi.argmin(axis=1))
        rows = np.arange(len(origins))
        normals = np.zeros_like(origins)
        sign = -np.sign(safe[rows, axis])
        normals[rows, axis] = np.where(entering, sign, -sign)
        return t, normals

    def bounding_sphere(self) -> Tuple[np.ndarray, float]:
        lo, hi = np.asarray(self.minimum, dtype=np.float64), np.asarray(self.maximum, dtype=np.float64)
        return (lo + hi) / 2.0, float(np.linalg.norm(hi - lo) / 2.0)

    def bounding_radius(self) -> float:
        corners = np.array(np.meshgrid(*zip(self.minimum, self.maximum))).reshape(3, -1).T
        return float(np.linalg.norm(corners, axis=1).max())


@dataclass(frozen=True)
class Cylinder:
    """A closed (capped) cylinder with a vertical (+Z) axis."""

    name: str
    color: Tuple[float, float, float]
    center_xy: Tuple[float, float]
    radius: float
    z_min: float
    z_max: float

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        cx, cy = self.center_xy
        ox = origins[:, 0] - cx
        oy = origins[:, 1] - cy
        dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
        oz = origins[:, 2]
        candidates = []
        # Side wall: |(o + t d)_xy - c|^2 = r^2.
        a = dx * dx + dy * dy
        a_safe = np.where(a > 1e-12, a, 1.0)
        b = ox * dx + oy * dy
        c = ox * ox + oy * oy - self.radius**2
        disc = b * b - a * c
        side_ok = (a > 1e-12) & (disc >= 0.0)
        root = np.sqrt(np.where(side_ok, disc, 0.0))
        for t_side in ((-b - root) / a_safe, (-b + root) / a_safe):
            z = oz + t_side * dz
            valid = side_ok & (t_side > _EPS) & (z >= self.z_min) & (z <= self.z_max)
            candidates.append(np.where(valid, t_side, np.inf))
        # Caps: planes z = z_min and z = z_max, inside the disc.
        dz_safe = np.where(np.abs(dz) > 1e-12, dz, 1e-12)
        for z_cap in (self.z_min, self.z_max):
            t_cap = (z_cap - oz) / dz_safe
            px = ox + t_cap * dx
            py = oy + t_cap * dy
            valid = (np.abs(dz) > 1e-12) & (t_cap > _EPS) & (px * px + py * py <= self.radius**2)
            candidates.append(np.where(valid, t_cap, np.inf))
        stacked = np.stack(candidates, axis=1)
        which = stacked.argmin(axis=1)
        t = stacked[np.arange(len(origins)), which]
        t_finite = np.where(np.isfinite(t), t, 0.0)
        side_normals = np.stack(
            [(ox + t_finite * dx) / self.radius, (oy + t_finite * dy) / self.radius, np.zeros_like(ox)],
            axis=1,
        )
        cap_normals = np.zeros_like(origins)
        cap_normals[:, 2] = np.where(which == 2, -1.0, 1.0)
        normals = np.where((which < 2)[:, None], side_normals, cap_normals)
        return t, normals

    def bounding_sphere(self) -> Tuple[np.ndarray, float]:
        center = np.array([self.center_xy[0], self.center_xy[1], (self.z_min + self.z_max) / 2.0])
        return center, float(math.hypot(self.radius, (self.z_max - self.z_min) / 2.0))

    def bounding_radius(self) -> float:
        horizontal = math.hypot(*self.center_xy) + self.radius
        return float(math.hypot(horizontal, max(abs(self.z_min), abs(self.z_max))))


Primitive = Union[Sphere, Box, Cylinder]

#: The solids of the demo scene: a slate plinth carrying a red ball, a yellow cube and a green column
#: topped by a blue ball. Nothing overlaps, everything lies within SCENE_RADIUS of the origin and the
#: arrangement is asymmetric, so orientation errors are easy to spot.
PRIMITIVES: Tuple[Primitive, ...] = (
    Box("plinth", (0.50, 0.56, 0.68), (-0.30, -0.30, -0.40), (0.30, 0.30, -0.30)),
    Sphere("red_ball", (0.85, 0.18, 0.15), (-0.14, -0.12, -0.12), 0.18),
    Box("yellow_cube", (0.95, 0.78, 0.15), (-0.22, 0.10, -0.30), (-0.02, 0.30, -0.10)),
    Cylinder("green_column", (0.20, 0.70, 0.30), (0.15, 0.10), 0.10, -0.30, 0.25),
    Sphere("blue_ball", (0.20, 0.35, 0.90), (0.15, 0.10, 0.33), 0.08),
)


def _primitive_to_json(primitive: Primitive) -> Dict[str, object]:
    kind = {Sphere: "sphere", Box: "axis_aligned_box", Cylinder: "capped_cylinder_z"}[type(primitive)]
    return {"type": kind, **asdict(primitive)}


def scene_description(config: DemoSceneConfig) -> Dict[str, object]:
    """Everything needed to reproduce the scene (the contents of ``scene.json``)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "world_up": [0.0, 0.0, 1.0],
        "scene_radius": SCENE_RADIUS,
        "background": list(BACKGROUND) if config.background == "white" else {"dome_radius": DOME_RADIUS},
        "primitives": [_primitive_to_json(p) for p in PRIMITIVES],
        "shading": {
            "model": "ambient + lambert * shadow + blinn_phong_specular * shadow",
            "light_direction": [float(x) for x in _LIGHT_DIR],
            "ambient": _AMBIENT,
            "diffuse": _DIFFUSE,
            "specular": _SPECULAR,
            "shininess": _SHININESS,
        },
        "generator": {**asdict(config), "camera_radius": config.radius, "fov_degrees": config.field_of_view},
    }


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _closest_hit(origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit over all primitives: (t, normal, primitive index); t = inf and index = -1 on a miss."""
    t_best = np.full(len(origins), np.inf)
    n_best = np.zeros_like(origins)
    idx_best = np.full(len(origins), -1, dtype=np.int64)
    for index, primitive in enumerate(PRIMITIVES):
        # Exact intersection only for the rays that reach the primitive's bounding sphere.
        center, radius = primitive.bounding_sphere()
        rows = np.flatnonzero(_reaches_sphere(origins, dirs, center, radius))
        if len(rows) == 0:
            continue
        t, normals = primitive.intersect(origins[rows], dirs[rows])
        closer = t < t_best[rows]
        rows, t, normals = rows[closer], t[closer], normals[closer]
        t_best[rows] = t
        n_best[rows] = normals
        idx_best[rows] = index
    return t_best, n_best, idx_best


def _reaches_sphere(origins: np.ndarray, dirs: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Whether each ray (unit direction) meets the sphere somewhere ahead of its origin (conservative)."""
    oc = origins - center
    b = np.einsum("ij,ij->i", oc, dirs)
    c = np.einsum("ij,ij->i", oc, oc) - (radius + 1e-6) ** 2
    return (b * b - c >= 0.0) & ((b < 0.0) | (c < 0.0))


def _dome_colours(origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Colour where each ray (starting inside it) meets the textured dome: soft bands of hue over azimuth and
    elevation, with a brighter sky above the horizon, so that the background has detail at every distance."""
    b = np.einsum("ij,ij->i", origins, dirs)
    c = np.einsum("ij,ij->i", origins, origins) - DOME_RADIUS**2
    points = origins + (-b + np.sqrt(b * b - c))[:, None] * dirs
    azimuth = np.arctan2(points[:, 1], points[:, 0])
    elevation = np.arcsin(np.clip(points[:, 2] / DOME_RADIUS, -1.0, 1.0))
    phase = np.stack([azimuth * 3.0, azimuth * 5.0 + elevation * 4.0, elevation * 7.0], axis=-1)
    sky = 0.55 + 0.25 * np.tanh(4.0 * elevation)[:, None]
    return np.clip(sky + 0.2 * np.sin(phase + np.array([0.0, 2.1, 4.2])), 0.0, 1.0)


def _shade_rays(origins: np.ndarray, dirs: np.ndarray, background: str = "white") -> np.ndarray:
    """Colour of each ray, (N, 3) in [0, 1], composited over the background (white or the textured dome)."""
    if background == "textured":
        colors = _dome_colours(origins, dirs)
    else:
        colors = np.broadcast_to(np.asarray(BACKGROUND), origins.shape).copy()
    # Rays that miss the sphere enclosing every solid see the background (cheap early out).
    near_scene = np.flatnonzero(_reaches_sphere(origins, dirs, np.zeros(3), SCENE_RADIUS))
    if len(near_scene) == 0:
        return colors
    t, normals, index = _closest_hit(origins[near_scene], dirs[near_scene])
    hit = index >= 0
    if not hit.any():
        return colors
    hit_rows = near_scene[hit]
    o, d, n, idx = origins[hit_rows], dirs[hit_rows], normals[hit], index[hit]
    points = o + t[hit][:, None] * d
    # Shadow rays towards the (directional) light.
    shadow_origins = points + _SHADOW_OFFSET * n
    shadow_dirs = np.broadcast_to(_LIGHT_DIR, shadow_origins.shape)
    t_shadow, _, _ = _closest_hit(shadow_origins, np.ascontiguousarray(shadow_dirs))
    lit = np.isinf(t_shadow).astype(np.float64)
    n_dot_l = np.clip(n @ _LIGHT_DIR, 0.0, None)
    half = _LIGHT_DIR[None, :] - d
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    n_dot_h = np.clip(np.einsum("ij,ij->i", n, half), 0.0, None)
    specular = _SPECULAR * lit * np.where(n_dot_l > 0.0, n_dot_h**_SHININESS, 0.0)
    albedo = np.array([p.color for p in PRIMITIVES])[idx]
    shaded = albedo * (_AMBIENT + _DIFFUSE * lit * n_dot_l)[:, None] + specular[:, None]
    colors[hit_rows] = np.clip(shaded, 0.0, 1.0)
    return colors


def render_demo_view(
    camera_to_world: np.ndarray,
    fl_x: float,
    fl_y: float,
    cx: float,
    cy: float,
    w: int,
    h: int,
    supersample: int = 2,
    background: str = "white",
) -> np.ndarray:
    """Render the demo scene from an arbitrary pinhole camera.

    Args:
        camera_to_world: 3x4 or 4x4 camera-to-world matrix in nerfstudio/OpenGL convention (the camera
            looks down its -Z axis, +Y is up in the image, +X to the right).
        fl_x, fl_y, cx, cy, w, h: pinhole intrinsics in pixels, as in ``transforms.json``. Pixel
            ``(row, col)`` is centred at image coordinates ``(col + 0.5, row + 0.5)``, as in nerfstudio.
        supersample: each pixel averages ``supersample**2`` rays on a regular sub-pixel grid.
        background: ``"white"`` or ``"textured"`` (see :attr:`DemoSceneConfig.background`).

    Returns:
        ``(h, w, 3)`` float64 RGB image in [0, 1], composited over the background.
    """
    c2w = np.asarray(camera_to_world, dtype=np.float64)
    if c2w.shape not in ((3, 4), (4, 4)):
        raise ValueError(f"camera_to_world must be 3x4 or 4x4, got shape {c2w.shape}")
    w, h, supersample = int(w), int(h), int(supersample)
    if w < 1 or h < 1 or supersample < 1:
        raise ValueError(f"w, h and supersample must be positive, got w={w} h={h} supersample={supersample}")
    rotation, origin = c2w[:3, :3], c2w[:3, 3]

    sub = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(w)[:, None] + sub[None, :]).reshape(-1)  # w * s sample columns
    image = np.empty((h, w, 3))
    rows_per_chunk = max(1, _RAYS_PER_CHUNK // (w * supersample * supersample))
    for row0 in range(0, h, rows_per_chunk):
        rows = np.arange(row0, min(h, row0 + rows_per_chunk))
        ys = (rows[:, None] + sub[None, :]).reshape(-1)  # rows * s sample rows
        grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
        cam_dirs = np.stack([(grid_x - cx) / fl_x, -(grid_y - cy) / fl_y, -np.ones_like(grid_x)], axis=-1).reshape(
            -1, 3
        )
        dirs = cam_dirs @ rotation.T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        origins = np.broadcast_to(origin, dirs.shape).copy()
        colors = _shade_rays(origins, dirs, background)
        colors = colors.reshape(len(rows), supersample, w, supersample, 3).mean(axis=(1, 3))
        image[rows] = colors
    return image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Quantise a float image in [0, 1] to 8 bits exactly as the written PNG files are."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------------


def look_at(position: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 camera-to-world matrix (OpenGL/nerfstudio convention) at ``position`` looking at ``target``.

    World ``+Z`` is up, so image up is the projection of ``+Z``.
    """
    position = np.asarray(position, dtype=np.float64)
    back = position - np.asarray(target, dtype=np.float64)
    back /= np.linalg.norm(back)
    world_up = np.array([0.0, 0.0, 1.0])
    right = np.cross(world_up, back)
    if np.linalg.norm(right) < 1e-6:  # looking straight up or down: any horizontal right vector works
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def _fibonacci_sphere(n: int, azimuth_offset: float) -> np.ndarray:
    """``n`` nearly evenly spread unit vectors covering the whole sphere (never exactly at a pole)."""
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = i * math.pi * (3.0 - math.sqrt(5.0)) + azimuth_offset
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def demo_camera_poses(config: DemoSceneConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Camera-to-world matrices ``(train (num_train, 4, 4), eval (num_eval, 4, 4))``.

    Both sets are Fibonacci spirals over the full sphere of radius ``camera_radius`` (so their mean is
    close to the origin, which nerfstudio's default ``center_method="poses"`` relies on), each turned by
    its own seeded azimuth. Eval positions are kept at least ~1 degree away from every train position.
    """
    rng = np.random.default_rng(config.seed)
    train_offset, eval_offset = rng.uniform(0.0, 2.0 * math.pi, size=2)
    train_dirs = _fibonacci_sphere(config.num_train, train_offset)
    eval_dirs = _fibonacci_sphere(config.num_eval, eval_offset)
    for _ in range(100):
        closest = (eval_dirs @ train_dirs.T).max()
        if closest < math.cos(math.radians(1.0)):
            break
        eval_offset += math.radians(7.0)
        eval_dirs = _fibonacci_sphere(config.num_eval, eval_offset)
    train = np.stack([look_at(config.radius * d) for d in train_dirs])
    evals = np.stack([look_at(config.radius * d) for d in eval_dirs])
    return train, evals


# --------------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------------

_OWN_FILES = ("transforms.json", "scene.json")
_OWN_IMAGE_PREFIXES = ("train_", "eval_")


def _image_names(prefix: str, count: int) -> List[str]:
    digits = max(3, len(str(count - 1)))
    return [f"images/{prefix}_{i:0{digits}d}.png" for i in range(count)]


def _remove_previous_output(output_dir: Path) -> None:
    """Delete files an earlier run of this generator wrote (and nothing else)."""
    for name in _OWN_FILES:
        path = output_dir / name
        if path.is_file():
            path.unlink()
    images = output_dir / "images"
    if images.is_dir():
        for path in images.iterdir():
            if path.is_file() and path.suffix == ".png" and path.name.startswith(_OWN_IMAGE_PREFIXES):
                path.unlink()


def write_demo_scene(
    output_dir: Union[str, Path],
    config: Union[DemoSceneConfig, None] = None,
    overwrite: bool = False,
    *,
    show_progress: bool = True,
) -> Path:
    """Render the demo scene and write it to ``output_dir`` in nerfstudio's data format.

    Args:
        output_dir: directory to create (parents too). It must not exist or be empty unless
            ``overwrite`` is set.
        config: generator settings (defaults: :class:`DemoSceneConfig()`).
        overwrite: allow writing into a non-empty directory. Files from a previous demo scene
            (``transforms.json``, ``scene.json``, ``images/train_*.png``, ``images/eval_*.png``) are
            replaced; other files are left alone.
        show_progress: show a progress bar while rendering.

    Returns:
        The output directory, ready for ``ns-train vqad --data <output_dir>``.

    Raises:
        FileExistsError: ``output_dir`` is non-empty (and ``overwrite`` is false) or is a file.
        ValueError: a setting in ``config`` is out of range.
    """
    config = DemoSceneConfig() if config is None else config
    config.validate()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output path {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {output_dir} already exists and is not empty; "
                "choose another directory or pass overwrite=True (--overwrite) "
                "to replace the demo scene in it"
            )
        _remove_previous_output(output_dir)
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    train_poses, eval_poses = demo_camera_poses(config)
    train_names = _image_names("train", config.num_train)
    eval_names = _image_names("eval", config.num_eval)
    intrinsics = config.intrinsics()
    views = list(zip(train_names + eval_names, list(train_poses) + list(eval_poses)))

    from PIL import Image
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    frames = []
    with Progress(
        TextColumn("[bold]Rendering demo scene"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("render", total=len(views))
        for name, c2w in views:
            image = render_demo_view(c2w, supersample=config.supersample, background=config.background, **intrinsics)
            Image.fromarray(to_uint8(image)).save(output_dir / name)
            frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
            progress.advance(task)

    transforms = {
        "camera_model": "OPENCV",
        **intrinsics,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": frames,
        "train_filenames": train_names,
        "val_filenames": eval_names,
        "test_filenames": eval_names,
    }
    (output_dir / "transforms.json").write_text(json.dumps(transforms, indent=2) + "\n", encoding="utf-8")
    (output_dir / "scene.json").write_text(json.dumps(scene_description(config), indent=2) + "\n", encoding="utf-8")
    return output_dir
