"""facedis.step: the joint step, fast-vs-faithful equivalence, FLOPs vs docs/method.md#flops."""
import copy
import os
import tempfile

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from facedis.losses import uniform_laplacian
from facedis.model import DisentanglingVAE, IdentityDiscriminator
from facedis.config import FidelityConfig as Fidelity
from facedis.config import LossConfig
from facedis.step import (
    Updates,
    eval_forward,
    joint_step,
    pretrain_disc_step,
    step_flops,
)

from step_helpers import WEIGHTS, assert_same_run, grid_mesh, make_batch  # noqa: E402


def build(V=30, width=0.25, use_bn=True, pointwise="conv", seed=0):
    torch.manual_seed(seed)
    vae = DisentanglingVAE(V, 4, 3, width=width, pointwise=pointwise)
    disc = IdentityDiscriminator(width=width, use_bn=use_bn, pointwise=pointwise)
    return vae, disc


def run(vae, disc, batch, mean_face, lap, *, fidelity, steps=2, seed=1, opt="sgd", **kw):
    if opt == "sgd":
        ov = torch.optim.SGD(vae.parameters(), lr=1e-3)
        od = torch.optim.SGD(disc.parameters(), lr=1e-3)
    else:
        ov = torch.optim.Adam(vae.parameters(), lr=1e-4, weight_decay=1e-4)
        od = torch.optim.Adam(disc.parameters(), lr=1e-4)
    torch.manual_seed(seed)
    args = dict(use_discriminator=True, neutral_gt=False, use_laplacian=True)
    args.update(kw)
    for _ in range(steps):
        logs = joint_step(vae, disc, ov, od, batch, mean_face, lap, WEIGHTS, fidelity=fidelity, **args)
        assert all(torch.isfinite(v) for v in logs.values()), logs
    return logs


def test_joint_step_runs_and_updates_everything():
    V, B = 30, 4
    vae, disc = build(V)
    batch, mf = make_batch(B, V)
    before = {k: v.clone() for k, v in {**dict(vae.named_parameters()), **{"d." + k: p for k, p in disc.named_parameters()}}.items()}
    logs = run(vae, disc, batch, mf, uniform_laplacian(grid_mesh(5, 6), V), fidelity=None, steps=1,
               opt="adam", neutral_gt=True)
    assert set(logs) == {"disc", "disc_acc", "recon", "neutral_recon", "exp_recon", "kl_id", "kl_exp",
                         "laplacian", "adv_id", "latent_consistency", "total"}
    for k, v in logs.items():
        assert v.ndim == 0 and not v.requires_grad and torch.isfinite(v), k
    after = {**dict(vae.named_parameters()), **{"d." + k: p for k, p in disc.named_parameters()}}
    for k, p in after.items():
        assert torch.isfinite(p).all(), k
        assert not torch.equal(p, before[k]), f"{k} was not updated"


def _fast_vs_faithful(use_bn, neutral_gt, dtype, steps=2):
    V, B = 30, 4
    tri = grid_mesh(5, 6)
    vae, disc = build(V, use_bn=use_bn)
    vae, disc = vae.to(dtype), disc.to(dtype)
    vae_f, disc_f = copy.deepcopy(vae), copy.deepcopy(disc)
    vae_f.set_pointwise("linear")
    disc_f.set_pointwise("linear")
    batch, mf = make_batch(B, V)
    batch, mf = {k: v.to(dtype) for k, v in batch.items()}, mf.to(dtype)
    common = dict(neutral_gt=neutral_gt, use_laplacian=not neutral_gt, steps=steps)
    la = run(vae, disc, batch, mf, uniform_laplacian(tri, V, dense=True).to(dtype),
             fidelity=Fidelity(), **common)
    lb = run(vae_f, disc_f, batch, mf, uniform_laplacian(tri, V).to(dtype),
             fidelity=Fidelity(detach_fakes=True, encoder_only_reencode=True), **common)
    return la, lb, (vae, vae_f), (disc, disc_f)


@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("neutral_gt", [False, True])
def test_fast_path_gives_identical_updates_exactly(use_bn, neutral_gt):
    """detach_fakes + encoder_only_reencode + sparse Laplacian + pointwise="linear" change no
    update of the reference: in float64 the two runs agree to round-off (1e-10), including BN
    running stats, the D's dropout masks and the shuffle (same RNG stream)."""
    la, lb, vaes, discs = _fast_vs_faithful(use_bn, neutral_gt, torch.float64)
    assert_same_run(la, lb, [vaes, discs], rtol=1e-9, atol=1e-10)


def test_fast_path_gives_identical_updates_fp32():
    # fp32: round-off only. (With the D's BN over tiny batches, fp32 round-off is amplified to
    # ~1e-4 relative within two steps; the float64 test above shows the math is identical.)
    la, lb, vaes, discs = _fast_vs_faithful(False, False, torch.float32)
    assert_same_run(la, lb, [vaes, discs], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("option", ["analytic_kl", "reencode_mu"])
def test_result_changing_options_change_results(option):
    V, B = 30, 4
    tri = grid_mesh(5, 6)
    vae, disc = build(V)
    vae2, disc2 = copy.deepcopy(vae), copy.deepcopy(disc)
    batch, mf = make_batch(B, V)
    lap = uniform_laplacian(tri, V)
    la = run(vae, disc, batch, mf, lap, fidelity=Fidelity(), steps=1)
    lb = run(vae2, disc2, batch, mf, lap, fidelity=Fidelity(**{option: True}), steps=1)
    key = "kl_id" if option == "analytic_kl" else "latent_consistency"
    assert not torch.allclose(la[key], lb[key])


def test_without_discriminator_and_reencode():
    V, B = 30, 4
    vae, _ = build(V)
    batch, mf = make_batch(B, V)
    ov = torch.optim.SGD(vae.parameters(), lr=1e-2)
    w = LossConfig(recon=1.0, kl_id=1e-3, kl_exp=1e-3, adv_id=0.0, latent_consistency=0.0, laplacian=0.0,
                   neutral_recon=0.0, exp_recon=0.0)
    logs = joint_step(vae, None, ov, None, batch, mf, None, w, use_discriminator=False,
                      neutral_gt=False, use_laplacian=False, kl_scale=0.5)
    assert set(logs) == {"recon", "kl_id", "kl_exp", "total"}
    expected = logs["recon"] + 0.5e-3 * (logs["kl_id"] + logs["kl_exp"])
    torch.testing.assert_close(logs["total"], expected)


def test_bf16_autocast_step():
    V, B = 30, 4
    vae, disc = build(V)
    batch, mf = make_batch(B, V)
    logs = run(vae, disc, batch, mf, uniform_laplacian(grid_mesh(5, 6), V), fidelity=None, steps=1,
               updates=Updates(torch.bfloat16, "cpu"))
    assert all(torch.isfinite(v) for v in logs.values())


def test_pretrain_disc_step():
    V, B = 30, 4
    _, disc = build(V)
    batch, _ = make_batch(B, V)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    w0 = disc.head.fc3.weight.clone()
    logs = pretrain_disc_step(disc, opt, {"a": batch["vertices"], "b": batch["partner"],
                                          "same": torch.tensor([1, 0, 1, 0])})
    assert set(logs) == {"disc", "disc_acc"} and torch.isfinite(logs["disc"])
    assert not torch.equal(w0, disc.head.fc3.weight)


def test_eval_forward_uses_mu_codes():
    V, B = 30, 4
    vae, _ = build(V)
    batch, mf = make_batch(B, V)
    vae.eval()
    a = eval_forward(vae, batch["vertices"], mf)
    b = eval_forward(vae, batch["vertices"], mf)
    torch.testing.assert_close(a.full, b.full)
    out = vae(batch["vertices"], mode="mean")
    torch.testing.assert_close(a.full, mf + out.id_offset + out.exp_offset)
    torch.testing.assert_close(a.identity, mf + out.id_offset)
    assert not a.full.requires_grad


# ---- FLOPs (docs/method.md#flops) -------------------------------------------------------------
def _measure_flops(V, B, tri, d=4):
    torch.manual_seed(0)
    vae = DisentanglingVAE(V, d, d)
    disc = IdentityDiscriminator(use_bn=False)
    batch, mf = make_batch(B, V)
    ov = torch.optim.Adam(vae.parameters(), lr=1e-4, weight_decay=1e-4)
    od = torch.optim.Adam(disc.parameters(), lr=1e-4)
    lap = uniform_laplacian(tri, V, dense=True)
    with FlopCounterMode(display=False) as fc:
        joint_step(vae, disc, ov, od, batch, mf, lap, WEIGHTS, use_discriminator=True,
                   neutral_gt=False, use_laplacian=True)
    return fc.get_total_flops()


def test_analytic_flops_reproduce_spec_numbers():
    coma = step_flops(5023, 32, 4, 4)
    assert coma["total"] / 1e9 == pytest.approx(1200.7, abs=0.05)
    assert coma["per_sample"] / 1e9 == pytest.approx(37.52, abs=0.005)
    assert coma["forward"] / 1e9 == pytest.approx(370.4, abs=0.05)
    lean = step_flops(5023, 32, 4, 4, detach_fakes=True, encoder_only_reencode=True, dense_laplacian=False)
    assert lean["total"] / 1e12 == pytest.approx(1.095, abs=5e-4)
    assert step_flops(4547, 32, 64, 64)["total"] / 1e12 == pytest.approx(1.086, abs=5e-4)
    assert step_flops(5023, 32, 4, 4, use_laplacian=False)["per_sample"] / 1e9 == pytest.approx(37.2, abs=0.05)
    assert step_flops(5023, 32, 4, 4, use_discriminator=False)["per_sample"] / 1e9 == pytest.approx(9.3, abs=0.05)


def test_faithful_step_flops_match_analytic_model_small():
    V, B = 300, 4
    measured = _measure_flops(V, B, grid_mesh(15, 20))
    expected = step_flops(V, B, 4, 4)["total"]
    assert measured / expected == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow  # ~5-15 s on a shared CPU
def test_faithful_step_flops_match_analytic_model_coma():
    V, B = 5023, 2
    tri = np.stack([np.arange(V - 2), np.arange(1, V - 1), np.arange(2, V)], 1)
    measured = _measure_flops(V, B, tri)
    expected = step_flops(V, B, 4, 4)["total"]
    assert measured / B / 1e9 == pytest.approx(37.52, abs=0.01)
    assert measured / expected == pytest.approx(1.0, abs=0.01)


# ---- DDP (single process, gloo) ----------------------------------------------------------------
@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("encoder_only", [True, False])
def test_step_under_ddp_with_detached_fakes(gloo_group, encoder_only):
    from torch.nn.parallel import DistributedDataParallel as DDP

    V, B = 30, 4
    vae, disc = build(V)
    batch, mf = make_batch(B, V)
    fid = Fidelity(detach_fakes=True, encoder_only_reencode=encoder_only)
    logs = run(DDP(vae), DDP(disc), batch, mf, uniform_laplacian(grid_mesh(5, 6), V), fidelity=fid, steps=2)
    assert all(torch.isfinite(v) for v in logs.values())


def test_ddp_without_detached_fakes_is_refused(gloo_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    V, B = 30, 4
    vae, disc = build(V)
    batch, mf = make_batch(B, V)
    with pytest.raises(ValueError, match="detach_fakes"):
        run(DDP(vae), DDP(disc), batch, mf, uniform_laplacian(grid_mesh(5, 6), V), fidelity=None, steps=1)
