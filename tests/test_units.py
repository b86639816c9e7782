"""Units a user never has to think about: a model trained on the CoMA fixture (raw PLYs in
metres) reads mesh files in metres and writes outputs in metres by default; a mesh far from the
training scale gets a warning naming the units it is probably in.

The model is trained for a few seconds (6 short epochs); what is tested is the units, not the
quality of the fit (a few mm of decoder noise on a 95 mm face).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coma_run(tmp_path_factory) -> dict:
    """CoMA fixture tree (metres) -> prepared data set (stored = metres / 0.26) -> a tiny model."""
    import fixtures_real as fx

    base = tmp_path_factory.mktemp("units")
    raw = base / "raw"
    fx.make_coma_tree(raw, face=fx.small_face(), lr_vertex=100)
    data = base / "coma"
    r = fx.prepare("coma", "--raw", raw, "--out", data, *fx.COMA_PREPARE_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = base / "run"
    fx.train_tiny_coma(data, run_dir, **{
        "loss.recon": 5e4, "loss.neutral_recon": 5e4, "optim.lr_vae": 3e-3, "train.epochs": 6,
        "train.batch_size": 8, "train.eval_every": 6, "train.checkpoint_every": 6, "run.name": "units"})
    plys = sorted(raw.glob("FaceTalk_1/bareteeth/*.ply")) + sorted(raw.glob("FaceTalk_2/eyebrow/*.ply"))
    return {"raw": raw, "data": data, "run": run_dir, "source": plys[12], "target": plys[-25]}


def _extent(v) -> np.ndarray:
    """Per-axis extent (bounding-box sides) of a face (V, 3)."""
    return np.ptp(np.asarray(v, np.float64), axis=0)


def _size(v) -> float:
    """Overall extent: the bounding-box diagonal."""
    return float(np.linalg.norm(_extent(v)))


def test_model_knows_its_raw_units(coma_run):
    from facedis.inference import load

    m = load(coma_run["run"])
    assert m.raw_units == "m" and m.units == "auto" and m.resolve_units() == "m"
    assert m.meta["raw_units_from"] == "model.pt raw_units"  # the training run records them
    # a model file without the record (an older run) finds them in its data set's meta.json
    import torch

    old = torch.load(coma_run["run"] / "model.pt", weights_only=True)
    del old["raw_units"]
    torch.save(old, coma_run["run"].parent / "old-model.pt")
    m_old = load(coma_run["run"].parent / "old-model.pt")
    assert m_old.raw_units == "m" and str(coma_run["data"]) in m_old.meta["raw_units_from"]
    assert m.resolve_units("stored") == "stored"
    # metres -> stored is × 1000 / mm_per_unit (CoMA: metres / 0.26)
    x = np.ones((m.num_vertices, 3), np.float32)
    np.testing.assert_allclose(m.to_stored(x), 1000.0 / m.mm_per_unit, rtol=1e-6)
    np.testing.assert_allclose(m.from_stored(m.to_stored(x * 0.1, "cm"), "cm"), x * 0.1, rtol=1e-6)


def test_cli_transfer_on_raw_coma_plys_writes_metres(coma_run, tmp_path, capsys):
    """The reported failure: ``apps transfer`` on two of the data set's own raw PLYs wrote a face
    4-8× too large. By default it now reads and writes metres, with no warning."""
    from facedis.apps.__main__ import main
    from facedis.inference import read_mesh

    out = tmp_path / "t.ply"
    capsys.readouterr()
    assert main(["transfer", "--run", str(coma_run["run"]), "--source", str(coma_run["source"]),
                 "--target", str(coma_run["target"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err, err
    v, _ = read_mesh(out)
    vs, _ = read_mesh(coma_run["source"])
    vt, _ = read_mesh(coma_run["target"])
    ratio_t, ratio_s = _size(v) / _size(vt), _size(v) / _size(vs)
    dist_mm = np.linalg.norm(v - vt, axis=-1).mean() * 1000
    with capsys.disabled():  # for the record (pytest -s)
        print(f"extent (bbox diagonal) ratio output/target {ratio_t:.3f}, output/source {ratio_s:.3f}; per axis "
              f"output/target {np.round(_extent(v) / _extent(vt), 3).tolist()}; mean distance to target {dist_mm:.2f} mm")
    assert abs(ratio_t - 1) < 0.10 and abs(ratio_s - 1) < 0.10, (ratio_t, ratio_s)
    # and it sits where the inputs are (metres, not stored units): a few mm from the target
    assert dist_mm < 15, dist_mm
    # --units stored keeps the old behaviour for explicit control: the raw metres are read as
    # stored units (4× too small for this model) and that is warned about, naming metres
    assert main(["transfer", "--run", str(coma_run["run"]), "--source", str(coma_run["source"]),
                 "--target", str(coma_run["target"]), "--units", "stored", "--out", str(tmp_path / "s.ply")]) == 0
    err = capsys.readouterr().err
    assert "facedis: warning:" in err and "in metres: pass units='m'" in err, err
    # (what the reported run did without the warning: the output, in stored units, is far too large)
    assert _size(read_mesh(tmp_path / "s.ply")[0]) / _size(vt) > 2


def test_millimetre_mesh_triggers_units_warning(coma_run, tmp_path, capsys):
    from facedis.apps.__main__ import main
    from facedis.inference import UnitsWarning, load, read_mesh, write_mesh

    m = load(coma_run["run"])
    vt, f = read_mesh(coma_run["target"])
    mm_path = write_mesh(tmp_path / "target_mm.ply", vt * 1000.0, f)
    with pytest.warns(UnitsWarning) as rec:
        m.encode(mm_path)
    msg = str(rec[0].message)
    with capsys.disabled():
        print(f"warning: {msg}")
    assert "target_mm.ply" in msg and "read as metres" in msg and "in millimetres: pass units='mm'" in msg
    assert m.likely_units(vt * 1000.0)[0] == "mm" and m.likely_units(vt * 100.0)[0] == "cm"
    assert m.likely_units(vt)[0] == "m" and m.likely_units(m.to_stored(vt))[0] == "stored"
    # with the right units there is no warning and the result is the metre input's, in mm
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnitsWarning)
        np.testing.assert_allclose(m.encode(mm_path, units="mm")[0], m.encode(coma_run["target"])[0], atol=1e-4)
        np.testing.assert_allclose(m.reconstruct(mm_path, units="mm"), m.reconstruct(coma_run["target"]) * 1000.0,
                                   rtol=1e-4, atol=1e-2)
    # the CLI says it on stderr, one plain line
    capsys.readouterr()
    assert main(["transfer", "--run", str(coma_run["run"]), "--source", str(coma_run["source"]),
                 "--target", str(mm_path), "--out", str(tmp_path / "t.ply")]) == 0
    err = capsys.readouterr().err
    assert "facedis: warning: " in err and "millimetres" in err, err
    # ×4 off (e.g. the data set's stored units given as metres) is caught too
    with pytest.warns(UnitsWarning, match="×"):
        m.neutral(vt * 4.0)


def test_raw_units_per_data_source():
    from facedis.inference import raw_units_of_meta

    assert raw_units_of_meta({"dataset": "coma", "units": {"mm_per_unit": 260.0}}) == "m"
    assert raw_units_of_meta({"dataset": "synth"}) == "m"
    assert raw_units_of_meta({"dataset": "bu3dfe"}) == "mm"
    assert raw_units_of_meta({"dataset": "facescape"}) == "mm"
    assert raw_units_of_meta({"dataset": "my_faces", "options": {"input_units": "cm"}}) == "cm"
    assert raw_units_of_meta({"dataset": "coma", "options": {"input_units": "mm"}}) == "mm"  # custom named coma
    assert raw_units_of_meta({"dataset": "x", "units": {"raw_units": "mm"}}) == "mm"
    assert raw_units_of_meta({"dataset": "x"}) is None and raw_units_of_meta(None) is None
