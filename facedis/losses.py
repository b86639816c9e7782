"""Loss terms of the joint training (docs/method.md#losses) as pure functions, plus the mesh Laplacian.

Shapes: B batch, V vertices, d latent size. Every face tensor is in stored (normalised) units.
Every function returns a 0-d tensor on the input's device and never syncs with the host.
Weights are applied by the caller (``facedis.step``), never inside a term.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)
KL_DECAY_EPOCHS_COMA = 350


# ---------------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------------
def recon_mse(recon: torch.Tensor, vertices: torch.Tensor, mean_face: torch.Tensor) -> torch.Tensor:
    """MSE(x̂, X - M̄), mean over B·V·3. recon (B,V,3) offset; vertices (B,V,3); mean_face (V,3)."""
    return F.mse_loss(recon, vertices - mean_face)


def neutral_mse(id_offset: torch.Tensor, neutral: torch.Tensor, mean_face: torch.Tensor) -> torch.Tensor:
    """+ne-gt term MSE(Δ_id, X_n - M̄). id_offset, neutral (B,V,3); mean_face (V,3)."""
    return F.mse_loss(id_offset, neutral - mean_face)


def expression_mse(exp_offset: torch.Tensor, vertices: torch.Tensor, neutral: torch.Tensor) -> torch.Tensor:
    """BU-3DFE +ne-gt term MSE(Δ_exp, X - X_n). All (B,V,3)."""
    return F.mse_loss(exp_offset, vertices - neutral)


# ---------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------
def kl_mc(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """One-sample Monte-Carlo KL, the reference's estimator (docs/method.md#kl-estimator):
    log q(z|x) - log p(z) with q = N(μ, exp(logvar)), p = N(0, I); summed over d, mean over B.

    z, mu, logvar: (B, d). Gradients flow through z (reparameterised) and through μ, logvar.
    """
    log_q = -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))
    log_p = -0.5 * (LOG_2PI + z**2)
    return (log_q - log_p).sum(dim=1).mean()


def kl_analytic(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(μ, σ²) || N(0, I)) = ½ Σ_d (σ² + μ² - 1 - log σ²), mean over B. (B, d)."""
    return 0.5 * (torch.exp(logvar) + mu**2 - 1.0 - logvar).sum(dim=1).mean()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor | None = None, analytic: bool = False) -> torch.Tensor:
    """``kl_analytic`` if ``analytic`` else ``kl_mc`` (which needs the sampled ``z``)."""
    if analytic:
        return kl_analytic(mu, logvar)
    if z is None:
        raise ValueError("the one-sample KL needs the sampled code z (or pass analytic=True)")
    return kl_mc(z, mu, logvar)


def kl_decay_scale(epoch: int, total: int = KL_DECAY_EPOCHS_COMA) -> float:
    """CoMA's KL weight multiplier (total - epoch) / total (docs/method.md#loss-weights).

    ``epoch`` is 1-based like the reference's loop (``range(1, epochs + 1)``), so the first
    epoch is scaled by 349/350. The reference calls it a warm-up; it is a linear decay.
    """
    return (total - epoch) / total


# ---------------------------------------------------------------------------------------------
# adversarial
# ---------------------------------------------------------------------------------------------
def adversarial_identity_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator's non-saturating D term CE(D(X, M̄+Δ_id), 1) = -log D_same. fake_logits (B, 2)."""
    target = torch.ones(fake_logits.shape[0], dtype=torch.long, device=fake_logits.device)
    return F.cross_entropy(fake_logits, target)


def discriminator_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """D's cross-entropy. logits (B, 2); labels (B,) int64, 1 = same identity / real pair."""
    return F.cross_entropy(logits, labels)


def latent_consistency(z_reencoded: torch.Tensor, z_id: torch.Tensor) -> torch.Tensor:
    """Neutral latent consistency L1 mean |z̄_id - z_id| over B·d (docs/method.md#latent-consistency).
    Gradients flow into both arguments, as in the reference."""
    return F.l1_loss(z_reencoded, z_id)


# ---------------------------------------------------------------------------------------------
# uniform mesh Laplacian
# ---------------------------------------------------------------------------------------------
def _unique_neighbours(triangles: np.ndarray, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges (row, col) of the triangle graph, each distinct pair once, no self loops,
    sorted by row then col."""
    t = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
    if t.size and (t.min() < 0 or t.max() >= num_vertices):
        raise ValueError(f"triangle indices must lie in [0, {num_vertices})")
    a = np.concatenate([t[:, 0], t[:, 1], t[:, 2], t[:, 1], t[:, 2], t[:, 0]])
    b = np.concatenate([t[:, 1], t[:, 2], t[:, 0], t[:, 0], t[:, 1], t[:, 2]])
    keep = a != b
    key = np.unique(a[keep] * num_vertices + b[keep])
    return key // num_vertices, key % num_vertices


def dense_uniform_laplacian(triangles: np.ndarray, num_vertices: int) -> torch.Tensor:
    """The reference's dense L = I - D⁻¹A (V, V) float32 (docs/method.md#laplacian): L[i,j] = -1 for every
    edge (assigned, so duplicates count once), diagonal = number of distinct neighbours, rows
    divided by the diagonal. Isolated vertices get an all-zero row (the reference divides by 0)."""
    rows, cols = _unique_neighbours(triangles, num_vertices)
    deg = np.bincount(rows, minlength=num_vertices).astype(np.float64)
    L = np.zeros((num_vertices, num_vertices), dtype=np.float64)
    L[rows, cols] = -1.0
    L[np.arange(num_vertices), np.arange(num_vertices)] = deg
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
    return torch.from_numpy((L * inv[:, None]).astype(np.float32))


class UniformLaplacian(nn.Module):
    """Uniform (umbrella) Laplacian L = I - D⁻¹A as a sparse operator: (L x)_v = x_v - mean of x over
    the distinct neighbours of v.

    Stored as a padded neighbour table (V, K) plus weights 1/deg (0 in the padding), so the
    forward is one gather and a weighted sum: deterministic (no atomics), differentiable, works
    on any device (also ``meta``), in any dtype and under autocast. Buffers follow ``.to()``.
    Isolated vertices map to 0.
    """

    def __init__(self, triangles: np.ndarray, num_vertices: int):
        super().__init__()
        rows, cols = _unique_neighbours(triangles, num_vertices)
        deg = np.bincount(rows, minlength=num_vertices)
        K = max(int(deg.max()) if deg.size else 0, 1)
        start = np.concatenate([[0], np.cumsum(deg)[:-1]])
        slot = np.arange(rows.size) - start[rows]
        idx = np.zeros((num_vertices, K), dtype=np.int64)
        w = np.zeros((num_vertices, K), dtype=np.float32)
        idx[rows, slot] = cols
        w[rows, slot] = 1.0 / deg[rows]
        self.num_vertices = num_vertices
        self.register_buffer("neighbours", torch.from_numpy(idx), persistent=False)
        self.register_buffer("weights", torch.from_numpy(w), persistent=False)
        self.register_buffer("has_neighbours", torch.from_numpy(deg > 0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, V, 3) -> L x (B, V, 3)."""
        nb = x[:, self.neighbours]  # (B, V, K, 3)
        avg = (nb * self.weights.to(x.dtype)[None, :, :, None]).sum(dim=2)
        return (x - avg) * self.has_neighbours.to(x.dtype)[None, :, None]

    def to_dense(self) -> torch.Tensor:
        """The same operator as a dense (V, V) matrix (for tests)."""
        V, K = self.neighbours.shape
        L = torch.zeros(V, V, dtype=self.weights.dtype, device=self.weights.device)
        L.scatter_add_(1, self.neighbours, -self.weights)
        return L + torch.diag(self.has_neighbours.to(L.dtype))


class DenseLaplacian(nn.Module):
    """The reference's dense N×N operator (2·N²·3 FLOPs per sample and pass). Kept for FLOP- and
    bit-faithful runs; use ``UniformLaplacian`` otherwise (same values)."""

    def __init__(self, triangles: np.ndarray, num_vertices: int):
        super().__init__()
        self.register_buffer("matrix", dense_uniform_laplacian(triangles, num_vertices), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, V, 3) -> L x (B, V, 3)."""
        return torch.matmul(self.matrix.to(x.dtype), x)


def uniform_laplacian(triangles: np.ndarray, num_vertices: int, dense: bool = False) -> nn.Module:
    """Build the Laplacian operator from a triangle array (F, 3): sparse by default."""
    return (DenseLaplacian if dense else UniformLaplacian)(triangles, num_vertices)


def laplacian_loss(x: torch.Tensor, operator) -> torch.Tensor:
    """Reference Laplacian loss: (1/B) Σ_b Σ_v ‖(L x_b)_v‖² / V, squared norm (docs/method.md#laplacian).

    x (B, V, 3) absolute predicted identity M̄ + Δ_id; operator: callable (B,V,3) -> (B,V,3).
    """
    lx = operator(x)
    return lx.pow(2).sum(dim=(1, 2)).mean() / x.shape[1]
