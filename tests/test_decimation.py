"""Decimation for CoMA and custom meshes (``prepare.py coma|custom --vertices N``): the same scripted
decimation and stored vertex map as FaceScape, and a model trained on the decimated set accepts
full-resolution meshes (reduced through the map); outputs stay at the model's resolution."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fixtures_real as fx

REPO = Path(__file__).resolve().parents[1]
COMA_ARGS = fx.COMA_PREPARE_ARGS
_prepare = fx.prepare


@pytest.fixture(scope="module")
def coma(tmp_path_factory) -> dict:
    """CoMA fixture tree on a 1,600-vertex face -> ``--vertices 1000`` data set -> a tiny model."""
    import fixtures_real as fx

    base = tmp_path_factory.mktemp("decimation")
    raw = base / "raw"
    face = fx.dense_face()
    fx.make_coma_tree(raw, face=face, lr_vertex=100, frames=20)
    data = base / "coma"
    r = _prepare("coma", "--raw", raw, "--out", data, "--vertices", 1000, *COMA_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = base / "run"
    fx.train_tiny_coma(data, run_dir, **{"train.epochs": 1, "train.batch_size": 16, "train.eval_every": 1,
                                         "train.checkpoint_every": 1, "run.name": "decimated"})
    return {"raw": raw, "data": data, "run": run_dir, "face": face}


def test_coma_vertices_stores_the_map(coma):
    from facedis.prep.meshio import read_mesh
    from facedis.shards import read_arrays, read_meta

    meta, arrays = read_meta(coma["data"]), read_arrays(coma["data"])
    vmap = arrays["vertex_index_map"]
    assert meta["num_vertices"] == len(vmap) and abs(len(vmap) - 1000) <= 20
    assert vmap.dtype == np.int64 and np.all(np.diff(vmap) > 0) and vmap.max() < 1600
    dec = meta["decimation"]
    assert dec["source_vertices"] == 1600 and dec["target_vertices"] == 1000 and dec["quality"]["ok"]
    assert dec["num_vertices"] == len(vmap) and arrays["triangles"].max() < len(vmap)
    assert meta["num_triangles"] == len(arrays["triangles"])
    # kept vertices are the source vertices at the map's indices (template and every sample)
    ref, _ = read_mesh(sorted(coma["raw"].glob("FaceTalk_0/bareteeth/*.ply"))[0], faces=True)
    scale = 1000.0 / meta["units"]["mm_per_unit"]
    np.testing.assert_allclose(arrays["template"], ref[vmap] * scale, rtol=1e-5, atol=1e-6)


def test_full_resolution_input_is_mapped(coma):
    from facedis.inference import MeshMismatchError, load
    from facedis.prep.meshio import read_mesh
    from facedis.shards import read_arrays

    m = load(coma["run"])
    vmap = read_arrays(coma["data"])["vertex_index_map"]
    assert m.num_vertices == len(vmap) and m.source_vertices == 1600
    np.testing.assert_array_equal(m.vertex_index_map, vmap)
    ply = sorted(coma["raw"].glob("FaceTalk_1/eyebrow/*.ply"))[7]
    full, _ = read_mesh(ply, faces=True)
    zi_f, ze_f = m.encode(ply)  # the full-resolution file
    zi_a, ze_a = m.encode(full)  # full-resolution vertices
    zi_d, ze_d = m.encode(full[vmap])  # the decimated mesh
    for a, b in ((zi_f, zi_d), (ze_f, ze_d), (zi_a, zi_d), (ze_a, ze_d)):
        np.testing.assert_array_equal(a, b)
    zi_b, _ = m.encode(np.stack([full, full]))
    np.testing.assert_allclose(zi_b[1], zi_d, rtol=1e-5, atol=1e-6)  # batched: float round-off only
    assert m.reconstruct(full).shape == (len(vmap), 3)  # outputs stay at the model's resolution
    with pytest.raises(MeshMismatchError, match=r"1234 vertices.*1600-vertex full-resolution"):
        m.encode(np.zeros((1234, 3), np.float32))
    # without the map in model.pt, it comes from the data set (config data.root)
    import torch

    old = torch.load(coma["run"] / "model.pt", weights_only=True)
    del old["vertex_index_map"], old["source_vertices"]
    torch.save(old, coma["run"].parent / "old-model.pt")
    m_old = load(coma["run"].parent / "old-model.pt")
    np.testing.assert_array_equal(m_old.encode(full)[0], zi_d)


def test_no_vertices_keeps_full_topology(tmp_path):
    import fixtures_real as fx
    from facedis.shards import read_arrays, read_meta

    raw = tmp_path / "raw"
    fx.make_coma_tree(raw, face=fx.small_face(), lr_vertex=100, subjects=2, frames=20)
    r = _prepare("coma", "--raw", raw, "--out", tmp_path / "d", *COMA_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    meta, arrays = read_meta(tmp_path / "d"), read_arrays(tmp_path / "d")
    assert "decimation" not in meta and meta["num_vertices"] == 224
    np.testing.assert_array_equal(arrays["vertex_index_map"], np.arange(224))


def test_custom_vertices(tmp_path):
    import fixtures_real as fx
    from facedis.prep.meshio import read_mesh
    from facedis.shards import read_arrays, read_meta

    raw = tmp_path / "raw"
    truth = fx.make_custom(raw, face=fx.dense_face(), subjects=("alice", "bob", "carol"), frames=4)
    out = tmp_path / "custom"
    r = _prepare("custom", "--raw", raw, "--out", out, "--vertices", 600, "--protocol", "loso",
                 "--workers", 1, "--progress", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    meta, arrays = read_meta(out), read_arrays(out)
    vmap = arrays["vertex_index_map"]
    assert abs(len(vmap) - 600) <= 20 and meta["num_vertices"] == len(vmap)
    assert meta["decimation"]["source_vertices"] == 1600 and meta["decimation"]["quality"]["ok"]
    first = next(iter(truth))
    v0, _ = read_mesh(raw / first, faces=True)
    scale = 1000.0 / meta["units"]["mm_per_unit"]
    np.testing.assert_allclose(arrays["template"], v0[vmap] * scale, rtol=1e-5, atol=1e-6)
    import h5py

    shard = out / meta["splits"]["train"]["shards"][0]
    with h5py.File(shard, "r") as f:
        x = f["vertices"][0]
    assert x.shape == (len(vmap), 3)
    # the first training sample is alice's first mesh (loso fold 0 holds alice out: use bob's)
    rel = next(k for k in truth if k.startswith("bob/"))
    np.testing.assert_allclose(x, truth[rel][vmap] * scale, rtol=1e-4, atol=1e-5)
