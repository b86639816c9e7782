"""CoMA (Ranjan et al. 2018) -> facedis shards.

Raw layout: ``<raw>/FaceTalk_<...>/<sequence>/<sequence>.NNNNNN.ply`` (FLAME topology, 5,023 v, metres).

Labels (docs/method.md#coma, without the reference code's bugs):

- expression level per frame = mean per-vertex distance to the sequence's first frame; frames whose
  level has a z-score > ``--outlier-z`` within the sequence are dropped (one-sided, recorded in
  meta.json ``dropped_outliers``); levels are divided by the sequence maximum (0..1);
- the asymmetric sequences (``--asymmetric``) are split into ``<seq>_left`` / ``<seq>_right`` per frame by
  the x of vertex ``--lr-vertex`` (3506) relative to the first frame: +x (the subject's left in
  FLAME's frame) -> ``_left``, otherwise ``_right``;
- ``is_neutral`` = level <= ``--neutral-threshold`` (0.01); per-subject neutral ground truth = mean of
  those frames **within each split** (``--neutral-leakage`` reproduces the reference's test neutral
  averaged over train *and* test frames).

Splits (``--split``): ``every100`` (default; the paper's "10 frames of every 100": frame positions
``p % period in [offset, offset+length)`` of each sequence are test), ``windows`` (the reference code's
random windows of 10 consecutive frames inside one subject and expression class, ``int(0.01 n)``
windows, starts >= 10 apart, **seeded**; the windows are saved in meta.json) and ``loso``
(leave-one-subject-out, ``--fold k``).

``--vertices N`` decimates the first readable frame to about N vertices as FaceScape's preparation
does (:func:`facedis.prep.common.decimate_reference`; the map is meta.h5 ``vertex_index_map``,
described in meta.json ``decimation``); levels and left/right use the full meshes, the shards hold
the kept vertices. Default: no decimation.

Two streaming passes: pass 1 computes per-frame levels (one task per sequence, only small arrays come
back), pass 2 reads the frames again in chunks and writes shards. Memory is bounded by the shard size.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

from facedis.prep.common import (
    BadFiles, add_common_arguments, add_decimation_argument, decimate_reference, finish_message, load_checked, loso,
    mean_per_subject, natural_key, options_dict, random_windows, stream, units, window_test_mask
)
from facedis.prep.meshio import MeshReadError, read_mesh
from facedis.shards import ShardWriter

ASYMMETRIC = ("mouth_down", "mouth_middle", "mouth_side", "mouth_up")
NUM_VERTICES = 5023
MM_PER_UNIT = 260.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("CoMA")
    g.add_argument("--split", choices=["every100", "windows", "loso"], default="every100",
                   help="every100: the paper's 10 of every 100 frames (deterministic); windows: the reference "
                        "code's random 10-frame windows (seeded); loso: leave one subject out (--fold)")
    g.add_argument("--test-period", type=int, default=100, help="every100: period in frames")
    g.add_argument("--test-length", type=int, default=10, help="every100: test frames per period")
    g.add_argument("--test-offset", type=int, default=0, help="every100: first test position within a period")
    g.add_argument("--window-fraction", type=float, default=0.01, help="windows: number of windows / frames")
    g.add_argument("--window-length", type=int, default=10, help="windows: frames per window")
    g.add_argument("--fold", type=int, default=0, help="loso: index of the test subject (natural sort order)")
    g.add_argument("--neutral-leakage", action="store_true",
                   help="reproduce the reference: test neutral GT averaged over train AND test frames")
    g.add_argument("--neutral-threshold", type=float, default=0.01, help="is_neutral = level <= this")
    g.add_argument("--outlier-z", type=float, default=3.0, help="drop frames whose level z-score exceeds this")
    g.add_argument("--lr-vertex", type=int, default=3506, help="vertex whose x decides _left/_right")
    g.add_argument("--asymmetric", default=",".join(ASYMMETRIC),
                   help="comma-separated sequences split into _left/_right ('' = none)")
    g.add_argument("--num-vertices", type=int, default=NUM_VERTICES, help="expected vertices (0: from the first mesh)")
    g.add_argument("--mm-per-unit", type=float, default=MM_PER_UNIT,
                   help="stored = metres * 1000 / mm_per_unit (paper: 260, i.e. metres / 0.26)")
    g.add_argument("--check-topology", action="store_true",
                   help="also compare every frame's triangles with the first frame's (slower)")
    g.add_argument("--subject-glob", default="*", help="subject folders to use (glob; default all)")
    add_decimation_argument(g)


# ---------------------------------------------------------------------------- discovery


def discover(raw: Path, subject_glob: str = "*") -> dict[str, dict[str, list[Path]]]:
    """``{subject: {sequence: [frame paths sorted]}}``."""
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: CoMA raw directory does not exist")
    tree: dict[str, dict[str, list[Path]]] = {}
    for sd in sorted(raw.glob(subject_glob), key=lambda p: natural_key(p.name)):
        if not sd.is_dir():
            continue
        seqs = {}
        for q in sorted(sd.iterdir(), key=lambda p: p.name):
            if q.is_dir():
                frames = sorted(q.glob("*.ply"), key=lambda p: natural_key(p.name))
                if frames:
                    seqs[q.name] = frames
        if seqs:
            tree[sd.name] = seqs
    if not tree:
        raise FileNotFoundError(f"{raw}: no <subject>/<sequence>/*.ply files found (CoMA layout "
                                f"FaceTalk_*/<sequence>/<sequence>.NNNNNN.ply)")
    return tree


# ---------------------------------------------------------------------------- workers


def _sequence_stats(paths: list[Path], num_vertices: int, triangles: np.ndarray | None, lr_vertex: int,
                    scale: float | None, vmap: np.ndarray | None = None):
    """Pass 1 on one sequence: per frame (reason or None, level_raw, dx), and with ``scale`` the
    stacked scaled vertices of the readable frames (else None), restricted to ``vmap`` when given
    (levels and left/right are computed on the full meshes)."""
    ref = None
    out = []
    keep = []
    for p in paths:
        v, reason = load_checked(p, num_vertices, triangles)
        if reason is not None:
            out.append((reason, np.nan, np.nan))
            continue
        if ref is None:
            ref = v
        diff = v - ref
        d = float(np.sqrt(np.einsum("ij,ij->i", diff, diff)).mean(dtype=np.float64))
        out.append((None, d, float(v[lr_vertex, 0] - ref[lr_vertex, 0])))
        if scale is not None:
            keep.append(v if vmap is None else v[vmap])
    stack = None
    if scale is not None:
        nv = num_vertices if vmap is None else len(vmap)
        stack = np.stack(keep) if keep else np.zeros((0, nv, 3), np.float32)
        stack *= np.float32(scale)
    return out, stack


def _read_scaled(path: Path, num_vertices: int, scale: float, vmap: np.ndarray | None = None):
    v, reason = load_checked(path, num_vertices)
    if v is not None:
        if vmap is not None:
            v = v[vmap]
        v *= np.float32(scale)
    return v, reason


# ---------------------------------------------------------------------------- preparation


def compute_levels(raw_levels: np.ndarray, outlier_z: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised levels and keep-mask for one sequence (NaN entries = bad frames, not kept)."""
    ok = np.isfinite(raw_levels)
    keep = ok.copy()
    x = raw_levels[ok]
    if len(x) > 1 and x.std() > 0:
        z = (x - x.mean()) / x.std()
        keep[np.flatnonzero(ok)[z > outlier_z]] = False
    lev = np.zeros_like(raw_levels)
    mx = raw_levels[keep].max() if keep.any() else 0.0
    if mx > 0:
        lev[keep] = raw_levels[keep] / mx
    return lev, keep


def prepare(args: argparse.Namespace) -> Path:
    raw, out = Path(args.raw), Path(args.out)
    progress = bool(getattr(args, "progress", 1))
    tree = discover(raw, getattr(args, "subject_glob", "*"))
    subjects = list(tree)
    asym = {s for s in args.asymmetric.replace(" ", "").split(",") if s}
    seq_names = sorted({q for seqs in tree.values() for q in seqs})
    expressions = []
    for q in seq_names:
        expressions += [f"{q}_left", f"{q}_right"] if q in asym else [q]
    exp_id = {e: i for i, e in enumerate(expressions)}
    bad = BadFiles(skip=args.skip_bad)

    # reference topology: the first readable frame
    all_paths = [p for seqs in tree.values() for frames in seqs.values() for p in frames]
    V = args.num_vertices or None
    triangles = None
    for p in all_paths:
        try:
            v0, triangles = read_mesh(p, faces=True)
        except MeshReadError as e:
            bad.report(p, "unreadable (" + str(e).split(": ", 1)[-1] + ")")
            continue
        if V and len(v0) != V:
            bad.report(p, f"wrong vertex count ({len(v0)}, expected {V})")
            triangles = None
            continue
        V = len(v0)
        break
    if triangles is None:
        raise RuntimeError(f"{raw}: no readable reference mesh")
    if not (0 <= args.lr_vertex < V):
        raise ValueError(f"--lr-vertex {args.lr_vertex} is outside the {V} vertices of the meshes")
    V_src = V  # the raw topology (levels, --lr-vertex and the topology check use it)
    vmap = decimation = None
    if getattr(args, "vertices", None) is not None:
        vmap, dec_tris, decimation = decimate_reference(p, v0, triangles, args.vertices, root=raw)
        V = len(vmap)

    # ---- pass 1: levels per sequence (one task per sequence). For the deterministic splits the
    # workers also return the sequence's scaled vertices, so a single read pass suffices; the
    # seeded-windows split needs every label first, so it reads the frames a second time.
    seq_list = [(s, q, frames) for s, seqs in tree.items() for q, frames in seqs.items()]
    nframes = sum(len(f) for _, _, f in seq_list)
    one_pass = args.split != "windows"
    scale = 1000.0 / args.mm_per_unit
    already_bad = {b["file"] for b in bad.items}
    func = functools.partial(_sequence_stats, num_vertices=V_src,
                             triangles=triangles if args.check_topology else None,
                             lr_vertex=args.lr_vertex, scale=scale if one_pass else None, vmap=vmap)
    dropped: list[dict] = []
    S = len(subjects)
    split_info: dict = {"kind": args.split}
    if args.split == "every100":
        window_test_mask(1, args.test_period, args.test_length, args.test_offset)  # validates the options
        protocol = "seen-identity"
        split_info.update(period=args.test_period, length=args.test_length, offset=args.test_offset)
    elif args.split == "windows":
        protocol = "seen-identity"
    else:
        _, test_subj = loso(subjects, args.fold)
        loso_sid = subjects.index(test_subj[0])
        protocol = "leave-one-subject-out"
        split_info.update(fold=args.fold, test_subject=test_subj[0])

    def label(s, q, frames, stats):
        """Rows (path, subject id, sequence, class id, level, position, index in the stack)."""
        raw_lev = np.array([np.nan if r[0] else r[1] for r in stats])
        dx = np.array([r[2] for r in stats])
        for p, r in zip(frames, stats):
            if r[0] and str(p) not in already_bad:
                bad.report(p, r[0])
        lev, keep = compute_levels(raw_lev, args.outlier_z)
        rows, k = [], -1
        for pos, p in enumerate(frames):
            if not np.isfinite(raw_lev[pos]):
                continue
            k += 1
            if not keep[pos]:
                dropped.append({"file": str(p.relative_to(raw)), "level_raw_m": float(raw_lev[pos])})
                continue
            cls = (f"{q}_left" if dx[pos] > 0 else f"{q}_right") if q in asym else q
            rows.append((p, subjects.index(s), q, exp_id[cls], float(lev[pos]), pos, k))
        return rows

    def is_test_row(row) -> bool:
        if args.split == "every100":
            return args.test_offset <= row[5] % args.test_period < args.test_offset + args.test_length
        return row[1] == loso_sid

    def samples():
        """(row, is_test, vertices or None, reason)."""
        it = stream(func, [f for _, _, f in seq_list], workers=args.workers, chunk=1,
                    window=2 * max(args.workers, 1), desc="CoMA sequences" if one_pass else "CoMA pass 1 (levels)",
                    progress=progress)
        if one_pass:
            for (s, q, frames), (stats, stack) in zip(seq_list, it):
                for row in label(s, q, frames, stats):
                    yield row, is_test_row(row), stack[row[6]], None
            return
        rows = [row for (s, q, frames), (stats, _) in zip(seq_list, list(it)) for row in label(s, q, frames, stats)]
        if not rows:
            return
        subj = np.array([r[1] for r in rows])
        cls = np.array([r[3] for r in rows])
        starts = random_windows(subj * len(expressions) + cls, fraction=args.window_fraction,
                                length=args.window_length, seed=args.seed)
        is_test = np.zeros(len(rows), bool)
        for st in starts:
            is_test[st: st + args.window_length] = True
        split_info.update(seed=args.seed, length=args.window_length, fraction=args.window_fraction,
                          windows=[[subjects[rows[st][1]], rows[st][2], rows[st][0].name] for st in starts])
        read = functools.partial(_read_scaled, num_vertices=V_src, scale=scale, vmap=vmap)
        for row, test, (v, reason) in zip(rows, is_test, stream(read, [r[0] for r in rows], workers=args.workers,
                                                                 chunk=32, desc="CoMA pass 2 (shards)",
                                                                 progress=progress)):
            yield row, test, v, reason

    # ---- stream frames into shards
    neu_sum = np.zeros((S, V, 3))
    neu_n = np.zeros(S, dtype=np.int64)
    counts = {"train": 0, "test": 0}
    subj_in = {"train": set(), "test": set()}
    with ShardWriter(out, num_vertices=V, num_subjects=S, shard_size=args.shard_size,
                     overwrite=args.overwrite) as w:
        batch: dict[str, list] = {"train": [], "test": []}

        def flush(split):
            b = batch[split]
            if b:
                w.add(split, np.stack([x[0] for x in b]), subject=[x[1] for x in b],
                      expression=[x[2] for x in b], level=[x[3] for x in b], is_neutral=[x[4] for x in b])
                b.clear()

        for (p, s, q, c, lev, _, _), test, v, reason in samples():
            if v is None:
                bad.report(p, reason)
                continue
            split = "test" if test else "train"
            neutral = lev <= args.neutral_threshold
            if neutral:
                neu_sum[s] += v
                neu_n[s] += 1
            batch[split].append((v, s, c, lev, neutral))
            counts[split] += 1
            subj_in[split].add(s)
            if len(batch[split]) >= 64:
                flush(split)
        flush("train")
        flush("test")
        if counts["train"] == 0 or counts["test"] == 0:
            raise RuntimeError(f"{raw}: split {args.split!r} gives {counts} samples; need both train and test "
                               f"(sequences too short for --test-period/--test-length?)")
        # --neutral-leakage: the test neutral GT averaged over train AND test frames (the reference)
        neutral = {"test": mean_per_subject(neu_sum, neu_n)} if args.neutral_leakage else {}
        for split in ("train", "test"):
            nm = neutral.get(split, w.neutral_means(split))
            missing = [subjects[i] for i in sorted(subj_in[split]) if np.isnan(nm[i]).any()]
            if missing:
                print(f"warning: {split} split has no neutral frames (level <= {args.neutral_threshold}) "
                      f"for {missing}; their neutral ground truth is NaN", file=sys.stderr)
        meta = {
            "dataset": "coma",
            "protocol": protocol,
            "seed": args.seed,
            "num_triangles": int(len(triangles) if vmap is None else len(dec_tris)),
            "units": units(args.mm_per_unit, f"CoMA metres * {1000.0 / args.mm_per_unit:g} "
                                             f"(metres / {args.mm_per_unit / 1000:g}); mm = stored * {args.mm_per_unit:g}"),
            "subjects": subjects,
            "expressions": expressions,
            "source": str(raw.absolute()),
            "options": options_dict(args),
            "skipped": bad.items,
            "split": split_info,
            "dropped_outliers": dropped,
            "neutral_gt": ("test neutral from train+test frames (reference leakage)" if args.neutral_leakage
                           else "per split, from that split's frames only"),
            "num_raw_files": nframes,
        }
        arrays = {"triangles": triangles.astype(np.int32),
                  "template": (v0.astype(np.float64) * scale).astype(np.float32),
                  "vertex_index_map": np.arange(V, dtype=np.int64)}
        if vmap is not None:
            meta["decimation"] = decimation
            arrays.update(triangles=dec_tris, template=arrays["template"][vmap], vertex_index_map=vmap)
        path = w.finish(meta=meta, arrays=arrays, neutral=neutral)
    finish_message(path, counts, bad)
    return path

