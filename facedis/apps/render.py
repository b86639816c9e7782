"""A small headless mesh renderer: numpy + matplotlib (Agg), no display, no OpenGL, no psbody.

Orthographic frontal view (y up, the face looking towards +z; a face looking towards −z is
detected and turned round), painter's algorithm (triangles drawn far to near), flat two-sided
Lambert shading. Good enough for readable figures of registered face meshes of a few thousand
vertices; it is not a general renderer (no z-buffer, so interpenetrating triangles can be
drawn in the wrong order).

- ``draw_mesh(ax, vertices, triangles, ...)``: draw into a matplotlib ``Axes`` (for composite
  figures with titles and colour bars).
- ``render_mesh(vertices, triangles, ...) -> (H, W, 3) uint8``: one image.
- ``view_rotation(vertices, yaw)``: the rotation the renderer applies (frontalisation + yaw).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

FACE_GREY = (0.78, 0.78, 0.80)
LIGHT_DIR = (0.35, 0.45, 1.0)


def _as_np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _rot_y(deg: float) -> np.ndarray:
    r = np.deg2rad(deg)
    c, s = np.cos(r), np.sin(r)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def faces_minus_z(vertices: np.ndarray) -> bool:
    """Heuristic: True if the face looks towards −z. The central region (nose) of a face mesh
    protrudes towards the viewer, so its depth is larger than the depth of the rim."""
    v = np.asarray(vertices, dtype=np.float64)
    xy = v[:, :2] - np.median(v[:, :2], axis=0)
    r = np.linalg.norm(xy / (np.abs(xy).max(axis=0) + 1e-12), axis=1)
    centre, rim = r <= np.quantile(r, 0.15), r >= np.quantile(r, 0.85)
    if not centre.any() or not rim.any():
        return False
    return float(np.median(v[centre, 2])) < float(np.median(v[rim, 2]))


def view_rotation(vertices, yaw: float = 0.0, frontalise: bool = True) -> np.ndarray:
    """The (3, 3) rotation applied before projecting onto (x, y): turn a −z-facing face round
    (if ``frontalise``), then rotate by ``yaw`` degrees about the vertical axis."""
    R = np.eye(3)
    if frontalise and faces_minus_z(_as_np(vertices)):
        R = _rot_y(180.0)
    return _rot_y(yaw) @ R


def mesh_bounds(vertex_sets: Sequence[np.ndarray], margin: float = 0.04, R: Optional[np.ndarray] = None):
    """Common (xmin, xmax, ymin, ymax) over several meshes after rotation R, with a margin, so that
    panels of a figure share one scale."""
    R = np.eye(3) if R is None else R
    pts = np.concatenate([np.asarray(_as_np(v), dtype=np.float64).reshape(-1, 3) @ R.T for v in vertex_sets])
    lo, hi = pts[:, :2].min(axis=0), pts[:, :2].max(axis=0)
    pad = margin * float((hi - lo).max())
    return (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)


def shade_faces(vertices: np.ndarray, triangles: np.ndarray, colors=None, ambient: float = 0.3,
                light=LIGHT_DIR, R: Optional[np.ndarray] = None):
    """Per-triangle RGB colours with flat two-sided Lambert shading, the projected 2-D polygons
    and their depths (in view space).

    colors: None (grey), one RGB, per-vertex (V, 3|4) or per-face (F, 3|4) in [0, 1].
    Returns polys (F, 3, 2), rgb (F, 3), depth (F,).
    """
    v = np.asarray(vertices, dtype=np.float64)
    t = np.asarray(triangles, dtype=np.int64)
    if R is not None:
        v = v @ np.asarray(R, dtype=np.float64).T
    tri = v[t]  # (F, 3, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-20)
    l = np.asarray(light, dtype=np.float64)
    l = l / np.linalg.norm(l)
    intensity = ambient + (1.0 - ambient) * np.abs(n @ l)  # two-sided: winding does not matter
    if colors is None:
        base = np.broadcast_to(np.asarray(FACE_GREY), (len(t), 3))
    else:
        c = np.asarray(colors, dtype=np.float64)
        if c.ndim == 1:
            base = np.broadcast_to(c[:3], (len(t), 3))
        elif c.shape[0] == len(v) and c.shape[0] != len(t):
            base = c[t, :3].mean(axis=1)
        elif c.shape[0] == len(t):
            base = c[:, :3]
        else:
            raise ValueError(f"colors has {c.shape[0]} rows; expected {len(v)} vertices or {len(t)} triangles")
    rgb = np.clip(base * intensity[:, None], 0.0, 1.0)
    return tri[:, :, :2], rgb, tri[:, :, 2].mean(axis=1)


def draw_mesh(ax, vertices, triangles, colors=None, yaw: float = 0.0, bounds=None, frontalise: bool = True,
              ambient: float = 0.3, R: Optional[np.ndarray] = None):
    """Draw a mesh into a matplotlib Axes (painter's algorithm, far triangles first).

    R overrides the view rotation (use the same R for every panel of a figure so the faces are
    seen from the same side). bounds (xmin, xmax, ymin, ymax) fixes the framing. Returns R.
    """
    v = np.asarray(_as_np(vertices), dtype=np.float64)
    if R is None:
        R = view_rotation(v, yaw, frontalise)
    polys, rgb, depth = shade_faces(v, _as_np(triangles), _as_np(colors) if colors is not None else None,
                                    ambient=ambient, R=R)
    order = np.argsort(depth, kind="stable")  # far (small z) first; the viewer sits at +z
    pc = PolyCollection(polys[order], facecolors=rgb[order], edgecolors=rgb[order], linewidths=0.3,
                        antialiased=True)
    ax.add_collection(pc)
    if bounds is None:
        bounds = mesh_bounds([v], R=R)
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal")
    ax.set_axis_off()
    return R


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a matplotlib Figure with the Agg canvas -> (H, W, 3) uint8."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_mesh(vertices, triangles, colors=None, size: int = 256, yaw: float = 0.0, bounds=None,
                background=(1.0, 1.0, 1.0), frontalise: bool = True, R: Optional[np.ndarray] = None) -> np.ndarray:
    """Render one mesh to an (size, size, 3) uint8 image (frontal view unless ``yaw``)."""
    fig = Figure(figsize=(size / 100.0, size / 100.0), dpi=100, facecolor=background)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_facecolor(background)
    draw_mesh(ax, vertices, triangles, colors=colors, yaw=yaw, bounds=bounds, frontalise=frontalise, R=R)
    return figure_to_array(fig)
