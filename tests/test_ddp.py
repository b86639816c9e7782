"""DDP with 2 real processes (gloo, CPU): replicas stay identical and match a single-process run
with the same global batch (synchronised BatchNorm + global-batch sampler)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facedis import engine
from facedis.config import save_config

REPO = Path(__file__).resolve().parent.parent


def _fresh_accelerate_state():
    """debug_launcher forks this process: drop any accelerate state inherited from earlier tests."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    GradientState._reset_state()


def _deterministic_codes(monkeypatch):
    """z = μ: the VAE's Monte-Carlo noise is drawn per process (per-rank streams), so it cannot match
    a single-process run; everything else must."""
    import facedis.model as model
    import facedis.step as step

    monkeypatch.setattr(model, "reparameterize", lambda mu, logvar: mu + 0.0 * logvar)
    monkeypatch.setattr(step, "reparameterize", lambda mu, logvar: mu + 0.0 * logvar)


def _bn_worker(out_dir):
    import torch.distributed as dist

    from facedis.distributed import GlobalBatchNorm

    _fresh_accelerate_state()
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    torch.manual_seed(0)
    x = torch.randn(8, 5, 7, dtype=torch.float64)
    w = torch.randn(8, 5, 7, dtype=torch.float64)
    r = acc.process_index
    bn = GlobalBatchNorm(5).double()
    xl = x[4 * r:4 * (r + 1)].clone().requires_grad_(True)
    y = bn(xl)
    (y * w[4 * r:4 * (r + 1)]).sum().backward()
    grads = [torch.zeros_like(bn.weight) for _ in range(2)]
    dist.all_gather(grads, bn.weight.grad)
    torch.save({"y": y.detach(), "gx": xl.grad, "gw": sum(grads), "rm": bn.running_mean, "rv": bn.running_var},
               Path(out_dir) / f"bn{r}.pt")


def test_global_batchnorm_matches_full_batch(tmp_path):
    from accelerate import debug_launcher

    debug_launcher(lambda: _bn_worker(tmp_path), num_processes=2)
    torch.manual_seed(0)
    x = torch.randn(8, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 5, 7, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(5).double()
    y = bn(x)
    (y * w).sum().backward()
    parts = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach())
    torch.testing.assert_close(torch.cat([p["gx"] for p in parts]), x.grad)
    torch.testing.assert_close(parts[0]["gw"], bn.weight.grad)
    torch.testing.assert_close(parts[1]["rm"], bn.running_mean)
    torch.testing.assert_close(parts[1]["rv"], bn.running_var)


def _train_worker(cfg):
    _fresh_accelerate_state()
    engine.train(cfg)


@pytest.mark.slow
def test_two_processes_match_single_process(tiny_config, tmp_path, monkeypatch):
    from accelerate import debug_launcher

    _deterministic_codes(monkeypatch)
    common = {"pretrain.enabled": False, "train.epochs": 2, "train.batch_size": 8, "train.eval_every": 2,
              "optim.lr_disc": 1e-3, "train.log_every_steps": 4}
    one = tiny_config(**common, **{"run.dir": str(tmp_path / "one")})
    two = tiny_config(**common, **{"run.dir": str(tmp_path / "two")})
    engine.train(one)
    debug_launcher(lambda: _train_worker(two), num_processes=2)

    prov = json.loads((tmp_path / "two" / "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["per_process_batch_size"] == 4
    # identical replicas (exact): every rank hashed its own parameters into the checkpoint
    ranks = [torch.load(tmp_path / "two" / "checkpoints" / "last" / f"rank{r}.pt", weights_only=True)
             for r in range(2)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    # the same training as one process with the global batch, up to float round-off
    a = torch.load(tmp_path / "one" / "checkpoints" / "last" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    # A bias right before a BatchNorm has an exactly-zero gradient; Adam's normalisation turns the
    # float round-off of that zero into +-lr steps, so it (and the BN running mean, which absorbs
    # it) wander differently; in training mode BN cancels them exactly. The evaluation metrics
    # below check that the eval-mode functions agree.
    inert = {f"encoder.conv{i}.bias" for i in range(1, 6)} | {f"encoder.bn{i}.running_mean" for i in range(1, 6)}
    for net in ("vae", "disc"):
        for k, v in a[net].items():
            if net == "vae" and k in inert:
                continue
            if v.is_floating_point():
                torch.testing.assert_close(b[net][k], v, rtol=1e-3, atol=3e-4, msg=f"{net}.{k}")
            else:
                assert torch.equal(b[net][k], v), k
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert mb["num_test_samples"] == ma["num_test_samples"]
    for k in ("train/recon", "train/neutral_recon", "train/disc", "train/total"):  # train mode: tight
        assert mb[k] == pytest.approx(ma[k], rel=1e-3), k
    for k in ("E_rec_mean", "AVD_neu_mean"):  # eval mode sees the wandering running means (E_dis: a spread, too sensitive)
        assert mb[k] == pytest.approx(ma[k], rel=2e-2), k


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.epochs": 1, "pretrain.epochs": 1, "train.checkpoint_every_steps": 2})
    save_config(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "facedis" / "train.py"), "--config", str(tmp_path / "cfg.yaml")]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    run = cfg.run.resolved_dir()
    assert json.loads((run / "provenance.json").read_text())["world_size"] == 2
    assert (run / "metrics.json").is_file() and (run / "model.pt").is_file()
    assert r.stdout.count("facedis: finished") == 1  # the summary is printed by the main process only
