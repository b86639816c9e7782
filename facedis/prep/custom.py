"""Your own registered meshes -> facedis shards.

Raw: a folder of registered meshes in one topology (PLY/OBJ/WRL via the fast readers, any other
format trimesh reads) plus a CSV (``--csv``, default ``<raw>/labels.csv``; also accepted:
``<raw>/index.csv``, or the only ``*.csv`` in ``<raw>``) with the header ``path,subject,expression,level,is_neutral``: ``path`` relative to the
CSV's folder (or absolute), ``level`` in [0, 1], ``is_neutral`` one of 1/0/true/false/yes/no.
The first mesh defines the topology; every other mesh must have the same vertex count (and, with
``--check-topology``, the same triangles). ``--vertices N`` decimates the first mesh to about N
vertices as FaceScape's preparation does (the map is meta.h5 ``vertex_index_map``, described in
meta.json ``decimation``) and keeps those vertices of every mesh.

Units: ``--input-units`` (m, cm or mm) and ``--mm-per-unit`` (stored = millimetres / mm_per_unit;
default 260, CoMA's normalisation).

Protocols (``--protocol``):
- ``seen-identity``: within every (subject, expression) group, in CSV order, positions
  ``p % period in [offset, offset+length)`` are test (``--test-period/--test-length/--test-offset``);
- ``unseen-identity``: seeded subject split (``--test-fraction``; ``--test-subjects`` forces subjects into test);
- ``loso``: leave one subject out (``--fold k``, subjects in natural sort order).
Neutral ground truth per split = mean of that split's ``is_neutral`` meshes of the subject
(``--neutral-leakage``: test neutral from train + test meshes).
"""

from __future__ import annotations

import argparse
import csv
import functools
from collections import defaultdict
from pathlib import Path

import numpy as np

from facedis.prep.common import (
    BadFiles, add_common_arguments, add_decimation_argument, decimate_reference, finish_message, load_checked, loso,
    mean_per_subject, natural_key, options_dict, stream, subject_split, units, window_test_mask
)
from facedis.prep.meshio import MeshReadError, read_mesh
from facedis.shards import ShardWriter

UNIT_MM = {"m": 1000.0, "cm": 10.0, "mm": 1.0}
TRUE = {"1", "true", "yes", "y", "t"}
FALSE = {"0", "false", "no", "n", "f", ""}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("custom")
    g.add_argument("--csv", type=Path, default=None, help="labels CSV (default <raw>/labels.csv, else <raw>/index.csv or the only *.csv)")
    g.add_argument("--input-units", choices=sorted(UNIT_MM), default="m", help="units of the mesh files")
    g.add_argument("--mm-per-unit", type=float, default=260.0, help="stored = millimetres / this")
    g.add_argument("--protocol", choices=["seen-identity", "unseen-identity", "loso"], default="unseen-identity")
    g.add_argument("--test-period", type=int, default=10)
    g.add_argument("--test-length", type=int, default=1)
    g.add_argument("--test-offset", type=int, default=0)
    g.add_argument("--test-fraction", type=float, default=0.3)
    g.add_argument("--test-subjects", default="", help="unseen-identity: comma-separated subjects forced into test")
    g.add_argument("--fold", type=int, default=0)
    g.add_argument("--neutral-leakage", action="store_true")
    g.add_argument("--check-topology", action="store_true", help="compare every mesh's triangles with the first")
    g.add_argument("--dataset-name", default="custom")
    add_decimation_argument(g)


def read_index(csv_path: Path) -> list[dict]:
    rows = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"path", "subject", "expression", "level", "is_neutral"}
        if reader.fieldnames is None or not need <= {h.strip() for h in reader.fieldnames}:
            raise ValueError(f"{csv_path}: header must contain {sorted(need)}, found {reader.fieldnames}")
        for n, r in enumerate(reader, 2):
            r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
            try:
                lev = float(r["level"])
            except ValueError:
                raise ValueError(f"{csv_path}:{n}: level {r['level']!r} is not a number") from None
            if not (0.0 <= lev <= 1.0):
                raise ValueError(f"{csv_path}:{n}: level {lev} outside [0, 1]")
            neu = r["is_neutral"].lower()
            if neu not in TRUE | FALSE:
                raise ValueError(f"{csv_path}:{n}: is_neutral {r['is_neutral']!r} is not a boolean")
            if not r["path"] or not r["subject"]:
                raise ValueError(f"{csv_path}:{n}: empty path or subject")
            p = Path(r["path"])
            rows.append({"path": p if p.is_absolute() else csv_path.parent / p, "subject": r["subject"],
                         "expression": r["expression"] or "unknown", "level": lev, "is_neutral": neu in TRUE,
                         "line": n})
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    return rows


#: The CSV looked for in ``--raw`` without ``--csv``, in this order (``labels.csv`` is the documented name).
CSV_NAMES = ("labels.csv", "index.csv")


def _find_csv(raw: Path, csv_arg) -> Path:
    if csv_arg is not None:
        return Path(csv_arg)
    for name in CSV_NAMES:
        if (raw / name).is_file():
            return raw / name
    cands = sorted(raw.glob("*.csv"))
    if len(cands) != 1:
        raise FileNotFoundError(f"{raw}: pass --csv (found {len(cands)} *.csv files and no labels.csv)")
    return cands[0]


def _read(path, num_vertices, triangles, scale, vmap=None):
    v, reason = load_checked(path, num_vertices, triangles)
    if v is None:
        return None, reason
    if vmap is not None:
        v = v[vmap]
    return (v.astype(np.float64) * scale).astype(np.float32), None


def prepare(args: argparse.Namespace) -> Path:
    raw, out = Path(args.raw), Path(args.out)
    progress = bool(getattr(args, "progress", 1))
    csv_path = _find_csv(raw, args.csv)
    rows = read_index(csv_path)
    bad = BadFiles(skip=args.skip_bad)
    subjects = sorted({r["subject"] for r in rows}, key=natural_key)
    expressions = sorted({r["expression"] for r in rows}, key=natural_key)
    sid = {s: i for i, s in enumerate(subjects)}
    eid = {e: i for i, e in enumerate(expressions)}

    # reference topology: the first readable mesh
    v0 = tris = ref = None
    for r in rows:
        try:
            v0, tris = read_mesh(r["path"], faces=True)
            ref = r["path"]
            break
        except MeshReadError as e:
            bad.report(r["path"], "unreadable (" + str(e).split(": ", 1)[-1] + ")")
            r["bad"] = True
    if v0 is None:
        raise RuntimeError(f"{csv_path}: no readable mesh")
    V = V_src = len(v0)  # V_src: the raw topology (reading and the topology check use it)
    vmap = decimation = None
    if getattr(args, "vertices", None) is not None:
        vmap, dec_tris, decimation = decimate_reference(ref, v0, tris, args.vertices, root=csv_path.parent)
        V = len(vmap)

    # ---- split
    if args.protocol == "seen-identity":
        groups: dict = defaultdict(int)
        is_test = []
        for r in rows:
            k = (r["subject"], r["expression"])
            p = groups[k]
            groups[k] += 1
            is_test.append(bool(window_test_mask(p + 1, args.test_period, args.test_length, args.test_offset)[p]))
        split_info = {"period": args.test_period, "length": args.test_length, "offset": args.test_offset}
    else:
        if args.protocol == "unseen-identity":
            forced = [s.strip() for s in args.test_subjects.split(",") if s.strip()]
            unknown = [s for s in forced if s not in sid]
            if unknown:
                raise ValueError(f"--test-subjects {unknown} not in {csv_path}")
            _, test_subj = subject_split(subjects, test_fraction=args.test_fraction, seed=args.seed, forced_test=forced)
            split_info = {"test_fraction": args.test_fraction, "seed": args.seed}
        else:
            _, test_subj = loso(subjects, args.fold)
            split_info = {"fold": args.fold}
        split_info["test_subjects"] = test_subj
        is_test = [r["subject"] in set(test_subj) for r in rows]
    split_info["kind"] = args.protocol

    scale = UNIT_MM[args.input_units] / args.mm_per_unit
    reader = functools.partial(_read, num_vertices=V_src, triangles=tris if args.check_topology else None, scale=scale,
                               vmap=vmap)
    todo = [(r, t) for r, t in zip(rows, is_test) if not r.get("bad")]
    S = len(subjects)
    neu_sum = np.zeros((S, V, 3))
    neu_n = np.zeros(S, dtype=np.int64)
    counts: dict[str, int] = defaultdict(int)
    with ShardWriter(out, num_vertices=V, num_subjects=S, shard_size=args.shard_size,
                     overwrite=args.overwrite) as w:
        for (r, test), (v, reason) in zip(todo, stream(reader, [r["path"] for r, _ in todo], workers=args.workers,
                                                        chunk=16, desc="custom", progress=progress)):
            if v is None:
                bad.report(r["path"], reason)
                continue
            split = "test" if test else "train"
            s = sid[r["subject"]]
            if r["is_neutral"]:
                neu_sum[s] += v
                neu_n[s] += 1
            w.add(split, v, subject=s, expression=eid[r["expression"]], level=r["level"], is_neutral=r["is_neutral"])
            counts[split] += 1
        if not counts["train"] or not counts["test"]:
            raise RuntimeError(f"{csv_path}: protocol {args.protocol!r} gives {dict(counts)} meshes; need train and test")
        # --neutral-leakage: the test neutral GT averaged over train AND test frames (the reference)
        neutral = {"test": mean_per_subject(neu_sum, neu_n)} if args.neutral_leakage else {}
        meta = {
            "dataset": args.dataset_name,
            "protocol": {"loso": "leave-one-subject-out"}.get(args.protocol, args.protocol),
            "seed": args.seed,
            "num_triangles": int(len(tris) if vmap is None else len(dec_tris)),
            "units": units(args.mm_per_unit, f"input {args.input_units} -> mm / {args.mm_per_unit:g}; "
                                             f"mm = stored * {args.mm_per_unit:g}"),
            "subjects": subjects,
            "expressions": expressions,
            "source": str(csv_path.absolute()),
            "options": options_dict(args),
            "skipped": bad.items,
            "split": split_info,
        }
        arrays = {"triangles": tris.astype(np.int32), "template": (v0.astype(np.float64) * scale).astype(np.float32),
                  "vertex_index_map": np.arange(V, dtype=np.int64)}
        if vmap is not None:
            meta["decimation"] = decimation
            arrays.update(triangles=dec_tris, template=arrays["template"][vmap], vertex_index_map=vmap)
        path = w.finish(meta=meta, arrays=arrays, neutral=neutral)
    finish_message(path, dict(counts), bad)
    return path
