"""facedis.losses: closed forms, the MC KL, and the sparse Laplacian vs a naive dense build."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facedis import losses


def grid_mesh(rows=5, cols=6):
    """Triangulated grid; every interior edge appears in two triangles (duplicates)."""
    tri = []
    for r in range(rows - 1):
        for c in range(cols - 1):
            a, b, d, e = r * cols + c, r * cols + c + 1, (r + 1) * cols + c, (r + 1) * cols + c + 1
            tri += [[a, b, e], [a, e, d]]
    return np.array(tri, dtype=np.int32), rows * cols


def naive_laplacian(tri, n):
    """The reference's construction, written as loops (docs/method.md#laplacian)."""
    L = np.zeros((n, n))
    for f in tri:
        for i in range(3):
            for j in range(3):
                if i != j:
                    L[f[i], f[j]] = -1.0
    for i in range(n):
        L[i, i] = -L[i].sum()
        L[i] /= L[i, i]
    return torch.tensor(L, dtype=torch.float32)


def test_dense_laplacian_matches_naive():
    tri, n = grid_mesh()
    torch.testing.assert_close(losses.dense_uniform_laplacian(tri, n), naive_laplacian(tri, n))


def test_sparse_laplacian_equals_dense_values_and_gradients():
    torch.manual_seed(0)
    tri, n = grid_mesh()
    L = naive_laplacian(tri, n)
    op = losses.uniform_laplacian(tri, n)
    assert isinstance(op, losses.UniformLaplacian)
    torch.testing.assert_close(op.to_dense(), L)
    x1 = torch.randn(4, n, 3, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    torch.testing.assert_close(op(x1), torch.matmul(L, x2.detach()))
    l1 = losses.laplacian_loss(x1, op)
    l2 = ((L @ x2) ** 2).sum(dim=(1, 2)).mean() / n  # naive: mean_b Σ_v ‖(Lx)_v‖² / N
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    dense = losses.uniform_laplacian(tri, n, dense=True)
    torch.testing.assert_close(losses.laplacian_loss(x2.detach(), dense), l2.detach())


def test_laplacian_flat_mesh_rows_sum_to_zero():
    tri, n = grid_mesh()
    op = losses.UniformLaplacian(tri, n)
    const = torch.ones(2, n, 3) * 3.0
    assert op(const).abs().max() < 1e-6


def test_laplacian_meta_and_bf16_autocast():
    tri, n = grid_mesh()
    op = losses.UniformLaplacian(tri, n)
    x = torch.randn(2, n, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = losses.laplacian_loss(x, op)
    assert torch.isfinite(v)
    opm = op.to("meta")
    assert opm(x.to("meta")).shape == (2, n, 3)


def test_laplacian_rejects_bad_indices():
    with pytest.raises(ValueError):
        losses.UniformLaplacian(np.array([[0, 1, 5]]), 3)


def test_kl_mc_is_log_q_minus_log_p():
    torch.manual_seed(0)
    mu, lv = torch.randn(5, 3), torch.randn(5, 3)
    z = mu + torch.exp(lv / 2) * torch.randn(5, 3)
    q = torch.distributions.Normal(mu, torch.exp(lv / 2))
    p = torch.distributions.Normal(0.0, 1.0)
    expected = (q.log_prob(z) - p.log_prob(z)).sum(1).mean()
    torch.testing.assert_close(losses.kl_mc(z, mu, lv), expected)


def test_kl_mc_mean_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 0.2]])
    lv = torch.tensor([[-0.5, 0.3, 0.0]])
    n = 400_000
    M, LV = mu.expand(n, 3), lv.expand(n, 3)
    z = M + torch.exp(LV / 2) * torch.randn(n, 3, generator=g)
    mc = losses.kl_mc(z, M, LV)
    exact = losses.kl_analytic(mu, lv)
    closed = 0.5 * (lv.exp() + mu**2 - 1 - lv).sum()
    torch.testing.assert_close(exact, closed)
    assert abs(mc.item() - exact.item()) < 0.01
    assert losses.kl_divergence(mu, lv, analytic=True) == exact
    with pytest.raises(ValueError):
        losses.kl_divergence(mu, lv)


def test_kl_decay_schedule():
    assert losses.kl_decay_scale(0) == 1.0
    assert losses.kl_decay_scale(1) == pytest.approx(349 / 350)
    assert losses.kl_decay_scale(350) == 0.0
    assert losses.kl_decay_scale(50, total=100) == 0.5


def test_reconstruction_terms():
    torch.manual_seed(0)
    x, n, m = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(4, 3)
    off = torch.randn(2, 4, 3)
    torch.testing.assert_close(losses.recon_mse(off, x, m), ((off - (x - m)) ** 2).mean())
    torch.testing.assert_close(losses.neutral_mse(off, n, m), ((off - (n - m)) ** 2).mean())
    torch.testing.assert_close(losses.expression_mse(off, x, n), ((off - (x - n)) ** 2).mean())


def test_adversarial_and_discriminator_losses():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    expected = -F.log_softmax(logits, 1)[:, 1].mean()
    torch.testing.assert_close(losses.adversarial_identity_loss(logits), expected)
    labels = torch.tensor([1, 0])
    d = -(F.log_softmax(logits, 1)[0, 1] + F.log_softmax(logits, 1)[1, 0]) / 2
    torch.testing.assert_close(losses.discriminator_loss(logits, labels), d)
    # the reference feeds log_softmax to cross_entropy: identical
    torch.testing.assert_close(F.cross_entropy(F.log_softmax(logits, 1), labels), d)


def test_latent_consistency_l1_both_sides_get_grad():
    a = torch.tensor([[1.0, -2.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0]], requires_grad=True)
    v = losses.latent_consistency(a, b)
    assert math.isclose(v.item(), 1.5)
    v.backward()
    assert a.grad is not None and b.grad is not None
