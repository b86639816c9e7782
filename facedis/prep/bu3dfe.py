"""BU-3DFE (registered, one topology) -> facedis shards.

Raw: ``*.wrl`` files named ``[FM]NNNN_XXLLRR_F3D.wrl`` anywhere under ``--raw`` (e.g. ``F0001/``
sub-folders), a *registered* BU-3DFE in which every file has the same topology (the reference
code needs one but never says where it comes from; docs/method.md#bu-3dfe). Files are parsed by a real VRML
``IndexedFaceSet`` reader (:func:`facedis.prep.meshio.read_wrl`), not by fixed line numbers; a file
whose topology differs from the first file's stops preparation with an error naming it.

Labels: identity = gender + number (``F0001`` != ``M0001``); expression ``XX`` in
NE, AN, DI, FE, HA, SA, SU; level = ``LL / 4`` (NE: 0); ``is_neutral`` = NE.

Splits: ``paper`` (test = F0001-F0010, the first 10 *female* subjects) or ``kfold``
(seeded subject-level k-fold, ``--kfold K --fold k``).

Rigid alignment (Kabsch, rotation + translation): every neutral is aligned to the mean of the
**train** raw neutrals over all vertices; every expressive scan to its own subject's aligned neutral
over the landmark vertices (``--landmarks``; default the reference's 13 indices when the meshes
have enough vertices, else all vertices). Coordinates are millimetres / 156 (mm_per_unit 156).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from facedis.prep.common import (BadFiles, add_common_arguments, finish_message, kfold_subjects, load_checked,
                              natural_key, options_dict, rigid_align, stream, units)
from facedis.prep.meshio import MeshReadError, read_mesh
from facedis.shards import ShardWriter

EXPRESSIONS = ("NE", "AN", "DI", "FE", "HA", "SA", "SU")
REFERENCE_LANDMARKS = (4302, 954, 227, 1700, 2186, 1128, 4303, 1597, 4501, 4827, 41, 3604, 1143)
PAPER_TEST = tuple(f"F{i:04d}" for i in range(1, 11))
NAME_RE = re.compile(r"^([FM])(\d{4})_([A-Z]{2})(\d{2})([A-Z]{2})_F3D\.wrl$", re.IGNORECASE)
MM_PER_UNIT = 156.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("BU-3DFE")
    g.add_argument("--split", choices=["paper", "kfold"], default="paper",
                   help="paper: test = F0001-F0010; kfold: seeded subject k-fold (--kfold, --fold)")
    g.add_argument("--kfold", type=int, default=10)
    g.add_argument("--fold", type=int, default=0)
    g.add_argument("--test-subjects", default=",".join(PAPER_TEST),
                   help="paper split: comma-separated test subjects (default F0001..F0010)")
    g.add_argument("--landmarks", default="reference",
                   help="vertices for expression->neutral alignment: 'reference' (the 13 reference indices "
                        "if the meshes have enough vertices, else all), 'all', or a comma-separated list")
    g.add_argument("--no-align", action="store_true", help="skip the rigid alignment")
    g.add_argument("--max-level", type=int, default=4, help="level = LL / max_level")
    g.add_argument("--mm-per-unit", type=float, default=MM_PER_UNIT, help="stored = mm / this (paper: 156)")


def parse_name(name: str):
    """``F0001_AN01WH_F3D.wrl`` -> (subject 'F0001', expression 'AN', level 1, race 'WH') or None."""
    m = NAME_RE.match(name)
    if not m:
        return None
    g, num, exp, lev, race = m.groups()
    exp = exp.upper()
    if exp not in EXPRESSIONS:
        return None
    return f"{g.upper()}{num}", exp, int(lev), race.upper()


def discover(raw: Path):
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: BU-3DFE raw directory does not exist")
    files, ignored = [], []
    for p in sorted(raw.rglob("*"), key=lambda p: natural_key(p.name)):
        if p.is_file() and p.suffix.lower() == ".wrl":
            info = parse_name(p.name)
            (files.append((p, *info)) if info else ignored.append(str(p.relative_to(raw))))
    if not files:
        raise FileNotFoundError(f"{raw}: no files named [FM]NNNN_XXLLRR_F3D.wrl found")
    return files, ignored


def resolve_landmarks(spec: str, V: int) -> np.ndarray | None:
    """None means all vertices."""
    spec = spec.strip().lower()
    if spec == "all":
        return None
    if spec == "reference":
        return np.array(REFERENCE_LANDMARKS) if max(REFERENCE_LANDMARKS) < V else None
    idx = np.array([int(t) for t in spec.replace(",", " ").split()], dtype=np.int64)
    if len(idx) < 3 or idx.min() < 0 or idx.max() >= V:
        raise ValueError(f"--landmarks needs >= 3 vertex indices in [0, {V}), got {spec!r}")
    return idx


def _read_raw(path, num_vertices, triangles):
    return load_checked(path, num_vertices, triangles)


def _read_aligned(task, num_vertices, triangles, landmarks, scale, align):
    path, target = task
    v, reason = load_checked(path, num_vertices, triangles)
    if v is None:
        return None, reason
    if align:
        v = rigid_align(v, target, landmarks)
    return (v.astype(np.float64) * scale).astype(np.float32), None


def prepare(args: argparse.Namespace) -> Path:
    raw, out = Path(args.raw), Path(args.out)
    progress = bool(getattr(args, "progress", 1))
    files, ignored = discover(raw)
    if ignored:
        print(f"note: ignoring {len(ignored)} .wrl file(s) not named [FM]NNNN_XXLLRR_F3D.wrl "
              f"(e.g. {ignored[0]})", file=sys.stderr)
    bad = BadFiles(skip=args.skip_bad)

    # reference topology: the first file (sorted by name)
    ref_path = files[0][0]
    try:
        v0, triangles = read_mesh(ref_path, faces=True)
    except MeshReadError as e:
        raise RuntimeError(f"{e} (the first file defines the topology; fix or remove it)") from None
    V = len(v0)
    landmarks = resolve_landmarks(args.landmarks, V)

    subjects = sorted({f[1] for f in files}, key=natural_key)
    if args.split == "paper":
        test_names = {s.strip().upper() for s in args.test_subjects.split(",") if s.strip()}
        test_subj = [s for s in subjects if s in test_names]
        protocol = "unseen-identity"
    else:
        _, test_subj = kfold_subjects(subjects, k=args.kfold, fold=args.fold, seed=args.seed)
        protocol = "unseen-identity-kfold"
    if not test_subj or len(test_subj) == len(subjects):
        raise RuntimeError(f"{raw}: split {args.split!r} gives {len(test_subj)} test of {len(subjects)} subjects")
    split_of = {s: ("test" if s in set(test_subj) else "train") for s in subjects}

    # ---- pass A: neutrals (one per subject)
    neutral_files: dict[str, Path] = {}
    for p, s, e, lev, race in files:
        if e == "NE":
            if s in neutral_files:
                print(f"warning: {s} has several NE scans; using {neutral_files[s].name}, ignoring {p.name}",
                      file=sys.stderr)
                continue
            neutral_files[s] = p
    read = functools.partial(_read_raw, num_vertices=V, triangles=triangles)
    raw_neutral: dict[str, np.ndarray] = {}
    ns = list(neutral_files)
    for s, (v, reason) in zip(ns, stream(read, [neutral_files[s] for s in ns], workers=args.workers, chunk=4,
                                         desc="BU-3DFE neutrals", progress=progress)):
        if v is None:
            bad.report(neutral_files[s], reason)
        else:
            raw_neutral[s] = v.astype(np.float64)
    for s in subjects:
        if s not in raw_neutral and s not in neutral_files:
            bad.report(raw / f"{s}_NE00??_F3D.wrl", f"subject {s} has no neutral (NE00) scan; its "
                       f"expressions cannot be aligned")
    usable = [s for s in subjects if s in raw_neutral]
    train_neutrals = [raw_neutral[s] for s in usable if split_of[s] == "train"]
    if not train_neutrals:
        raise RuntimeError(f"{raw}: no train subject has a neutral scan")
    mean_neutral = np.mean(train_neutrals, axis=0)
    aligned = {s: (rigid_align(raw_neutral[s], mean_neutral) if not args.no_align else raw_neutral[s].astype(np.float32))
               for s in usable}

    # ---- pass B: expressive scans, aligned to their subject's aligned neutral (in the workers)
    scale = 1.0 / args.mm_per_unit
    expressive = [f for f in files if f[2] != "NE" and f[1] in aligned]
    for p, s, e, *_ in files:
        if e != "NE" and s not in aligned:
            bad.items.append({"file": str(p), "reason": f"subject {s} has no usable neutral scan"})
    tasks = [(p, aligned[s] if landmarks is None else aligned[s][landmarks]) for p, s, *_ in expressive]
    reader = functools.partial(_read_aligned, num_vertices=V, triangles=triangles, landmarks=landmarks,
                               scale=scale, align=not args.no_align)
    S = len(subjects)
    sid = {s: i for i, s in enumerate(subjects)}
    eid = {e: i for i, e in enumerate(EXPRESSIONS)}
    counts: dict[str, int] = defaultdict(int)
    with ShardWriter(out, num_vertices=V, num_subjects=S, shard_size=args.shard_size,
                     overwrite=args.overwrite) as w:
        for s in usable:
            w.add(split_of[s], aligned[s].astype(np.float64) * scale, subject=sid[s], expression=eid["NE"],
                  level=0.0, is_neutral=True)
            counts[split_of[s]] += 1
        for (p, s, e, lev, race), (v, reason) in zip(
                expressive, stream(reader, tasks, workers=args.workers, chunk=8, desc="BU-3DFE expressions",
                                   progress=progress)):
            if v is None:
                bad.report(p, reason)
                continue
            w.add(split_of[s], v, subject=sid[s], expression=eid[e], level=min(lev / args.max_level, 1.0),
                  is_neutral=False)
            counts[split_of[s]] += 1
        races = {}
        for _, s, _, _, race in files:
            races.setdefault(s, race)
        meta = {
            "dataset": "bu3dfe",
            "protocol": protocol,
            "seed": args.seed,
            "num_triangles": int(len(triangles)),
            "units": units(args.mm_per_unit, f"BU-3DFE millimetres / {args.mm_per_unit:g}; "
                                             f"mm = stored * {args.mm_per_unit:g}"),
            "subjects": subjects,
            "expressions": list(EXPRESSIONS),
            "subject_info": {s: {"gender": s[0], "race": races.get(s)} for s in subjects},
            "source": str(raw.absolute()),
            "options": options_dict(args),
            "skipped": bad.items,
            "ignored_files": ignored,
            "split": {"kind": args.split, "test_subjects": test_subj,
                      **({"k": args.kfold, "fold": args.fold, "seed": args.seed} if args.split == "kfold" else {})},
            "alignment": ("none" if args.no_align else
                          {"neutral": "Kabsch to the mean raw train neutral, all vertices",
                           "expression": "Kabsch to the subject's aligned neutral on "
                                         + ("all vertices" if landmarks is None else f"{len(landmarks)} landmark vertices")}),
            "reference_topology_file": str(ref_path.relative_to(raw)),
        }
        arrays = {"triangles": triangles.astype(np.int32),
                  "template": (np.mean([aligned[s] for s in usable if split_of[s] == "train"], axis=0)
                               * scale).astype(np.float32),
                  "vertex_index_map": np.arange(V, dtype=np.int64)}
        if landmarks is not None:
            arrays["landmarks"] = landmarks.astype(np.int32)
        path = w.finish(meta=meta, arrays=arrays)
    finish_message(path, dict(counts), bad)
    return path
