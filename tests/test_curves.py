"""curves.png: training curves from metrics.jsonl, and mean ± std bands over seeds."""
import json

import numpy as np

from facedis import curves


def _records(seed: int, epochs: int = 4, spe: int = 10, torn: bool = False):
    rng = np.random.default_rng(seed)
    out = []
    for e in range(1, epochs + 1):
        r = {"epoch": e, "global_step": e * spe, "train/recon": float(np.exp(-e) + 0.01 * rng.random()),
             "train/kl_id": 0.5 + 0.01 * rng.random(), "train/disc_acc": 0.5, "lr/vae": 1e-3 * 0.7 ** (e // 2)}
        if e % 2 == 0:
            r.update({"E_rec_mean": 5.0 / e + rng.random() * 0.1, "AVD_neu_mean": 3.0 / e,
                      "AVD_neu_meanface_mean": 3.7, "E_dis_ref_mean": None})
        out.append(r)
    return out


def test_run_curves_written_atomically(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert curves.write_run_curves(run) is None  # nothing logged yet: no picture
    lines = [json.dumps(r) for r in _records(0)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"epoch\": 5, \"glob")  # a torn last line
    path = curves.write_run_curves(run)
    assert path == run / "curves.png" and path.stat().st_size > 10_000
    assert not list(run.glob(".curves.png.tmp-*"))
    assert curves.main([str(run)]) == 0


def test_bands_over_seeds_use_the_shared_steps():
    runs = [_records(s) for s in range(3)]
    runs[2] = runs[2][:3]  # a seed that stopped early: the bands end where all seeds have data
    fig = curves.plot_curves(runs, "three seeds")
    ax_loss, ax_eval, ax_lr = fig.axes[:3]
    recon = [ln for ln in ax_loss.get_lines() if ln.get_label().startswith("recon")][0]
    assert recon.get_label() == "recon (n=3)" and list(recon.get_xdata()) == [10.0, 20.0, 30.0]
    assert len(ax_loss.collections) == 2  # std bands of recon and kl_id (disc_acc is not a loss)
    labels = [ln.get_label() for ln in ax_eval.get_lines()]
    assert "E_rec (n=3)" in labels and not any(lb.startswith("E_dis (ref)") for lb in labels)  # None is skipped
    eval_line = [ln for ln in ax_eval.get_lines() if ln.get_label() == "E_rec (n=3)"][0]
    assert list(eval_line.get_xdata()) == [20.0]
