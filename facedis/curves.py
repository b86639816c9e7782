"""Training curves as pictures: ``curves.png`` of a run, and mean ± std curves over seeds.

Both are drawn from ``metrics.jsonl`` (one record per epoch: the epoch's mean train losses,
learning rates and, on evaluation epochs, the test metrics in mm) against the global step.

    python -m facedis.curves runs/synth            # (re)writes runs/synth/curves.png
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

EVAL_KEYS = (("E_rec_mean", "E_rec"), ("AVD_neu_mean", "AVD_neu"), ("E_dis_ref_mean", "E_dis (ref)"),
             ("E_dis_vstd_mean", "E_dis (vertex std)"))
MEANFACE_KEY = "AVD_neu_meanface_mean"


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a missing file or a torn last line gives what is there)."""
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r.get("global_step", r.get("epoch", i)), r[key]) for i, r in enumerate(records)
           if isinstance(r.get(key), (int, float)) and r.get(key) is not None and np.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _loss_keys(records: Iterable[dict]) -> list[str]:
    keys = []
    for r in records:
        for k in r:
            if k.startswith("train/") and k not in keys and k != "train/disc_acc":
                keys.append(k)
    return keys


def _new_figure(ncols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * ncols, 3.6), dpi=110, layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _band(ax, runs: list[list[dict]], key: str, label: str, **style) -> bool:
    """Mean ± std over runs of ``key`` at the steps all runs share; one line for a single run."""
    series = [_series(r, key) for r in runs]
    series = [s for s in series if s[0].size]
    if not series:
        return False
    common = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
    if not common:
        return False
    ys = np.stack([np.interp(common, s[0], s[1]) for s in series])
    mean = ys.mean(0)
    line, = ax.plot(common, mean, label=label if len(series) == 1 else f"{label} (n={len(series)})", **style)
    if len(series) > 1:
        sd = ys.std(0, ddof=1)
        ax.fill_between(common, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)
    return True


def plot_curves(runs: list[list[dict]], title: str = ""):
    """A figure with three panels: train losses (log scale), test metrics in mm (with the
    mean-face AVD_neu for reference), learning rates. ``runs``: one record list per run (seeds);
    several runs give mean ± std bands."""
    fig, (ax_loss, ax_eval, ax_lr) = _new_figure(3)
    for key in _loss_keys(r for run in runs for r in run):
        _band(ax_loss, runs, key, key.split("/", 1)[1])
    ax_loss.set_yscale("log")
    ax_loss.set_title("train losses (epoch means, unweighted)", fontsize=9)
    drawn = False
    for key, label in EVAL_KEYS:
        drawn |= _band(ax_eval, runs, key, label, marker="o", markersize=3)
    if _band(ax_eval, runs, MEANFACE_KEY, "AVD_neu of the mean face", linestyle="--", color="0.5"):
        drawn = True
    ax_eval.set_title("test split (mm)" if drawn else "test split: not evaluated yet", fontsize=9)
    for key, label in (("lr/vae", "VAE"), ("lr/disc", "discriminator")):
        _band(ax_lr, runs, key, label)
    ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate", fontsize=9)
    for ax in (ax_loss, ax_eval, ax_lr):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write a PNG atomically (temporary name, then rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    FigureCanvasAgg(fig)
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def write_run_curves(run_dir: Path, title: Optional[str] = None) -> Optional[Path]:
    """``<run_dir>/curves.png`` from ``<run_dir>/metrics.jsonl`` (None when it has no records)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    if not records:
        return None
    return save_figure(plot_curves([records], title if title is not None else run_dir.name), run_dir / "curves.png")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    for run in args:
        path = write_run_curves(Path(run))
        print(f"written {path}" if path else f"{run}: no metrics.jsonl records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
