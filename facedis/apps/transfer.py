"""Expression transfer (docs/method.md#applications, paper Fig. 1): the target's identity with
the source's expression, ``decode(z_id(target), z_exp(source))`` with μ codes.

Unlike the reference (fixed subject numbers of one data set, a stale mean-face file), the
faces are picked from whatever split is given, deterministically, and when the data set has
neutral ground truth the transfer is scored against the synthetic ground truth
``neutral_target + (source − neutral_source)`` (exact for data built by adding an expression
offset to a neutral, as the synthetic ICT-FaceKit set is; an approximation otherwise), next to
two baselines: ``mean_face + (source − neutral_source)`` (right expression, no identity) and
the source itself (right expression, wrong identity).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def pick_transfer_faces(split, n_sources: int = 4, n_targets: int = 3) -> tuple[list[int], list[int]]:
    """Deterministic choice of (source indices, target indices).

    Targets: the first neutral scan (else the lowest-level scan) of the first ``n_targets``
    identities. Sources: the strongest (highest-level) non-neutral scan of as many different
    expressions as possible, preferring identities that are not targets.
    """
    subj = np.unique(split.subject)
    targets = []
    for s in subj[:n_targets]:
        idx = np.flatnonzero(split.subject == s)
        neu = idx[split.is_neutral[idx]]
        targets.append(int(neu[0]) if neu.size else int(idx[np.argmin(split.level[idx])]))
    tsub = set(int(split.subject[t]) for t in targets)
    cand = np.flatnonzero(~split.is_neutral)
    if cand.size == 0:
        cand = np.setdiff1d(np.arange(len(split)), targets)
    # prefer non-target identities, then high level; one per expression first
    order = sorted(cand.tolist(), key=lambda i: (int(split.subject[i]) in tsub, -float(split.level[i]), i))
    sources, seen_exp, seen_sub = [], set(), []
    for i in order:
        e = int(split.expression[i])
        if e in seen_exp:
            continue
        sources.append(i)
        seen_exp.add(e)
        seen_sub.append(int(split.subject[i]))
        if len(sources) == n_sources:
            break
    for i in order:  # not enough distinct expressions: fill up
        if len(sources) == n_sources:
            break
        if i not in sources:
            sources.append(i)
    return sources, targets


def synthetic_transfer_gt(split, source_idx, target_idx) -> np.ndarray:
    """``neutral_gt[target] + (source − neutral_gt[source])`` (stored units); NaN where a neutral GT is missing."""
    s, t = np.atleast_1d(source_idx), np.atleast_1d(target_idx)
    return split.neutral_of(t) + (split.vertices[s] - split.neutral_of(s))


def transfer_scores(model, split, source_idx, target_idx) -> dict:
    """Mean per-vertex distances (mm) to the synthetic GT of the transfers of the pairs
    (source_idx[k], target_idx[k]) and of the two baselines."""
    s, t = np.atleast_1d(source_idx), np.atleast_1d(target_idx)
    pred = model.transfer(split.vertices[s], split.vertices[t], units="stored", align=False)
    gt = synthetic_transfer_gt(split, s, t)
    base_mean = model.mean_face[None] + (split.vertices[s] - split.neutral_of(s))
    mm = model.mm_per_unit

    def err(a):
        return np.linalg.norm(np.asarray(a, np.float64) - gt, axis=-1).mean(axis=-1) * mm

    return {"transfer_mm": err(pred), "mean_face_plus_expression_mm": err(base_mean),
            "source_itself_mm": err(split.vertices[s]), "prediction": pred, "gt": gt}


def transfer_grid_figure(model, split, path, n_sources: int = 4, n_targets: int = 3,
                         mesh_dir: Optional[Path] = None) -> dict:
    """A transfer grid: header row = targets (identity donors), first column = sources
    (expression donors), cell (i, j) = target j with source i's expression. Writes the PNG and,
    with ``mesh_dir``, one PLY per transfer (in the model's units, e.g. the raw files')."""
    from facedis.apps.grid import face_grid

    src, tgt = pick_transfer_faces(split, n_sources, n_targets)
    S, T = len(src), len(tgt)
    pairs_s = np.repeat(src, T)
    pairs_t = np.tile(tgt, S)
    sc = transfer_scores(model, split, pairs_s, pairs_t)
    pred = sc["prediction"].reshape(S, T, *model.mean_face.shape)
    have_gt = np.isfinite(sc["transfer_mm"])
    cells = [[None] + [{"vertices": split.vertices[t], "title": "target (identity)"} for t in tgt]]
    for i, s in enumerate(src):
        row = [{"vertices": split.vertices[s], "title": "source (expression)"}]
        for j in range(T):
            k = i * T + j
            title = f"vs GT {sc['transfer_mm'][k]:.2f} mm" if have_gt[k] else None
            row.append({"vertices": pred[i, j], "title": title})
        cells.append(row)
    col_labels = [""] + [f"id {split.subject_name(int(split.subject[t]))}" for t in tgt]
    row_labels = [""] + [f"{split.expression_name(int(split.expression[s]))}\n"
                         f"(id {split.subject_name(int(split.subject[s]))})" for s in src]
    title = "expression transfer: target identity + source expression"
    if have_gt.any():
        title += (f"  |  mean error vs synthetic GT {np.nanmean(sc['transfer_mm']):.2f} mm "
                  f"(mean face + expr. {np.nanmean(sc['mean_face_plus_expression_mm']):.2f}, "
                  f"source itself {np.nanmean(sc['source_itself_mm']):.2f})")
    face_grid(cells, model.triangles, path=path, row_labels=row_labels, col_labels=col_labels, suptitle=title,
              cell_in=1.7)
    files = {"transfer_grid": str(path)}
    if mesh_dir is not None:
        for i, s in enumerate(src):
            for j, t in enumerate(tgt):
                p = Path(mesh_dir) / f"transfer_src{s}_tgt{t}.ply"
                files[f"transfer_src{s}_tgt{t}"] = str(model.save_mesh(p, model.from_stored(pred[i, j])))
    return {"sources": [int(s) for s in src], "targets": [int(t) for t in tgt], "files": files,
            "mean_transfer_mm": float(np.nanmean(sc["transfer_mm"])) if have_gt.any() else None,
            "mean_baseline_mean_face_mm": float(np.nanmean(sc["mean_face_plus_expression_mm"])) if have_gt.any() else None,
            "mean_baseline_source_mm": float(np.nanmean(sc["source_itself_mm"])) if have_gt.any() else None}
