"""facedis.metrics on known answers."""
import numpy as np
import pytest
import torch

from facedis import metrics


def rot(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def test_identical_meshes_give_zero():
    x = np.random.default_rng(0).normal(size=(4, 10, 3))
    ids = np.array([0, 0, 1, 1])
    assert metrics.e_rec(x, x)["mean"] == 0.0
    assert metrics.avd_neu(torch.tensor(x), torch.tensor(x))["median"] == 0.0
    same = np.repeat(x[:1], 4, axis=0)
    assert metrics.edis_reference(same, ids)["mean"] == 0.0
    assert metrics.edis_vertex_std(same, ids)["mean"] == 0.0


def test_e_rec_hand_computed_with_ddof0_std():
    target = np.zeros((2, 3, 3))
    pred = target.copy()
    pred[0, :, 0] = 1.0  # sample 0: every vertex 1 unit off
    pred[1, :, :2] = [3.0, 4.0]  # sample 1: every vertex 5 units off
    r = metrics.e_rec(pred, target, mm_per_unit=2.0)
    np.testing.assert_allclose(r["per_sample"], [2.0, 10.0])
    assert r["mean"] == pytest.approx(6.0)
    assert r["std"] == pytest.approx(4.0)  # np.std, ddof 0
    assert r["median"] == pytest.approx(6.0)


def test_avd_neu_hand_computed():
    gt = np.zeros((1, 2, 3))
    pred = np.array([[[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])  # mean over vertices: (2 + 0) / 2
    r = metrics.avd_neu(pred, gt)
    assert r["mean"] == pytest.approx(1.0) and r["std"] == 0.0


def test_edis_constant_offset_separates_the_two_definitions():
    base = np.random.default_rng(1).normal(size=(5, 3))
    c = np.array([0.3, -0.4, 0.0])  # |c| = 0.5
    P = np.stack([base, base + c])  # one identity, two predictions
    ids = [7, 7]
    assert metrics.edis_reference(P, ids)["mean"] == pytest.approx(0.0, abs=1e-12)
    # every vertex is |c|/2 from the mean: per-vertex RMS = 0.25
    assert metrics.edis_vertex_std(P, ids)["mean"] == pytest.approx(0.25)


def test_edis_hand_computed_two_identities():
    a = np.zeros((2, 3, 3))
    a[1, 0, 0] = 2.0  # mean vertex 0 = (1,0,0): distances [1,0,0, 1,0,0]
    b = np.zeros((3, 3, 3))  # identity with no spread
    P = np.concatenate([a, b])
    ids = [0, 0, 5, 5, 5]
    ref = metrics.edis_reference(P, ids, mm_per_unit=10.0)
    assert ref["per_identity"][0] == pytest.approx(10.0 * np.sqrt(2.0 / 9.0))
    assert ref["per_identity"][5] == 0.0
    assert ref["mean"] == pytest.approx(5.0 * np.sqrt(2.0 / 9.0))
    assert ref["median"] == pytest.approx(ref["mean"])
    vs = metrics.edis_vertex_std(P, ids, mm_per_unit=10.0)
    assert vs["per_identity"][0] == pytest.approx(10.0 / 3.0)  # vertex RMS [1,0,0] averaged
    assert vs["mean"] == pytest.approx(10.0 / 6.0)


def test_kabsch_recovers_rotation_and_translation_batched():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(3, 20, 3))
    R = np.stack([rot([1, 2, 3], 0.7), rot([0, 0, 1], -2.0), rot([1, -1, 0], 3.0)])
    t = rng.normal(size=(3, 3))
    tgt = src @ np.swapaxes(R, -1, -2) + t[:, None]
    R_hat, t_hat = metrics.kabsch(src, tgt)
    np.testing.assert_allclose(R_hat, R, atol=1e-9)
    np.testing.assert_allclose(t_hat, t, atol=1e-9)
    np.testing.assert_allclose(metrics.kabsch_align(src, tgt), tgt, atol=1e-9)


def test_kabsch_never_reflects():
    src = np.random.default_rng(3).normal(size=(30, 3))
    mirrored = src * np.array([-1.0, 1.0, 1.0])
    R, _ = metrics.kabsch(src, mirrored)
    assert np.linalg.det(R) == pytest.approx(1.0)


def test_rank1_identification_hand_case():
    # 1-D "shapes" as codes; gallery = first sample of each identity
    feats = np.array([[0.0], [10.0], [0.4], [9.0], [6.0]])
    ids = np.array([0, 1, 0, 1, 0])
    g, p = metrics.gallery_split(ids, [True, True, False, False, False])
    np.testing.assert_array_equal(g, [0, 1])
    np.testing.assert_array_equal(p, [2, 3, 4])
    # probe 4 (id 0, value 6) is nearer to id 1's gallery entry: 2 of 3 correct
    assert metrics.rank1_identification(feats, ids, g, p, metric="euclidean") == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.rank1_identification(feats, ids, g, [0, 2])


def test_rank1_vertex_sum_distance():
    rng = np.random.default_rng(4)
    faces = rng.normal(size=(3, 8, 3))
    probes = faces + rng.normal(scale=0.01, size=faces.shape)
    X = np.concatenate([faces, probes])
    ids = np.array([0, 1, 2, 0, 1, 2])
    g, p = metrics.gallery_split(ids, [True] * 3 + [False] * 3)
    assert metrics.rank1_identification(X, ids, g, p) == 1.0
    assert metrics.rank1_identification(X.reshape(6, -1), ids, g, p, metric="cosine") == 1.0


def test_summarize_and_length_mismatch():
    s = metrics.summarize([1.0, 2.0, 6.0])
    assert s == {"mean": 3.0, "std": pytest.approx(np.std([1, 2, 6])), "median": 2.0}
    with pytest.raises(ValueError):
        metrics.edis_reference(np.zeros((3, 2, 3)), [0, 1])
