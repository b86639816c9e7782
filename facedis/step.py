"""The per-batch training math: one joint VAE/discriminator step, one D-pretraining step, and
the evaluation forward. No loop, no Accelerator, no host syncs: ``facedis.engine`` owns those,
and benchmarks/tests call these functions directly.

Order of a joint step (method-spec §2.2):

1. VAE forward on the batch X (sampled codes).
2. D step: [true pairs (X, partner), label 1; fake pairs (X, M̄+Δ_id), label 0], shuffled with a
   device ``randperm``; CE; backward; ``opt_disc.step()``.
3. G step with the *just-updated* D in train mode: reconstruction (+ neutral / expression MSE),
   both KLs, Laplacian on M̄+Δ_id, the non-saturating adversarial term, the re-encode of M̄+Δ_id
   and the L1 latent consistency; one backward; ``opt_vae.step()``.

Faithful by default (``Fidelity()``): one-sample KL, non-detached fakes (the D backward runs
through the VAE, whose grads are then zeroed, exactly the reference's FLOPs), a full-VAE
re-encode (both decoders, train-mode BN updates), sampled codes in the consistency loss.
See ``docs/fidelity.md`` for every option and whether it changes results.

DDP: the engine may pass DDP-wrapped ``vae`` and ``disc``. The step calls them only through
``forward`` (the encoder-only re-encode is ``vae(x, mode="encode")``), so no ``unwrap`` is
needed and every parameter that a backward reaches is reached through a wrapped call.
One caveat: with ``detach_fakes=False`` the D-step backward also reaches the id-path of the
VAE, which DDP(vae) would treat as a (partial) VAE backward and then fail on the G backward.
Under DDP use ``detach_fakes=True`` (the step raises otherwise): its parameter updates are
identical (tests/test_step.py).
``backward`` is called as ``backward(loss)`` or ``backward(loss, retain_graph=True)``;
``accelerator.backward`` accepts both.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

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


@dataclass
class StepWeights:
    """Weights of the VAE objective; each multiplies its own term directly (flat sum, no nesting):
    ``neutral_recon`` and ``exp_recon`` are the reference's λ1·λ6, ``recon`` is λ1,
    ``kl_id``/``kl_exp`` λ2/λ3, ``adv_id`` λ4, ``latent_consistency`` λ7, ``laplacian`` λ8."""

    recon: float = 1.0
    kl_id: float = 0.0
    kl_exp: float = 0.0
    adv_id: float = 0.0
    neutral_recon: float = 0.0
    exp_recon: float = 0.0
    latent_consistency: float = 0.0
    laplacian: float = 0.0


@dataclass
class Fidelity:
    """Reference defects that can be fixed (method-spec §6); defaults reproduce the reference.

    analytic_kl: closed-form KL instead of the one-sample estimate (changes results).
    disc_bn_match: the joint D uses the pretraining BN/dropout setting (engine-level: decides how
        the joint D is built; the step ignores it) (changes results).
    detach_fakes: detach M̄+Δ_id in the D step (same updates, ~8% fewer FLOPs).
    encoder_only_reencode: re-encode with the encoder only (same updates, no unused decoders).
    reencode_mu: deterministic μ codes on both sides of the consistency loss (changes results).
    """

    analytic_kl: bool = False
    disc_bn_match: bool = False
    detach_fakes: bool = False
    encoder_only_reencode: bool = False
    reencode_mu: bool = False


FIDELITY_OPTIONS = tuple(Fidelity.__dataclass_fields__)


def _fidelity(obj) -> Fidelity:
    """Accept ``None``, a ``Fidelity`` or any object with (some of) the same attributes."""
    if obj is None:
        return Fidelity()
    if isinstance(obj, Fidelity):
        return obj
    if isinstance(obj, dict):
        unknown = set(obj) - set(FIDELITY_OPTIONS)
        if unknown:
            raise ValueError(f"unknown fidelity options {sorted(unknown)}; valid: {FIDELITY_OPTIONS}")
        return Fidelity(**obj)
    return Fidelity(**{k: bool(getattr(obj, k, False)) for k in FIDELITY_OPTIONS})


def _default_backward(loss: torch.Tensor, **kwargs) -> None:
    loss.backward(**kwargs)


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
    weights: StepWeights,
    *,
    use_discriminator: bool,
    neutral_gt: bool,
    use_laplacian: bool,
    kl_scale: float = 1.0,
    fidelity=None,
    backward: Callable = _default_backward,
    autocast_ctx: Callable = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """One joint training step (method-spec §2.2). Puts ``vae`` and ``disc`` in train mode.

    Args:
        vae: ``DisentanglingVAE`` (or a DDP wrapper of one).
        disc: ``IdentityDiscriminator`` (or DDP wrapper); may be None if not ``use_discriminator``.
        batch: ``vertices`` (B,V,3), ``partner`` (B,V,3) (needed with the D), ``neutral`` (B,V,3)
            (needed with ``neutral_gt``), on the device, stored units.
        mean_face: (V,3) training mean face M̄ on the device.
        laplacian_operator: callable (B,V,3) -> (B,V,3), e.g. ``losses.uniform_laplacian(...)``
            (sparse; ``dense=True`` for the reference's FLOPs). Needed with ``use_laplacian``.
        weights: ``StepWeights``. ``exp_recon`` is used only with ``neutral_gt``; a zero
            ``latent_consistency`` skips the re-encode.
        kl_scale: multiplies both KL weights (``losses.kl_decay_scale(epoch)`` for CoMA).
        fidelity: ``Fidelity``, a dict, or any object with its attribute names (cfg.fidelity).
        backward: ``accelerator.backward`` or the default ``loss.backward``.
        autocast_ctx: zero-arg callable returning the forward's context (``accelerator.autocast``).

    Returns detached 0-d tensors: the ``StepWeights`` field names that were computed (unweighted
    terms), ``total`` (weighted VAE objective), and with the D ``disc`` (D-step loss) and
    ``disc_acc`` (D-step accuracy). No ``.item()``.
    """
    fid = _fidelity(fidelity)
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
    with autocast_ctx():
        out = vae(X)
        pred_identity = mean_face + out.id_offset  # absolute M̄ + Δ_id

    logs: dict[str, torch.Tensor] = {}

    # ---- 2. D step ----
    if use_discriminator:
        fake = pred_identity.detach() if fid.detach_fakes else pred_identity
        with autocast_ctx():
            pairs = torch.cat([_pair(X, batch["partner"]), _pair(X, fake)], dim=0)  # (2B,V,6)
            labels = torch.cat([torch.ones(B, dtype=torch.long, device=X.device),
                                torch.zeros(B, dtype=torch.long, device=X.device)])
            perm = torch.randperm(2 * B, device=X.device)
            labels = labels[perm]
            logits = disc(pairs[perm])
            loss_d = discriminator_loss(_f32(logits), labels)
        opt_disc.zero_grad(set_to_none=True)
        if fid.detach_fakes:
            backward(loss_d)
        else:  # the reference's retain_graph: the VAE graph is reused by the G step
            backward(loss_d, retain_graph=True)
        opt_disc.step()
        logs["disc"] = loss_d.detach()
        logs["disc_acc"] = (logits.detach().argmax(dim=1) == labels).float().mean()

    # ---- 3. G step ----
    opt_vae.zero_grad(set_to_none=True)  # also drops the VAE grads of a non-detached D step
    with autocast_ctx():
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
    backward(total)
    opt_vae.step()

    logs.update({k: v.detach() for k, v in terms.items()})
    logs["total"] = total.detach()
    return logs


def _is_ddp(module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def _weight(w: StepWeights, name: str, kl_scale: float) -> float:
    value = getattr(w, name)
    return value * kl_scale if name in ("kl_id", "kl_exp") else value


def _reencode(vae, pred_identity: torch.Tensor, fid: Fidelity) -> torch.Tensor:
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


def pretrain_disc_step(
    disc,
    opt: torch.optim.Optimizer,
    batch: dict,
    backward: Callable = _default_backward,
    autocast_ctx: Callable = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """One D-pretraining step (method-spec §3). batch: ``a``, ``b`` (B,V,3) absolute faces,
    ``same`` (B,) int64 (1 = same identity). Returns detached ``disc`` and ``disc_acc``.
    With BN, B must be > 1 (the reference skips size-1 batches; use ``drop_last``)."""
    disc.train()
    labels = batch["same"].long()
    with autocast_ctx():
        logits = disc(_pair(batch["a"], batch["b"]))
        loss = discriminator_loss(_f32(logits), labels)
    opt.zero_grad(set_to_none=True)
    backward(loss)
    opt.step()
    return {"disc": loss.detach(), "disc_acc": (logits.detach().argmax(dim=1) == labels).float().mean()}


class EvalPrediction(NamedTuple):
    full: torch.Tensor  # (B,V,3) M̄ + Δ_id + Δ_exp
    identity: torch.Tensor  # (B,V,3) M̄ + Δ_id


@torch.no_grad()
def eval_forward(vae, vertices: torch.Tensor, mean_face: torch.Tensor) -> EvalPrediction:
    """Deterministic (μ-code) predictions as absolute faces in stored units (method-spec §5.1).
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
    """Analytic GEMM/conv/bmm FLOPs of one ``joint_step`` at paper widths (method-spec §7.1;
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


# ---------------------------------------------------------------------------------------------
# the fast path (GitHub issue #11)
# ---------------------------------------------------------------------------------------------
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class FastPath:
    """Everything that makes ``joint_step`` fast, as one option set (docs/fidelity.md, "fast path").

    Same parameter updates as the faithful step (fp32: round-off; tests/test_fast_path.py):

    - ``detach_fakes``, ``encoder_only_reencode``: ``Fidelity`` fields (no wasted VAE backward in
      the D step, no unused decoders in the re-encode).
    - ``dense_laplacian=False``: the sparse neighbour-gather Laplacian (build it with
      ``losses.uniform_laplacian(tri, V, dense=False)``).
    - ``pointwise="fused"``: point-wise layers as points-major GEMMs, the widest one fused with
      its BN + ReLU + max-pool (``model._FusedPointwiseMax``): no B·V·1024 map, no GEMM in its
      backward.
    - no host syncs: ``joint_step`` returns device tensors; the engine should ``.item()`` them
      only every ``train.log_every_steps``.

    Reduced precision (updates within a stated tolerance, loss curve tracks fp32):
    - ``precision``: ``"bf16"`` / ``"fp16"`` autocast of the forward (``autocast_ctx(device)``);
      parameters, optimiser state, BN statistics and losses stay fp32. fp16 needs a GradScaler
      (``accelerate`` adds one for ``mixed_precision="fp16"``).
    - ``compile``: ``torch.compile`` the two modules (GPU: fewer kernels; CPU: no speed, less
      memory). Off by default.
    """

    detach_fakes: bool = True
    encoder_only_reencode: bool = True
    dense_laplacian: bool = False
    pointwise: str = "fused"
    precision: str = "no"
    compile: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; valid choices: {PRECISIONS}")

    def fidelity(self, base=None) -> Fidelity:
        """``base`` (a ``Fidelity``/``cfg.fidelity``/dict/None) with the fast, update-preserving
        switches turned on; the result-changing options (analytic_kl, reencode_mu,
        disc_bn_match) are kept as given."""
        fid = _fidelity(base)
        return Fidelity(**{**fid.__dict__, "detach_fakes": fid.detach_fakes or self.detach_fakes,
                           "encoder_only_reencode": fid.encoder_only_reencode or self.encoder_only_reencode})

    def autocast_ctx(self, device) -> Callable:
        """Zero-arg callable giving the forward's autocast context (``nullcontext`` for ``"no"``)."""
        dev = torch.device(device).type
        if self.precision == "no":
            return contextlib.nullcontext
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return lambda: torch.autocast(dev, dtype=dtype)

    def apply(self, *modules):
        """Switch the point-wise mode of each module in place (parameters unchanged) and return
        them, compiled when ``compile`` (compile *after* DDP wrapping is also fine)."""
        out = []
        for m in modules:
            if m is None:
                out.append(None)
                continue
            base = m.module if _is_ddp(m) else m
            getattr(base, "set_pointwise")(self.pointwise)
            out.append(torch.compile(m) if self.compile else m)
        return tuple(out) if len(out) != 1 else out[0]


def fast_fidelity(base=None) -> Fidelity:
    """The fast, update-preserving ``Fidelity`` (detached fakes, encoder-only re-encode) on top of
    ``base``'s result-changing options. Shorthand for ``FastPath().fidelity(base)``."""
    return FastPath().fidelity(base)


def fast_path(cfg=None, **overrides) -> FastPath:
    """The ``FastPath`` for a ``Config`` (``train.fast``, ``train.precision``, ``train.compile``,
    ``model.pointwise``, ``fidelity.dense_laplacian``) or the defaults when ``cfg`` is None.

    With ``train.fast`` the point-wise mode is ``"fused"`` and the Laplacian sparse whatever
    ``model.pointwise``/``fidelity.dense_laplacian`` say; without it those fields are used as
    given and only ``precision``/``compile`` apply (a faithful run can still use bf16)."""
    if cfg is None:
        return FastPath(**overrides)
    tr = cfg.train
    fast = bool(getattr(tr, "fast", False))
    kw = dict(
        detach_fakes=fast or bool(getattr(cfg.fidelity, "detach_fakes", False)),
        encoder_only_reencode=fast or bool(getattr(cfg.fidelity, "encoder_only_reencode", False)),
        dense_laplacian=False if fast else bool(getattr(cfg.fidelity, "dense_laplacian", False)),
        pointwise="fused" if fast else getattr(cfg.model, "pointwise", "conv"),
        precision=getattr(tr, "precision", "no"),
        compile=bool(getattr(tr, "compile", False)),
    )
    kw.update(overrides)
    return FastPath(**kw)


class DevicePrefetcher:
    """Overlap host->device copies with compute: iterates ``loader`` one batch ahead, copying each
    dict of tensors with ``non_blocking=True`` on a side CUDA stream (the loader should use
    ``pin_memory=True``). On CPU it is a plain pass-through (``num_workers`` already overlaps
    loading with compute there)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self):
        return len(self.loader)

    def _copy(self, batch):
        if self.stream is None:
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.cuda.stream(self.stream):
            return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def __iter__(self):
        it = iter(self.loader)
        try:
            nxt = self._copy(next(it))
        except StopIteration:
            return
        while True:
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                for v in nxt.values():
                    if torch.is_tensor(v):
                        v.record_stream(torch.cuda.current_stream(self.device))
            cur = nxt
            try:
                nxt = self._copy(next(it))
            except StopIteration:
                yield cur
                return
            yield cur
