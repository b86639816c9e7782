"""Face recognition on the disentangled identity (docs/method.md#applications, with the
reference's bugs fixed).

Protocol (deterministic):

- **Gallery**: one entry per identity: its first neutral scan (``is_neutral``) in split order.
  If the split flags no neutral at all, the lowest-``level`` scan of each identity is used and
  the result says so (``gallery_from``).
- **Probes**: the non-neutral scans of identities that have a gallery entry. A probe is never a
  gallery entry (the reference put each probe's own neutral in the gallery).
- **Codes** are the posterior means μ (the reference sampled z, so its results were random).
- **Rank-1 identification**: on identity codes μ_id with cosine similarity, and on the predicted
  neutral faces M̄+Δ_id with the sum of per-vertex Euclidean distances (the reference's vertex
  distance), scored by argmin/argmax over the gallery.
- **Verification** (every probe against every gallery entry, genuine = same identity): ROC, AUC
  and EER, on identity-code cosine similarity and on the (negated) vertex distance.
"""
from __future__ import annotations

import numpy as np

from facedis.metrics import rank1_identification

GALLERY_FROM = ("neutral", "lowest_level")


def gallery_probe_split(subject, is_neutral, level=None, gallery_from: str = "neutral"):
    """(gallery_indices, probe_indices, gallery_from_used).

    gallery: the first neutral per identity (or the lowest-level scan with ``lowest_level``, or
    automatically when no scan is flagged neutral); probes: the non-neutral scans of identities
    with a gallery entry (with ``lowest_level``: every other scan of those identities).
    """
    subject = np.asarray(subject, dtype=np.int64)
    is_neutral = np.asarray(is_neutral, dtype=bool)
    if gallery_from not in GALLERY_FROM:
        raise ValueError(f"gallery_from={gallery_from!r}; valid choices: {GALLERY_FROM}")
    if gallery_from == "neutral" and not is_neutral.any():
        gallery_from = "lowest_level"
    gallery = []
    for s in np.unique(subject):
        idx = np.flatnonzero(subject == s)
        if gallery_from == "neutral":
            hit = idx[is_neutral[idx]]
            if hit.size:
                gallery.append(int(hit[0]))
        else:
            lv = np.zeros(len(subject)) if level is None else np.asarray(level, dtype=np.float64)
            gallery.append(int(idx[np.argmin(lv[idx])]))
    gallery = np.asarray(gallery, dtype=np.int64)
    eligible = np.isin(subject, subject[gallery])
    if gallery_from == "neutral":
        eligible &= ~is_neutral
    probes = np.setdiff1d(np.flatnonzero(eligible), gallery)
    assert not np.intersect1d(gallery, probes).size
    return gallery, probes, gallery_from


def roc_curve(scores, genuine) -> dict:
    """ROC of similarity scores (higher = more similar) -> {fpr, tpr, thresholds, auc, eer, eer_threshold}."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(genuine, dtype=bool).reshape(-1)
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        raise ValueError(f"need genuine and impostor pairs (got {P} genuine, {N} impostor)")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr, fpr = np.r_[0.0, tp / P], np.r_[0.0, fp / N]
    thr = np.r_[np.inf, s[last]]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    fnr = 1.0 - tpr
    d = fpr - fnr  # increasing from -1 to +1
    i = int(np.argmax(d >= 0))
    if i == 0:
        eer, eer_thr = float(fpr[0]), float(thr[0])
    else:
        t = d[i - 1] / (d[i - 1] - d[i]) if d[i - 1] != d[i] else 0.0
        eer = float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
        eer_thr = float(thr[i])
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr, "auc": auc, "eer": eer, "eer_threshold": eer_thr}


def _cosine_sim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return a @ b.T


def _vertex_sum_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([np.linalg.norm(b - x[None], axis=-1).sum(axis=-1) for x in a])


def recognise(z_id, pred_neutral, subject, is_neutral, level=None, gallery_from: str = "neutral",
              mm_per_unit: float = 1.0) -> dict:
    """Identification and verification from precomputed identity codes (n, d_id) and predicted
    neutrals (n, V, 3) (stored units). Returns a JSON-able dict (ROC curves as lists)."""
    z = np.asarray(z_id, dtype=np.float64)
    P = np.asarray(pred_neutral, dtype=np.float64)
    subject = np.asarray(subject, dtype=np.int64)
    g, p, used = gallery_probe_split(subject, is_neutral, level, gallery_from)
    if len(g) < 2 or len(p) == 0:
        raise ValueError(f"recognition needs ≥ 2 gallery identities and ≥ 1 probe (got {len(g)} and {len(p)})")
    res = {
        "protocol": "gallery = one neutral per identity, probes = non-neutral scans, probe never in gallery, μ codes",
        "gallery_from": used,
        "num_gallery": int(len(g)),
        "num_probes": int(len(p)),
        "chance_rank1": 1.0 / len(g),
        "rank1_latent_cosine": rank1_identification(z, subject, g, p, metric="cosine"),
        "rank1_vertex": rank1_identification(P, subject, g, p, metric="vertex_sum"),
        "gallery_indices": g.tolist(),
        "probe_indices": p.tolist(),
    }
    genuine = subject[p][:, None] == subject[g][None, :]
    lat = roc_curve(_cosine_sim(z[p], z[g]), genuine)
    # vertex similarity: negated mean per-vertex distance in mm (higher = more similar)
    vtx = roc_curve(-_vertex_sum_dist(P[p], P[g]) / P.shape[1] * mm_per_unit, genuine)
    for name, r in (("latent_cosine", lat), ("vertex", vtx)):
        res[f"verification_{name}"] = {
            "auc": r["auc"], "eer": r["eer"], "eer_threshold": r["eer_threshold"],
            "fpr": r["fpr"].tolist(), "tpr": r["tpr"].tolist(),
        }
    return res


def recognise_split(model, split, gallery_from: str = "neutral") -> dict:
    """Run ``recognise`` on a ``facedis.apps.common.Split`` with a ``FaceModel``."""
    out = model.disentangle(split.vertices, units="stored", align=False)
    res = recognise(out["z_id"], out["identity"], split.subject, split.is_neutral, split.level,
                    gallery_from=gallery_from, mm_per_unit=model.mm_per_unit)
    res.update({"split": split.name, "data_root": str(split.root), "num_identities": int(len(np.unique(split.subject)))})
    return res


def summary_line(res: dict) -> str:
    return (f"rank-1 latent(cos) {res['rank1_latent_cosine']:.3f}  vertex {res['rank1_vertex']:.3f}  "
            f"(chance {res['chance_rank1']:.3f}, {res['num_gallery']} ids, {res['num_probes']} probes)  "
            f"EER latent {res['verification_latent_cosine']['eer']:.3f} vertex {res['verification_vertex']['eer']:.3f}")

