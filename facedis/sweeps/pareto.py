"""Pareto front of (E_dis, E_rec), the scalarised pick, and the front plot. Pure functions.

Both objectives are minimised. A point *dominates* another when it is no worse in both objectives
and strictly better in at least one; the front is the set of points no other point dominates.
Exact duplicates do not dominate each other, so both stay on the front. Rows with a missing or
non-finite value are never on the front.

Scalarised choice (``method="median"``, the default): among the front, minimise

    score = E_dis / median(E_dis) + E_rec / median(E_rec)

with the medians taken over *all* eligible points (not just the front), so a 10 % gain in either
error is worth the same and the units (mm) cancel. ``method="rank"``: minimise
``w·rank(E_dis) + (1 − w)·rank(E_rec)`` (ranks over all eligible points, 1 = best; ``w`` =
``weight``, default 0.5), ties broken by the median score. The median score accepts ``weight``
too: ``2·(w·E_dis/med + (1 − w)·E_rec/med)``.

Hypervolume (:func:`hypervolume`): the area of the part of the plane that the points dominate and
that is itself dominated by a fixed reference point ``r`` (both objectives minimised), i.e. the area
of the union of the boxes ``[a, r_a] × [b, r_b]``. Larger is better; points outside the reference
box add nothing. Comparable between sweeps only with the same reference point.
"""

from __future__ import annotations

import math
from typing import Sequence


def _finite(p) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)


def dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    """``p`` dominates ``q`` (both minimised): no worse in every objective, strictly better in one.
    A point with a missing or non-finite value dominates nothing; a finite point dominates it."""
    if not _finite(p):
        return False
    if not _finite(q):
        return True
    return all(a <= b for a, b in zip(p, q)) and any(a < b for a, b in zip(p, q))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices (ascending) of the non-dominated points of ``points`` (each ``(a, b)``, minimised)."""
    pts = [tuple(float(v) for v in p) if _finite(p) else None for p in points]
    front = []
    for i, p in enumerate(pts):
        if p is None:
            continue
        dominated = any(
            q is not None and j != i and all(qa <= pa for qa, pa in zip(q, p)) and any(qa < pa for qa, pa in zip(q, p))
            for j, q in enumerate(pts)
        )
        if not dominated:
            front.append(i)
    return front


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Area dominated by ``points`` (each ``(a, b)``, minimised) inside the box bounded by ``reference``.

    Points with a missing value, and points not strictly better than ``reference`` in both
    objectives, add nothing. Exact: a sweep over the front sorted by the first objective.
    """
    ra, rb = (float(v) for v in reference)
    if not (math.isfinite(ra) and math.isfinite(rb)):
        raise ValueError(f"hypervolume reference point must be finite, got {tuple(reference)}")
    inside = [(float(a), float(b)) for a, b in (p for p in points if _finite(p)) if a < ra and b < rb]
    front = sorted({inside[i] for i in pareto_front(inside)})  # ascending a, hence descending b
    area, prev_b = 0.0, rb
    for a, b in front:
        area += (ra - a) * (prev_b - b)
        prev_b = b
    return area


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    m = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    return m if m > 0 else (max(xs) or 1.0)


def _ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties get the mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def scores(points: Sequence[Sequence[float]], method: str = "median", weight: float = 0.5) -> list[float]:
    """Scalar score per point (lower is better; ``nan`` for points with missing values)."""
    if method not in ("median", "rank"):
        raise ValueError(f"unknown selection method {method!r}; choose 'median' or 'rank'")
    ok = [i for i, p in enumerate(points) if _finite(p)]
    out = [math.nan] * len(points)
    if not ok:
        return out
    a = [float(points[i][0]) for i in ok]
    b = [float(points[i][1]) for i in ok]
    ma, mb = _median(a), _median(b)
    med = [2 * (weight * x / ma + (1 - weight) * y / mb) for x, y in zip(a, b)]
    if method == "median":
        vals = med
    else:
        ra, rb = _ranks(a), _ranks(b)
        # rank score first; the median score (< 1e-6 of a rank step) breaks ties
        vals = [weight * x + (1 - weight) * y + 1e-9 * m for x, y, m in zip(ra, rb, med)]
    for i, v in zip(ok, vals):
        out[i] = v
    return out


def select(points: Sequence[Sequence[float]], k: int = 1, method: str = "median", weight: float = 0.5) -> list[int]:
    """Indices of the ``k`` best front points by :func:`scores` (best first); fewer if the front is smaller."""
    front = pareto_front(points)
    s = scores(points, method, weight)
    return sorted(front, key=lambda i: (s[i], i))[:k]


def plot_front(points, labels, front, chosen, path, xlabel="E_rec_mean (mm)", ylabel="E_dis_ref_mean (mm)",
               title="", dimmed=()) -> None:
    """Scatter of every point (``dimmed`` ones hollow), the front as a step line, the chosen ones starred.

    ``points`` are ``(E_dis, E_rec)``; the plot puts E_rec on x and E_dis on y.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ok = [i for i, p in enumerate(points) if _finite(p)]
    dim = set(dimmed)
    solid = [i for i in ok if i not in dim]
    hollow = [i for i in ok if i in dim]
    if solid:
        ax.scatter([points[i][1] for i in solid], [points[i][0] for i in solid], c="0.5", s=18, label="trials")
    if hollow:
        ax.scatter([points[i][1] for i in hollow], [points[i][0] for i in hollow], facecolors="none",
                   edgecolors="0.6", s=18, label="stopped early")
    if front:
        f = sorted(front, key=lambda i: points[i][1])
        ax.step([points[i][1] for i in f], [points[i][0] for i in f], where="post", c="C0", lw=1)
        ax.scatter([points[i][1] for i in f], [points[i][0] for i in f], c="C0", s=30, label="Pareto front")
    if chosen:
        ax.scatter([points[i][1] for i in chosen], [points[i][0] for i in chosen], marker="*", c="C3", s=160,
                   zorder=5, label="selected")
    for i in front:
        ax.annotate(str(labels[i]), (points[i][1], points[i][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(fontsize=7)
    fig.tight_layout()
    from facedis.curves import save_figure

    save_figure(fig, path)  # atomic: temporary name, then rename
    plt.close(fig)
