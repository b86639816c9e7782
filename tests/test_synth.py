"""facedis/prep/synth.py + data_prep/prepare.py (the entry script): determinism, splits, neutral GT, units, check, non-linearity."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from facedis.prep import synth
from facedis.shards import check_dataset, read_arrays, read_meta

REPO = Path(__file__).resolve().parent.parent
PREPARE = REPO / "data_prep" / "prepare.py"
TINY = ["--subjects", "6", "--per-subject", "8", "--vertices", "300", "--frames-per-sequence", "4"]


def run_prepare(*args, cwd=None):
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or "/")


def digest(root: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    r = run_prepare("synth", "--out", out, *TINY)
    assert r.returncode == 0, r.stderr
    return out


def tiny_opts(**kw):
    base = dict(subjects=6, per_subject=8, vertices=300, frames_per_sequence=4)
    base.update(kw)
    return synth.default_options(**base)


def test_cli_deterministic_byte_identical(tiny, tmp_path):
    out2 = tmp_path / "again"
    r = run_prepare("synth", "--out", out2, *TINY)
    assert r.returncode == 0, r.stderr
    assert digest(tiny) == digest(out2)  # every shard, meta.h5 and meta.json
    r = run_prepare("synth", "--out", tmp_path / "seed1", *TINY, "--seed", "1")
    assert read_meta(tmp_path / "seed1")["content_hash"] != read_meta(tiny)["content_hash"]


def test_meta_contents(tiny):
    meta = read_meta(tiny)
    assert meta["dataset"] == "synth" and meta["protocol"] == "unseen-identity" and meta["seed"] == 0
    assert meta["units"]["mm_per_unit"] == 260.0
    assert meta["units"]["stored_per_metre"] == pytest.approx(1 / 0.26)
    assert meta["source"].startswith("ICT-FaceKit (MIT), basis sha256 ")
    assert len(meta["subjects"]) == 6 and meta["expressions"] == list(synth.EXPRESSIONS)
    assert any(e.endswith("_left") for e in meta["expressions"]) and any(e.endswith("_right") for e in meta["expressions"])
    assert meta["options"]["vertices"] == 300 and meta["options"]["identity_interaction"] and meta["options"]["pose"]
    arr = read_arrays(tiny)
    V = meta["num_vertices"]
    assert V == 300 and arr["template"].shape == (V, 3) and arr["vertex_index_map"].dtype == np.int64
    assert arr["triangles"].dtype == np.int32 and arr["triangles"].max() < V
    b = synth.load_basis()
    np.testing.assert_allclose(arr["template"], b["template"][arr["vertex_index_map"]] / 0.26, rtol=1e-6)
    assert "landmarks" in arr and arr["landmarks"].max() < V
    s = check_dataset(tiny)
    assert s["splits"]["train"]["samples"] + s["splits"]["test"]["samples"] == 48


def test_check_command_ok_and_failures(tiny, tmp_path):
    r = run_prepare("check", tiny)
    assert r.returncode == 0 and "check OK" in r.stdout, r.stderr
    # truncated
    bad = tmp_path / "trunc"
    shutil.copytree(tiny, bad)
    shard = bad / "train-00000.h5"
    shard.write_bytes(shard.read_bytes()[:-1000])
    r = run_prepare("check", bad)
    assert r.returncode != 0 and "train-00000.h5" in r.stderr and "sha256" in r.stderr
    # missing
    bad = tmp_path / "missing"
    shutil.copytree(tiny, bad)
    (bad / "test-00000.h5").unlink()
    r = run_prepare("check", bad)
    assert r.returncode != 0 and "test-00000.h5: missing" in r.stderr
    # tampered (one byte of vertex data changed, size unchanged)
    bad = tmp_path / "tampered"
    shutil.copytree(tiny, bad)
    shard = bad / "train-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_prepare("check", bad)
    assert r.returncode != 0 and "train-00000.h5" in r.stderr
    # not a data set at all
    r = run_prepare("check", tmp_path / "nope")
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_unseen_identity_split_disjoint(tiny):
    meta = read_meta(tiny)
    tr, te = set(meta["splits"]["train"]["subjects"]), set(meta["splits"]["test"]["subjects"])
    assert tr and te and not (tr & te) and tr | te == set(range(6))
    with h5py.File(tiny / "test-00000.h5") as f:
        assert set(np.unique(f["subject"][()])) == te


def test_seen_identity_split_disjoint_frames():
    d = synth.generate(**tiny_opts(protocol="seen-identity", per_subject=20, frames_per_sequence=10))
    tr, te = d["splits"]["train"], d["splits"]["test"]
    assert set(np.unique(tr["subject"])) == set(np.unique(te["subject"])) == set(range(6))
    assert len(tr["subject"]) + len(te["subject"]) == 6 * 20
    h = lambda a: {hashlib.sha256(x.tobytes()).hexdigest() for x in a}  # noqa: E731
    assert not (h(tr["vertices"]) & h(te["vertices"])), "a frame is in both splits"
    assert not te["is_neutral"].any()  # held-out windows never take the sequence's neutral frame


def test_neutral_gt_is_exact_identity_mesh(tiny):
    b = synth.load_basis()
    arr = read_arrays(tiny)
    vmap = arr["vertex_index_map"]
    meta = read_meta(tiny)
    for split in ("train", "test"):
        neu = arr[f"neutral/{split}"]
        for s in range(6):
            if s in meta["splits"][split]["subjects"]:
                beta = np.random.default_rng([0, 1, s]).standard_normal(100)
                exact = (b["template"][vmap].astype(np.float64) + b["iddirs"][vmap].astype(np.float64) @ beta) / 0.26
                np.testing.assert_allclose(neu[s], exact, atol=2e-6)
            else:
                assert np.isnan(neu[s]).all()


def test_identity_modes_keeps_the_leading_modes():
    b = synth.load_basis()
    full = synth.generate(**tiny_opts(pose=False))
    d = synth.generate(**tiny_opts(pose=False, identity_modes=3))
    assert "identity_modes" not in full["options"] and d["options"]["identity_modes"] == 3
    vmap = d["vertex_index_map"]
    for s in range(6):
        beta = np.random.default_rng([0, 1, s]).standard_normal(100)
        beta[3:] = 0.0  # the same draws as the full model, tail set to zero
        exact = (b["template"][vmap].astype(np.float64) + b["iddirs"][vmap].astype(np.float64) @ beta) / 0.26
        np.testing.assert_allclose(d["identity"][s], exact, atol=2e-6)
    assert not np.allclose(d["identity"], full["identity"], atol=1e-3)
    with pytest.raises(ValueError, match="identity-modes"):
        synth.generate(**tiny_opts(identity_modes=0))


def test_neutral_frames_levels_and_switches():
    d = synth.generate(**tiny_opts(identity_interaction=False, pose=False))
    for split, s in d["splits"].items():
        assert s["level"].min() == 0.0 and s["level"].max() <= 1.0
        assert set(np.unique(s["subject"][s["is_neutral"]])) == set(np.unique(s["subject"]))  # a gallery each
        # without pose and noise, a level-0 frame is exactly the identity mesh
        np.testing.assert_array_equal(s["vertices"][s["is_neutral"]], d["identity"][s["subject"][s["is_neutral"]]])
    on = synth.generate(**tiny_opts())
    s = on["splits"]["train"]
    moved = np.abs(s["vertices"][s["is_neutral"]] - on["identity"][s["subject"][s["is_neutral"]]]).max() * 260
    assert 0.5 < moved < 40  # the pose moves the neutral frames by millimetres, not centimetres
    noisy = synth.generate(**tiny_opts(identity_interaction=False, pose=False, noise_mm=0.5))
    r = (noisy["splits"]["train"]["vertices"] - d["splits"]["train"]["vertices"]) * 260
    assert 0.4 < r.std() < 0.6


def _oracle_linear_avd(d) -> float:
    """AVD (mm) of the best linear 3DMM fit with the TRUE generating bases (identity PCA + the
    blendshapes used): exact for a purely additive model."""
    b = synth.load_basis()
    vmap = d["vertex_index_map"]
    names = list(map(str, b["exp_names"]))
    used = sorted({names.index(k) for c in synth.EXPRESSIONS.values() for k in c})
    M = np.concatenate([b["iddirs"][vmap].reshape(len(vmap) * 3, -1),
                        b["expdirs"][vmap][:, :, used].reshape(len(vmap) * 3, -1)], 1).astype(np.float64) / 0.26
    T = d["template"].astype(np.float64).reshape(-1)
    s = d["splits"]["test"]
    coef, *_ = np.linalg.lstsq(M, (s["vertices"].reshape(len(s["vertices"]), -1) - T).T, rcond=None)
    pred = (T[:, None] + M[:, :100] @ coef[:100]).T.reshape(-1, len(vmap), 3)
    return float(np.linalg.norm(pred - d["identity"][s["subject"]], axis=-1).mean() * 260)


def _ridge_avd(d) -> float:
    """Best (over alpha) test AVD (mm) of a ridge regression face -> neutral fitted on train."""
    tr, te = d["splits"]["train"], d["splits"]["test"]
    idn = d["identity"].astype(np.float64)
    X = tr["vertices"].reshape(len(tr["vertices"]), -1).astype(np.float64)
    Y = X - idn[tr["subject"]].reshape(len(X), -1)
    Xt = te["vertices"].reshape(len(te["vertices"]), -1).astype(np.float64)
    mu, ym = X.mean(0), Y.mean(0)
    K = (X - mu) @ (X - mu).T
    Kt = (Xt - mu) @ (X - mu).T
    scale = np.trace(K) / len(K)
    best = np.inf
    for a in (1e-8, 1e-6, 1e-4, 1e-2):
        pred = Xt - (Kt @ np.linalg.solve(K + a * scale * np.eye(len(K)), Y - ym) + ym)
        best = min(best, np.linalg.norm(pred.reshape(-1, idn.shape[1], 3) - idn[te["subject"]], axis=-1).mean() * 260)
    return float(best)


def test_not_linearly_solvable():
    additive = synth.generate(**tiny_opts(identity_interaction=False, pose=False))
    default = synth.generate(**tiny_opts())
    a, o = _oracle_linear_avd(additive), _oracle_linear_avd(default)
    assert a < 1e-3, a  # a linear model solves the additive version exactly
    assert o > 0.5, o   # ... but not the default data (interaction + pose)
    inter = _oracle_linear_avd(synth.generate(**tiny_opts(pose=False)))
    assert 0.05 < inter < o


@pytest.mark.slow
def test_ridge_regression_fails_with_interaction_and_pose():
    kw = dict(subjects=150, per_subject=4, vertices=300, frames_per_sequence=4)
    off = _ridge_avd(synth.generate(**synth.default_options(identity_interaction=False, pose=False, **kw)))
    on = _ridge_avd(synth.generate(**synth.default_options(**kw)))
    print(f"ridge face->neutral test AVD: additive {off:.3f} mm, interaction+pose {on:.3f} mm")
    assert off < 0.05 and on > 0.2 and on > 5 * off
