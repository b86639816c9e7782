"""Evaluation metrics (docs/method.md#metrics) as pure numpy functions, in millimetres.

Inputs may be numpy arrays or torch tensors (moved to the host as float64). Faces are
(n, V, 3) in stored units; ``mm_per_unit`` converts to mm (``DatasetInfo.mm_per_unit``).

Two E_dis definitions exist and are never mixed:

- ``edis_reference``: the authors' code: per identity, ``np.std`` over all k·V distances of its
  predicted identity shapes to their mean (the *spread* of the distances; 0 for a constant
  offset), then mean / median over identities.
- ``edis_vertex_std``: the per-vertex standard deviation of the predicted identity across the
  identity's k samples (RMS deviation from the per-identity mean), averaged over vertices, then
  mean / median over identities (Jiang et al. style).
"""
from __future__ import annotations

import numpy as np


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def summarize(values) -> dict:
    """mean, std (ddof 0, ``np.std``) and median of a 1-D array."""
    v = _np(values)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


def per_sample_vertex_distance(pred, target, mm_per_unit: float = 1.0) -> np.ndarray:
    """(1/V) Σ_v ‖pred_v - target_v‖₂ per sample, in mm. pred, target (n, V, 3) -> (n,)."""
    p, t = _np(pred), _np(target)
    return np.linalg.norm(p - t, axis=-1).mean(axis=-1) * mm_per_unit


def e_rec(pred_full, target, mm_per_unit: float = 1.0) -> dict:
    """Reconstruction error E_rec: per-sample mean vertex distance between the predicted full face
    and the input, mm. Returns {mean, std, median, per_sample (n,)}."""
    d = per_sample_vertex_distance(pred_full, target, mm_per_unit)
    return {**summarize(d), "per_sample": d}


def avd_neu(pred_identity, gt_neutral, mm_per_unit: float = 1.0) -> dict:
    """AVD_neu: per-sample mean vertex distance between the predicted identity M̄+Δ_id and the
    ground-truth neutral, mm. Returns {mean, std, median, per_sample (n,)}."""
    d = per_sample_vertex_distance(pred_identity, gt_neutral, mm_per_unit)
    return {**summarize(d), "per_sample": d}


def _groups(pred_identity, subject_ids, mm_per_unit: float):
    p = _np(pred_identity) * mm_per_unit
    ids = _np(subject_ids).astype(np.int64).reshape(-1)
    if ids.shape[0] != p.shape[0]:
        raise ValueError(f"{p.shape[0]} shapes but {ids.shape[0]} subject ids")
    for s in np.unique(ids):
        yield int(s), p[ids == s]


def edis_reference(pred_identity, subject_ids, mm_per_unit: float = 1.0) -> dict:
    """E_dis as in the reference code (docs/method.md#disentanglement-error-two-definitions).

    Per identity with k predicted identity shapes P (k, V, 3): d_{i,v} = ‖P_{i,v} - mean_i P_{·,v}‖₂,
    E_dis(id) = np.std over all k·V values of d. Returns {mean, median, per_identity {id: mm}}.
    """
    per = {}
    for s, P in _groups(pred_identity, subject_ids, mm_per_unit):
        d = np.linalg.norm(P - P.mean(axis=0, keepdims=True), axis=-1)
        per[s] = float(d.std())
    v = np.array(list(per.values()))
    return {"mean": float(v.mean()), "median": float(np.median(v)), "per_identity": per}


def edis_vertex_std(pred_identity, subject_ids, mm_per_unit: float = 1.0) -> dict:
    """E_dis as the per-vertex std of the predicted identity (Jiang et al.).

    Per identity: s_v = sqrt( (1/k) Σ_i ‖P_{i,v} - mean_i P_{·,v}‖² ) (RMS deviation from the
    identity's mean shape), E_dis(id) = mean over v of s_v. Returns {mean, median, per_identity}.
    """
    per = {}
    for s, P in _groups(pred_identity, subject_ids, mm_per_unit):
        sq = ((P - P.mean(axis=0, keepdims=True)) ** 2).sum(axis=-1)  # (k, V)
        per[s] = float(np.sqrt(sq.mean(axis=0)).mean())
    v = np.array(list(per.values()))
    return {"mean": float(v.mean()), "median": float(np.median(v)), "per_identity": per}


def kabsch(source, target) -> tuple[np.ndarray, np.ndarray]:
    """Best rigid transform (rotation, no reflection, no scale, + translation) mapping source onto
    target in least squares: target ≈ source @ R.T + t.

    source, target (..., V, 3), batched over leading dims. Returns R (..., 3, 3), t (..., 3).
    """
    P, Q = _np(source), _np(target)
    pc, qc = P.mean(axis=-2, keepdims=True), Q.mean(axis=-2, keepdims=True)
    H = np.swapaxes(P - pc, -1, -2) @ (Q - qc)  # (..., 3, 3)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(np.swapaxes(Vt, -1, -2) @ np.swapaxes(U, -1, -2)))
    D = np.broadcast_to(np.eye(3), H.shape).copy()
    D[..., 2, 2] = d
    R = np.swapaxes(Vt, -1, -2) @ D @ np.swapaxes(U, -1, -2)
    t = qc[..., 0, :] - (pc @ np.swapaxes(R, -1, -2))[..., 0, :]
    return R, t


def kabsch_align(source, target) -> np.ndarray:
    """Source rigidly aligned to target (the BU-3DFE evaluation step). (..., V, 3) -> (..., V, 3)."""
    R, t = kabsch(source, target)
    return _np(source) @ np.swapaxes(R, -1, -2) + t[..., None, :]


def _distances(probes: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    if metric == "vertex_sum":  # Σ_v ‖·‖₂, the reference's vertex rank-1 distance
        return np.stack([np.linalg.norm(gallery - p[None], axis=-1).sum(axis=-1) for p in probes])
    a, b = probes.reshape(len(probes), -1), gallery.reshape(len(gallery), -1)
    if metric == "euclidean":
        return np.sqrt(np.maximum((a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None], 0.0))
    if metric == "cosine":
        a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
        b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
        return -(a @ b.T)
    raise ValueError(f"metric={metric!r}; valid choices: ('vertex_sum', 'euclidean', 'cosine')")


def gallery_split(subject_ids, is_gallery_candidate) -> tuple[np.ndarray, np.ndarray]:
    """One gallery entry per identity: its first candidate (e.g. the first neutral scan).
    Returns (gallery_indices, probe_indices); probes are all other samples, so no probe is ever
    its own gallery entry. Identities without a candidate have no gallery entry and their
    samples are not probes."""
    ids = _np(subject_ids).astype(np.int64).reshape(-1)
    cand = np.asarray(is_gallery_candidate, dtype=bool).reshape(-1)
    gallery = []
    for s in np.unique(ids):
        hit = np.flatnonzero((ids == s) & cand)
        if hit.size:
            gallery.append(hit[0])
    gallery = np.array(gallery, dtype=np.int64)
    has = np.isin(ids, ids[gallery])
    probes = np.setdiff1d(np.flatnonzero(has), gallery)
    return gallery, probes


def rank1_identification(features, subject_ids, gallery_indices, probe_indices, metric: str = "vertex_sum") -> float:
    """Rank-1 identification accuracy: each probe gets the identity of its nearest gallery entry.

    features (n, ...) (predicted identity shapes (n, V, 3) or codes (n, d)); subject_ids (n,);
    metric: ``vertex_sum`` (Σ_v ‖·‖₂ over (V,3) shapes), ``euclidean`` or ``cosine``.
    Raises if a probe index is also a gallery index.
    """
    f = _np(features)
    ids = _np(subject_ids).astype(np.int64).reshape(-1)
    g, p = np.asarray(gallery_indices, dtype=np.int64), np.asarray(probe_indices, dtype=np.int64)
    if np.intersect1d(g, p).size:
        raise ValueError("a probe is also in the gallery")
    if p.size == 0:
        raise ValueError("no probes")
    nearest = _distances(f[p], f[g], metric).argmin(axis=1)
    return float((ids[g][nearest] == ids[p]).mean())
