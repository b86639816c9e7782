"""Baselines (docs/results.md): each one trained on tiny synth data through the same harness, its metrics
checked against a direct numpy computation (mean face / identity map to float64 rounding,
ridge against a closed-form ``np.linalg.solve``), plus the run-directory files and the grid."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from facedis import baselines as B
from facedis.config import ConfigError, load_config
from facedis.shards import read_arrays, read_meta

REPO = Path(__file__).resolve().parents[1]

MM = 260.0
ALPHAS = [1e-6, 1e-3, 1.0, 1e3]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
def _prepare(out: Path, protocol: str) -> Path:
    from facedis.prep import prepare

    rc = prepare.main(["synth", "--subjects", "6", "--per-subject", "10", "--vertices", "120", "--seed", "0",
                       "--protocol", protocol, "--out", str(out)])
    assert rc in (0, None)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return {"seen": _prepare(root / "synth-seen", "seen-identity"),
            "unseen": _prepare(root / "synth-unseen", "unseen-identity")}


def _cfg(root: Path, run_dir: Path, kind: str, **extra):
    over = {"data.root": str(root), "data.prepare": [], "model.kind": kind, "run.dir": str(run_dir),
            "train.epochs": 2, "train.batch_size": 8, "train.eval_batch_size": 7, "train.eval_every": 1,
            "train.cpu": True, "train.progress": False, "run.tensorboard": False, "model.width": 0.125,
            "model.encoder_channels": [], "model.decoder_hidden": 16, "model.ridge_alphas": ALPHAS, "method.id_discriminator": False}
    over.update(extra)
    return load_config(REPO / "configs" / "synth.yaml", overrides=over)


def _split(root: Path, split: str) -> dict:
    """A split straight from the shard files (independent of facedis.data)."""
    meta = read_meta(root)
    parts: dict = {}
    for name in meta["splits"][split]["shards"]:
        with h5py.File(root / name, "r") as f:
            for k in ("vertices", "subject"):
                parts.setdefault(k, []).append(f[k][()])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    arrays = read_arrays(root)
    out["neutral"] = arrays[f"neutral/{split}"][out["subject"]].astype(np.float64)
    out["vertices"] = out["vertices"].astype(np.float64)
    out["mean_face"] = arrays["mean_face"].astype(np.float64)
    return out


def _dist(a, b):  # per-sample mean vertex distance, mm
    return np.linalg.norm(a - b, axis=-1).mean(-1) * MM


def _edis(pred, subj):
    ref, vstd = [], []
    for s in np.unique(subj):
        P = pred[subj == s] * MM
        dev = P - P.mean(0, keepdims=True)
        ref.append(np.linalg.norm(dev, axis=-1).std())
        vstd.append(np.sqrt((dev**2).sum(-1).mean(0)).mean())
    return np.array(ref), np.array(vstd)


def _expected(pred_neutral, full, test) -> dict:
    avd, rec = _dist(pred_neutral, test["neutral"]), _dist(full, test["vertices"])
    ref, vstd = _edis(pred_neutral, test["subject"])
    return {"AVD_neu_mean": avd.mean(), "AVD_neu_std": avd.std(), "AVD_neu_median": np.median(avd),
            "E_rec_mean": rec.mean(), "E_rec_std": rec.std(), "E_rec_median": np.median(rec),
            "E_dis_ref_mean": ref.mean(), "E_dis_ref_median": np.median(ref),
            "E_dis_vstd_mean": vstd.mean(), "E_dis_vstd_median": np.median(vstd)}


def _check(metrics: dict, expected: dict, rtol: float, atol: float = 0.0) -> None:
    for k, v in expected.items():
        np.testing.assert_allclose(metrics[k], v, rtol=rtol, atol=atol, err_msg=k)


def _closed_form_ridge(X, Y, alpha):
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
    return lambda Z: ym + (Z - xm) @ W


# ---------------------------------------------------------------------------------------------
# exact metrics against numpy
# ---------------------------------------------------------------------------------------------
def test_mean_face_exact(data, tmp_path):
    m = B.run_baseline(_cfg(data["seen"], tmp_path / "mf", "mean_face"))
    t = _split(data["seen"], "test")
    mf = np.broadcast_to(t["mean_face"], t["vertices"].shape)
    exp = _expected(mf, mf, t)
    assert exp["E_dis_ref_mean"] == 0.0 and exp["E_dis_vstd_mean"] == 0.0
    _check(m, exp, rtol=1e-12, atol=1e-12)
    assert m["AVD_neu_mean"] == pytest.approx(m["AVD_neu_meanface_mean"], rel=1e-12)
    assert m["num_test_samples"] == len(t["subject"]) and m["num_test_identities"] == 6


def test_identity_map_exact(data, tmp_path):
    m = B.run_baseline(_cfg(data["seen"], tmp_path / "im", "identity_map"))
    t = _split(data["seen"], "test")
    exp = _expected(t["vertices"], t["vertices"], t)
    _check(m, exp, rtol=1e-12)
    assert m["E_rec_mean"] == 0.0 and m["E_rec_median"] == 0.0  # the input reproduced exactly
    assert m["E_dis_ref_mean"] > 0 and m["AVD_neu_mean"] > 0


@pytest.mark.parametrize("protocol", ["seen", "unseen"])
def test_ridge_matches_closed_form(data, tmp_path, protocol):
    root = data[protocol]
    seed = 3
    m = B.run_baseline(_cfg(root, tmp_path / "ridge", "ridge", **{"train.seed": seed}))
    tr, te = _split(root, "train"), _split(root, "test")
    ok = np.isfinite(tr["neutral"]).all(axis=(1, 2))
    n = int(ok.sum())
    X, Y, subj = tr["vertices"][ok].reshape(n, -1), tr["neutral"][ok].reshape(n, -1), tr["subject"][ok]
    # validation set of train SUBJECTS, seeded; alpha chosen on it by AVD_neu
    fit_s, val_s = B.split_val_subjects(subj, seed)
    assert len(np.intersect1d(fit_s, val_s)) == 0 and len(val_s) == max(1, round(0.2 * len(np.unique(subj))))
    f, v = np.isin(subj, fit_s), np.isin(subj, val_s)
    val = {a: _dist(_closed_form_ridge(X[f], Y[f], a)(X[v]).reshape(-1, tr["vertices"].shape[1], 3),
                    Y[v].reshape(-1, tr["vertices"].shape[1], 3)).mean() for a in ALPHAS}
    best = min(ALPHAS, key=lambda a: (val[a], -a))
    assert m["ridge_alpha"] == best
    for a in ALPHAS:
        np.testing.assert_allclose(m["ridge_val_AVD_neu_mean"][repr(a)], val[a], rtol=1e-6)
    # refit on the whole train split, predict the test split
    nt = len(te["subject"])
    pred = _closed_form_ridge(X, Y, best)(te["vertices"].reshape(nt, -1)).reshape(te["vertices"].shape)
    # E_dis is computed by the engine from float32 copies of the predicted identities: ~1e-5 mm rounding
    _check(m, _expected(pred, pred, te), rtol=1e-6, atol=2e-5)


def test_ridge_factorisation_equals_solve():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 45)), rng.normal(size=(30, 45))  # D > n: the dual / SVD path
    f = B.ridge_factorise(X, Y)
    Z = rng.normal(size=(5, 45))
    for a in (1e-4, 0.1, 10.0):
        np.testing.assert_allclose(f.predict(Z, a), _closed_form_ridge(X, Y, a)(Z), rtol=1e-8, atol=1e-10)


def test_val_split_is_seeded_and_valid():
    subj = np.repeat(np.arange(10), 3)
    a, b = B.split_val_subjects(subj, 0), B.split_val_subjects(subj, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a[1]) == 2 and len(a[0]) == 8
    assert any(not np.array_equal(B.split_val_subjects(subj, s)[1], a[1]) for s in range(1, 6))
    with pytest.raises(ConfigError):
        B.split_val_subjects(np.zeros(4), 0)


def test_supervised_trains_and_metrics_match_its_weights(data, tmp_path):
    run_dir = tmp_path / "sup"
    m = B.run_baseline(_cfg(data["seen"], run_dir, "supervised", **{"train.epochs": 3}))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 3]  # per epoch (+ eval at 1, 2) and the final eval
    assert all(np.isfinite(x["train/neutral_recon"]) for x in lines)
    assert m["epoch"] == 3 and m["global_step"] == 3 * (48 // 8)
    # recompute the predictions from the saved weights and check the metrics with numpy
    payload = torch.load(run_dir / "baseline.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == "facedis-baseline/1" and payload["kind"] == "supervised"
    assert payload["encoder_channels"] == []
    net = B.SupervisedRegressor(payload["num_vertices"], payload["code_dim"], width=0.125, decoder_hidden=16,
                                pointwise="linear", encoder_channels=payload["encoder_channels"] or None)
    net.load_state_dict(payload["state_dict"])
    net.eval()
    t = _split(data["seen"], "test")
    with torch.no_grad():
        off = net.offset(torch.as_tensor(t["vertices"], dtype=torch.float32)).double().numpy()
    pred = t["mean_face"].astype(np.float32).astype(np.float64) + off
    _check(m, _expected(pred, pred, t), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# harness: run directory, aggregation, config, grid
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", B.BASELINE_KINDS)
def test_run_dir_like_the_engine_and_aggregated(data, tmp_path, kind):
    from facedis.cluster import aggregate

    grid = tmp_path / "grid"
    run_dir = grid / f"unseen-{kind}" / "seed0"
    m = B.run_baseline(_cfg(data["unseen"], run_dir, kind, **{"train.epochs": 1}))
    for f in ("config.yaml", "provenance.json", "metrics.jsonl", "metrics.json", "baseline.pt"):
        assert (run_dir / f).is_file(), f
    assert not (run_dir / "model.pt").exists()  # model.pt is the VAE inference format
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["kind"] == kind
    assert load_config(run_dir / "config.yaml").model.kind == kind  # the config round-trips
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["model_kind"] == kind and on_disk["mode"] == f"baseline:{kind}"
    assert all(np.isfinite(on_disk[k]) for k in aggregate.METRIC_KEYS)
    assert json.loads((run_dir / "provenance.json").read_text())["dataset"]["content_hash"]
    # a rerun returns the finished run's metrics without refitting
    mtime = (run_dir / "metrics.json").stat().st_mtime_ns
    again = B.run_baseline(_cfg(data["unseen"], run_dir, kind, **{"train.epochs": 1}))
    assert again == on_disk == json.loads(json.dumps(m)) and (run_dir / "metrics.json").stat().st_mtime_ns == mtime
    groups, problems = aggregate.scan(grid)
    assert not problems and groups[0].stats["AVD_neu_mean"][0] == pytest.approx(m["AVD_neu_mean"])


def test_rejects_the_vae_kind(data, tmp_path):
    with pytest.raises(ConfigError, match="not a baseline"):
        B.run_baseline(_cfg(data["seen"], tmp_path / "x", "vae"))


def test_engine_dispatches_baselines(data, tmp_path):
    from facedis import engine

    cfg = _cfg(data["seen"], tmp_path / "via-engine", "identity_map")
    try:
        m = engine.train(cfg)
    except ConfigError as e:
        if "baselines" in str(e):
            pytest.skip("engine.train has no model.kind dispatch yet (see facedis/baselines.py run_baseline)")
        raise
    assert m["model_kind"] == "identity_map" and m["E_rec_mean"] == 0.0


def test_synth_results_grid():
    from facedis.cluster.grids import resolve_grid
    from facedis.cluster.submit import plan_runs

    name, entries = resolve_grid("synth-results")
    assert name == "synth-results" and len(entries) == 16
    specs = plan_runs(entries, name, [0, 1, 2], Path("/tmp/facedis-grid-test"))
    assert len(specs) == 48
    assert {s.cfg.model.kind for s in specs} == {"vae", *B.BASELINE_KINDS}
    modes = {(s.cfg.method.neutral_gt, s.cfg.method.id_discriminator) for s in specs if s.cfg.model.kind == "vae"}
    assert len(modes) == 4
    for s in specs:
        protocol = "seen-identity" if s.label.startswith("seen") else "unseen-identity"
        assert s.cfg.data.root.endswith(f"synth-results-{protocol}")
        assert s.cfg.data.prepare[s.cfg.data.prepare.index("--protocol") + 1] == protocol
        if s.cfg.model.kind != "vae":
            assert not s.cfg.method.id_discriminator
