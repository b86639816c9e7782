"""Networks of Gu, Pears & Sun (FG 2023): the PointNet VAE and the pairwise identity discriminator.

Everything here follows docs/method.md, section "Architecture". The shapes are constructor
arguments; nothing knows about devices, distributed training or the config.

- ``DisentanglingVAE``: PointNet encoder (no T-Net) with separate identity and expression
  latents, and two MLP decoders that predict **offsets from the training mean face**
  (docs/method.md#decoders-and-the-mean-face). The encoder sees the *absolute* face in stored
  units, exactly as the reference does (``vae(true_vertices)``); only the decoders work in offsets.
- ``IdentityDiscriminator``: PointNet with a 6x6 input T-Net over the per-vertex concatenated
  pair (B, V, 6) (docs/method.md#identity-discriminator). Returns logits; class 1 = same identity.

Point-wise layers can run as the reference's ``Conv1d(k=1)`` on (B, C, V)
(``pointwise="conv"``) or as ``F.linear`` on the points-major (B*V, C) layout
(``pointwise="linear"``, about 1.65x faster on CPU), or as ``linear`` with the widest (last)
layer fused with its BN, ReLU and the max-pool (``pointwise="fused"``, ``_FusedPointwiseMax``:
no (B*V, 1024) feature map is materialised and its backward needs no GEMM). All paths hold the *same* parameters
(the weights of an ``nn.Conv1d``, shape (C_out, C_in, 1)), so their state dicts are
interchangeable and they compute the same function and the same updates (up to fp32
round-off). BatchNorm statistics are over (batch, points) in both.

Decoder output layout: the 3V vector is viewed as (B, V, 3) row-major, i.e.
[x0, y0, z0, x1, ...]. The reference views it channel-major ([x0..xV-1, y0.., z0..]); this
matters only when loading the authors' weights (permute the rows of the last Linear).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

POINTWISE_CHOICES = ("conv", "linear", "fused")
ENCODER_INPUTS = ("absolute", "absolute+offset")
DECODER_INITS = ("default", "zero")
VAE_MODES = ("sample", "mean", "encode")


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class Encoding:
    """Posterior parameters of both latents; ``logvar_*`` are log-variances (std = exp(lv/2))."""

    mu_id: torch.Tensor  # (B, d_id)
    logvar_id: torch.Tensor  # (B, d_id)
    mu_exp: torch.Tensor  # (B, d_exp)
    logvar_exp: torch.Tensor  # (B, d_exp)


@dataclass
class VAEOutput:
    """One VAE forward. All ``*_offset`` and ``recon`` are offsets from the mean face, (B, V, 3)."""

    recon: torch.Tensor  # id_offset + exp_offset
    id_offset: torch.Tensor  # Δ_id; predicted identity = mean_face + id_offset
    exp_offset: torch.Tensor  # Δ_exp
    mu_id: torch.Tensor  # (B, d_id)
    logvar_id: torch.Tensor
    mu_exp: torch.Tensor  # (B, d_exp)
    logvar_exp: torch.Tensor
    z_id: torch.Tensor  # the code that was decoded (sampled, or μ in mode="mean")
    z_exp: torch.Tensor


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def _check_pointwise(pointwise: str) -> str:
    if pointwise not in POINTWISE_CHOICES:
        raise ValueError(f"pointwise={pointwise!r}; valid choices: {POINTWISE_CHOICES}")
    return pointwise


def scaled_width(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


ENCODER_WIDTHS = (64, 64, 64, 128, 1024)
"""The PointNet encoder's point-wise layer widths at ``width=1`` (docs/method.md#vae-encoder)."""


def encoder_widths(width: float = 1.0, channels: Optional[Sequence[int]] = None) -> list[int]:
    """The encoder's five point-wise widths: ``channels`` when given, else the paper's scaled by ``width``."""
    if channels:
        c = [int(x) for x in channels]
        if len(c) != len(ENCODER_WIDTHS) or min(c) < 1:
            raise ValueError(f"encoder channels must be {len(ENCODER_WIDTHS)} positive widths "
                             f"(the paper's: {list(ENCODER_WIDTHS)}), got {list(channels)}")
        return c
    return [scaled_width(w, width) for w in ENCODER_WIDTHS]


class PointwiseMLP(nn.Module):
    """Shared per-point layers ``C_0 -> C_1 -> ... -> C_k``, each followed by [BN] + ReLU,
    then a global max over the points.

    Parameters are stored as ``conv{i}`` (``nn.Conv1d(k=1)``) and ``bn{i}`` (``nn.BatchNorm1d``)
    in both pointwise modes, so the state dict does not depend on the mode.
    """

    def __init__(self, channels: list[int], use_bn: bool = True, pointwise: str = "conv"):
        super().__init__()
        self.pointwise = _check_pointwise(pointwise)
        self.use_bn = use_bn
        self.num_layers = len(channels) - 1
        for i in range(self.num_layers):
            setattr(self, f"conv{i + 1}", nn.Conv1d(channels[i], channels[i + 1], 1))
            if use_bn:
                setattr(self, f"bn{i + 1}", nn.BatchNorm1d(channels[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, V, C_0) points-major -> pooled features (B, C_k)."""
        B, V, _ = x.shape
        if self.pointwise == "conv":
            h = x.transpose(1, 2)  # (B, C, V), the reference layout
            for i in range(1, self.num_layers + 1):
                h = getattr(self, f"conv{i}")(h)
                if self.use_bn:
                    h = getattr(self, f"bn{i}")(h)
                h = F.relu(h)
            # the reference's MaxPool1d, over however many points arrive: the backward sends each
            # channel's gradient to its arg-max point (zero fill + scatter); amax's backward would
            # split ties evenly at the cost of several extra passes over the (B, C, V) map
            return F.max_pool1d(h, h.shape[2]).squeeze(2)
        h = x.reshape(B * V, -1)  # (B*V, C): the same GEMMs without the transposes
        fused = self.pointwise == "fused" and self.num_layers >= 1
        last = self.num_layers - 1 if fused else self.num_layers
        for i in range(1, last + 1):
            conv = getattr(self, f"conv{i}")
            h = F.linear(h, conv.weight.squeeze(-1), conv.bias)
            if self.use_bn:
                h = getattr(self, f"bn{i}")(h)  # stats over the B*V rows = over (batch, points)
            h = F.relu(h)
        if fused:  # the widest layer: Linear + [BN] + ReLU + max without the (B*V, C_k) map
            k = self.num_layers
            bn = getattr(self, f"bn{k}") if self.use_bn else None
            return fused_pointwise_max(h, B, V, getattr(self, f"conv{k}"), bn)
        return max_over_points(h.view(B, V, -1))


# ---------------------------------------------------------------------------------------------
# max over the points
# ---------------------------------------------------------------------------------------------
class _MaxOverPoints(torch.autograd.Function):
    """``amax`` over dim 1 of (B, V, C) with a lean backward: the gradient goes to the arg-max
    points, split evenly among ties exactly like ``amax``'s own backward, but built from one
    comparison and one ``where`` instead of autograd's generic chain (which costs several full
    (B, V, C) passes and was a tenth of a small-model step at V = 5 023)."""

    @staticmethod
    def forward(ctx, h):
        m = h.amax(dim=1)
        ctx.save_for_backward(h, m)
        return m

    @staticmethod
    def backward(ctx, g):
        h, m = ctx.saved_tensors
        hit = h == m.unsqueeze(1)  # (B, V, C)
        count = hit.sum(dim=1, dtype=g.dtype)  # (B, C), >= 1
        return torch.where(hit, (g / count).unsqueeze(1), 0.0)


def max_over_points(h: torch.Tensor) -> torch.Tensor:
    """(B, V, C) -> (B, C) maximum over the points; same values and gradients as ``h.amax(dim=1)``."""
    return _MaxOverPoints.apply(h)


# ---------------------------------------------------------------------------------------------
# fused last point-wise layer: Linear -> [BN] -> ReLU -> max over points
# ---------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM dtype the standard path would use: the autocast dtype when autocast is on for
    x's device (and x is floating point fp32/bf16/fp16), else x's own dtype."""
    dev = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # old signature
        enabled = torch.is_autocast_enabled() if dev == "cuda" else torch.is_autocast_cpu_enabled()
    if enabled and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _FusedPointwiseMax(torch.autograd.Function):
    """``max_v ReLU(BN(x W^T + b))`` per sample without materialising (or keeping) the
    (B·V, C_out) feature map, the step's main memory traffic (docs/method.md#roofline).

    BN in train mode is a per-channel affine map ``a_c·(h - mean_c) + beta_c`` with
    ``a_c = gamma_c·rstd_c``; ReLU is monotone. So the pooled output only needs the per-sample
    max of ``sign(gamma_c)·h`` (its arg-max row) and the batch statistics of h, which follow from
    the (C_in × C_in) covariance of x: mean_h = W·mean_x + b, var_h,c = w_c^T Σ_x w_c.
    The forward computes the GEMM in chunks of samples and keeps only (B, C_out) maxima and
    arg-max rows; the backward is exact (train-mode BN backward with a gradient that is sparse
    in h): a gather/scatter over the arg-max rows plus (C_in × C_in) corrections, no B·V·C_out
    GEMM at all.

    Ties in the max (measure zero for real inputs; exact duplicates of a whole input row) send the
    gradient to one row instead of splitting it evenly: the parameter gradients are the same,
    only the per-row input gradients of the duplicated rows differ.
    """

    @staticmethod
    def forward(ctx, x, B, V, weight, bias, gamma, beta, running_mean, running_var, mode, factor, eps,
                cdtype, chunk_rows):
        # x (B*V, C_in); weight (C_out, C_in); mode: "none" (no BN), "train", "eval"
        with torch.autocast(x.device.type, enabled=False):
            pdt = weight.dtype
            N = B * V
            C_out = weight.shape[0]
            s = None
            if mode != "none":
                s = torch.where(gamma >= 0, 1.0, -1.0).to(pdt)
            ws = weight if s is None else weight * s[:, None]
            wsc = ws.to(cdtype)
            xc_ = x.to(cdtype).view(B, V, -1)
            nb = max(1, min(B, chunk_rows // max(V, 1)))
            maxes, idxs = [], []
            for b0 in range(0, B, nb):
                b1 = min(B, b0 + nb)
                # channels-major (nb, C_out, V): the max runs over the contiguous dim (CPU: ~2x
                # faster than a max-with-indices over the strided point dim)
                h = torch.bmm(wsc.expand(b1 - b0, -1, -1), xc_[b0:b1].transpose(1, 2))
                m, i = h.max(dim=2)
                maxes.append(m)
                idxs.append(i)
                del h
            mx = torch.cat(maxes).to(pdt)  # (B, C_out): max_v of s·(x W^T), bias not included
            idx = torch.cat(idxs)  # (B, C_out) row within each sample
            x32 = x.to(pdt)
            mu = cov = wcov = rstd = None
            if mode == "none":
                pre = mx if bias is None else mx + bias
                a = None
            else:
                h_max = mx * s  # the pre-BN value (without bias) at the arg-max row
                if mode == "train":
                    mu = x32.mean(dim=0)  # (C_in,)
                    xcen = x32 - mu
                    cov = xcen.t() @ xcen  # (C_in, C_in), = Σ_n (x_n - μ)(x_n - μ)^T
                    del xcen
                    wcov = weight @ cov  # (C_out, C_in)
                    var = (wcov * weight).sum(dim=1) / N  # biased, as BN normalises with it
                    centred = h_max - (weight @ mu)  # h_r - mean_h (bias cancels)
                    rstd = torch.rsqrt(var + eps)
                    if running_mean is not None:
                        with torch.no_grad():
                            mean_h = weight @ mu + (bias if bias is not None else 0.0)
                            running_mean.mul_(1.0 - factor).add_(mean_h.to(running_mean.dtype), alpha=factor)
                            unbiased = var * (N / max(N - 1, 1))
                            running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
                else:  # eval: running statistics
                    rstd = torch.rsqrt(running_var.to(pdt) + eps)
                    centred = h_max + (bias if bias is not None else 0.0) - running_mean.to(pdt)
                xhat = centred * rstd
                a = gamma * rstd
                pre = xhat * gamma + beta
            out = torch.relu(pre)
        ctx.B, ctx.V, ctx.mode, ctx.has_bias = B, V, mode, bias is not None
        if mode == "train":
            ctx.save_for_backward(x, weight, gamma, idx, out, xhat, a, rstd, mu, cov, wcov)
        elif mode == "eval":
            ctx.save_for_backward(x, weight, gamma, idx, out, xhat, a)
        else:
            ctx.save_for_backward(x, weight, idx, out)
        return out

    @staticmethod
    def backward(ctx, g):
        B, V, mode = ctx.B, ctx.V, ctx.mode
        N = B * V
        with torch.autocast(g.device.type, enabled=False):
            if mode == "train":
                x, weight, gamma, idx, out, xhat, a, rstd, mu, cov, wcov = ctx.saved_tensors
            elif mode == "eval":
                x, weight, gamma, idx, out, xhat, a = ctx.saved_tensors
            else:
                x, weight, idx, out = ctx.saved_tensors
            pdt = weight.dtype
            g = g.to(pdt) * (out > 0).to(pdt)  # through the ReLU (B, C_out)
            C_in = weight.shape[1]
            rows = (idx + torch.arange(B, device=idx.device)[:, None] * V).reshape(-1)  # flat arg-max rows
            vals = g if mode == "none" else g * a  # dL/dh at the arg-max rows (B, C_out)
            need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
            need_gamma = mode != "none" and ctx.needs_input_grad[5]
            need_beta = mode != "none" and ctx.needs_input_grad[6]
            dx = dw = db = dgamma = dbeta = None
            if mode == "train":
                S1 = g.sum(dim=0)
                S2 = (g * xhat).sum(dim=0)
                k = a * S1 / N  # the per-channel constant of the BN backward
                q = a * S2 * rstd / N  # the per-channel multiple of (h - mean_h)
            if need_x:
                # scatter the (B*C_out, C_in) row contributions; a 1-D index_add is one vectorised
                # kernel (the 2-D one loops over rows on CPU)
                contrib = (vals[:, :, None] * weight[None]).reshape(-1)
                flat = (rows[:, None] * C_in + torch.arange(C_in, device=rows.device)).reshape(-1)
                dx = torch.zeros(N * C_in, dtype=pdt, device=x.device).index_add_(0, flat, contrib).view(N, C_in)
                if mode == "train":
                    M = weight.t() @ (q[:, None] * weight)  # (C_in, C_in)
                    dx -= (k @ weight)[None, :]
                    dx -= (x.to(pdt) - mu) @ M
                dx = dx.to(x.dtype)
            if need_w:
                xr = x.reshape(N, C_in)[rows].to(pdt).view(B, -1, C_in)  # (B, C_out, C_in)
                dw = (vals[:, :, None] * xr).sum(dim=0)
                if mode == "train":
                    dw = dw - (N * k)[:, None] * mu[None, :] - q[:, None] * wcov
            if need_b and ctx.has_bias:
                db = vals.sum(dim=0)
                if mode == "train":
                    db = db - N * k  # = 0 up to round-off, as in BN's backward
            if need_gamma:
                dgamma = (g * xhat).sum(dim=0)
            if need_beta:
                dbeta = g.sum(dim=0)
        return (dx, None, None, dw, db, dgamma, dbeta, None, None, None, None, None, None, None)


FUSED_CHUNK_ROWS = {"cpu": 16384, "cuda": 1 << 19}


def fused_pointwise_max(x: torch.Tensor, B: int, V: int, conv: nn.Conv1d, bn: Optional[nn.BatchNorm1d],
                        chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Fused ``max_v ReLU([BN](conv(x)))`` for x (B*V, C_in) points-major -> (B, C_out) in the
    parameters' dtype. Same function and gradients as the ``linear`` path (up to round-off),
    same BN running-statistics updates, also under autocast (GEMM in the autocast dtype)."""
    if chunk_rows is None:
        chunk_rows = FUSED_CHUNK_ROWS.get(x.device.type, 1 << 19)
    w = conv.weight.squeeze(-1)
    if bn is None:
        mode, gamma, beta, rm, rv, factor, eps = "none", None, None, None, None, 0.0, 0.0
    else:
        if not bn.affine:
            raise ValueError("fused pointwise max needs an affine BatchNorm")
        use_batch = bn.training or bn.running_mean is None
        mode = "train" if use_batch else "eval"
        gamma, beta, eps = bn.weight, bn.bias, bn.eps
        rm, rv, factor = None, None, 0.0
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            rm, rv = bn.running_mean, bn.running_var
        elif not use_batch:
            rm, rv = bn.running_mean, bn.running_var
    return _FusedPointwiseMax.apply(x, B, V, w, conv.bias, gamma, beta, rm, rv, mode, factor, eps,
                                    _compute_dtype(x), chunk_rows)


class MLPDecoder(nn.Module):
    """``Linear(d, hidden) -> ReLU -> Linear(hidden, 3V)``, no output activation
    (docs/method.md#decoders-and-the-mean-face)."""

    def __init__(self, latent_dim: int, num_vertices: int, hidden: int = 256, init: str = "default"):
        super().__init__()
        if init not in DECODER_INITS:
            raise ValueError(f"decoder init={init!r}; valid choices: {DECODER_INITS}")
        self.num_vertices = num_vertices
        self.fc1 = nn.Linear(latent_dim, hidden)
        self.fc2 = nn.Linear(hidden, 3 * num_vertices)
        if init == "zero":  # start exactly at the mean face instead of ~O(1) random offsets
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, d) -> offsets (B, V, 3), row-major."""
        return self.fc2(F.relu(self.fc1(z))).view(z.shape[0], self.num_vertices, 3)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = μ + exp(logvar/2)·ε, ε ~ N(0, I); one ``randn`` per call like ``Normal.rsample``."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------
class DisentanglingVAE(nn.Module):
    """PointNet VAE with identity/expression latents (docs/method.md#architecture).

    Args:
        num_vertices: V (only the decoders' last layers depend on it).
        id_dim, exp_dim: latent sizes d_id, d_exp.
        width: multiplier on the encoder widths 64/64/64/128/1024 (1.0 = paper).
        decoder_hidden: hidden width of both decoders; default ``round(256 * width)``.
        pointwise: ``"conv"`` (reference layout), ``"linear"`` (same parameters, faster) or
            ``"fused"`` (``linear`` + fused last layer/max-pool; same parameters, fastest).
        encoder_input: ``"absolute"`` (the reference: the PointNet sees the absolute face) or
            ``"absolute+offset"`` (not in the paper: each point also carries its offset from a
            reference face, ``(x − reference) · scale``, 6 input channels). Identity differences are
            a few mm on a ~200 mm face; after the first BatchNorm they are ~2% of the feature
            scale, which an absolute-coordinate PointNet needs very many steps to amplify. The
            offset channels give them unit scale. Set the reference (the training mean face)
            and scale with :meth:`set_input_reference`; both are buffers saved with the weights.
        encoder_channels: the encoder's five point-wise widths, overriding ``width`` (e.g.
            ``[64, 64, 64, 128, 128]``: the paper's first four layers with a narrow global feature,
            a slim network that still sees fine geometry; ``width`` scales all five, and at 0.125
            the first layers are only 8 wide).
        decoder_init: ``"default"`` (PyTorch's default init, as the reference: the untrained
            decoders output random offsets of O(1) model units, i.e. hundreds of mm) or ``"zero"``
            (the decoders' output layers start at zero, so an untrained model predicts the mean
            face; not in the paper, converges in far fewer steps).

    ``forward(x, mode)`` with ``x`` the absolute face (B, V, 3) in stored units:

    - ``mode="sample"`` (default, the reference's forward, also in eval mode): sample both codes
      (id first, then exp) and decode them -> ``VAEOutput``.
    - ``mode="mean"``: decode μ (the reference's ``encoding_eval``) -> ``VAEOutput``.
    - ``mode="encode"``: the encoder only -> ``Encoding``. Exposed through ``forward`` so that a
      DDP-wrapped model can run it (``ddp(x, mode="encode")``) without unwrapping.
    """

    def __init__(
        self,
        num_vertices: int,
        id_dim: int,
        exp_dim: int,
        width: float = 1.0,
        decoder_hidden: Optional[int] = None,
        pointwise: str = "conv",
        encoder_input: str = "absolute",
        decoder_init: str = "default",
        encoder_channels: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"encoder_input={encoder_input!r}; valid choices: {ENCODER_INPUTS}")
        self.num_vertices, self.id_dim, self.exp_dim = num_vertices, id_dim, exp_dim
        self.encoder_input = encoder_input
        c = [3 if encoder_input == "absolute" else 6] + encoder_widths(width, encoder_channels)
        if encoder_input != "absolute":
            self.register_buffer("input_reference", torch.zeros(num_vertices, 3))
            self.register_buffer("input_offset_scale", torch.ones(()))
        hidden = decoder_hidden if decoder_hidden is not None else scaled_width(256, width)
        # ---- encoder ----
        self.encoder = PointwiseMLP(c, use_bn=True, pointwise=pointwise)
        self.fc_id_mu = nn.Linear(c[-1], id_dim)
        self.fc_id_logvar = nn.Linear(c[-1], id_dim)
        self.fc_exp_mu = nn.Linear(c[-1], exp_dim)
        self.fc_exp_logvar = nn.Linear(c[-1], exp_dim)
        # ---- decoders ----
        self.id_decoder = MLPDecoder(id_dim, num_vertices, hidden, init=decoder_init)
        self.exp_decoder = MLPDecoder(exp_dim, num_vertices, hidden, init=decoder_init)

    @property
    def pointwise(self) -> str:
        return self.encoder.pointwise

    def set_pointwise(self, pointwise: str) -> None:
        """Switch conv/linear in place (parameters are shared, nothing is copied)."""
        self.encoder.pointwise = _check_pointwise(pointwise)

    @torch.no_grad()
    def set_input_reference(self, reference: torch.Tensor, scale: float) -> None:
        """Reference face (V, 3) and offset scale for ``encoder_input="absolute+offset"``."""
        if self.encoder_input == "absolute":
            return
        self.input_reference.copy_(torch.as_tensor(reference, dtype=self.input_reference.dtype))
        self.input_offset_scale.fill_(float(scale))

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-point encoder input: (B, V, 3) or, with offsets, (B, V, 6)."""
        if self.encoder_input == "absolute":
            return x
        ref = self.input_reference.to(x.dtype)
        return torch.cat([x, (x - ref) * self.input_offset_scale.to(x.dtype)], dim=-1)

    def encode(self, x: torch.Tensor) -> Encoding:
        """x (B, V, 3) absolute face -> ``Encoding`` (μ and log-variance of both latents)."""
        f = self.encoder(self.encoder_features(x))  # (B, 1024)
        return Encoding(self.fc_id_mu(f), self.fc_id_logvar(f), self.fc_exp_mu(f), self.fc_exp_logvar(f))

    def decode(self, z_id: torch.Tensor, z_exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes -> (id_offset, exp_offset), each (B, V, 3)."""
        return self.id_decoder(z_id), self.exp_decoder(z_exp)

    def forward(self, x: torch.Tensor, mode: str = "sample"):
        if mode not in VAE_MODES:
            raise ValueError(f"mode={mode!r}; valid choices: {VAE_MODES}")
        enc = self.encode(x)
        if mode == "encode":
            return enc
        if mode == "sample":
            z_id = reparameterize(enc.mu_id, enc.logvar_id)
            z_exp = reparameterize(enc.mu_exp, enc.logvar_exp)
        else:
            z_id, z_exp = enc.mu_id, enc.mu_exp
        id_offset, exp_offset = self.decode(z_id, z_exp)
        return VAEOutput(
            recon=id_offset + exp_offset,
            id_offset=id_offset,
            exp_offset=exp_offset,
            mu_id=enc.mu_id,
            logvar_id=enc.logvar_id,
            mu_exp=enc.mu_exp,
            logvar_exp=enc.logvar_exp,
            z_id=z_id,
            z_exp=z_exp,
        )


# ---------------------------------------------------------------------------------------------
# discriminator
# ---------------------------------------------------------------------------------------------
class _FCStack(nn.Module):
    """``fc{i}`` Linear layers; every one but the last followed by [BN] + ReLU.

    ``dropout_before_bn`` maps a layer index to a dropout applied after that Linear and before
    its BN (the reference head's order: Linear -> Dropout -> BN -> ReLU).
    """

    def __init__(self, channels: list[int], use_bn: bool, dropout_at: dict[int, float] | None = None):
        super().__init__()
        self.use_bn = use_bn
        self.num_layers = len(channels) - 1
        self.dropout_at = dict(dropout_at or {})
        for i in range(self.num_layers):
            setattr(self, f"fc{i + 1}", nn.Linear(channels[i], channels[i + 1]))
            if use_bn and i < self.num_layers - 1:
                setattr(self, f"bn{i + 1}", nn.BatchNorm1d(channels[i + 1]))
        for i, p in self.dropout_at.items():
            setattr(self, f"drop{i}", nn.Dropout(p))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_layers + 1):
            h = getattr(self, f"fc{i}")(h)
            if i == self.num_layers:
                break
            if i in self.dropout_at:
                h = getattr(self, f"drop{i}")(h)
            if self.use_bn:
                h = getattr(self, f"bn{i}")(h)
            h = F.relu(h)
        return h


class TNet(nn.Module):
    """Input transform T-Net for k channels: point-wise k->64->128->1024, max, FC 1024->512->256->k²,
    plus the identity (docs/method.md#identity-discriminator). Returns (B, k, k)."""

    def __init__(self, k: int, width: float, use_bn: bool, pointwise: str):
        super().__init__()
        self.k = k
        c = [k] + [scaled_width(w, width) for w in (64, 128, 1024)]
        f = [c[-1], scaled_width(512, width), scaled_width(256, width), k * k]
        self.features = PointwiseMLP(c, use_bn=use_bn, pointwise=pointwise)
        self.fc = _FCStack(f, use_bn=use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fc(self.features(x)).view(-1, self.k, self.k)
        return t + torch.eye(self.k, dtype=t.dtype, device=t.device)


class IdentityDiscriminator(nn.Module):
    """Pairwise identity discriminator (docs/method.md#identity-discriminator).

    Args:
        width: multiplier on all hidden widths (1.0 = paper).
        use_bn: BatchNorm after every point-wise and hidden FC layer **and** dropout in the head,
            for the whole network, T-Net included (the reference's single switch). Without it
            there is no BN and no dropout at all, and no BN parameters exist.
        dropout: head dropout probability (only with ``use_bn``).
        pointwise: ``"conv"``, ``"linear"`` or ``"fused"`` (same parameters).

    ``forward(pair)``: pair (B, V, 6) = ``cat([X, Y], dim=-1)`` in absolute stored units, any V.
    Returns logits (B, 2); class 1 = same identity / real. (The reference returns log_softmax
    and applies cross-entropy on top; that equals CE on the logits.)
    """

    def __init__(self, width: float = 1.0, use_bn: bool = False, dropout: float = 0.5, pointwise: str = "conv"):
        super().__init__()
        self.use_bn = use_bn
        self.tnet = TNet(6, width, use_bn, pointwise)
        c = [6] + [scaled_width(w, width) for w in (64, 128, 1024)]
        self.features = PointwiseMLP(c, use_bn=use_bn, pointwise=pointwise)
        h = [c[-1], scaled_width(512, width), scaled_width(256, width), 2]
        self.head = _FCStack(h, use_bn=use_bn, dropout_at={2: dropout} if use_bn else None)

    @property
    def pointwise(self) -> str:
        return self.features.pointwise

    def set_pointwise(self, pointwise: str) -> None:
        self.features.pointwise = _check_pointwise(pointwise)
        self.tnet.features.pointwise = self.features.pointwise

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """pair (B, V, 6) -> logits (B, 2)."""
        t = self.tnet(pair)  # (B, 6, 6)
        x = torch.bmm(pair, t)  # (B, V, 6)
        return self.head(self.features(x))

    def load_pretrained(self, state_dict: dict) -> list[str]:
        """Load a pretrained D, dropping BatchNorm entries this D does not have (a D pretrained
        with ``use_bn=True`` loaded into one without BN, the reference's default; see
        ``disc_bn_match`` in docs/fidelity.md).

        Any other missing or unexpected key raises. Returns the dropped keys.
        """
        own = self.state_dict()
        dropped = [k for k in state_dict if k not in own]
        bad = [k for k in dropped if not _is_bn_key(k)]
        missing = [k for k in own if k not in state_dict]
        if bad or missing:
            raise KeyError(f"discriminator state dict mismatch: unexpected={bad}, missing={missing}")
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=True)
        return dropped


def _is_bn_key(key: str) -> bool:
    return key.split(".")[-2].startswith("bn") if "." in key else False


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
