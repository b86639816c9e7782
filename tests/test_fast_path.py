"""The fast training step (``train.fast``): same updates as the faithful step, bf16 tracks fp32.

- ``pointwise="fused"`` (Linear + BN + ReLU + max-pool of the widest layer in one autograd
  Function) is the same function with the same gradients and BN running statistics as the
  ``linear``/``conv`` paths, in train and eval mode, with and without BN.
- The whole fast path (``facedis.components.step_fidelity`` and ``pointwise_mode`` of a
  ``train.fast`` config: detached fakes, encoder-only re-encode, sparse Laplacian, fused
  point-wise layers) gives the faithful step's parameter updates: float64 to 1e-10, fp32 to
  round-off (the existing tolerance of tests/test_step.py).
- bf16 autocast: each step matches fp32 to bf16 precision, and a 30-step run stays finite and
  learns like the fp32 one.
"""
import copy

import numpy as np
import pytest
import torch

from facedis.components import pointwise_mode, step_fidelity
from facedis.config import Config, FidelityConfig
from facedis.data import DevicePrefetcher
from facedis.losses import uniform_laplacian
from facedis.model import DisentanglingVAE, IdentityDiscriminator, PointwiseMLP
from facedis.step import Updates, joint_step, step_flops

from step_helpers import WEIGHTS, assert_same_run, grid_mesh, make_batch  # noqa: E402


# ---- the fused layer -------------------------------------------------------------------------
@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_fused_layer_is_the_same_function_float64(use_bn, train):
    torch.manual_seed(0)
    ref = PointwiseMLP([6, 16, 32, 64], use_bn=use_bn, pointwise="linear").double()
    for p in ref.parameters():
        p.data.normal_()  # random signs of the BN gammas: both the max and the min branch
    if use_bn:
        ref.bn3.running_mean.normal_()
        ref.bn3.running_var.uniform_(0.5, 2.0)
    fused = copy.deepcopy(ref)
    fused.pointwise = "fused"
    ref.train(train)
    fused.train(train)
    x = torch.randn(3, 50, 6, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 64, dtype=torch.float64)
    a, b = ref(x), fused(x2)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    (a * g).sum().backward()
    (b * g).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-12)
    for (k, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-11, msg=k)
    for (k, p), q in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12, msg=k)


def test_fused_layer_chunking_does_not_matter():
    torch.manual_seed(0)
    from facedis import model as M

    m = PointwiseMLP([3, 8, 32], use_bn=True, pointwise="fused").double()
    x = torch.randn(5, 20, 3, dtype=torch.float64)
    old = dict(M.FUSED_CHUNK_ROWS)
    try:
        outs = []
        for rows in (1, 40, 10_000):
            M.FUSED_CHUNK_ROWS["cpu"] = rows
            outs.append(copy.deepcopy(m)(x))
    finally:
        M.FUSED_CHUNK_ROWS.update(old)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_fused_layer_under_bf16_autocast_is_close():
    torch.manual_seed(0)
    vae = DisentanglingVAE(40, 4, 3, width=0.25, pointwise="fused")
    ref = copy.deepcopy(vae)
    ref.set_pointwise("linear")
    x = torch.randn(4, 40, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ref(x, mode="encode").mu_id.float()
        b = vae(x, mode="encode").mu_id.float()
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)


# ---- the whole fast path vs the faithful step ------------------------------------------------
def _fast_config(**fidelity) -> Config:
    cfg = Config()
    cfg.train.fast = True
    for k, v in fidelity.items():
        setattr(cfg.fidelity, k, v)
    return cfg


def _fast(cfg: Config, *modules):
    """The modules switched in place to the point-wise mode ``cfg`` trains with (parameters kept)."""
    for m in modules:
        m.set_pointwise(pointwise_mode(cfg))
    return modules


def _run(vae, disc, batch, mf, lap, fid, steps, updates=None, opt="sgd", neutral_gt=False, seed=1):
    if opt == "sgd":
        ov = torch.optim.SGD(vae.parameters(), lr=1e-3)
        od = torch.optim.SGD(disc.parameters(), lr=1e-3)
    else:
        ov = torch.optim.Adam(vae.parameters(), lr=1e-3, weight_decay=1e-4)
        od = torch.optim.Adam(disc.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    kw = dict(use_discriminator=True, neutral_gt=neutral_gt, use_laplacian=not neutral_gt, fidelity=fid)
    if updates is not None:
        kw["updates"] = updates
    hist = []
    for _ in range(steps):
        logs = joint_step(vae, disc, ov, od, batch, mf, lap, WEIGHTS, **kw)
        hist.append({k: float(v) for k, v in logs.items()})
    return logs, hist


def _faithful_vs_fast(use_bn, neutral_gt, dtype, steps=2):
    V, B = 30, 4
    tri = grid_mesh(5, 6)
    torch.manual_seed(0)
    vae = DisentanglingVAE(V, 4, 3, width=0.25).to(dtype)  # conv: the reference layout
    disc = IdentityDiscriminator(width=0.25, use_bn=use_bn).to(dtype)
    cfg = _fast_config()
    fid = step_fidelity(cfg)
    vae_f, disc_f = _fast(cfg, copy.deepcopy(vae), copy.deepcopy(disc))
    assert vae_f.pointwise == "fused" and disc_f.pointwise == "fused"
    batch, mf = make_batch(B, V, dtype=dtype)
    la, _ = _run(vae, disc, batch, mf, uniform_laplacian(tri, V, dense=True).to(dtype), FidelityConfig(), steps,
                 neutral_gt=neutral_gt)
    lb, _ = _run(vae_f, disc_f, batch, mf, uniform_laplacian(tri, V, dense=fid.dense_laplacian).to(dtype),
                 fid, steps, neutral_gt=neutral_gt)
    return la, lb, [(vae, vae_f), (disc, disc_f)]


@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("neutral_gt", [False, True])
def test_fast_path_gives_identical_updates_float64(use_bn, neutral_gt):
    la, lb, pairs = _faithful_vs_fast(use_bn, neutral_gt, torch.float64, steps=3)
    assert_same_run(la, lb, pairs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("neutral_gt", [False, True])
def test_fast_path_gives_identical_updates_fp32(neutral_gt):
    # fp32 round-off only. As in tests/test_step.py the D runs without BN (the joint D of 5 of the
    # 6 reference runs): the D's BN over 2B = 8 rows amplifies fp32 round-off to ~1e-4 relative in
    # two steps whatever the implementation (docs/fidelity.md); float64 above covers it exactly.
    la, lb, pairs = _faithful_vs_fast(False, neutral_gt, torch.float32, steps=2)
    assert_same_run(la, lb, pairs, rtol=1e-4, atol=2e-5)


# bf16 keeps 8 significant bits: one rounding is off by at most 2**-9 relative, 2**-8 with the slack
# of an fp32-accumulated matmul whose inputs were rounded too.
BF16_EPS = 2.0**-8
# bf16 roundings in series between the input and the reconstruction of the VAE below: 5 point-wise
# layers (matmul and BN output each), the mu/logvar head, the sampling (exp, x, +), 2 decoder layers
# and the sum id_offset + exp_offset.
BF16_DEPTH = 17


def _recon_bound(recon: float, target_rms: float) -> float:
    """Largest |recon_bf16 - recon_fp32| that bf16 rounding explains, from the same state.

    recon = mean(r^2), r = x_hat - (X - M). Each of ``BF16_DEPTH`` roundings in series moves x_hat by at
    most ``BF16_EPS`` relative (first order; BN keeps each layer's gain near 1), so
    rms(dx) <= e * rms(x_hat) with e = BF16_DEPTH * BF16_EPS, rms(x_hat) <= rms(r) + rms(X - M), and by
    Cauchy-Schwarz |d recon| = |mean(2 r dx + dx^2)| <= 2 rms(r) rms(dx) + rms(dx)^2.
    """
    e = BF16_DEPTH * BF16_EPS
    rms_r = recon ** 0.5
    dx = e * (rms_r + target_rms)
    return 2 * rms_r * dx + dx * dx


def test_bf16_training_tracks_fp32(monkeypatch):
    """What bf16 autocast must guarantee on any CPU, with or without native bf16 matmul (oneDNN's
    bf16 kernels and torch's fp32 fallback both round each op's inputs and output to bf16 and
    accumulate in fp32, so the same bounds hold for both).

    1. Step by step it computes what fp32 computes, to bf16 precision: every 5 steps along the fp32
       run, one joint step from that state (weights, Adam moments, RNG) in bf16 and in fp32 gives
       reconstruction losses within :func:`_recon_bound` (17 roundings of 2**-8 -> 6.6% of x_hat;
       measured over 8 seeds: at most 7% of the bound), and not bitwise equal (autocast is on).
    2. It stays finite, and the weights stay fp32.
    3. It learns like fp32: over 30 Adam steps both runs cut recon more than 10x, and end within a
       factor 1.5 of each other. The ends are not compared more tightly because the trajectories
       are chaotic, not because bf16 is imprecise: Adam moves every weight by about lr per step
       whatever its gradient's size, so a rounding that flips a small gradient's sign moves the
       weight the other way, and the runs drift apart by up to 2*lr*steps per weight. Rounding
       fp32's initial weights to bf16 once (2**-9 relative) already moves fp32's recon after 30
       steps by ~8%, and the bf16 run rounds every op of every step (ends measured up to 9% apart
       over 8 seeds; a 15% bound on them passed or failed depending on the CPU's bf16 kernels).

    The sampling noise is drawn in fp32 in both runs (``torch.randn_like`` patched; the bf16 run
    rounds it to bf16 like any other value): torch's CPU normal kernel takes a different path for
    bf16 than for fp32 tensors, which for some sizes draws different numbers (a batch of 8
    3-dimensional codes is one), and which path fp32 takes depends on the CPU's vector ISA. The
    runs would then sample different codes: a different random draw, not a precision effect.
    """
    V, B = 30, 8
    randn_like, draws = torch.randn_like, []

    def fp32_randn_like(t, *args, dtype=None, **kwargs):
        draws.append(t.dtype)
        return randn_like(t, *args, dtype=torch.float32, **kwargs).to(dtype or t.dtype)

    monkeypatch.setattr(torch, "randn_like", fp32_randn_like)
    tri = grid_mesh(5, 6)
    torch.manual_seed(0)
    vae = DisentanglingVAE(V, 4, 3, width=0.5)
    disc = IdentityDiscriminator(width=0.25, use_bn=False)
    batch, mf = make_batch(B, V, seed=3)
    lap = uniform_laplacian(tri, V)
    target_rms = float((batch["vertices"] - mf).pow(2).mean().sqrt())
    cfg = _fast_config()
    fid = step_fidelity(cfg)
    updates = {"no": Updates(), "bf16": Updates(torch.bfloat16, "cpu")}
    kw = dict(use_discriminator=True, neutral_gt=False, use_laplacian=True, fidelity=fid)

    def setup():
        v, dd = _fast(cfg, copy.deepcopy(vae), copy.deepcopy(disc))
        ov = torch.optim.Adam(v.parameters(), lr=1e-3, weight_decay=1e-4)
        od = torch.optim.Adam(dd.parameters(), lr=1e-3)
        return v, dd, ov, od

    def step(state, prec):
        v, dd, ov, od = state
        logs = joint_step(v, dd, ov, od, batch, mf, lap, WEIGHTS, updates=updates[prec], **kw)
        return {k: float(x) for k, x in logs.items()}

    curves, checked = {}, 0
    for prec in ("no", "bf16"):
        state = setup()
        torch.manual_seed(1)
        hist = []
        for t in range(30):
            if prec == "no" and t % 5 == 0:  # 1. one step from the same state in both precisions
                rng = torch.get_rng_state()
                one = {}
                for p in ("no", "bf16"):
                    torch.set_rng_state(rng)
                    one[p] = step(copy.deepcopy(state), p)  # models and optimisers copied together
                torch.set_rng_state(rng)  # the fp32 run goes on from here: its next step is one["no"]
                r32, r16 = one["no"]["recon"], one["bf16"]["recon"]
                assert abs(r16 - r32) <= _recon_bound(r32, target_rms), (t, r32, r16, _recon_bound(r32, target_rms))
                if t == 0:
                    assert r16 != r32, "bf16 autocast changed nothing"
                checked += 1
            hist.append(step(state, prec))
            if prec == "no" and t % 5 == 0:
                assert hist[-1] == one["no"], "the copied state is not the run's state"
        for m in state[:2]:  # 2. fp32 master weights, finite
            assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.parameters())
        curves[prec] = hist
    assert checked == 6 and torch.bfloat16 in draws and torch.float32 in draws  # the noise went through the patch
    f32, b16 = curves["no"], curves["bf16"]
    for h in f32 + b16:  # 2. finite throughout
        assert all(np.isfinite(x) for x in h.values()), h
    end32 = np.mean([h["recon"] for h in f32[-3:]])
    end16 = np.mean([h["recon"] for h in b16[-3:]])
    assert end32 < 0.1 * f32[0]["recon"] and end16 < 0.1 * b16[0]["recon"], (f32[0]["recon"], end32, b16[0]["recon"], end16)
    assert 1 / 1.5 <= end16 / end32 <= 1.5, (end32, end16)  # 3. learns like fp32


# ---- the option set -------------------------------------------------------------------------
def test_fast_fidelity_keeps_result_changing_options():
    assert step_fidelity(_fast_config(analytic_kl=True)) == FidelityConfig(
        analytic_kl=True, detach_fakes=True, encoder_only_reencode=True, dense_laplacian=False)
    assert step_fidelity(_fast_config()) == FidelityConfig(detach_fakes=True, encoder_only_reencode=True)
    assert step_fidelity(_fast_config(dense_laplacian=True)).dense_laplacian is False


def test_fast_path_from_config():
    cfg = Config()
    assert step_fidelity(cfg) == FidelityConfig() and pointwise_mode(cfg) == cfg.model.pointwise == "conv"
    cfg.train.fast = True
    cfg.fidelity.dense_laplacian = True
    cfg.fidelity.reencode_mu = True
    fid = step_fidelity(cfg)
    assert pointwise_mode(cfg) == "fused"
    assert fid.reencode_mu and fid.detach_fakes and fid.encoder_only_reencode and not fid.dense_laplacian
    assert cfg.fidelity.dense_laplacian and not cfg.fidelity.detach_fakes  # the config itself is left alone


def test_fast_path_switches_in_place_and_keeps_state_dict():
    vae = DisentanglingVAE(20, 2, 2, width=0.25)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    (out,) = _fast(_fast_config(), vae)
    assert out is vae and vae.pointwise == "fused"
    assert all(torch.equal(sd[k], v) for k, v in vae.state_dict().items())


def test_device_prefetcher_cpu_passthrough():
    data = [{"x": torch.full((2,), float(i)), "i": i} for i in range(3)]
    out = list(DevicePrefetcher(data, "cpu"))
    assert [b["i"] for b in out] == [0, 1, 2]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(data, out))
    assert list(DevicePrefetcher([], "cpu")) == []


def test_fused_flop_model():
    ref = step_flops(5023, 8, 4, 4)
    fused = step_flops(5023, 8, 4, 4, detach_fakes=True, encoder_only_reencode=True, dense_laplacian=False,
                       fused_pointwise=True)
    assert fused["per_sample"] < 0.4 * ref["per_sample"]
    assert step_flops(5023, 8, 4, 4)["per_sample"] / 1e9 == pytest.approx(37.52, abs=0.005)


# ---- small-model speed-ups: same values and gradients ------------------------------------------
def test_max_over_points_matches_amax_with_ties():
    """The lean max-pool gives amax's values and gradients bit for bit, ties included (a duplicated
    point and a channel that is 0 everywhere after the ReLU)."""
    from facedis.model import max_over_points

    torch.manual_seed(0)
    h = torch.relu(torch.randn(4, 50, 8, dtype=torch.float64))
    h[0, 5] = h[0, 7] = h[0].amax(dim=0) + 1.0  # a duplicated point that is the maximum
    h[1, :, 3] = 0.0
    h.requires_grad_()
    g = torch.randn(4, 8, dtype=torch.float64)
    ref, = torch.autograd.grad(h.amax(dim=1), h, g)
    ours, = torch.autograd.grad(max_over_points(h), h, g)
    assert torch.equal(max_over_points(h), h.amax(dim=1))
    assert torch.equal(ours, ref)
    assert ours[0, 5].abs().sum() > 0 and torch.equal(ours[0, 5], ours[0, 7])  # the tie is split evenly


def test_adam_multi_tensor_update_is_bit_identical():
    """``components.adam`` (foreach) gives the per-parameter loop's updates exactly."""
    from facedis.components import adam

    def run(make):
        torch.manual_seed(0)
        model = DisentanglingVAE(30, 4, 4, width=0.125)
        opt = make(model.parameters())
        x = torch.randn(6, 30, 3)
        for _ in range(5):
            opt.zero_grad()
            out = model(x)
            (out.recon.pow(2).mean() + out.mu_id.pow(2).mean()).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    loop = run(lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4, foreach=False))
    multi = run(lambda p: adam(p, lr=1e-3, weight_decay=1e-4))
    assert all(torch.equal(a, b) for a, b in zip(loop, multi))
