"""Helpers shared by the step tests (tests/test_step.py, tests/test_fast_path.py)."""
import numpy as np
import torch

from facedis.config import LossConfig

WEIGHTS = LossConfig(recon=10.0, kl_id=1e-3, kl_exp=1e-3, adv_id=0.1, neutral_recon=5.0,
                      exp_recon=1.0, latent_consistency=0.1, laplacian=0.1)


def grid_mesh(rows, cols):
    """Triangles of a rows x cols vertex grid."""
    tri = []
    for r in range(rows - 1):
        for c in range(cols - 1):
            a, b, d, e = r * cols + c, r * cols + c + 1, (r + 1) * cols + c, (r + 1) * cols + c + 1
            tri += [[a, b, e], [a, e, d]]
    return np.array(tri, dtype=np.int32)


def make_batch(B, V, seed=0, dtype=torch.float32):
    """A batch of faces scattered around a random base face (also returned as the mean face)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(V, 3, generator=g) * 0.3
    f = lambda: (base + 0.05 * torch.randn(B, V, 3, generator=g)).to(dtype)  # noqa: E731
    return {"vertices": f(), "partner": f(), "neutral": f()}, base.to(dtype)


def assert_same_run(la, lb, pairs, rtol, atol):
    """Two runs agree: the logged losses ``la``/``lb`` and, for each ``(a, b)`` in ``pairs``, the
    modules' parameters and BatchNorm running statistics (``b`` checked against ``a``)."""
    assert la.keys() == lb.keys()
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
