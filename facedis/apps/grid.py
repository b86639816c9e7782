"""Grids of rendered faces and the figure primitives they need (Agg only, headless).

- ``face_grid(cells, triangles, ...)``: a grid of faces sharing one view and one framing, with
  optional row/column labels, a title and a colour bar in mm.
- ``new_figure``, ``save_figure``, ``add_colorbar``: small matplotlib helpers.

Shared by ``figures``, ``interpolate`` and ``transfer``. This module imports only
``facedis.apps.render`` from the package, so the applications import it without a cycle.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from facedis.apps.render import draw_mesh, mesh_bounds, view_rotation

HEAT_CMAP = "jet"
"""Colour map of the per-vertex error heat-maps."""


def new_figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=fig.dpi, facecolor="white")
    return path


def add_colorbar(fig: Figure, rect, vmax: float, label: str = "per-vertex error (mm)", cmap: str = HEAT_CMAP,
                 orientation: str = "vertical"):
    cax = fig.add_axes(rect)
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, vmax), cmap=cmap), cax=cax, orientation=orientation, label=label)
    return cax


def face_grid(cells: Sequence[Sequence[Optional[dict]]], triangles, path=None, cell_in: float = 1.7,
              row_labels: Optional[Sequence[str]] = None, col_labels: Optional[Sequence[str]] = None,
              suptitle: Optional[str] = None, vmax: Optional[float] = None, R=None):
    """Draw a grid of faces. ``cells[r][c]`` is None (empty) or a dict with ``vertices`` and
    optional ``colors``, ``title``. All faces share one view rotation and one framing. A colour bar
    (mm) is added when ``vmax`` is given. Saves to ``path`` if given; returns the Figure."""
    nr, nc = len(cells), max(len(r) for r in cells)
    allv = [c["vertices"] for r in cells for c in r if c is not None]
    R = view_rotation(np.mean(np.stack([np.asarray(v, np.float64) for v in allv]), axis=0)) if R is None else R
    bounds = mesh_bounds(allv, R=R)
    gap = 0.28  # below each face, for its title
    left = 1.0 if row_labels else 0.1
    right = 0.9 if vmax is not None else 0.1
    W = left + nc * cell_in + right
    lines = textwrap.wrap(suptitle, width=max(20, int(W * 14))) if suptitle else []
    head = 0.12 + 0.2 * len(lines)
    top = head + (0.35 if col_labels else 0.05)
    H = top + nr * (cell_in + gap) + 0.05
    fig = new_figure(W, H)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            x0 = (left + c * cell_in) / W
            y0 = 1.0 - (top + r * (cell_in + gap) + cell_in) / H
            ax = fig.add_axes((x0, y0, cell_in / W, cell_in / H))
            ax.set_axis_off()
            if cell is None:
                continue
            draw_mesh(ax, cell["vertices"], triangles, colors=cell.get("colors"), bounds=bounds, R=R)
            if cell.get("title"):
                ax.text(0.5, -0.03, cell["title"], transform=ax.transAxes, ha="center", va="top", fontsize=7)
    if row_labels:
        for r, lab in enumerate(row_labels):
            y = 1.0 - (top + r * (cell_in + gap) + cell_in / 2) / H
            fig.text(0.08 / W, y, lab, ha="left", va="center", fontsize=8)
    if col_labels:
        for c, lab in enumerate(col_labels):
            fig.text((left + (c + 0.5) * cell_in) / W, 1.0 - (head + 0.18) / H, lab, ha="center", va="center",
                     fontsize=8)
    for k, line in enumerate(lines):
        fig.text(0.5, 1.0 - (0.14 + 0.2 * k) / H, line, ha="center", va="top", fontsize=9)
    if vmax is not None:
        y0, h = (0.05 + gap) / H, (nr * (cell_in + gap) - gap) / H
        add_colorbar(fig, ((W - right + 0.15) / W, y0 + 0.1 * h, 0.15 / W, 0.8 * h), vmax, label="per-vertex error (mm)")
    if path is not None:
        save_figure(fig, path)
    return fig
