"""Test-split evaluation in millimetres, and how the results are shown.

:func:`evaluate` runs a model (the VAE or a baseline with the same ``forward(x, mode="mean")``
contract) over the test split in fp32 with deterministic codes, shards the work over the
processes, gathers the per-sample errors and returns E_rec, AVD_neu (and the mean-face
AVD_neu), and both E_dis definitions (docs/method.md, "Metrics").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facedis import metrics as M
from facedis.distributed import shard_indices
from facedis.loop import fetch
from facedis.step import eval_forward


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, cfg, rt) -> tuple[dict, np.ndarray]:
    """``(metrics, per-vertex mean E_rec in mm)`` on ``cfg.data.test_split``, on every process."""
    was = model.training
    model.eval()
    align = cfg.train.eval_align
    kabsch = align == "kabsch" or (align == "auto" and cfg.dataset == "bu3dfe")
    mm, V = data.mm_per_unit, data.num_vertices
    n = len(data.test)
    idx, valid = shard_indices(n, rt.world, rt.rank)
    bs = max(1, cfg.train.eval_batch_size // rt.world)
    mean_np = np.asarray(data.info.mean_face, dtype=np.float64)
    cols = {k: [] for k in ("index", "valid", "subject", "e_rec", "avd", "avd_mf")}
    ident, vsum = [], np.zeros(V)
    with rt.full_precision(model):
        for i in range(0, len(idx), bs):
            chunk = idx[i:i + bs]
            b = fetch(data.test, chunk)
            pred = eval_forward(model, b["vertices"].to(rt.device), data.mean_face)
            full = pred.full.double().cpu().numpy()
            idn = pred.identity.double().cpu().numpy()
            xv = b["vertices"].double().numpy()
            neu = (b["neutral"].double().numpy() if "neutral" in b
                   else np.full(b["vertices"].shape, np.nan))  # no neutral ground truth in this split
            if kabsch:
                full = M.kabsch_align(full, xv)
                has = np.isfinite(neu).all(axis=(1, 2))
                if has.any():
                    idn[has] = M.kabsch_align(idn[has], neu[has])
            v_ok = np.asarray(valid[i:i + bs], dtype=bool)
            cols["index"].append(np.asarray(chunk))
            cols["valid"].append(v_ok)
            cols["subject"].append(b["subject"].numpy())
            cols["e_rec"].append(M.per_sample_vertex_distance(full, xv, mm))
            cols["avd"].append(M.per_sample_vertex_distance(idn, neu, mm))
            cols["avd_mf"].append(M.per_sample_vertex_distance(np.broadcast_to(mean_np, neu.shape), neu, mm))
            vsum += (np.linalg.norm(full - xv, axis=-1) * mm)[v_ok].sum(0)
            ident.append(idn.astype(np.float32))
    model.train(was)
    local = {k: torch.from_numpy(np.concatenate(v) if v else np.zeros(0)).to(rt.device) for k, v in cols.items()}
    local["identity"] = torch.from_numpy(np.concatenate(ident) if ident else np.zeros((0, V, 3), np.float32)).to(rt.device)
    local = {k: rt.gather_for_metrics(v) for k, v in local.items()}
    vsum_t = rt.reduce(torch.from_numpy(vsum).to(rt.device), "sum")
    out: dict = {}
    if rt.is_main:
        g = {k: v.cpu().numpy() for k, v in local.items()}
        keep = g["valid"].astype(bool)
        order = np.argsort(g["index"][keep], kind="stable")
        g = {k: v[keep][order] for k, v in g.items()}
        for name, key in (("E_rec", "e_rec"), ("AVD_neu", "avd"), ("AVD_neu_meanface", "avd_mf")):
            vals = g[key][np.isfinite(g[key])]
            s = M.summarize(vals) if vals.size else {"mean": None, "std": None, "median": None}
            for stat in ("mean", "std", "median"):
                out[f"{name}_{stat}"] = s[stat]
        subj = g["subject"].astype(np.int64)
        ref = M.edis_reference(g["identity"], subj, mm)
        vst = M.edis_vertex_std(g["identity"], subj, mm)
        out.update({"E_dis_ref_mean": ref["mean"], "E_dis_ref_median": ref["median"],
                    "E_dis_vstd_mean": vst["mean"], "E_dis_vstd_median": vst["median"],
                    "num_test_samples": int(keep.sum()), "num_test_identities": int(np.unique(subj).size),
                    "eval_align": "kabsch" if kabsch else "none"})
    return rt.broadcast(out), vsum_t.cpu().numpy() / max(n, 1)


def _fmt(m: dict, key: str, width: int = 0) -> str:
    v = m.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "n/a".rjust(width)
    return f"{v:{width}.3f}"


def eval_line(epoch: int, m: dict) -> str:
    return (f"[facedis] epoch {epoch}: E_rec {_fmt(m, 'E_rec_mean')} mm, AVD_neu {_fmt(m, 'AVD_neu_mean')} mm "
            f"(mean face {_fmt(m, 'AVD_neu_meanface_mean')}), E_dis ref {_fmt(m, 'E_dis_ref_mean')} / "
            f"vstd {_fmt(m, 'E_dis_vstd_mean')} mm")


def summary(title: str, m: dict, run_dir: Path, files: str, e_rec_note: str = "") -> str:
    """The block printed when a run finishes."""
    f = lambda k: _fmt(m, k, 7)  # noqa: E731
    return "\n".join([
        "",
        title,
        f"  test split ({m.get('num_test_samples')} samples, {m.get('num_test_identities')} identities), mm:",
        f"    E_rec      mean {f('E_rec_mean')}  median {f('E_rec_median')}  std {f('E_rec_std')}{e_rec_note}",
        f"    AVD_neu    mean {f('AVD_neu_mean')}  median {f('AVD_neu_median')}  std {f('AVD_neu_std')}",
        f"    (mean face AVD_neu {f('AVD_neu_meanface_mean')})",
        f"    E_dis ref  mean {f('E_dis_ref_mean')}  median {f('E_dis_ref_median')}",
        f"    E_dis vstd mean {f('E_dis_vstd_mean')}  median {f('E_dis_vstd_median')}",
        f"  run directory {run_dir}/: {files}",
    ])


def error_map_figure(info, per_vertex: np.ndarray, title: str):
    """A front-view scatter of the template coloured by the mean per-vertex error (TensorBoard)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = np.asarray(info.template if getattr(info, "template", None) is not None else info.mean_face)
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=100)
    sc = ax.scatter(t[:, 0], t[:, 1], c=per_vertex, s=3, cmap="viridis")
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.colorbar(sc, ax=ax, fraction=0.046, label="mean vertex error (mm)")
    return fig
