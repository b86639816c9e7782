"""Headless figures (Agg only; no display, no psbody): error heat-maps, best/median/worst panels
like the paper's Figs. 5-10, transfer grids, interpolation strips, the latent space, ROC.

- ``error_map_image(vertices, triangles, errors_mm) -> (H, W, 3) uint8``: one face coloured by
  per-vertex error with a colour bar in mm (used by the engine for TensorBoard).
- ``save_error_ply(path, vertices, triangles, errors_mm)``: the same colouring as a PLY.
- ``disentanglement_panels(...)``: the paper's arrangement: per group, row 1 ground truth (full,
  neutral, expression), row 2 prediction, row 3 error heat-maps; groups best / median / worst.
- ``latent_pca(...)``: 2-D PCA of z_id and z_exp, coloured by identity and by expression.
- ``make_figures(run_dir, ...)``: the whole set for a trained run
  (``python -m facedis.apps figures --run RUN_DIR``).

Faces are drawn by ``facedis.apps.render`` (orthographic frontal view, Lambert shading); grids
of faces by ``facedis.apps.grid`` (``face_grid``, re-exported here).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib import colormaps

from facedis.apps import interpolate as interp_app
from facedis.apps import transfer as transfer_app
from facedis.apps.grid import HEAT_CMAP, add_colorbar, face_grid, new_figure, save_figure
from facedis.apps.render import draw_mesh, figure_to_array


# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------
def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a)


def auto_vmax(*errors, q: float = 99.0) -> float:
    """A colour-scale top for error maps: the q-th percentile over all errors (at least 1e-3 mm)."""
    vals = np.concatenate([np.asarray(e, dtype=np.float64).reshape(-1) for e in errors])
    vals = vals[np.isfinite(vals)]
    return max(float(np.percentile(vals, q)) if vals.size else 1.0, 1e-3)


def heat_colors(errors_mm, vmax: float, cmap: str = HEAT_CMAP) -> np.ndarray:
    """Per-vertex errors (mm) -> RGBA in [0, 1] on a 0..vmax scale."""
    e = np.nan_to_num(np.asarray(errors_mm, dtype=np.float64), nan=0.0)
    return colormaps[cmap](np.clip(e / vmax, 0.0, 1.0))


def error_map_image(vertices, triangles, errors_mm, vmax: Optional[float] = None, size: int = 256,
                    title: Optional[str] = None, cmap: str = HEAT_CMAP) -> np.ndarray:
    """One face coloured by its per-vertex error with a colour bar in mm -> (H, W, 3) uint8
    (H = size, W ≈ 1.3·size). vertices (V, 3) in any units; errors_mm (V,)."""
    v, e = _np(vertices).astype(np.float64), _np(errors_mm).astype(np.float64).reshape(-1)
    if e.shape[0] != v.shape[0]:
        raise ValueError(f"{e.shape[0]} errors for {v.shape[0]} vertices")
    vmax = auto_vmax(e) if vmax is None else float(vmax)
    h = size / 100.0
    fig = new_figure(1.32 * h, h)
    top = 0.88 if title else 0.98
    ax = fig.add_axes((0.0, 0.02, 0.76, top - 0.02))
    draw_mesh(ax, v, _np(triangles), colors=heat_colors(e, vmax, cmap))
    add_colorbar(fig, (0.79, 0.08, 0.045, 0.8), vmax, label="mm", cmap=cmap)
    if title:
        fig.text(0.38, 0.93, title, ha="center", va="center", fontsize=8)
    return figure_to_array(fig)


def save_error_ply(path, vertices, triangles, errors_mm, vmax: Optional[float] = None, cmap: str = HEAT_CMAP) -> Path:
    """A vertex-coloured PLY of an error map (colours on the 0..vmax mm scale)."""
    from facedis.inference import write_mesh

    e = _np(errors_mm).reshape(-1)
    vmax = auto_vmax(e) if vmax is None else float(vmax)
    return write_mesh(path, vertices, triangles, vertex_colors=heat_colors(e, vmax, cmap))


def save_png(path, image: np.ndarray) -> Path:
    from matplotlib.image import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(str(path), np.asarray(image))
    return path


# ---------------------------------------------------------------------------------------------
# the paper's disentanglement panels (Figs. 5-10)
# ---------------------------------------------------------------------------------------------
def sample_errors(model, split, idx) -> dict:
    """Predictions and per-vertex errors (mm) of samples ``idx``: GT full/neutral/expression
    (expression shown on the mean face M̄ + X − X_n), predictions, errors."""
    idx = np.asarray(idx)
    X = split.vertices[idx].astype(np.float64)
    out = model.disentangle(X.astype(np.float32), units="stored", align=False)
    Xn = split.neutral_of(idx).astype(np.float64)
    mm = model.mm_per_unit
    M = model.mean_face.astype(np.float64)
    has_gt = np.isfinite(Xn).all(axis=(1, 2))
    e_full = np.linalg.norm(out["full"] - X, axis=-1) * mm
    e_neu = np.linalg.norm(out["identity"] - Xn, axis=-1) * mm
    e_exp = np.linalg.norm(out["expression_offset"] - (X - Xn), axis=-1) * mm
    return {"X": X, "Xn": Xn, "gt_expression": M + (X - Xn), "pred": out, "has_gt": has_gt,
            "e_full": e_full, "e_neu": e_neu, "e_exp": e_exp}


def pick_best_median_worst(scores) -> dict:
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    return {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}


def disentanglement_panels(model, split, path, by: Optional[str] = None, out_dir=None) -> dict:
    """Best / median / worst test samples (by AVD_neu when neutral GT exists, else E_rec), each a
    3x3 group: GT (full, neutral, expression) / prediction / heat-maps, one shared mm scale.
    Also writes per-sample heat-map PNGs and vertex-coloured PLYs into ``out_dir``."""
    allerr = sample_errors(model, split, np.arange(len(split)))
    has_gt = allerr["has_gt"]
    if by is None:
        by = "avd_neu" if has_gt.all() else "e_rec"
    score = allerr["e_neu"].mean(axis=1) if by == "avd_neu" else allerr["e_full"].mean(axis=1)
    picks = pick_best_median_worst(score)
    tri = model.triangles
    M = model.mean_face
    sel = {k: allerr_sel(allerr, i) for k, i in picks.items()}
    errs = [e for s in sel.values() for e in (s["e_full"], s["e_neu"] if s["has_gt"] else s["e_full"],
                                              s["e_exp"] if s["has_gt"] else s["e_full"])]
    vmax = auto_vmax(*errs)
    cells: list[list] = [[], [], []]
    col_labels = []
    for k, s in sel.items():
        gt = [s["X"], s["Xn"] if s["has_gt"] else None, s["gt_expression"] if s["has_gt"] else None]
        pr = [s["pred"]["full"], s["pred"]["identity"], s["pred"]["expression"]]
        er = [s["e_full"], s["e_neu"] if s["has_gt"] else None, s["e_exp"] if s["has_gt"] else None]
        for j, name in enumerate(("full", "neutral", "expression")):
            cells[0].append(None if gt[j] is None else {"vertices": gt[j]})
            cells[1].append({"vertices": pr[j]})
            cells[2].append(None if er[j] is None else {
                "vertices": pr[j] if j < 2 else M + s["pred"]["expression_offset"],
                "colors": heat_colors(er[j], vmax), "title": f"{er[j].mean():.2f} mm"})
            col_labels.append(f"{k}: {name}" if j == 1 else name)
    fig_title = (f"{split.name} split, ranked by {'AVD_neu' if by == 'avd_neu' else 'E_rec'}: "
                 + ", ".join(f"{k} = sample {picks[k]} ({split.subject_name(int(split.subject[picks[k]]))}, "
                             f"{split.expression_name(int(split.expression[picks[k]]))})" for k in picks))
    face_grid(cells, tri, path=path, row_labels=["ground\ntruth", "prediction", "error"], col_labels=col_labels,
              suptitle=fig_title, vmax=vmax, cell_in=1.5)
    files = {"panels": str(path)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        for k, s in sel.items():
            title = f"{k}: E_rec {s['e_full'].mean():.2f} mm"
            files[f"heatmap_{k}_full_png"] = str(save_png(out_dir / f"heatmap_{k}_full.png",
                                                          error_map_image(s["pred"]["full"], tri, s["e_full"], vmax, 320, title)))
            files[f"heatmap_{k}_full_ply"] = str(save_error_ply(out_dir / f"heatmap_{k}_full.ply", model.from_stored(s["pred"]["full"]), tri,
                                                                s["e_full"], vmax))
            if s["has_gt"]:
                title = f"{k}: AVD_neu {s['e_neu'].mean():.2f} mm"
                files[f"heatmap_{k}_neutral_png"] = str(save_png(
                    out_dir / f"heatmap_{k}_neutral.png", error_map_image(s["pred"]["identity"], tri, s["e_neu"], vmax, 320, title)))
                files[f"heatmap_{k}_neutral_ply"] = str(save_error_ply(
                    out_dir / f"heatmap_{k}_neutral.ply", model.from_stored(s["pred"]["identity"]), tri, s["e_neu"], vmax))
    return {"picks": picks, "by": by, "vmax_mm": vmax, "files": files,
            "scores_mm": {k: float(score[i]) for k, i in picks.items()}}


def allerr_sel(allerr: dict, i: int) -> dict:
    """Sample i of ``sample_errors``' batched output."""
    return {
        "X": allerr["X"][i], "Xn": allerr["Xn"][i], "gt_expression": allerr["gt_expression"][i],
        "pred": {k: v[i] for k, v in allerr["pred"].items()}, "has_gt": bool(allerr["has_gt"][i]),
        "e_full": allerr["e_full"][i], "e_neu": allerr["e_neu"][i], "e_exp": allerr["e_exp"][i],
    }


# ---------------------------------------------------------------------------------------------
# latent space and ROC
# ---------------------------------------------------------------------------------------------
def pca_2d(z) -> tuple[np.ndarray, np.ndarray]:
    """Project codes (n, d) onto their first two principal components -> (n, 2), explained ratios (2,)."""
    z = np.asarray(z, dtype=np.float64)
    zc = z - z.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    proj = zc @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.concatenate([proj, np.zeros((len(z), 2 - proj.shape[1]))], axis=1)
    var = s**2
    ratio = var[:2] / max(var.sum(), 1e-20)
    ratio = np.concatenate([ratio, np.zeros(2 - len(ratio))])
    # deterministic sign: the largest-magnitude loading of each component is positive
    for k in range(min(2, vt.shape[0])):
        if vt[k][np.argmax(np.abs(vt[k]))] < 0:
            proj[:, k] *= -1
    return proj, ratio


def latent_pca(z_id, z_exp, subject, expression, path, subject_names=None, expression_names=None) -> Path:
    """2x2 scatter: rows z_id / z_exp (2-D PCA), columns coloured by identity / by expression."""
    fig = new_figure(10.5, 9.0)
    groups = ((np.asarray(subject), "identity", subject_names), (np.asarray(expression), "expression", expression_names))
    for r, (z, zname) in enumerate(((z_id, "z_id"), (z_exp, "z_exp"))):
        p, ratio = pca_2d(z)
        for c, (lab, lname, names) in enumerate(groups):
            ax = fig.add_subplot(2, 2, 2 * r + c + 1)
            uniq = np.unique(lab)
            cmap = colormaps["tab10" if len(uniq) <= 10 else "tab20"]
            for k, u in enumerate(uniq):
                m = lab == u
                name = str(names[u]) if names is not None and u < len(names) else str(u)
                ax.scatter(p[m, 0], p[m, 1], s=14, color=cmap(k % cmap.N), label=name, alpha=0.85, edgecolors="none")
            ax.set_title(f"{zname} (PCA), coloured by {lname}", fontsize=10)
            ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
            ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
            if len(uniq) <= 20:
                ax.legend(fontsize=6, markerscale=0.8, loc="best", ncol=2 if len(uniq) > 10 else 1)
    fig.tight_layout()
    return save_figure(fig, path)


def roc_figure(res: dict, path) -> Path:
    fig = new_figure(5.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for key, lab in (("verification_latent_cosine", "z_id cosine"), ("verification_vertex", "predicted neutral, vertex dist.")):
        v = res[key]
        ax.plot(v["fpr"], v["tpr"], label=f"{lab} (AUC {v['auc']:.3f}, EER {v['eer']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot([0, 1], [1, 0], color="grey", lw=0.5)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(f"verification: {res['num_probes']} probes x {res['num_gallery']} gallery ids\n"
                 f"rank-1 latent {res['rank1_latent_cosine']:.3f}, vertex {res['rank1_vertex']:.3f}, "
                 f"chance {res['chance_rank1']:.3f}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# the whole set
# ---------------------------------------------------------------------------------------------
def make_figures(run, data_root=None, split: str = "test", out=None, max_samples: Optional[int] = None,
                 steps: int = 5, device: str = "cpu") -> dict:
    """Write the figure set of a trained run into ``out`` (default ``<run_dir>/figures``).
    Returns (and writes to ``figures.json``) the list of files and the numbers behind them."""
    from facedis.apps.common import check_same_data, load_split, run_data_root
    from facedis.apps.recognition import recognise_split, summary_line
    from facedis.inference import load

    model = load(run, device=device)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    root = Path(data_root) if data_root else run_data_root(run_dir, model)
    if root is None:
        raise FileNotFoundError(f"{run_dir}: cannot find the run's data set; pass --data ROOT")
    data = load_split(root, split, max_samples=max_samples)
    check_same_data(model, data)
    out = Path(out) if out else run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {"run": str(run_dir), "data_root": str(root), "split": split, "files": {},
                   "mesh_units": model.resolve_units()}  # the PLYs are in the raw files' units

    panels = disentanglement_panels(model, data, out / "disentangle_best_median_worst.png", out_dir=out)
    index["files"].update(panels.pop("files"))
    index["panels"] = panels

    tr = transfer_app.transfer_grid_figure(model, data, out / "transfer_grid.png", mesh_dir=out / "meshes")
    index["files"].update(tr.pop("files"))
    index["transfer"] = tr

    for part in ("identity", "expression"):
        r = interp_app.interpolation_figure(model, data, out / f"interpolation_{part}.png", part=part, steps=steps,
                                            mesh_dir=out / "meshes")
        index["files"].update(r.pop("files"))
        index[f"interpolation_{part}"] = r

    codes = model.disentangle(data.vertices, units="stored", align=False)
    index["files"]["latent_pca"] = str(latent_pca(codes["z_id"], codes["z_exp"], data.subject, data.expression,
                                                  out / "latent_pca.png", data.subjects, data.expressions))
    try:
        rec = recognise_split(model, data)
    except ValueError as e:  # too few identities or no probes in this split
        index["recognition"] = {"skipped": str(e)}
    else:
        (out / "recognition.json").write_text(json.dumps(rec, indent=1))
        index["files"]["recognition_json"] = str(out / "recognition.json")
        index["files"]["roc"] = str(roc_figure(rec, out / "roc.png"))
        index["recognition"] = {"summary": summary_line(rec),
                                **{k: rec[k] for k in ("rank1_latent_cosine", "rank1_vertex", "chance_rank1",
                                                       "num_gallery", "num_probes")}}
    (out / "figures.json").write_text(json.dumps(index, indent=1, default=str))
    return index
