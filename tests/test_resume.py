"""Auto-resume: a run killed mid-epoch (SIGKILL) and rerun ends bit-identical to an uninterrupted
run; SIGTERM saves a checkpoint and stops cleanly."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facedis import engine
from facedis.config import save_config

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "facedis" / "train.py"


def _strip_time(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("time/")}


KILL_AFTER_STEP = """
import os, signal, sys
import facedis.step as step
real, n = step.joint_step, {{"k": 0}}
def joint_step(*a, **kw):
    if n["k"] == {after}:  # steps 1..{after} are complete (their checkpoints included)
        os.kill(os.getpid(), signal.SIGKILL)
    n["k"] += 1
    return real(*a, **kw)
step.joint_step = joint_step
from facedis.train import main
sys.exit(main(sys.argv[1:]))
"""


def _run(cfg_path: Path, kill_after_step: int = 0) -> subprocess.CompletedProcess:
    """``facedis/train.py --config cfg_path`` in a fresh process; with ``kill_after_step`` the
    process SIGKILLs itself when global step N is complete (a wrapper around the step function,
    so the training loop carries no test hook)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-c", KILL_AFTER_STEP.format(after=kill_after_step)] if kill_after_step
           else [sys.executable, str(TRAIN_PY)])
    return subprocess.run([*cmd, "--config", str(cfg_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    assert ma["vae"].keys() == mb["vae"].keys()
    for k in ma["vae"]:
        assert torch.equal(ma["vae"][k], mb["vae"][k]), k
    sa, sb = (torch.load(p / "checkpoints" / "last" / "state.pt", weights_only=True) for p in (a, b))
    for k in sa["disc"]:
        assert torch.equal(sa["disc"][k], sb["disc"][k]), k
    for name in ("opt_vae", "opt_disc"):
        for pid, st in sa[name]["state"].items():
            for kk, v in st.items():
                assert torch.equal(v, sb[name]["state"][pid][kk]), (name, pid, kk)
    assert sa["sched_vae"] == sb["sched_vae"] and sa["global_step"] == sb["global_step"]
    ja, jb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ja == jb
    la = [_strip_time(json.loads(x)) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [_strip_time(json.loads(x)) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_is_bit_identical(tiny_config, tmp_path):
    # 64 training samples / batch 8 = 8 steps per epoch; checkpoints every 3 steps; killed after
    # step 11 (epoch 2, batch 3): the rerun resumes from step 9 (epoch 2, batch 1) and redoes 10, 11.
    over = {"train.epochs": 3, "train.checkpoint_every_steps": 3, "train.eval_every": 2, "lr_step": None}
    over.pop("lr_step")
    ref_cfg = tiny_config(**over, **{"run.dir": str(tmp_path / "ref"), "optim.lr_step_epochs": 2})
    cut_cfg = tiny_config(**over, **{"run.dir": str(tmp_path / "cut"), "optim.lr_step_epochs": 2})
    save_config(ref_cfg, tmp_path / "ref.yaml")
    save_config(cut_cfg, tmp_path / "cut.yaml")

    r = _run(tmp_path / "ref.yaml")
    assert r.returncode == 0, r.stderr[-3000:]

    k = _run(tmp_path / "cut.yaml", kill_after_step=11)
    assert k.returncode == -signal.SIGKILL, (k.returncode, k.stderr[-3000:])
    cut = tmp_path / "cut"
    meta = json.loads((cut / "checkpoints" / "last" / "meta.json").read_text())
    assert (meta["epochs_done"], meta["step_in_epoch"], meta["global_step"]) == (1, 1, 9)
    assert not (cut / "metrics.json").exists()

    r2 = _run(tmp_path / "cut.yaml")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resuming from" in r2.stdout
    _assert_same_run(tmp_path / "ref", cut)


def test_sigterm_saves_checkpoint_and_rerun_finishes(tiny_config, monkeypatch):
    """In-process: SIGTERM after step 5 -> checkpoint at that step, TrainingInterrupted; the rerun
    finishes, bit-identical to an uninterrupted run."""
    import facedis.step as step

    ref = tiny_config(**{"pretrain.enabled": False, "run.dir": str(tiny_config().run.resolved_dir()) + "-ref"})
    engine.train(ref)

    real = step.joint_step
    n = {"k": 0}

    def joint_step(*a, **kw):
        out = real(*a, **kw)
        n["k"] += 1
        if n["k"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(step, "joint_step", joint_step)
    cfg = tiny_config(**{"pretrain.enabled": False})
    with pytest.raises(engine.TrainingInterrupted) as e:
        engine.train(cfg)
    assert e.value.signum == signal.SIGTERM and (e.value.epoch, e.value.step) == (0, 5)
    meta = json.loads((cfg.run.resolved_dir() / "checkpoints" / "last" / "meta.json").read_text())
    assert (meta["epochs_done"], meta["step_in_epoch"]) == (0, 5)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM))
    monkeypatch.setattr(step, "joint_step", real)
    engine.train(cfg)
    _assert_same_run(ref.run.resolved_dir(), cfg.run.resolved_dir())
