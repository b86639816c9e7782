"""facedis.apps: transfer against the synthetic ground truth, recognition protocol, renderer,
figures and the CLI, on the tiny engine-trained run of test_inference.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from test_inference import REPO  # the trained-run fixtures live in conftest.py


@pytest.fixture(scope="module")
def model(tiny_run):
    """The tiny model in stored units (the tests feed it split samples)."""
    from facedis.inference import load

    return load(tiny_run["run"], units="stored")



# ---------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------
def test_transfer_beats_baselines_on_synthetic_gt(model, test_split):
    """Target identity + source expression, scored against the synthetic GT
    neutral_t + (source − neutral_s) (exact here: no pose jitter, no identity-expression
    interaction), over every (strong expression, other identity's neutral) pair."""
    from facedis.apps.transfer import synthetic_transfer_gt, transfer_scores

    d = test_split
    strong = np.flatnonzero(~d.is_neutral & (d.level >= 0.5))
    neutrals = [int(np.flatnonzero(d.subject == s)[np.argmin(d.level[d.subject == s])]) for s in np.unique(d.subject)]
    src = np.repeat(strong, len(neutrals))
    tgt = np.tile(neutrals, len(strong))
    keep = d.subject[src] != d.subject[tgt]
    src, tgt = src[keep], tgt[keep]
    sc = transfer_scores(model, d, src, tgt)
    ours = sc["transfer_mm"].mean()
    assert np.isfinite(ours)
    # closer than the mean-face baseline (the training mean face predicted for every face)
    mean_face_mm = np.linalg.norm(np.asarray(model.mean_face)[None] - sc["gt"], axis=-1).mean() * model.mm_per_unit
    assert ours < mean_face_mm, (ours, mean_face_mm)
    # closer than the source itself (right expression, wrong identity)
    assert ours < 0.9 * sc["source_itself_mm"].mean(), (ours, sc["source_itself_mm"].mean())
    # (not asserted: the tiny model's expression branch is weak, so the transfer is not yet
    # closer than the target's own predicted neutral; printed for the record)
    gt = sc["gt"]
    target_only = np.linalg.norm(model.neutral(d.vertices[tgt]) - gt, axis=-1).mean() * model.mm_per_unit
    # it carries the target's identity: closer to its own GT than to the GT built with other targets
    wrong_t = np.array([neutrals[(neutrals.index(t) + 1) % len(neutrals)] for t in tgt])
    gt_wrong = synthetic_transfer_gt(d, src, wrong_t)
    err_wrong = np.linalg.norm(sc["prediction"] - gt_wrong, axis=-1).mean() * model.mm_per_unit
    assert ours < 0.9 * err_wrong, (ours, err_wrong)
    # exactly the target's predicted neutral plus the source's predicted expression offset
    np.testing.assert_allclose(sc["prediction"][0] - model.expression(d.vertices[src[0]], offset=True),
                               model.neutral(d.vertices[tgt[0]]), atol=1e-5)
    print(f"transfer {ours:.2f} mm; mean face {mean_face_mm:.2f}; mean face + GT expression {sc['mean_face_plus_expression_mm'].mean():.2f}, "
          f"source {sc['source_itself_mm'].mean():.2f}, target neutral {target_only:.2f}, wrong target {err_wrong:.2f}")


def test_pick_transfer_faces(test_split):
    from facedis.apps.transfer import pick_transfer_faces

    src, tgt = pick_transfer_faces(test_split, 4, 3)
    assert len(src) == 4 and len(tgt) == 3
    assert len({int(test_split.subject[t]) for t in tgt}) == 3
    assert not test_split.is_neutral[src].any()
    assert len({int(test_split.expression[s]) for s in src}) == 4
    assert pick_transfer_faces(test_split, 4, 3) == (src, tgt)


# ---------------------------------------------------------------------------------------------
# recognition
# ---------------------------------------------------------------------------------------------
def test_gallery_probe_split_rules():
    from facedis.apps.recognition import gallery_probe_split

    subject = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    neutral = np.array([0, 1, 1, 1, 0, 0, 0, 0, 1], bool)
    g, p, used = gallery_probe_split(subject, neutral)
    assert used == "neutral"
    assert g.tolist() == [1, 3, 8]  # the first neutral of each identity; identity 2 has none
    assert p.tolist() == [0, 4]  # non-neutral scans of identities in the gallery
    assert not np.intersect1d(g, p).size
    level = np.array([0.5, 0.1, 0.9, 0.3, 0.2, 0.7, 0.0, 0.4, 0.6])
    g, p, used = gallery_probe_split(subject, np.zeros(9, bool), level)
    assert used == "lowest_level" and g.tolist() == [1, 4, 6, 8]
    assert sorted(p.tolist()) == [0, 2, 3, 5, 7]


def test_roc_curve():
    from facedis.apps.recognition import roc_curve

    r = roc_curve([0.9, 0.8, 0.3, 0.2], [True, True, False, False])
    assert r["auc"] == pytest.approx(1.0) and r["eer"] == pytest.approx(0.0)
    r = roc_curve([0.9, 0.8, 0.3, 0.2], [False, False, True, True])
    assert r["auc"] == pytest.approx(0.0) and r["eer"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    y = rng.random(4000) < 0.3
    r = roc_curve(rng.random(4000), y)
    assert abs(r["auc"] - 0.5) < 0.05 and abs(r["eer"] - 0.5) < 0.05
    assert r["fpr"][0] == 0 and r["tpr"][-1] == 1 and np.all(np.diff(r["fpr"]) >= 0)


def test_recognition_beats_chance_and_probe_never_in_gallery(model, test_split):
    from facedis.apps.recognition import recognise_split

    res = recognise_split(model, test_split)
    g, p = np.array(res["gallery_indices"]), np.array(res["probe_indices"])
    assert not np.intersect1d(g, p).size
    assert len(np.unique(test_split.subject[g])) == len(g) == res["num_gallery"] == 12
    if res["gallery_from"] == "neutral":
        assert test_split.is_neutral[g].all() and not test_split.is_neutral[p].any()
    chance = res["chance_rank1"]
    assert chance == pytest.approx(1 / 12)
    for key in ("rank1_latent_cosine", "rank1_vertex"):
        assert res[key] >= max(4 * chance, chance + 0.35), (key, res[key], chance)
    assert res["verification_latent_cosine"]["eer"] < 0.3
    assert res["verification_latent_cosine"]["auc"] > 0.75
    assert recognise_split(model, test_split) == res  # deterministic


# ---------------------------------------------------------------------------------------------
# renderer and figures
# ---------------------------------------------------------------------------------------------
def test_render_and_error_map_image_are_faces(model, test_split):
    from facedis.apps.figures import error_map_image
    from facedis.apps.render import render_mesh

    img = render_mesh(test_split.vertices[0], model.triangles, size=200)
    assert img.shape == (200, 200, 3) and img.dtype == np.uint8
    fg = (img < 250).any(axis=-1)
    assert 0.2 < fg.mean() < 0.9  # a face fills a good part of the frame
    assert img[fg].std() > 10  # shaded, not a flat silhouette
    errs = np.linspace(0, 5, 300)
    em = error_map_image(test_split.vertices[0], model.triangles, errs, vmax=5.0, size=200, title="t")
    assert em.dtype == np.uint8 and em.ndim == 3 and em.shape[0] == 200 and em.shape[2] == 3
    r, b = em[..., 0].astype(int), em[..., 2].astype(int)
    assert ((r - b) > 100).sum() > 100 and ((b - r) > 100).sum() > 100  # red and blue parts of the map


def test_cli_figures_writes_the_set(tiny_run, tmp_path):
    out = tmp_path / "figs"
    r = subprocess.run([sys.executable, "-m", "facedis.apps", "figures", "--run", str(tiny_run["run"]), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    names = ["disentangle_best_median_worst.png", "heatmap_worst_full.png", "heatmap_worst_full.ply",
             "heatmap_median_neutral.png", "transfer_grid.png", "interpolation_identity.png",
             "interpolation_expression.png", "latent_pca.png", "roc.png", "recognition.json", "figures.json"]
    for n in names:
        assert (out / n).is_file() and (out / n).stat().st_size > 1000, n
    idx = json.loads((out / "figures.json").read_text())
    assert idx["transfer"]["mean_transfer_mm"] < idx["transfer"]["mean_baseline_source_mm"]
    import trimesh
    from matplotlib.image import imread

    m = trimesh.load(str(out / "heatmap_worst_full.ply"), process=False)
    assert len(m.vertices) == 300 and m.visual.vertex_colors.shape == (300, 4)
    assert len(np.unique(m.visual.vertex_colors[:, :3], axis=0)) > 10
    img = imread(out / "transfer_grid.png")
    assert img.shape[0] > 500 and img.shape[1] > 500
    assert len(list((out / "meshes").glob("transfer_*.ply"))) == 12


def _env():
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("DISPLAY", None)
    return env


def test_cli_transfer_neutralise_interpolate_recognise(tiny_run, model, test_split, tmp_path):
    from facedis.apps.__main__ import main

    run = str(tiny_run["run"])
    src = model.save_mesh(tmp_path / "src.ply", test_split.vertices[5])
    tgt = model.save_mesh(tmp_path / "tgt.obj", test_split.vertices[70])
    assert main(["transfer", "--run", run, "--source", str(src), "--target", str(tgt), "--units", "stored", "--out",
                 str(tmp_path / "t.ply")]) == 0
    from facedis.inference import read_mesh

    v, _ = read_mesh(tmp_path / "t.ply")
    np.testing.assert_allclose(v, model.transfer(test_split.vertices[5], test_split.vertices[70]), atol=1e-5)
    assert (tmp_path / "t.png").is_file()
    # data:SPLIT:INDEX specs and millimetres
    assert main(["transfer", "--run", run, "--source", "data:test:5", "--target", "data:test:70", "--units", "mm",
                 "--out", str(tmp_path / "t_mm.obj")]) == 0
    v_mm, _ = read_mesh(tmp_path / "t_mm.obj")
    np.testing.assert_allclose(v_mm, v * model.mm_per_unit, rtol=1e-4, atol=1e-3)
    assert main(["neutralise", "--run", run, str(src), "data:test:9", "--expression", "--units", "stored",
                 "--out", str(tmp_path / "n")]) == 0
    v, _ = read_mesh(tmp_path / "n" / "src_neutral.ply")
    np.testing.assert_allclose(v, model.neutral(test_split.vertices[5]), atol=1e-5)
    assert (tmp_path / "n" / "data_test_9_expression.ply").is_file()
    assert main(["interpolate", "--run", run, "--a", str(src), "--b", str(tgt), "--steps", "4", "--part", "expression",
                 "--units", "stored", "--out", str(tmp_path / "i")]) == 0
    assert len(list((tmp_path / "i").glob("expression_*.ply"))) == 4 and (tmp_path / "i" / "expression_strip.png").is_file()
    assert main(["recognise", "--run", run, "--out", str(tmp_path / "rec.json")]) == 0
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["rank1_latent_cosine"] > rec["chance_rank1"]
    with pytest.raises(SystemExit):
        main(["transfer", "--run", run, "--source", "data:test:99999", "--target", str(tgt), "--out", str(tmp_path / "x.ply")])


def test_cli_default_units_are_the_raw_files(tiny_run, model, test_split, tmp_path, capsys):
    """synth's raw units are metres: by default the CLI reads metre meshes and data:SPLIT:INDEX
    samples and writes metres."""
    from facedis.apps.__main__ import main
    from facedis.inference import read_mesh

    run = str(tiny_run["run"])
    to_m = model.mm_per_unit / 1000.0
    src = model.save_mesh(tmp_path / "src.ply", test_split.vertices[5] * to_m)
    tgt = model.save_mesh(tmp_path / "tgt.ply", test_split.vertices[70] * to_m)
    capsys.readouterr()
    assert main(["transfer", "--run", run, "--source", str(src), "--target", str(tgt), "--out", str(tmp_path / "t.ply")]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and json.loads(out.out)["units"] == "m"
    expected = model.transfer(test_split.vertices[5], test_split.vertices[70]) * to_m
    np.testing.assert_allclose(read_mesh(tmp_path / "t.ply")[0], expected, rtol=1e-4, atol=1e-6)
    assert main(["transfer", "--run", run, "--source", "data:test:5", "--target", "data:test:70",
                 "--out", str(tmp_path / "d.ply")]) == 0
    np.testing.assert_allclose(read_mesh(tmp_path / "d.ply")[0], expected, rtol=1e-4, atol=1e-6)
    # the stored-unit mesh given to the default (metres) is warned about on stderr
    stored = model.save_mesh(tmp_path / "stored.ply", test_split.vertices[70])
    assert main(["neutralise", "--run", run, str(stored), "--out", str(tmp_path / "n")]) == 0
    err = capsys.readouterr().err
    assert "facedis: warning: " in err and "stored.ply" in err and "pass units='stored'" in err, err
