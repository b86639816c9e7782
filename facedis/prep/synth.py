"""Synthetic CoMA-like faces from the ICT-FaceKit morphable model (the embedded default data set).

``python data_prep/prepare.py synth --out data/synth`` (defaults: ``--subjects 60 --per-subject 40
--region narrow --vertices 2000 --seed 0 --protocol unseen-identity``). See docs/data-format.md.

Generative model (all in metres, then stored × ``STORED_PER_METRE``):

* **Identity** ``s``: ``β_s ~ N(0, I_100)`` (ICT's unit-variance PCA modes);
  neutral ``N_s = T + Σ_j β_sj B_j`` — the exact neutral ground truth, canonical pose.
* **Expressions**: a vocabulary of named expressions (:data:`EXPRESSIONS`), each a sparse
  combination of ICT's 53 ARKit-style blendshapes, several asymmetric (``_left``/``_right``).
  Each subject performs CoMA-like sequences of ``--frames-per-sequence`` frames: the intensity
  ``level`` rises from 0 (first frame: the neutral face, ``is_neutral``) to 1 and falls back, and the
  blendshape weights of a frame are ``clip(level · peak · g_s ⊙ combo, 0, 1)`` with a per-sequence
  peak strength and per-subject blendshape gains ``g_s`` (people perform expressions differently).
* **Identity–expression interaction** (on by default; ``--no-identity-interaction``): the blendshape
  offsets ``E_k`` were authored on the generic template; like deformation transfer, each identity
  gets them mapped through its local deformation gradient ``J_s(v)`` (3×3 per vertex, the
  least-squares map of the template's 1-ring edges and normal onto the identity's):
  ``E_sk(v) = E_k(v) + λ (J_s(v) − I) E_k(v)`` with ``λ = --interaction-strength`` (1 = plain
  deformation transfer). ``J_s`` depends on ``β_s``, so the face is *not* additive in identity and
  expression: a wide face opens its jaw wider, etc.
* **Head pose** (on by default; ``--no-pose``): every frame is rigidly moved by a small rotation
  (yaw/pitch/roll ~ N(0, ``--pose-deg``²), clipped to ±3σ) about the head's centre and a translation
  ~ N(0, ``--pose-mm``²) per axis (clipped to ±3σ), as in real captures. The neutral GT stays in
  the canonical pose.
* Optional i.i.d. vertex noise ``--noise-mm`` (default 0).

The region crop and decimation are computed once on the template; the same vertex index map is
used for every mesh (``vertex_index_map`` in meta.h5, indices into ICT's vertex order).
Everything is deterministic given ``--seed`` (byte-identical shards).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import numpy as np

from facedis.prep import mesh_ops

METRES_PER_STORED = 0.26
STORED_PER_METRE = 1.0 / METRES_PER_STORED
MM_PER_UNIT = 260.0

BASIS_PATH = Path(__file__).resolve().parent.parent / "assets" / "ict_facekit_basis.npz"


def _sym(**kw) -> dict:
    """Expand ``name=w`` where name has no side into both ``name_L`` and ``name_R``."""
    out = {}
    for k, w in kw.items():
        if k.endswith("_L") or k.endswith("_R") or k in _UNSIDED:
            out[k] = w
        else:
            out[k + "_L"] = w
            out[k + "_R"] = w
    return out


_UNSIDED = {"jawOpen", "jawForward", "jawLeft", "jawRight", "mouthClose", "mouthFunnel", "mouthLeft",
            "mouthRight", "mouthPucker", "mouthRollLower", "mouthRollUpper", "mouthShrugLower",
            "mouthShrugUpper"}

#: The expression vocabulary: name -> {ICT blendshape: weight at full intensity}. CoMA-like
#: (12 sequences, the asymmetric ones split into left/right); every combination is sparse.
EXPRESSIONS: dict[str, dict[str, float]] = {
    "bareteeth": _sym(mouthUpperUp=0.8, mouthLowerDown=0.8, mouthStretch=0.6),
    "cheeks_in": _sym(mouthPucker=0.6, mouthFunnel=0.3, cheekSquint=0.2),
    "eyebrow": _sym(browInnerUp=1.0, browOuterUp=0.9, eyeWide=0.4),
    "high_smile": _sym(mouthSmile=1.0, cheekSquint=0.6, eyeSquint=0.4),
    "lips_back": _sym(mouthRollLower=0.8, mouthRollUpper=0.8, mouthPress=0.6),
    "lips_up": _sym(mouthShrugUpper=0.7, mouthUpperUp=0.6, noseSneer=0.4),
    "mouth_extreme": _sym(jawOpen=0.9, mouthStretch=0.5, browInnerUp=0.6, eyeWide=0.5),
    "mouth_open": _sym(jawOpen=0.6, mouthLowerDown=0.3),
    "frown": _sym(browDown=1.0, mouthFrown=0.8, mouthShrugLower=0.4),
    "smile_left": {"mouthSmile_L": 1.0, "cheekSquint_L": 0.6, "eyeSquint_L": 0.3, "mouthDimple_L": 0.3},
    "smile_right": {"mouthSmile_R": 1.0, "cheekSquint_R": 0.6, "eyeSquint_R": 0.3, "mouthDimple_R": 0.3},
    "mouth_side_left": {"mouthLeft": 1.0, "jawLeft": 0.4, "mouthPress_L": 0.3},
    "mouth_side_right": {"mouthRight": 1.0, "jawRight": 0.4, "mouthPress_R": 0.3},
    "sneer_left": {"noseSneer_L": 1.0, "mouthUpperUp_L": 0.7, "eyeSquint_L": 0.4, "browDown_L": 0.4},
    "sneer_right": {"noseSneer_R": 1.0, "mouthUpperUp_R": 0.7, "eyeSquint_R": 0.4, "browDown_R": 0.4},
    "wink_left": {"eyeBlink_L": 1.0, "cheekSquint_L": 0.4, "mouthSmile_L": 0.3},
    "wink_right": {"eyeBlink_R": 1.0, "cheekSquint_R": 0.4, "mouthSmile_R": 0.3},
    "cheeks_puff": _sym(cheekPuff=1.0, mouthPress=0.2),
}

REGIONS = ("narrow", "face", "head")
PROTOCOLS = ("unseen-identity", "seen-identity")


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subjects", type=int, default=60, help="number of identities (default 60)")
    p.add_argument("--per-subject", type=int, default=40, help="frames per subject (default 40)")
    p.add_argument("--frames-per-sequence", type=int, default=10,
                   help="frames of one expression sequence (level 0 -> 1 -> ~0); default 10")
    p.add_argument("--region", choices=REGIONS, default="narrow",
                   help="ICT region: narrow face (6706 v), face (9409 v) or head (11248 v); default narrow")
    p.add_argument("--vertices", type=int, default=2000,
                   help="decimate the region to this many vertices (0 = no decimation); default 2000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", choices=PROTOCOLS, default="unseen-identity",
                   help="unseen-identity: held-out subjects; seen-identity: held-out contiguous windows "
                        "of every sequence (CoMA-like)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of subjects (unseen-identity) or of each sequence's frames (seen-identity) "
                        "held out for the test split; default 0.2")
    p.add_argument("--no-identity-interaction", dest="identity_interaction", action="store_false",
                   help="expression offsets identical for every identity (purely additive model)")
    p.add_argument("--interaction-strength", type=float, default=1.0,
                   help="λ in E_sk = E_k + λ (J_s − I) E_k (1 = deformation transfer); default 1")
    p.add_argument("--identity-modes", type=int, default=100,
                   help="draw identities from the K leading PCA modes of ICT's 100 (the rest 0); default 100")
    p.add_argument("--no-pose", dest="pose", action="store_false", help="no per-frame head-pose change")
    p.add_argument("--pose-deg", type=float, default=2.0, help="std of yaw/pitch/roll per frame, degrees; default 2")
    p.add_argument("--pose-mm", type=float, default=1.5, help="std of translation per axis per frame, mm; default 1.5")
    p.add_argument("--noise-mm", type=float, default=0.0, help="std of i.i.d. vertex noise, mm; default 0")


def prepare(args: argparse.Namespace) -> Path:
    opts = options_from_args(args)
    t0 = time.perf_counter()
    data = generate(**opts)
    out = write(data, args.out, overwrite=getattr(args, "overwrite", False),
                shard_size=getattr(args, "shard_size", None) or 2048)
    print(f"synth: generated {sum(len(d['subject']) for d in data['splits'].values())} meshes "
          f"(V={data['template'].shape[0]}) in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


def options_from_args(args: argparse.Namespace) -> dict:
    keys = ("subjects", "per_subject", "frames_per_sequence", "region", "vertices", "seed", "protocol",
            "test_fraction", "identity_interaction", "interaction_strength", "pose", "pose_deg", "pose_mm",
            "noise_mm", "identity_modes")
    return {k: getattr(args, k) for k in keys}


def default_options(**overrides) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args([])
    opts = options_from_args(ns)
    for k, v in overrides.items():
        if k not in opts:
            raise TypeError(f"unknown synth option {k!r}")
        opts[k] = v
    return opts


# ---------------------------------------------------------------------------------------- model


def load_basis(path: Path = BASIS_PATH) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def basis_sha256(path: Path = BASIS_PATH) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def region_topology(basis: dict, region: str, vertices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(vertex_index_map into ICT, triangles over the map, crop_map, crop_triangles)."""
    n_all = basis["template"].shape[0]
    if region == "narrow":
        keep, tris = int(basis["n_narrow_face_verts"]), basis["faces_narrow"]
    elif region == "face":
        keep, tris = int(basis["n_face_verts"]), basis["faces_face"]
    elif region == "head":
        keep, tris = n_all, basis["faces"]
    else:
        raise ValueError(f"region {region!r}: choose one of {REGIONS}")
    crop_map, crop_tris = mesh_ops.crop(tris, keep, n_all)
    if vertices and vertices < len(crop_map):
        dec_map, tris_out = mesh_ops.decimate(basis["template"][crop_map].astype(np.float64), crop_tris,
                                              target_vertices=int(vertices))
    else:
        dec_map, tris_out = mesh_ops.remove_unreferenced(
            mesh_ops.clean_triangles(basis["template"][crop_map], crop_tris), len(crop_map))
    return crop_map[dec_map], tris_out.astype(np.int32), crop_map, crop_tris


class _DeformationGradient:
    """Per-vertex 3×3 deformation gradient of an identity relative to the template, as in
    deformation transfer: least-squares map of the template's 1-ring edges and (scaled) normal onto
    the identity's, smoothed over the mesh (``smooth`` rounds of 1-ring averaging) and with its
    singular values clamped to ``[1/max_stretch, max_stretch]`` (folded places such as the mouth
    corners would otherwise give near-singular gradients). Returned at the kept vertices."""

    def __init__(self, template_crop: np.ndarray, crop_tris: np.ndarray, kept: np.ndarray,
                 smooth: int = 2, max_stretch: float = 1.3):
        from scipy.sparse import coo_matrix, diags

        self.tris = crop_tris.astype(np.int64)
        n = len(template_crop)
        e = mesh_ops.edges(self.tris)
        e = np.concatenate([e, e[:, ::-1]])  # both directions: (i, j) for every neighbour j of i
        self.e_i, self.e_j = e[:, 0], e[:, 1]
        self.n = n
        self.kept = kept
        self.smooth = smooth
        self.max_stretch = max_stretch
        adj = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr() + diags(np.ones(n))
        self.avg = (diags(1.0 / np.asarray(adj.sum(axis=1)).ravel()) @ adj).tocsr()
        t = template_crop.astype(np.float64)
        d = t[self.e_j] - t[self.e_i]
        self.h = float(np.median(np.linalg.norm(d, axis=1)))
        self.d0 = d
        self.n0 = mesh_ops.vertex_normals(t, self.tris)
        B = self._outer_sum(d, d) + self.h ** 2 * np.einsum("va,vb->vab", self.n0, self.n0)
        self.B_inv = np.linalg.inv(B)

    def _outer_sum(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.zeros((self.n, 9))
        np.add.at(out, self.e_i, np.einsum("ea,eb->eab", a, b).reshape(-1, 9))
        return out.reshape(self.n, 3, 3)

    def __call__(self, identity_crop: np.ndarray) -> np.ndarray:
        x = identity_crop.astype(np.float64)
        d1 = x[self.e_j] - x[self.e_i]
        n1 = mesh_ops.vertex_normals(x, self.tris)
        A = self._outer_sum(d1, self.d0) + self.h ** 2 * np.einsum("va,vb->vab", n1, self.n0)
        J = np.einsum("vab,vbc->vac", A, self.B_inv).reshape(self.n, 9)
        for _ in range(self.smooth):
            J = self.avg @ J
        J = J.reshape(self.n, 3, 3)[self.kept]
        U, sv, Vt = np.linalg.svd(J)
        sv = np.clip(sv, 1.0 / self.max_stretch, self.max_stretch)
        return np.einsum("vab,vb,vbc->vac", U, sv, Vt)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """(n,3) yaw (about y), pitch (about x), roll (about z) in radians -> (n,3,3)."""
    y, x, z = angles[:, 0], angles[:, 1], angles[:, 2]
    cy, sy, cx, sx, cz, sz = np.cos(y), np.sin(y), np.cos(x), np.sin(x), np.cos(z), np.sin(z)
    o, l = np.zeros_like(y), np.ones_like(y)
    Ry = np.stack([cy, o, sy, o, l, o, -sy, o, cy], 1).reshape(-1, 3, 3)
    Rx = np.stack([l, o, o, o, cx, -sx, o, sx, cx], 1).reshape(-1, 3, 3)
    Rz = np.stack([cz, -sz, o, sz, cz, o, o, o, l], 1).reshape(-1, 3, 3)
    return Ry @ Rx @ Rz


def _level_profile(L: int) -> np.ndarray:
    """CoMA-like intensity: 0 at the first frame, peak 1, falling back towards 0."""
    if L <= 1:
        return np.zeros(max(L, 0))
    p = np.sin(np.pi * np.arange(L) / L)
    return p / p.max()


def generate(*, subjects: int, per_subject: int, frames_per_sequence: int, region: str, vertices: int,
             seed: int, protocol: str, test_fraction: float, identity_interaction: bool,
             interaction_strength: float, pose: bool, pose_deg: float, pose_mm: float, noise_mm: float,
             identity_modes: int = 100, basis: dict | None = None) -> dict:
    """Generate the data set in memory (metres are converted to stored units here).

    Returns ``{"template", "triangles", "vertex_index_map", "landmarks", "landmark_ids",
    "identity" (S,V,3) exact neutral meshes, "subjects", "expressions", "splits": {split: {
    "vertices", "subject", "expression", "level", "is_neutral"}}, "options"}``.
    """
    if subjects < 1 or per_subject < 1:
        raise ValueError("--subjects and --per-subject must be >= 1")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {PROTOCOLS}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("--test-fraction must be in [0, 1)")
    if protocol == "unseen-identity" and subjects < 2:
        raise ValueError("unseen-identity needs at least 2 subjects")
    if frames_per_sequence < 2:
        raise ValueError("--frames-per-sequence must be >= 2")
    if not 1 <= identity_modes <= 100:
        raise ValueError("--identity-modes must be in [1, 100]")
    options = dict(subjects=subjects, per_subject=per_subject, frames_per_sequence=frames_per_sequence,
                   region=region, vertices=vertices, seed=seed, protocol=protocol, test_fraction=test_fraction,
                   identity_interaction=identity_interaction, interaction_strength=interaction_strength,
                   pose=pose, pose_deg=pose_deg, pose_mm=pose_mm, noise_mm=noise_mm)
    if identity_modes != 100:  # recorded only when used: the default data sets keep their content hash
        options["identity_modes"] = identity_modes
    b = basis if basis is not None else load_basis()
    vmap, tris, crop_map, crop_tris = region_topology(b, region, vertices)
    V = len(vmap)
    kept_in_crop = np.searchsorted(crop_map, vmap)  # crop_map is sorted and contains vmap
    template = b["template"].astype(np.float64)
    pivot = template.mean(axis=0)  # centre of the whole ICT head: the rotation centre of the pose

    names = list(map(str, b["exp_names"]))
    expr_names = list(EXPRESSIONS)
    used = sorted({names.index(k) for combo in EXPRESSIONS.values() for k in combo})
    combos = np.zeros((len(expr_names), len(used)))
    for e, combo in enumerate(EXPRESSIONS.values()):
        for k, w in combo.items():
            combos[e, used.index(names.index(k))] = w
    E = b["expdirs"][vmap][:, :, used].astype(np.float64)  # (V,3,K)
    id_crop = b["iddirs"][crop_map].astype(np.float64)  # (Vc,3,100)
    Vc = len(crop_map)
    id_crop2 = id_crop.reshape(Vc * 3, -1)
    t_crop = template[crop_map]
    dgrad = _DeformationGradient(t_crop, crop_tris, kept_in_crop) if identity_interaction else None

    # split of subjects (unseen-identity)
    split_rng = np.random.default_rng([seed, 2])
    test_subjects: set[int] = set()
    if protocol == "unseen-identity" and test_fraction > 0:
        n_test = min(max(1, int(round(test_fraction * subjects))), subjects - 1)
        test_subjects = set(int(s) for s in split_rng.permutation(subjects)[:n_test])

    identity = np.zeros((subjects, V, 3))
    cols = {k: {"train": [], "test": []} for k in ("vertices", "subject", "expression", "level", "is_neutral")}
    L = frames_per_sequence
    n_seq = math.ceil(per_subject / L)
    for s in range(subjects):
        id_rng = np.random.default_rng([seed, 1, s])
        beta = id_rng.standard_normal(id_crop.shape[2])
        beta[identity_modes:] = 0.0  # same draws for every K: K=100 is the full model
        neutral_crop = t_crop + (id_crop2 @ beta).reshape(Vc, 3)
        neutral = neutral_crop[kept_in_crop]
        identity[s] = neutral
        if dgrad is not None:
            J = dgrad(neutral_crop)  # (V,3,3)
            E_s = E + interaction_strength * np.einsum("vab,vbk->vak", J - np.eye(3), E)
        else:
            E_s = E
        rng = np.random.default_rng([seed, 3, s])
        gains = np.clip(1.0 + 0.15 * rng.standard_normal(len(used)), 0.6, 1.4)
        order = rng.permutation(len(expr_names))
        frames_left = per_subject
        for q in range(n_seq):
            Lq = min(L, frames_left)
            frames_left -= Lq
            ex = int(order[q % len(order)])
            peak = rng.uniform(0.7, 1.0)
            level = _level_profile(L)[:Lq]
            W = np.clip(level[:, None] * peak * (combos[ex] * gains)[None, :], 0.0, 1.0)  # (Lq,K)
            faces = neutral[None] + np.einsum("vak,nk->nva", E_s, W)
            if pose:
                ang = np.clip(rng.standard_normal((Lq, 3)) * pose_deg, -3 * pose_deg, 3 * pose_deg)
                tr = np.clip(rng.standard_normal((Lq, 3)) * pose_mm, -3 * pose_mm, 3 * pose_mm) * 1e-3
                R = _rotation(np.radians(ang))
                faces = np.einsum("nab,nvb->nva", R, faces - pivot) + pivot + tr[:, None, :]
            if noise_mm > 0:
                faces = faces + rng.standard_normal(faces.shape) * noise_mm * 1e-3
            # split
            is_test = np.zeros(Lq, dtype=bool)
            if protocol == "unseen-identity":
                is_test[:] = s in test_subjects
            elif test_fraction > 0 and Lq >= 2:
                w = min(max(1, int(round(test_fraction * Lq))), Lq - 1)
                start = int(rng.integers(1, Lq - w + 1))  # frame 0 (the neutral) stays in train
                is_test[start:start + w] = True
            for split, m in (("train", ~is_test), ("test", is_test)):
                if m.any():
                    cols["vertices"][split].append((faces[m] * STORED_PER_METRE).astype(np.float32))
                    cols["subject"][split].append(np.full(int(m.sum()), s, dtype=np.int32))
                    cols["expression"][split].append(np.full(int(m.sum()), ex, dtype=np.int32))
                    cols["level"][split].append(level[m].astype(np.float32))
                    cols["is_neutral"][split].append(level[m] == 0.0)
    splits = {}
    for split in ("train", "test"):
        if cols["vertices"][split]:
            splits[split] = {k: np.concatenate(cols[k][split]) for k in cols}
    lm_ids = np.flatnonzero(np.isin(b["landmarks68"], crop_map)).astype(np.int32)
    landmarks = np.zeros(0, dtype=np.int32)
    if len(lm_ids):
        from scipy.spatial import cKDTree

        _, landmarks = cKDTree(template[vmap]).query(template[b["landmarks68"][lm_ids]])
        landmarks = np.asarray(landmarks, dtype=np.int32)
    return {
        "template": (template[vmap] * STORED_PER_METRE).astype(np.float32),
        "triangles": tris,
        "vertex_index_map": vmap.astype(np.int64),
        "landmarks": landmarks,
        "landmark_ids": lm_ids,
        "identity": (identity * STORED_PER_METRE).astype(np.float32),
        "subjects": [f"synth{s:03d}" for s in range(subjects)],
        "expressions": expr_names,
        "splits": splits,
        "options": options,
    }


def write(data: dict, out, *, overwrite: bool = False, shard_size: int = 2048) -> Path:
    from facedis.shards import ShardWriter

    opts = data["options"]
    S = len(data["subjects"])
    V = data["template"].shape[0]
    neutral = {}
    for split, d in data["splits"].items():
        a = np.full((S, V, 3), np.nan, dtype=np.float32)
        present = np.unique(d["subject"])
        a[present] = data["identity"][present]
        neutral[split] = a
    with ShardWriter(out, num_vertices=V, num_subjects=S, shard_size=shard_size, overwrite=overwrite) as w:
        for split, d in data["splits"].items():
            w.add(split, d["vertices"], subject=d["subject"], expression=d["expression"], level=d["level"],
                  is_neutral=d["is_neutral"])
        meta = {
            "dataset": "synth",
            "protocol": opts["protocol"],
            "seed": opts["seed"],
            "num_triangles": int(len(data["triangles"])),
            "units": {"mm_per_unit": MM_PER_UNIT, "stored_per_metre": STORED_PER_METRE,
                      "note": "stored = metres / 0.26 (CoMA normalisation); millimetres = stored x 260"},
            "subjects": data["subjects"],
            "expressions": data["expressions"],
            "expression_blendshapes": EXPRESSIONS,
            "source": f"ICT-FaceKit (MIT), basis sha256 {basis_sha256()}",
            "options": opts,
            "skipped": [],
            "neutral_gt": "exact identity mesh (template + identity PCA), canonical pose, no noise",
        }
        arrays = {"triangles": data["triangles"], "template": data["template"],
                  "vertex_index_map": data["vertex_index_map"]}
        if len(data["landmarks"]):
            arrays["landmarks"] = data["landmarks"]
            arrays["landmark_ids"] = data["landmark_ids"]
        return w.finish(meta=meta, arrays=arrays, neutral=neutral)
