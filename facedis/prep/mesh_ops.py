"""Mesh operations for data preparation: region crop, decimation with a vertex index map, checks.

Every operation that changes the topology returns a **vertex index map** ``(V',) int64`` into the
vertices it was given, plus the new triangles ``(F',3) int32`` over ``0..V'-1``. A map computed
once on a template is applied to every mesh of the same topology with ``mesh[vertex_index_map]``,
so all meshes of a data set stay in correspondence. Maps compose: ``crop_map[decimate_map]``.

Public API::

    crop(triangles, keep, num_vertices=None)            -> (vertex_index_map, triangles)
    decimate(vertices, triangles, target_vertices=None, target_faces=None, agg=7.0)
                                                        -> (vertex_index_map, triangles)
    clean_triangles(vertices, triangles, area_eps=1e-12) -> triangles
    remove_unreferenced(triangles, num_vertices)         -> (vertex_index_map, triangles)
    mesh_quality(vertices, triangles)                    -> dict (``ok`` is True for a clean mesh)
    triangle_areas(vertices, triangles)                  -> (F,) float64
    vertex_normals(vertices, triangles)                  -> (V,3) float64, unit length
    edges(triangles)                                     -> (E,2) int64 unique undirected edges

``decimate`` uses quadric edge collapse (``fast_simplification``), then snaps every decimated
vertex to its nearest original vertex (``scipy.spatial.cKDTree``), merges vertices that snapped to
the same original vertex, and rebuilds the triangles: degenerate (repeated index), zero-area and
duplicate triangles, triangles folded over by the snapping (normal against the original surface
normal) and triangles that make an edge non-manifold (shared by more than two triangles) are
dropped, then unreferenced vertices. The returned map is sorted ascending and has
no repeated index, so the decimated mesh has no duplicate vertices.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "crop",
    "decimate",
    "clean_triangles",
    "remove_unreferenced",
    "mesh_quality",
    "triangle_areas",
    "vertex_normals",
    "edges",
]


def _as_tris(triangles) -> np.ndarray:
    t = np.asarray(triangles)
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"triangles must have shape (F, 3), got {t.shape}")
    return t.astype(np.int64, copy=False)


def triangle_areas(vertices, triangles) -> np.ndarray:
    """Area of each triangle (float64, units of ``vertices`` squared)."""
    v = np.asarray(vertices, dtype=np.float64)
    t = _as_tris(triangles)
    if len(t) == 0:
        return np.zeros(0)
    cr = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    return 0.5 * np.linalg.norm(cr, axis=1)


def vertex_normals(vertices, triangles) -> np.ndarray:
    """Area-weighted unit vertex normals (zero vector for unreferenced vertices)."""
    v = np.asarray(vertices, dtype=np.float64)
    t = _as_tris(triangles)
    fn = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])  # length = 2 * area
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, t[:, k], fn)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)


def _directed_edges(t: np.ndarray) -> np.ndarray:
    return np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]])


def edges(triangles) -> np.ndarray:
    """Unique undirected edges ``(E, 2)`` (smaller index first), sorted."""
    t = _as_tris(triangles)
    e = np.sort(_directed_edges(t), axis=1)
    return np.unique(e, axis=0)


def remove_unreferenced(triangles, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop vertices no triangle uses. Returns (vertex_index_map (V',) int64, triangles (F',3) int32)."""
    t = _as_tris(triangles)
    used = np.zeros(int(num_vertices), dtype=bool)
    used[t.ravel()] = True
    vmap = np.flatnonzero(used).astype(np.int64)
    new_index = np.full(int(num_vertices), -1, dtype=np.int64)
    new_index[vmap] = np.arange(len(vmap))
    return vmap, new_index[t].astype(np.int32)


def crop(triangles, keep, num_vertices: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keep a region of a mesh.

    ``keep`` is a boolean mask over the vertices, an array of vertex indices, or an int ``n``
    (keep vertices ``0..n-1``, as in ICT-FaceKit's region crops). Triangles survive only when all
    three vertices are kept; vertices left without a triangle are dropped.
    Returns (vertex_index_map (V',) int64 sorted, triangles (F',3) int32 over the cropped vertices).
    """
    t = _as_tris(triangles)
    n = int(num_vertices) if num_vertices is not None else int(t.max()) + 1
    if isinstance(keep, (int, np.integer)):
        mask = np.zeros(n, dtype=bool)
        mask[: int(keep)] = True
    else:
        keep = np.asarray(keep)
        if keep.dtype == bool:
            mask = keep.copy()
            n = len(mask)
        else:
            mask = np.zeros(max(n, int(keep.max()) + 1), dtype=bool)
            mask[keep] = True
            n = len(mask)
    if len(t) and t.max() >= n:
        mask = np.concatenate([mask, np.zeros(int(t.max()) + 1 - n, dtype=bool)])
        n = len(mask)
    t = t[mask[t].all(axis=1)]
    return remove_unreferenced(t, n)


def clean_triangles(vertices, triangles, area_eps: float = 1e-12) -> np.ndarray:
    """Remove degenerate, zero-area, duplicate and non-manifold-making triangles.

    A triangle is zero-area when its area is below ``area_eps`` × (bounding-box diagonal)².
    Among triangles sharing an edge with more than two triangles, the smallest ones are dropped
    until every edge has at most two. Returns triangles (F',3) int32, order of survivors kept.
    """
    v = np.asarray(vertices, dtype=np.float64)
    t = _as_tris(triangles)
    if len(t) == 0:
        return t.astype(np.int32)
    # repeated index
    t = t[(t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 2] != t[:, 0])]
    # zero area
    diag2 = float(np.sum((v.max(0) - v.min(0)) ** 2)) or 1.0
    area = triangle_areas(v, t)
    keep = area > area_eps * diag2
    t, area = t[keep], area[keep]
    # duplicates (same vertex set, any order / orientation): keep the first
    key = np.sort(t, axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    first = np.sort(first)
    t, area = t[first], area[first]
    # non-manifold edges: greedily drop the smallest triangles on over-used edges
    for _ in range(10):
        F = len(t)
        e = np.sort(_directed_edges(t), axis=1)
        face_of = np.tile(np.arange(F), 3)
        _, inv, counts = np.unique(e, axis=0, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        bad_edge = counts > 2
        if not bad_edge.any():
            break
        drop = np.zeros(F, dtype=bool)
        for eid in np.flatnonzero(bad_edge):
            faces = face_of[inv == eid]
            faces = faces[~drop[faces]]
            if len(faces) <= 2:
                continue
            order = faces[np.lexsort((faces, -area[faces]))]  # largest first, ties by index
            drop[order[2:]] = True
        t, area = t[~drop], area[~drop]
    return t.astype(np.int32)


def _drop_folded(v: np.ndarray, t: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Drop triangles that snapping folded over: where a directed edge is used by several
    triangles (inconsistent orientation), keep only the one whose normal agrees best with the
    original surface normal."""
    if len(t) == 0:
        return t
    t64 = t.astype(np.int64)
    F = len(t64)
    d = _directed_edges(t64)
    _, inv, counts = np.unique(d, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    bad_edges = np.flatnonzero(counts > 1)
    if len(bad_edges) == 0:
        return t
    fn = np.cross(v[t64[:, 1]] - v[t64[:, 0]], v[t64[:, 2]] - v[t64[:, 0]])
    vn = normals[t64].sum(axis=1)
    cos = np.einsum("ij,ij->i", fn, vn) / np.maximum(np.linalg.norm(fn, axis=1) * np.linalg.norm(vn, axis=1), 1e-300)
    face_of = np.tile(np.arange(F), 3)
    drop = np.zeros(F, dtype=bool)
    for eid in bad_edges:
        faces = face_of[inv == eid]
        order = faces[np.lexsort((faces, -cos[faces]))]  # best aligned first, ties by index
        drop[order[1:]] = True
    return t[~drop]


def _snap_and_clean(orig: np.ndarray, dec_points: np.ndarray, dec_tris: np.ndarray, tree,
                    orig_normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, nearest = tree.query(dec_points, k=1)
    nearest = np.asarray(nearest, dtype=np.int64)
    tris = nearest[np.asarray(dec_tris, dtype=np.int64)]  # indices into the ORIGINAL vertices
    tris = clean_triangles(orig, tris)
    tris = _drop_folded(orig, tris, orig_normals)
    vmap, tris = remove_unreferenced(tris, len(orig))  # sorted, deduplicated
    return vmap, tris


def decimate(vertices, triangles, target_vertices: int | None = None, target_faces: int | None = None,
             agg: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation snapped to original vertices.

    Give exactly one of ``target_vertices`` or ``target_faces``. With ``target_vertices`` the
    triangle budget is searched (deterministically) so that the cleaned mesh has as close to
    ``target_vertices`` vertices as possible (usually exactly). A target at or above the input size
    returns the input mesh (cleaned, unreferenced vertices dropped).

    Returns (vertex_index_map (V',) int64 — sorted, unique indices into ``vertices``;
    triangles (F',3) int32 over ``0..V'-1``).
    """
    import fast_simplification
    from scipy.spatial import cKDTree

    if (target_vertices is None) == (target_faces is None):
        raise ValueError("give exactly one of target_vertices or target_faces")
    v = np.ascontiguousarray(np.asarray(vertices, dtype=np.float64))
    t = _as_tris(triangles)
    V0 = len(np.unique(t))
    F0 = len(t)
    if (target_vertices is not None and target_vertices >= V0) or (target_faces is not None and target_faces >= F0):
        t = clean_triangles(v, t)
        return remove_unreferenced(t, len(v))
    if (target_vertices is not None and target_vertices < 4) or (target_faces is not None and target_faces < 4):
        raise ValueError("decimation target too small (need at least 4)")
    tree = cKDTree(v)
    normals = vertex_normals(v, t)
    t32 = np.ascontiguousarray(t.astype(np.int32))
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def run(nf: int):
        nf = int(min(max(nf, 4), F0))
        if nf not in cache:
            pts, tri = fast_simplification.simplify(v, t32, target_count=nf, agg=agg)
            cache[nf] = _snap_and_clean(v, pts, tri, tree, normals)
        return cache[nf]

    if target_faces is not None:
        return run(target_faces)

    # search the face budget: vertex count is (nearly) monotone in it
    target = int(target_vertices)
    lo, hi = 4, F0
    guess = int(round(F0 * target / V0))
    best = None
    for _ in range(24):
        vmap, tri = run(guess)
        n = len(vmap)
        if best is None or (abs(n - target), n < target, guess) < (abs(len(best[0]) - target), len(best[0]) < target, best[2]):
            best = (vmap, tri, guess)
        if n == target:
            break
        if n < target:
            lo = guess + 1
        else:
            hi = guess - 1
        if lo > hi:
            break
        # secant-like step using the local faces-per-vertex ratio, kept inside [lo, hi]
        step = int(round((target - n) * max(len(tri), 1) / max(n, 1)))
        nxt = guess + (step if step != 0 else (1 if n < target else -1))
        guess = min(max(nxt, lo), hi)
    return best[0], best[1]


def mesh_quality(vertices, triangles) -> dict:
    """Checks of a triangle mesh. ``ok`` is True when there are no duplicate vertices, no
    unreferenced vertices, no degenerate / zero-area / duplicate triangles, no out-of-range
    indices and no non-manifold edges."""
    v = np.asarray(vertices, dtype=np.float64)
    t = _as_tris(triangles)
    V, F = len(v), len(t)
    out: dict = {"num_vertices": V, "num_triangles": F}
    out["index_out_of_range"] = int(((t < 0) | (t >= V)).any(axis=1).sum()) if F else 0
    if out["index_out_of_range"]:
        out["ok"] = False
        return out
    _, counts = np.unique(v, axis=0, return_counts=True)
    out["duplicate_vertices"] = int((counts - 1).sum())
    used = np.zeros(V, dtype=bool)
    used[t.ravel()] = True
    out["unreferenced_vertices"] = int((~used).sum())
    out["degenerate_triangles"] = int(((t[:, 0] == t[:, 1]) | (t[:, 1] == t[:, 2]) | (t[:, 2] == t[:, 0])).sum())
    area = triangle_areas(v, t)
    diag2 = float(np.sum((v.max(0) - v.min(0)) ** 2)) if V else 1.0
    out["zero_area_triangles"] = int((area <= 1e-12 * diag2).sum())
    key = np.sort(t, axis=1)
    out["duplicate_triangles"] = int(F - len(np.unique(key, axis=0))) if F else 0
    e = np.sort(_directed_edges(t), axis=1)
    ue, ecounts = np.unique(e, axis=0, return_counts=True)
    out["num_edges"] = int(len(ue))
    out["non_manifold_edges"] = int((ecounts > 2).sum())
    out["boundary_edges"] = int((ecounts == 1).sum())
    # orientation: an interior edge should be traversed once in each direction
    d = _directed_edges(t)
    ud, dcounts = np.unique(d, axis=0, return_counts=True)
    out["inconsistent_orientation_edges"] = int((dcounts > 1).sum())
    out["euler_characteristic"] = int(used.sum() - len(ue) + F)
    # connected components (over triangles' vertices)
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        g = coo_matrix((np.ones(len(ue)), (ue[:, 0], ue[:, 1])), shape=(V, V))
        ncomp, labels = connected_components(g, directed=False)
        out["components"] = int(len(np.unique(labels[used]))) if used.any() else 0
    except Exception:  # pragma: no cover
        out["components"] = -1
    if F:
        out["min_area"] = float(area.min())
        out["median_area"] = float(np.median(area))
        # smallest interior angle, degrees
        a = v[t[:, 1]] - v[t[:, 0]]
        b = v[t[:, 2]] - v[t[:, 1]]
        c = v[t[:, 0]] - v[t[:, 2]]
        def ang(x, y):
            cosv = np.sum(-x * y, axis=1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-300)
            return np.degrees(np.arccos(np.clip(cosv, -1, 1)))
        angles = np.stack([ang(c, a), ang(a, b), ang(b, c)], axis=1)
        out["min_angle_deg"] = float(angles.min())
    out["ok"] = bool(
        out["duplicate_vertices"] == 0 and out["unreferenced_vertices"] == 0 and out["degenerate_triangles"] == 0
        and out["zero_area_triangles"] == 0 and out["duplicate_triangles"] == 0 and out["non_manifold_edges"] == 0
    )
    return out
