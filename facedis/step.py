"""The per-batch training math: one joint VAE/discriminator step, one discriminator-pretraining
step, and the evaluation forward. No loop, no Accelerator, no host syncs: the loop
(``facedis.loop``) and the engine own those; benchmarks and tests call these functions directly.

Order of a joint step (docs/method.md, "Training order"):

1. VAE forward on the batch X (sampled codes).
2. D step: [true pairs (X, partner), label 1; fake pairs (X, M̄+Δ_id), label 0], shuffled with a
   device ``randperm``; cross-entropy; backward; discriminator optimiser step.
3. VAE step with the *just-updated* D in train mode: reconstruction (+ neutral / expression MSE),
   both KLs, Laplacian on M̄+Δ_id, the non-saturating adversarial term, the re-encode of M̄+Δ_id
   and the L1 latent consistency; one backward; VAE optimiser step.

The loss weights are the config's own ``LossConfig`` and the switches its ``FidelityConfig``
(defaults reproduce the reference code: one-sample KL, non-detached fakes whose D backward runs
through the VAE, a full-VAE re-encode, sampled codes in the consistency loss; docs/fidelity.md).
``facedis.components.step_fidelity`` expands ``train.fast`` into these switches.

Precision: the step runs its forwards under ``updates.autocast()`` and back-propagates and steps
each optimiser through ``updates.backward(loss, optimizer)`` / ``updates.step(optimizer)``; the
engine passes its :class:`~facedis.runtime.Runtime`, tests and benchmarks :class:`Updates`.

DDP: ``vae`` and ``disc`` may be DDP-wrapped. The step calls them only through ``forward`` (the
encoder-only re-encode is ``vae(x, mode="encode")``), so every parameter a backward reaches is
reached through a wrapped call. With non-detached fakes the D-step backward would also reach the
VAE, which DDP treats as a partial VAE backward; the step refuses that (the parameter updates of
``detach_fakes=True`` are identical).
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import torch

from facedis.config import FidelityConfig, LossConfig
from facedis.losses import (
    adversarial_identity_loss,
    discriminator_loss,
    expression_mse,
    kl_divergence,
    laplacian_loss,
    latent_consistency,
    neutral_mse,
    recon_mse,
)
from facedis.model import Encoding, reparameterize


class Updates:
    """Autocast, backward and optimiser step for one process without Accelerate: fp32 by default,
    or autocast to ``dtype`` (bf16; no loss scaling) on ``device_type``."""

    def __init__(self, dtype: Optional[torch.dtype] = None, device_type: str = "cpu"):
        self.dtype, self.device_type = dtype, device_type

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer, **kwargs) -> None:
        loss.backward(**kwargs)

    def step(self, optimizer) -> None:
        optimizer.step()


FP32 = Updates()


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Losses in at least fp32 (autocast may hand back bf16/fp16); fp64 stays fp64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-vertex concatenation (B,V,3),(B,V,3) -> (B,V,6); the real face X first."""
    return torch.cat([x, y.to(x.dtype)], dim=-1)


def joint_step(
    vae,
    disc,
    opt_vae: torch.optim.Optimizer,
    opt_disc: Optional[torch.optim.Optimizer],
    batch: dict,
    mean_face: torch.Tensor,
    laplacian_operator: Optional[Callable[[torch.Tensor], torch.Tensor]],
    weights: LossConfig,
    *,
    use_discriminator: bool,
    neutral_gt: bool,
    use_laplacian: bool,
    kl_scale: float = 1.0,
    fidelity: Optional[FidelityConfig] = None,
    updates=FP32,
) -> dict[str, torch.Tensor]:
    """One joint training step. Puts ``vae`` and ``disc`` in train mode.

    Args:
        vae: ``DisentanglingVAE`` (or a DDP wrapper of one).
        disc: ``IdentityDiscriminator`` (or DDP wrapper); may be None if not ``use_discriminator``.
        batch: ``vertices`` (B,V,3), ``partner`` (B,V,3) (needed with the D), ``neutral`` (B,V,3)
            (needed with ``neutral_gt``), on the device, stored units.
        mean_face: (V,3) training mean face M̄ on the device.
        laplacian_operator: callable (B,V,3) -> (B,V,3), e.g. ``losses.uniform_laplacian(...)``.
            Needed with ``use_laplacian``.
        weights: the config's ``LossConfig``; each weight multiplies its own term. ``exp_recon``
            is used only with ``neutral_gt``; a zero ``latent_consistency`` skips the re-encode.
        kl_scale: multiplies both KL weights (``losses.kl_decay_scale(epoch)`` for CoMA).
        fidelity: the config's ``FidelityConfig`` as the step should run it (None: the reference).
        updates: autocast/backward/step provider (:class:`Updates` or the engine's ``Runtime``).

    Returns detached 0-d tensors: the unweighted terms computed (named like the ``LossConfig``
    fields), ``total`` (weighted VAE objective), and with the D ``disc`` (D-step loss) and
    ``disc_acc`` (D-step accuracy). No ``.item()``.
    """
    fid = fidelity if fidelity is not None else FidelityConfig()
    if use_discriminator and not fid.detach_fakes and _is_ddp(vae):
        raise ValueError(
            "detach_fakes=False runs the D-step backward through DDP(vae), which DDP rejects "
            "('Expected to have finished reduction ...'); set fidelity.detach_fakes=True under "
            "DDP: the parameter updates are identical (only the wasted FLOPs go)"
        )
    w = weights
    X = batch["vertices"]
    B = X.shape[0]
    vae.train()
    if use_discriminator:
        disc.train()

    # ---- 1. VAE forward on X ----
    with updates.autocast():
        out = vae(X)
        pred_identity = mean_face + out.id_offset  # absolute M̄ + Δ_id

    logs: dict[str, torch.Tensor] = {}

    # ---- 2. D step ----
    if use_discriminator:
        fake = pred_identity.detach() if fid.detach_fakes else pred_identity
        with updates.autocast():
            pairs = torch.cat([_pair(X, batch["partner"]), _pair(X, fake)], dim=0)  # (2B,V,6)
            labels = torch.cat([torch.ones(B, dtype=torch.long, device=X.device),
                                torch.zeros(B, dtype=torch.long, device=X.device)])
            perm = torch.randperm(2 * B, device=X.device)
            labels = labels[perm]
            logits = disc(pairs[perm])
            loss_d = discriminator_loss(_f32(logits), labels)
        opt_disc.zero_grad(set_to_none=True)
        if fid.detach_fakes:
            updates.backward(loss_d, opt_disc)
        else:  # the reference's retain_graph: the VAE graph is reused by the G step
            updates.backward(loss_d, opt_disc, retain_graph=True)
        updates.step(opt_disc)
        logs["disc"] = loss_d.detach()
        logs["disc_acc"] = (logits.detach().argmax(dim=1) == labels).float().mean()

    # ---- 3. G step ----
    opt_vae.zero_grad(set_to_none=True)  # also drops the VAE grads of a non-detached D step
    with updates.autocast():
        terms: dict[str, torch.Tensor] = {}
        terms["recon"] = recon_mse(_f32(out.recon), X, mean_face)
        if neutral_gt:
            terms["neutral_recon"] = neutral_mse(_f32(out.id_offset), batch["neutral"], mean_face)
            if w.exp_recon != 0.0:
                terms["exp_recon"] = expression_mse(_f32(out.exp_offset), X, batch["neutral"])
        terms["kl_id"] = kl_divergence(_f32(out.mu_id), _f32(out.logvar_id), _f32(out.z_id), fid.analytic_kl)
        terms["kl_exp"] = kl_divergence(_f32(out.mu_exp), _f32(out.logvar_exp), _f32(out.z_exp), fid.analytic_kl)
        if use_laplacian:
            terms["laplacian"] = laplacian_loss(pred_identity, laplacian_operator)
        if use_discriminator:  # just-updated D, train mode, non-detached fake
            terms["adv_id"] = adversarial_identity_loss(_f32(disc(_pair(X, pred_identity))))
        if w.latent_consistency != 0.0:
            z_bar = _reencode(vae, pred_identity, fid)
            z_ref = out.mu_id if fid.reencode_mu else out.z_id
            terms["latent_consistency"] = latent_consistency(_f32(z_bar), _f32(z_ref))
        total = sum(_weight(w, k, kl_scale) * v for k, v in terms.items())
    updates.backward(total, opt_vae)
    updates.step(opt_vae)

    logs.update({k: v.detach() for k, v in terms.items()})
    logs["total"] = total.detach()
    return logs


def _is_ddp(module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def _weight(w: LossConfig, name: str, kl_scale: float) -> float:
    value = getattr(w, name)
    return value * kl_scale if name in ("kl_id", "kl_exp") else value


def _reencode(vae, pred_identity: torch.Tensor, fid: FidelityConfig) -> torch.Tensor:
    """Identity code of the re-encoded predicted neutral M̄+Δ_id (train mode, BN stats update).

    Full VAE forward by default (both decoders run, their outputs unused). The encoder-only path
    draws the same random numbers (id, then exp) so both give the same updates.
    """
    if fid.encoder_only_reencode:
        enc: Encoding = vae(pred_identity, mode="encode")
        if fid.reencode_mu:
            return enc.mu_id
        z_id = reparameterize(enc.mu_id, enc.logvar_id)
        torch.randn_like(enc.mu_exp)  # the full forward's exp draw: keep the RNG stream aligned
        return z_id
    out = vae(pred_identity, mode="mean" if fid.reencode_mu else "sample")
    return out.z_id


def pretrain_disc_step(disc, opt: torch.optim.Optimizer, batch: dict, updates=FP32) -> dict[str, torch.Tensor]:
    """One discriminator-pretraining step. batch: ``a``, ``b`` (B,V,3) absolute faces, ``same``
    (B,) int64 (1 = same identity). Returns detached ``disc`` and ``disc_acc``. With BatchNorm,
    B must be > 1."""
    disc.train()
    labels = batch["same"].long()
    with updates.autocast():
        logits = disc(_pair(batch["a"], batch["b"]))
        loss = discriminator_loss(_f32(logits), labels)
    opt.zero_grad(set_to_none=True)
    updates.backward(loss, opt)
    updates.step(opt)
    return {"disc": loss.detach(), "disc_acc": (logits.detach().argmax(dim=1) == labels).float().mean()}


class EvalPrediction(NamedTuple):
    full: torch.Tensor  # (B,V,3) M̄ + Δ_id + Δ_exp
    identity: torch.Tensor  # (B,V,3) M̄ + Δ_id


@torch.no_grad()
def eval_forward(vae, vertices: torch.Tensor, mean_face: torch.Tensor) -> EvalPrediction:
    """Deterministic (μ-code) predictions as absolute faces in stored units (docs/method.md, "Metrics").
    Does not change the module's mode: call ``vae.eval()`` first."""
    out = vae(vertices, mode="mean")
    return EvalPrediction(full=mean_face + out.recon, identity=mean_face + out.id_offset)


@torch.no_grad()
def eval_codes(vae, vertices: torch.Tensor) -> Encoding:
    """μ and log-variance of both latents (e.g. for latent rank-1); no grad, mode unchanged."""
    return vae(vertices, mode="encode")


def step_flops(
    num_vertices: int,
    batch_size: int,
    id_dim: int,
    exp_dim: int,
    *,
    use_discriminator: bool = True,
    use_laplacian: bool = True,
    dense_laplacian: bool = True,
    detach_fakes: bool = False,
    encoder_only_reencode: bool = False,
    latent_consistency: bool = True,
    fused_pointwise: bool = False,
    disc_bn: bool = False,
) -> dict[str, float]:
    """Analytic GEMM/conv/bmm FLOPs of one ``joint_step`` at paper widths (docs/method.md, "Cost model";
    2 FLOPs per MAC; BN, ReLU, max, elementwise losses and Adam excluded).

    Faithful defaults give the reference's 37.52 GFLOP/sample for CoMA (N=5023, B=32, d=4+4).
    ``fused_pointwise`` counts what ``pointwise="fused"`` executes instead: the 128->1024 layers
    run their forward GEMM only; with BN (the VAE encoder; the D when ``disc_bn``) add the
    (128x128) covariance in the forward and the (128x128) input-gradient correction in the
    backward; the gather/scatter of the arg-max rows is not counted.

    Returns ``forward``, ``backward``, ``total`` (per step) and ``per_sample``.
    """
    n, b = num_vertices, batch_size
    enc_conv = 2 * n * (3 * 64 + 64 * 64 + 64 * 64 + 64 * 128 + 128 * 1024)
    conv1_input_grad = 2 * n * 3 * 64  # not needed for the data X (no grad)
    heads_id, heads_exp = 2 * 1024 * 2 * id_dim, 2 * 1024 * 2 * exp_dim
    dec_id = 2 * (id_dim * 256 + 256 * 3 * n)
    dec_exp = 2 * (exp_dim * 256 + 256 * 3 * n)
    enc, dec = enc_conv + heads_id + heads_exp, dec_id + dec_exp
    dis = 2 * 2 * n * (6 * 64 + 64 * 128 + 128 * 1024) + 2 * n * 36 + 2 * (
        1024 * 512 + 512 * 256 + 256 * 36 + 1024 * 512 + 512 * 256 + 256 * 2
    )
    lap = 2 * 3 * n * n if (use_laplacian and dense_laplacian) else 0
    fwd = enc + dec + lap
    bwd = 2 * (enc + dec) - conv1_input_grad + lap
    if use_discriminator:
        fwd += 3 * dis  # 2B pairs in the D step, B in the G step
        bwd += 2 * 2 * dis + 2 * dis
        if not detach_fakes:  # the D-step backward through the id path of the VAE
            bwd += 2 * (enc_conv + heads_id + dec_id) - conv1_input_grad
    if latent_consistency:
        fwd += enc + (0 if encoder_only_reencode else dec)
        bwd += 2 * (enc_conv + heads_id)
    if fused_pointwise:
        last, cov = 2 * n * 128 * 1024, 2 * n * 128 * 128
        enc_fwd_count = 1 + (1 if latent_consistency else 0)
        enc_bwd_count = 1 + (1 if latent_consistency else 0)
        if use_discriminator and not detach_fakes:
            enc_bwd_count += 1
        fwd += enc_fwd_count * cov
        bwd += enc_bwd_count * (cov - 2 * last)
        if use_discriminator:  # 3 pairs per sample: 2 in the D step, 1 in the G step; 2 nets each
            fwd += 3 * 2 * (cov if disc_bn else 0)
            bwd += 3 * 2 * ((cov if disc_bn else 0) - 2 * last)
    fwd, bwd = float(fwd * b), float(bwd * b)
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "per_sample": (fwd + bwd) / b}
