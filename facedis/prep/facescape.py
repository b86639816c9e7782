"""FaceScape (registered "TU" models) -> facedis shards, with scripted decimation.

Raw: ``<raw>/<id>/models_reg/<k>_<name>.obj`` (26,317 v / 52,261 f; 20 expressions ``1_neutral`` ...
``20_brow_lower``), millimetres. Missing expressions are normal in FaceScape: they are listed in
meta.json ``missing`` (not errors).

Decimation replaces the reference's manual MeshLab step (docs/method.md#facescape): quadric edge-collapse
decimation of ``<template-subject>/models_reg/1_neutral.obj`` to ``--target-faces`` (9,000), every
decimated vertex snapped to its nearest original vertex, **deduplicated**, triangles cleaned
(:func:`facedis.prep.mesh_ops.decimate`). The resulting ``vertex_index_map`` is stored in meta.h5 and
described (version, template, sha256, mesh quality) in meta.json ``decimation``; ``--index-map``
reuses a stored map (a prepared data set directory, its ``meta.h5``, or an ``.npz`` with
``vertex_index_map`` and ``triangles``) so that every preparation can share one topology.

Outliers come from a data file (``--outliers``, default ``facedis/prep/facescape_outliers.txt``), not
from magic positions. Split: seeded unseen-identity split, ``--test-fraction`` (0.3) of the
identities in test, with the 10 "publishable" identities forced into test when present.
Coordinates are millimetres / 573 (mm_per_unit 573). Level: 0 for ``1_neutral`` (is_neutral), 1
otherwise (FaceScape has no intensity labels).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from facedis.prep.common import (DECIMATION_METHOD, DECIMATION_VERSION, BadFiles, add_common_arguments,
                                 decimation_record, finish_message, int_list, load_checked, options_dict, stream,
                                 subject_split, units)
from facedis.prep.meshio import MeshReadError, read_mesh
from facedis.shards import ShardWriter

EXPRESSIONS = ("1_neutral", "2_smile", "3_mouth_stretch", "4_anger", "5_jaw_left", "6_jaw_right",
               "7_jaw_forward", "8_mouth_left", "9_mouth_right", "10_dimpler", "11_chin_raiser",
               "12_lip_puckerer", "13_lip_funneler", "14_sadness", "15_lip_roll", "16_grin",
               "17_cheek_blowing", "18_eye_closed", "19_brow_raiser", "20_brow_lower")
PUBLISHABLE = (122, 212, 340, 344, 393, 395, 421, 527, 594, 610)
NUM_VERTICES = 26317
MM_PER_UNIT = 573.0
DEFAULT_OUTLIERS = Path(__file__).with_name("facescape_outliers.txt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("FaceScape")
    g.add_argument("--template-subject", type=int, default=None,
                   help="subject whose 1_neutral.obj is decimated (default: the first subject id)")
    g.add_argument("--target-faces", type=int, default=9000, help="decimation target (paper: 9000)")
    g.add_argument("--index-map", type=Path, default=None,
                   help="reuse a stored decimation (data set dir, meta.h5 or .npz with vertex_index_map, triangles)")
    g.add_argument("--no-decimate", action="store_true", help="keep the full TU topology")
    g.add_argument("--num-vertices", type=int, default=NUM_VERTICES, help="expected raw vertices (0: from the template)")
    g.add_argument("--outliers", default=str(DEFAULT_OUTLIERS), help="outlier list file ('none' for no outliers)")
    g.add_argument("--test-fraction", type=float, default=0.3)
    g.add_argument("--publishable", default=",".join(map(str, PUBLISHABLE)),
                   help="identities forced into the test split when present")
    g.add_argument("--mm-per-unit", type=float, default=MM_PER_UNIT, help="stored = mm / this (paper: 573)")


# ---------------------------------------------------------------------------- discovery, outliers


def discover(raw: Path):
    """``({id: {expression: path}}, missing [names])``."""
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: FaceScape raw directory does not exist")
    tree: dict[int, dict[str, Path]] = {}
    for d in raw.iterdir():
        if d.is_dir() and d.name.isdigit() and (d / "models_reg").is_dir():
            found = {p.stem: p for p in (d / "models_reg").glob("*.obj") if p.stem in EXPRESSIONS}
            if found:
                tree[int(d.name)] = found
    if not tree:
        raise FileNotFoundError(f"{raw}: no <id>/models_reg/<k>_<name>.obj files found")
    tree = dict(sorted(tree.items()))
    missing = [f"{i}/models_reg/{e}.obj" for i, ex in tree.items() for e in EXPRESSIONS if e not in ex]
    return tree, missing


def read_outliers(path) -> tuple[set[int], set[tuple[int, str]]]:
    """Parse an outlier file: subject ids and (id, '<k>_<name>') meshes."""
    if path is None or str(path).lower() == "none":
        return set(), set()
    subjects, meshes = set(), set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.isdigit():
            subjects.add(int(line))
            continue
        m = re.match(r"^(\d+)/(?:models_reg/)?(\d+_[a-z_]+?)(?:\.obj)?$", line)
        if not m or m.group(2) not in EXPRESSIONS:
            raise ValueError(f"{path}:{n}: cannot parse outlier entry {line!r} (expected '<id>' or '<id>/<k>_<name>')")
        meshes.add((int(m.group(1)), m.group(2)))
    return subjects, meshes


def load_index_map(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "meta.h5"
    if path.suffix == ".npz":
        d = np.load(path)
        return d["vertex_index_map"].astype(np.int64), d["triangles"].astype(np.int32), {"from": str(path)}
    import h5py

    with h5py.File(path, "r") as f:
        return f["vertex_index_map"][()].astype(np.int64), f["triangles"][()].astype(np.int32), {"from": str(path)}


# ---------------------------------------------------------------------------- worker


def _read_mapped(path, num_vertices, vmap, scale):
    v, reason = load_checked(path, num_vertices)
    if v is None:
        return None, reason
    return (v[vmap].astype(np.float64) * scale).astype(np.float32), None


# ---------------------------------------------------------------------------- preparation


def prepare(args: argparse.Namespace) -> Path:
    raw, out = Path(args.raw), Path(args.out)
    progress = bool(getattr(args, "progress", 1))
    tree, missing = discover(raw)
    out_subj, out_mesh = read_outliers(args.outliers)
    dropped = [f"{i}/models_reg/{e}.obj" for i, ex in tree.items() for e in ex
               if i in out_subj or (i, e) in out_mesh]
    tree = {i: {e: p for e, p in ex.items() if (i, e) not in out_mesh} for i, ex in tree.items() if i not in out_subj}
    tree = {i: ex for i, ex in tree.items() if ex}
    missing = [f"{i}/models_reg/{e}.obj" for i, ex in tree.items() for e in EXPRESSIONS
               if e not in ex and (i, e) not in out_mesh]
    bad = BadFiles(skip=args.skip_bad)

    # ---- template and decimation map
    tid = args.template_subject if args.template_subject is not None else next(iter(tree))
    if tid not in tree or "1_neutral" not in tree[tid]:
        raise FileNotFoundError(f"{raw}/{tid}/models_reg/1_neutral.obj: template mesh missing "
                                f"(choose another --template-subject)")
    tpath = tree[tid]["1_neutral"]
    try:
        tv, tf = read_mesh(tpath, faces=True)
    except MeshReadError as e:
        raise RuntimeError(f"{e} (the template mesh; choose another --template-subject)") from None
    V0 = args.num_vertices or len(tv)
    if len(tv) != V0:
        raise RuntimeError(f"{tpath}: template has {len(tv)} vertices, expected {V0} (--num-vertices)")
    from facedis.prep import mesh_ops

    if args.index_map is not None:
        vmap, tris, info = load_index_map(args.index_map)
        if vmap.max() >= V0:
            raise RuntimeError(f"{args.index_map}: index map refers to vertex {vmap.max()} of a {V0}-vertex topology")
        method = "loaded"
    elif args.no_decimate:
        vmap, tris = np.arange(V0, dtype=np.int64), tf.astype(np.int32)
        info, method = {}, "none"
    else:
        print(f"decimating {tpath} ({len(tv)} v / {len(tf)} f) to {args.target_faces} faces ...", file=sys.stderr)
        vmap, tris = mesh_ops.decimate(tv, tf, target_faces=args.target_faces)
        info, method = {}, DECIMATION_METHOD
    vmap = np.asarray(vmap, dtype=np.int64)
    tris = np.asarray(tris, dtype=np.int32)
    decimation = decimation_record(
        vmap, tris, tv, method=method, template=str(tpath.relative_to(raw)),
        template_sha256=hashlib.sha256(tpath.read_bytes()).hexdigest(), source_vertices=V0,
        extra={**info, "target_faces": None if method in ("none", "loaded") else args.target_faces})
    V = len(vmap)

    # ---- split
    ids = list(tree)
    forced = [i for i in int_list(args.publishable) if i in tree]
    train_ids, test_ids = subject_split(ids, test_fraction=args.test_fraction, seed=args.seed, forced_test=forced)
    split_of = {i: "train" for i in train_ids} | {i: "test" for i in test_ids}
    subjects = [str(i) for i in ids]
    sid = {i: k for k, i in enumerate(ids)}
    eid = {e: k for k, e in enumerate(EXPRESSIONS)}

    # ---- stream
    items = [(i, e, p) for i, ex in tree.items() for e, p in sorted(ex.items(), key=lambda kv: eid[kv[0]])]
    reader = functools.partial(_read_mapped, num_vertices=V0, vmap=vmap, scale=1.0 / args.mm_per_unit)
    counts: dict[str, int] = defaultdict(int)
    with ShardWriter(out, num_vertices=V, num_subjects=len(ids), shard_size=args.shard_size,
                     overwrite=args.overwrite) as w:
        for (i, e, p), (v, reason) in zip(items, stream(reader, [x[2] for x in items], workers=args.workers,
                                                         chunk=4, desc="FaceScape", progress=progress)):
            if v is None:
                bad.report(p, reason)
                continue
            neutral = e == "1_neutral"
            w.add(split_of[i], v, subject=sid[i], expression=eid[e], level=0.0 if neutral else 1.0,
                  is_neutral=neutral)
            counts[split_of[i]] += 1
        meta = {
            "dataset": "facescape",
            "protocol": "unseen-identity",
            "seed": args.seed,
            "num_triangles": int(len(tris)),
            "units": units(args.mm_per_unit, f"FaceScape millimetres / {args.mm_per_unit:g}; "
                                             f"mm = stored * {args.mm_per_unit:g}"),
            "subjects": subjects,
            "expressions": list(EXPRESSIONS),
            "source": str(raw.absolute()),
            "options": options_dict(args),
            "skipped": bad.items,
            "missing": missing,
            "outliers": {"file": str(args.outliers), "dropped": dropped},
            "split": {"kind": "unseen-identity", "seed": args.seed, "test_fraction": args.test_fraction,
                      "forced_test": forced, "test_subjects": [str(i) for i in test_ids]},
            "decimation": decimation,
        }
        arrays = {"triangles": tris, "vertex_index_map": vmap,
                  "template": (tv[vmap].astype(np.float64) / args.mm_per_unit).astype(np.float32)}
        path = w.finish(meta=meta, arrays=arrays)
    finish_message(path, dict(counts), bad)
    return path
