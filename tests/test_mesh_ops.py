"""facedis/prep/mesh_ops.py: crop, decimation with a vertex index map, mesh checks."""
import numpy as np
import pytest

from facedis.prep import mesh_ops
from facedis.prep.synth import load_basis


@pytest.fixture(scope="module")
def narrow():
    b = load_basis()
    cmap, tris = mesh_ops.crop(b["faces_narrow"], int(b["n_narrow_face_verts"]), len(b["template"]))
    return b["template"][cmap].astype(np.float64), tris, cmap


def test_crop_region(narrow):
    v, tris, cmap = narrow
    assert len(cmap) == 6706 and np.array_equal(cmap, np.arange(6706))
    assert tris.dtype == np.int32 and tris.max() < len(v)
    assert mesh_ops.mesh_quality(v, tris)["ok"]
    # crop by mask keeps only triangles whose three vertices survive
    keep = v[:, 0] > 0
    m, t = mesh_ops.crop(tris, keep)
    assert keep[m].all() and t.max() < len(m)


@pytest.mark.parametrize("target", [300, 2000])
def test_decimate_quality(narrow, target):
    v, tris, _ = narrow
    vmap, t = mesh_ops.decimate(v, tris, target_vertices=target)
    assert vmap.dtype == np.int64 and t.dtype == np.int32
    assert abs(len(vmap) - target) <= max(3, target // 100)
    assert len(np.unique(vmap)) == len(vmap), "duplicate indices in the vertex index map"
    assert np.all(np.diff(vmap) > 0) and vmap.min() >= 0 and vmap.max() < len(v)
    assert t.min() >= 0 and t.max() == len(vmap) - 1
    q = mesh_ops.mesh_quality(v[vmap], t)
    assert q["ok"], q
    assert q["duplicate_vertices"] == 0 and q["degenerate_triangles"] == 0 and q["zero_area_triangles"] == 0
    assert q["duplicate_triangles"] == 0 and q["non_manifold_edges"] == 0 and q["unreferenced_vertices"] == 0
    assert q["inconsistent_orientation_edges"] == 0 and q["components"] == 1
    # every triangle refers to decimated vertices only, and every decimated vertex is used
    assert set(np.unique(t)) == set(range(len(vmap)))


def test_decimate_deterministic_and_faces(narrow):
    v, tris, _ = narrow
    a = mesh_ops.decimate(v, tris, target_vertices=500)
    b = mesh_ops.decimate(v, tris, target_vertices=500)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    vmap, t = mesh_ops.decimate(v, tris, target_faces=1000)
    assert 800 <= len(t) <= 1000 and mesh_ops.mesh_quality(v[vmap], t)["ok"]
    with pytest.raises(ValueError):
        mesh_ops.decimate(v, tris)
    vmap, t = mesh_ops.decimate(v, tris, target_vertices=10**6)  # no-op: everything kept
    assert len(vmap) == len(v)


def test_clean_and_quality_detect_problems():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [2, 0, 0], [0, 0, 0]], float)
    t = np.array([[0, 1, 2], [1, 3, 2], [2, 1, 0], [0, 0, 1], [0, 1, 4], [1, 2, 3]])
    q = mesh_ops.mesh_quality(v, t)
    assert not q["ok"]
    assert q["duplicate_vertices"] == 1 and q["degenerate_triangles"] == 1 and q["duplicate_triangles"] == 2
    assert q["zero_area_triangles"] >= 2  # the degenerate one and the collinear (0,1,4)
    c = mesh_ops.clean_triangles(v, t)
    assert c.tolist() == [[0, 1, 2], [1, 3, 2]]
    vmap, c2 = mesh_ops.remove_unreferenced(c, len(v))
    assert vmap.tolist() == [0, 1, 2, 3] and mesh_ops.mesh_quality(v[vmap], c2)["ok"]


def test_non_manifold_edge_removed():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], float)
    t = np.array([[0, 1, 2], [1, 0, 3], [0, 1, 4]])  # edge (0,1) used three times
    assert mesh_ops.mesh_quality(v, t)["non_manifold_edges"] == 1
    c = mesh_ops.clean_triangles(v, t)
    assert len(c) == 2 and mesh_ops.mesh_quality(v, c)["non_manifold_edges"] == 0
