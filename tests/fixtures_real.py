"""Tiny fixtures in the real data sets' layouts and file formats (tests/test_datasets.py).

Geometry comes from the ICT-FaceKit basis embedded in the package (always present). The CoMA tests
that need FLAME's exact topology (5,023 v, vertex 3506) use ``../shared/data/flame2023_open`` when
it is present beside the repository.

- ``small_face()``: an ICT face resampled on a regular grid (V ~ 200) with identity and expression
  bases -- small enough for fast tests, a real face shape. ``dense_face()``: the same, upsampled
  (V = 1,600) for decimation tests.
- ``make_coma_tree``: ``FaceTalk_*/<seq>/<seq>.NNNNNN.ply`` binary little-endian PLYs whose
  expression amplitude rises and falls, one injected outlier frame, left/right swings on the
  asymmetric sequences.
- ``make_bu3dfe``: ``[FM]NNNN_XXLLRR_F3D.wrl`` VRML files with known random rigid poses.
- ``make_facescape``: ``<id>/models_reg/<k>_<name>.obj`` trees on the ICT narrow-face topology.
- ``make_custom``: a folder of OBJ/PLY meshes plus ``labels.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from facedis.prep.meshio import write_obj, write_ply, write_wrl

REPO = Path(__file__).resolve().parents[1]
ICT = REPO / "facedis" / "assets" / "ict_facekit_basis.npz"
FLAME = Path(__file__).resolve().parents[2] / "shared" / "data" / "flame2023_open" / "basis.npz"


def rotation(axis, deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    th = np.radians(deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


def _grid_triangles(nx: int, ny: int) -> np.ndarray:
    tris = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            a, b, c, d = j * nx + i, j * nx + i + 1, (j + 1) * nx + i, (j + 1) * nx + i + 1
            tris += [(a, b, d), (a, d, c)]
    return np.array(tris, dtype=np.int32)


_CACHE: dict = {}


def ict() -> dict:
    if "ict" not in _CACHE:
        d = np.load(ICT)
        _CACHE["ict"] = {k: d[k] for k in d.files}
    return _CACHE["ict"]


def small_face(nx: int = 14, ny: int = 16, n_id: int = 20) -> dict:
    """ICT face resampled on an nx*ny grid (front projection). Keys: template (V,3) metres,
    triangles, iddirs (V,3,n_id), expdirs (V,3,53), exp_names, src (V,) ICT vertex ids."""
    key = ("small", nx, ny, n_id)
    if key in _CACHE:
        return _CACHE[key]
    d = ict()
    nn = int(d["n_narrow_face_verts"])
    t = d["template"][:nn].astype(np.float64)
    lo, hi = np.percentile(t[:, :2], 12, axis=0), np.percentile(t[:, :2], 88, axis=0)
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], nx), np.linspace(lo[1], hi[1], ny))
    # nearest front-most ICT vertex to every grid point
    from scipy.spatial import cKDTree

    front = np.flatnonzero(t[:, 2] > np.percentile(t[:, 2], 30))
    _, idx = cKDTree(t[front, :2]).query(np.stack([gx.ravel(), gy.ravel()], 1))
    src = front[idx]
    out = {"template": d["template"][src].astype(np.float64), "triangles": _grid_triangles(nx, ny),
           "iddirs": d["iddirs"][src, :, :n_id].astype(np.float64),
           "expdirs": d["expdirs"][src].astype(np.float64), "exp_names": list(d["exp_names"]), "src": src}
    assert len(np.unique(src)) == len(src), "grid too fine for the ICT mesh"
    _CACHE[key] = out
    return out


def dense_face(nx: int = 40, ny: int = 40) -> dict:
    """:func:`small_face` bilinearly upsampled to an nx*ny grid (more vertices than the ICT front
    holds at nearest-vertex sampling; for decimation tests). Same keys as :func:`small_face`
    (``src``: the nearest small-grid vertex)."""
    key = ("dense", nx, ny)
    if key in _CACHE:
        return _CACHE[key]
    from scipy.interpolate import RegularGridInterpolator

    bx, by = 14, 16
    base = small_face(bx, by)
    fields = {k: base[k] for k in ("template", "iddirs", "expdirs")}
    flat = np.concatenate([f.reshape(bx * by, -1) for f in fields.values()], axis=1).reshape(by, bx, -1)
    interp = RegularGridInterpolator((np.linspace(0, 1, by), np.linspace(0, 1, bx)), flat)
    gy, gx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    vals = interp(np.stack([gy.ravel(), gx.ravel()], 1))
    out, k = {}, 0
    for name, f in fields.items():
        n = int(np.prod(f.shape[1:]))
        out[name] = vals[:, k:k + n].reshape((nx * ny,) + f.shape[1:])
        k += n
    near = np.rint(gy.ravel() * (by - 1)).astype(int) * bx + np.rint(gx.ravel() * (bx - 1)).astype(int)
    out.update(triangles=_grid_triangles(nx, ny), exp_names=base["exp_names"], src=base["src"][near])
    _CACHE[key] = out
    return out


def flame() -> dict | None:
    if not FLAME.is_file():
        return None
    if "flame" not in _CACHE:
        d = np.load(FLAME)
        _CACHE["flame"] = {"template": d["template"].astype(np.float64), "triangles": d["faces"],
                           "iddirs": d["shapedirs"].astype(np.float64)}
    return _CACHE["flame"]


def _bump(template: np.ndarray, centre: int, direction, radius: float) -> np.ndarray:
    d2 = ((template - template[centre]) ** 2).sum(1)
    w = np.exp(-d2 / (2 * radius ** 2))
    return w[:, None] * np.asarray(direction, dtype=np.float64)[None]


# ---------------------------------------------------------------------------- CoMA


def coma_amplitude(t, frames: int):
    """Expression amplitude of frame t: 0 at both ends, rising faster than it falls (no two frames alike)."""
    x = np.asarray(t) / (frames - 1)
    return np.sin(np.pi * x) * (1 + 0.5 * x)


def make_coma_tree(root: Path, *, face: dict, lr_vertex: int, subjects: int = 3, frames: int = 25,
                   sequences=("bareteeth", "eyebrow", "mouth_side"), outlier=("FaceTalk_0", "bareteeth", 13),
                   seed: int = 0) -> dict:
    """Write a CoMA-like PLY tree (metres). Frame t of a sequence = neutral + coma_amplitude(t) * field
    (+ a lateral swing sin(2 pi t/(T-1)) * x-bump at ``lr_vertex`` for mouth_* sequences, so frames
    in the first half move it +x = '_left'). Returns the ground truth."""
    rng = np.random.default_rng(seed)
    T = face["template"]
    V = len(T)
    scale = np.ptp(T, axis=0).max()
    centres = {q: int(rng.integers(V)) for q in sequences}
    truth = {"neutral": {}, "frames": {}, "lr": {}}
    for s in range(subjects):
        name = f"FaceTalk_{s}"
        beta = rng.standard_normal(face["iddirs"].shape[2])
        neutral = T + face["iddirs"] @ beta
        truth["neutral"][name] = neutral
        for q in sequences:
            d = root / name / q
            d.mkdir(parents=True, exist_ok=True)
            field = _bump(T, centres[q], rng.normal(size=3) * 0.01, 0.15 * scale)
            lateral = _bump(T, lr_vertex, [0.006, 0, 0], 0.1 * scale) if q.startswith("mouth") else 0 * field
            if q.startswith("mouth"):
                field[:, 0] = 0  # only the lateral swing moves the left/right vertex sideways
            for t in range(frames):
                a = coma_amplitude(t, frames)
                b = np.sin(2 * np.pi * t / (frames - 1))
                v = neutral + a * field + b * lateral
                if outlier and (name, q, t) == tuple(outlier):
                    v = neutral + 12 * field  # a tracking failure: far from every other frame
                write_ply(d / f"{q}.{t + 1:06d}.ply", v, face["triangles"])
                truth["frames"][(name, q, t)] = v
                truth["lr"][(name, q, t)] = "left" if (b * lateral[lr_vertex, 0] if q.startswith("mouth") else 0) > 0 else "right"
    return truth


# ---------------------------------------------------------------------------- BU-3DFE

BU_EXPRESSIONS = ("AN", "HA")


def make_bu3dfe(root: Path, *, face: dict, subjects=("F0001", "F0002", "F0011", "M0001", "M0002"),
                expressions=BU_EXPRESSIONS, levels=(1, 4), landmarks=None, rotate_test_deg: float = 20.0,
                seed: int = 0, subfolders: bool = True) -> dict:
    """Write BU-3DFE-like registered .wrl files (millimetres). Expression fields are zero on
    ``landmarks`` so expression->neutral alignment on them is exact. Neutrals of subjects F0001..F0010
    are rotated by ``rotate_test_deg`` about a tilted axis; train neutrals are unrotated; every
    expressive scan gets its own random rigid pose. Returns the ground truth."""
    rng = np.random.default_rng(seed)
    T = face["template"] * 1000.0
    V = len(T)
    lm = np.asarray(landmarks if landmarks is not None else rng.choice(V, 13, replace=False))
    truth = {"neutral": {}, "exp": {}, "landmarks": lm, "pose": {}}
    fields = {}
    for e in expressions:
        f = _bump(T, int(rng.integers(V)), rng.normal(size=3) * 6, 25.0)
        f[lm] = 0
        fields[e] = f
    for s in subjects:
        d = root / s if subfolders else root
        d.mkdir(parents=True, exist_ok=True)
        neutral = T + (face["iddirs"] * 1000.0) @ rng.standard_normal(face["iddirs"].shape[2])
        truth["neutral"][s] = neutral
        test = s[0] == "F" and int(s[1:]) <= 10
        R = rotation([0.3, 1, 0.2], rotate_test_deg) if test else np.eye(3)
        tvec = np.array([5.0, -3.0, 2.0]) if test else np.zeros(3)
        truth["pose"][(s, "NE", 0)] = (R, tvec)
        write_wrl(d / f"{s}_NE00WH_F3D.wrl", neutral @ R.T + tvec, face["triangles"], per_line=1 + (len(s) % 3))
        for e in expressions:
            for lv in levels:
                R = rotation(rng.normal(size=3), rng.uniform(3, 12))
                tvec = rng.normal(size=3) * 4
                v = neutral + fields[e] * lv / 4
                truth["exp"][(s, e, lv)] = v
                truth["pose"][(s, e, lv)] = (R, tvec)
                write_wrl(d / f"{s}_{e}{lv:02d}WH_F3D.wrl", v @ R.T + tvec, face["triangles"], per_line=3)
    return truth


# ---------------------------------------------------------------------------- FaceScape

FS_NAMES = ("1_neutral", "2_smile", "3_mouth_stretch")


def facescape_face() -> dict:
    """ICT narrow face (6,706 v / 13,120 f) standing in for the 26,317-v TU topology."""
    d = ict()
    nn = int(d["n_narrow_face_verts"])
    return {"template": d["template"][:nn].astype(np.float64), "triangles": d["faces_narrow"],
            "iddirs": d["iddirs"][:nn, :, :10].astype(np.float64),
            "expdirs": d["expdirs"][:nn].astype(np.float64), "exp_names": list(d["exp_names"])}


def make_facescape(root: Path, *, face: dict, ids=(3, 5, 7, 122, 212, 603), names=FS_NAMES, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    T = face["template"] * 1000.0
    exps = {n: (face["expdirs"] * 1000.0) @ (rng.uniform(0, 1, 53) * (rng.uniform(size=53) < 0.1))
            for n in names[1:]}
    truth = {"meshes": {}}
    for i in ids:
        d = root / str(i) / "models_reg"
        d.mkdir(parents=True, exist_ok=True)
        neutral = T + (face["iddirs"] * 1000.0) @ rng.standard_normal(face["iddirs"].shape[2])
        for n in names:
            v = neutral if n == "1_neutral" else neutral + exps[n]
            write_obj(d / f"{n}.obj", v, face["triangles"])
            truth["meshes"][(i, n)] = v
    return truth


# ---------------------------------------------------------------------------- custom


def make_custom(root: Path, *, face: dict, subjects=("alice", "bob", "carol", "dave"), frames: int = 10,
                expressions=("smile", "frown"), seed: int = 0, fmt=("obj", "ply"), csv_name: str = "labels.csv") -> dict:
    """A folder of registered meshes (metres; OBJ and PLY mixed) plus ``labels.csv`` (``csv_name``)."""
    rng = np.random.default_rng(seed)
    T = face["template"]
    V = len(T)
    fields = {e: _bump(T, int(rng.integers(V)), rng.normal(size=3) * 0.01, 0.03) for e in expressions}
    rows = []
    truth = {}
    root.mkdir(parents=True, exist_ok=True)
    for si, s in enumerate(subjects):
        neutral = T + face["iddirs"] @ rng.standard_normal(face["iddirs"].shape[2])
        for e in expressions:
            for t in range(frames):
                lev = t / (frames - 1)
                v = neutral + lev * fields[e]
                ext = fmt[(si + t) % len(fmt)]
                rel = f"{s}/{e}_{t:03d}.{ext}"
                (root / s).mkdir(exist_ok=True)
                (write_obj if ext == "obj" else write_ply)(root / rel, v, face["triangles"])
                rows.append((rel, s, e, f"{lev:.4f}", "1" if t == 0 else "0"))
                truth[rel] = v
    with open(root / csv_name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject", "expression", "level", "is_neutral"])
        w.writerows(rows)
    return truth


# ---- a tiny model trained on a prepared CoMA fixture (tests/test_units.py, tests/test_decimation.py) ----
COMA_PREPARE_ARGS = ["--num-vertices", "0", "--lr-vertex", "100", "--test-period", "10", "--test-length", "2",
                     "--workers", "1", "--progress", "0"]


def prepare_cmd() -> list[str]:
    """The source checkout's ``data_prep/prepare.py`` (or the module when installed)."""
    import sys

    script = Path(__file__).resolve().parents[1] / "data_prep" / "prepare.py"
    return [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "facedis.prep.prepare"]


def prepare(*args) -> "subprocess.CompletedProcess":
    import subprocess

    return subprocess.run([*prepare_cmd(), *map(str, args)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)


def train_tiny_coma(data: Path, run_dir: Path, **overrides):
    """Train a tiny +ne-gt −id-dis model on a prepared CoMA data set in ``run_dir`` (CPU, seconds)."""
    from facedis.config import Config, apply_overrides
    from facedis.engine import train

    cfg = apply_overrides(Config(), {
        "dataset": "coma", "data.root": str(data),
        "model.id_dim": 4, "model.exp_dim": 4, "model.width": 0.125, "model.decoder_hidden": 32,
        "model.pointwise": "linear", "method.neutral_gt": True, "method.id_discriminator": False,
        "pretrain.enabled": False, "train.cpu": True, "train.progress": False, "train.seed": 0,
        "run.dir": str(run_dir), "run.artefact_dir": str(run_dir.parent / "art"), **overrides,
    })
    return train(cfg)
