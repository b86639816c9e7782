"""Shared machinery of the real data set readers (CoMA, BU-3DFE, FaceScape, custom).

- :func:`add_common_arguments`: ``--raw --out --seed --overwrite --skip-bad --workers --shard-size``.
- :func:`stream`: read files on all cores with **bounded memory** (a fixed window of in-flight
  chunks; results come back in input order), with a tqdm progress bar.
- :class:`BadFiles`: collects unreadable / wrong-vertex-count / NaN / wrong-topology files; without
  ``--skip-bad`` the first one stops preparation with :class:`BadFileError` naming it.
- :func:`kabsch`, :func:`rigid_align`: rotation + translation (no scale, no reflection).
- splits: :func:`window_test_mask` (k of every n frames), :func:`random_windows`,
  :func:`subject_split` (seeded, with forced test subjects), :func:`kfold_subjects`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from facedis.prep.meshio import MeshReadError, read_mesh

# ---------------------------------------------------------------------------- arguments


def _has_option(parser: argparse.ArgumentParser, opt: str) -> bool:
    return opt in parser._option_string_actions  # noqa: SLF001 (no public API for this)


def add_common_arguments(parser: argparse.ArgumentParser, *, default_workers: int | None = None) -> None:
    """Options every reader takes. Options the CLI already defined are left alone."""
    opts = [
        ("--raw", dict(required=True, type=Path, help="raw data set directory")),
        ("--out", dict(required=True, type=Path, help="output data set directory")),
        ("--seed", dict(type=int, default=0, help="seed of every random choice (splits)")),
        ("--overwrite", dict(action="store_true", help="replace an existing output directory")),
        ("--skip-bad", dict(action="store_true",
                            help="skip unreadable/mismatched/NaN files (recorded in meta.json 'skipped') "
                                 "instead of stopping at the first one")),
        ("--workers", dict(type=int, default=default_workers or os.cpu_count() or 1,
                           help="reader processes (default: all cores)")),
        ("--shard-size", dict(type=int, default=2048, help="samples per HDF5 shard")),
        ("--progress", dict(type=int, default=1, choices=[0, 1], help="show tqdm progress bars")),
    ]
    for opt, kw in opts:
        if not _has_option(parser, opt):
            parser.add_argument(opt, **kw)


def options_dict(args: argparse.Namespace) -> dict:
    """JSON-safe copy of the preparation arguments (recorded in meta.json ``options``)."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if callable(v):
            continue
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        try:
            json.dumps(v)
        except TypeError:
            v = repr(v)
        out[k] = v
    return out


def units(mm_per_unit: float, note: str) -> dict:
    return {"mm_per_unit": float(mm_per_unit), "stored_per_metre": 1000.0 / float(mm_per_unit), "note": note}


def int_list(text: str) -> list[int]:
    """Parse ``"1,2,3"`` (also spaces) into ints; empty string -> []."""
    return [int(t) for t in text.replace(",", " ").split()]


# ---------------------------------------------------------------------------- bad files


class BadFileError(RuntimeError):
    """A raw file is unreadable or inconsistent (the message names it)."""


@dataclass
class BadFiles:
    skip: bool
    items: list = None

    def __post_init__(self):
        self.items = []

    def report(self, path, reason: str) -> None:
        """Record a bad file; raises :class:`BadFileError` unless skipping."""
        if not self.skip:
            raise BadFileError(f"{path}: {reason}\n(pass --skip-bad to skip bad files and record them in "
                               f"meta.json 'skipped')")
        self.items.append({"file": str(path), "reason": reason})

    def summary(self) -> str:
        if not self.items:
            return "no bad files"
        kinds = Counter(i["reason"].split(" (")[0].split(":")[0] for i in self.items)
        lines = [f"skipped {len(self.items)} bad file(s):"] + [f"  {n} x {k}" for k, n in kinds.most_common()]
        lines += [f"  {i['file']}: {i['reason']}" for i in self.items[:20]]
        if len(self.items) > 20:
            lines.append(f"  ... and {len(self.items) - 20} more (see meta.json 'skipped')")
        return "\n".join(lines)

    def print_summary(self) -> None:
        print(self.summary(), file=sys.stderr)


def check_vertices(v: np.ndarray, num_vertices: int | None) -> str | None:
    """Reason why ``v`` is unusable, or None."""
    if num_vertices and v.shape[0] != num_vertices:
        return f"wrong vertex count ({v.shape[0]}, expected {num_vertices})"
    if not np.isfinite(v).all():
        return f"NaN/inf coordinates ({int((~np.isfinite(v)).any(1).sum())} vertices)"
    return None


def load_checked(path, num_vertices: int | None = None, triangles: np.ndarray | None = None):
    """Read a mesh and check it. Returns ``(vertices float32 or None, reason or None)``."""
    try:
        v, f = read_mesh(path, faces=triangles is not None)
    except MeshReadError as e:
        msg = str(e)
        prefix = f"{path}: "
        return None, "unreadable (" + (msg[len(prefix):] if msg.startswith(prefix) else msg) + ")"
    except Exception as e:  # noqa: BLE001 - anything else is still "unreadable", named
        return None, f"unreadable ({type(e).__name__}: {e})"
    reason = check_vertices(v, num_vertices)
    if reason is None and triangles is not None and (f.shape != triangles.shape or not np.array_equal(f, triangles)):
        reason = (f"topology differs from the reference mesh ({len(f)} triangles vs {len(triangles)}"
                  + (", same count but different indices" if f.shape == triangles.shape else "") + ")")
    return (v if reason is None else None), reason


# ---------------------------------------------------------------------------- parallel streaming


def _run_chunk(func, chunk):
    return [func(x) for x in chunk]


def stream(func: Callable[[Any], Any], items: Sequence, *, workers: int = 1, chunk: int = 16,
           window: int | None = None, desc: str = "", progress: bool = True) -> Iterator[Any]:
    """Yield ``func(item)`` for every item, in order, computed on ``workers`` processes.

    Memory is bounded: at most ``window`` chunks (default ``4 * workers``) are in flight or
    waiting, so results are never accumulated faster than the caller consumes them.
    ``func`` must be picklable (a module-level function or a ``functools.partial`` of one).
    """
    items = list(items)
    bar = _progress(len(items), desc, progress)
    try:
        if workers <= 1 or len(items) <= chunk:
            for x in items:
                r = func(x)
                bar.update(1)
                yield r
            return
        chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        window = window or 4 * workers
        ctx = _mp_context()
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            pending: deque = deque()
            try:
                it = iter(chunks)
                for c in it:
                    pending.append(ex.submit(_run_chunk, func, c))
                    if len(pending) >= window:
                        break
                while pending:
                    res = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(ex.submit(_run_chunk, func, nxt))
                    for r in res:
                        bar.update(1)
                        yield r
            finally:  # the consumer stopped early (e.g. at a bad file): drop the queued work
                for f in pending:
                    f.cancel()
    finally:
        bar.close()


def _mp_context():
    import multiprocessing as mp

    # fork is fastest and safe here (workers only read files with numpy); fall back elsewhere
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform.startswith("linux") else "spawn")


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="mesh", disable=not enabled, dynamic_ncols=True,
                    mininterval=0.5, file=sys.stderr)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n): ...
            def close(self): ...
        return _Null()


# ---------------------------------------------------------------------------- rigid alignment


def mean_per_subject(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(S,V,3) per-subject sums and (S,) counts -> float32 means, NaN rows where a count is 0."""
    out = np.full(sums.shape, np.nan, dtype=np.float32)
    has = counts > 0
    out[has] = (sums[has] / counts[has, None, None]).astype(np.float32)
    return out


def kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``R`` (3,3) and translation ``t`` (3,) minimising ``||src @ R.T + t - dst||``.

    Proper rotation only (det +1; a reflection is corrected), no scaling.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    cs, cd = src.mean(0), dst.mean(0)
    H = (src - cs).T @ (dst - cd)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T)) or 1.0
    D = np.diag([1.0, 1.0, d])
    R = Vt.T @ D @ U.T
    t = cd - cs @ R.T
    return R, t


def rigid_align(vertices: np.ndarray, target: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Align ``vertices`` to ``target`` with Kabsch over the vertices ``idx`` (all if None).

    ``target`` may hold only the ``idx`` rows (shape (len(idx),3)) or all rows.
    """
    v = np.asarray(vertices, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    if idx is None:
        R, t = kabsch(v, tgt)
    else:
        R, t = kabsch(v[idx], tgt if len(tgt) == len(idx) and len(tgt) != len(v) else tgt[idx])
    return (v @ R.T + t).astype(np.float32)


# ---------------------------------------------------------------------------- splits


def window_test_mask(n: int, period: int = 100, length: int = 10, offset: int = 0) -> np.ndarray:
    """Deterministic "``length`` frames of every ``period``": position p is test iff
    ``offset <= p % period < offset + length``."""
    if not (0 < length <= period) or not (0 <= offset <= period - length):
        raise ValueError(f"need 0 < length <= period and 0 <= offset <= period - length "
                         f"(period {period}, length {length}, offset {offset})")
    p = np.arange(n) % period
    return (p >= offset) & (p < offset + length)


def random_windows(group_ids: np.ndarray, *, fraction: float = 0.01, length: int = 10, seed: int = 0,
                   min_gap: int = 10) -> np.ndarray:
    """The reference code's CoMA split, seeded: ``int(fraction * n)`` windows of ``length``
    consecutive items that stay inside one group (subject + expression class), no two window starts
    within ``min_gap`` of each other. ``group_ids`` (n,) labels items in their global order.
    Returns the sorted window start positions."""
    g = np.asarray(group_ids)
    n = len(g)
    k = int(fraction * n)
    if n < length or k == 0:
        return np.zeros(0, dtype=np.int64)
    # s is a valid start iff g[s] == g[s + length - 1] and the group is contiguous there
    same = np.ones(n - length + 1, dtype=bool)
    for j in range(1, length):
        same &= g[j: n - length + 1 + j] == g[: n - length + 1]
    valid = np.flatnonzero(same)
    rng = np.random.default_rng(seed)
    order = rng.permutation(valid)
    taken: list[int] = []
    blocked = np.zeros(n, dtype=bool)
    for s in order:
        if blocked[s]:
            continue
        taken.append(int(s))
        blocked[max(0, s - min_gap): s + min_gap + 1] = True
        if len(taken) == k:
            break
    return np.array(sorted(taken), dtype=np.int64)


def subject_split(subjects: Sequence, *, test_fraction: float = 0.3, seed: int = 0,
                  forced_test: Iterable = ()) -> tuple[list, list]:
    """Seeded unseen-identity split of subject names. ``forced_test`` subjects (when present) are
    always in test; the test set has ``int(test_fraction * n)`` subjects (at least the forced ones,
    at least one, and at least one subject is left for training)."""
    subs = sorted(subjects, key=_natural_key)
    n = len(subs)
    if n < 2:
        raise ValueError(f"need at least 2 subjects for an unseen-identity split, found {n}")
    forced = [s for s in subs if s in set(forced_test)]
    k = min(max(int(test_fraction * n), len(forced), 1), n - 1)
    rest = [s for s in subs if s not in set(forced)]
    rng = np.random.default_rng(seed)
    extra = [rest[i] for i in rng.permutation(len(rest))[: max(0, k - len(forced))]]
    test = set(forced[:k]) | set(extra)
    return [s for s in subs if s not in test], [s for s in subs if s in test]


def kfold_subjects(subjects: Sequence, *, k: int, fold: int, seed: int = 0) -> tuple[list, list]:
    """Seeded subject-level k-fold: returns (train, test) subject names of fold ``fold``."""
    subs = sorted(subjects, key=_natural_key)
    if not (2 <= k <= len(subs)):
        raise ValueError(f"k-fold needs 2 <= k <= #subjects ({len(subs)}), got k={k}")
    if not (0 <= fold < k):
        raise ValueError(f"--fold must be in [0, {k}), got {fold}")
    perm = np.random.default_rng(seed).permutation(len(subs))
    test = {subs[i] for i in np.array_split(perm, k)[fold]}
    return [s for s in subs if s not in test], [s for s in subs if s in test]


def loso(subjects: Sequence, fold: int) -> tuple[list, list]:
    """Leave-one-subject-out: subject number ``fold`` (in natural sorted order) is the test set."""
    subs = sorted(subjects, key=_natural_key)
    if not (0 <= fold < len(subs)):
        raise ValueError(f"--fold must be in [0, {len(subs)}) for leave-one-subject-out, got {fold}")
    return [s for i, s in enumerate(subs) if i != fold], [subs[fold]]


def _natural_key(s):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


natural_key = _natural_key


def finish_message(out: Path, counts: dict, bad: BadFiles) -> None:
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"wrote {out} ({parts}); {bad.summary() if bad.items else 'no bad files'}", file=sys.stderr)


# ---------------------------------------------------------------------------- decimation

#: Version tag of the scripted decimation recorded in meta.json ``decimation``.
DECIMATION_VERSION = "facedis-decimate/1"
DECIMATION_METHOD = ("quadric edge collapse (fast_simplification) + nearest-original-vertex snap, "
                     "deduplicated, cleaned (facedis.prep.mesh_ops.decimate)")
_QUALITY_KEYS = ("ok", "duplicate_vertices", "unreferenced_vertices", "degenerate_triangles",
                 "zero_area_triangles", "duplicate_triangles", "non_manifold_edges")


def add_decimation_argument(parser: argparse.ArgumentParser) -> None:
    """``--vertices N`` (default: no decimation) for the readers of one fixed topology."""
    parser.add_argument("--vertices", type=int, default=None,
                        help="decimate the reference mesh to about N vertices (scripted quadric decimation "
                             "snapped to original vertices, as for FaceScape; the map is stored in meta.h5 "
                             "vertex_index_map). Default: keep every vertex")


def decimation_record(vmap: np.ndarray, tris: np.ndarray, template_vertices: np.ndarray, *, method: str,
                      template: str, template_sha256: str, source_vertices: int, extra: dict | None = None) -> dict:
    """meta.json ``decimation``: version, method, template file and sha256, sizes, map sha256, mesh quality."""
    from facedis.prep import mesh_ops

    vmap = np.asarray(vmap, dtype=np.int64)
    tris = np.asarray(tris, dtype=np.int32)
    if len(np.unique(vmap)) != len(vmap):
        raise RuntimeError("decimation index map has repeated vertices")
    quality = mesh_ops.mesh_quality(np.asarray(template_vertices)[vmap], tris)
    return {
        "version": DECIMATION_VERSION, "method": method, **(extra or {}),
        "template": template, "template_sha256": template_sha256,
        "source_vertices": int(source_vertices), "num_vertices": int(len(vmap)), "num_triangles": int(len(tris)),
        "map_sha256": hashlib.sha256(vmap.astype("<i8").tobytes() + tris.astype("<i4").tobytes()).hexdigest(),
        "quality": {k: quality[k] for k in _QUALITY_KEYS if k in quality},
    }


def decimate_reference(path: Path, vertices: np.ndarray, triangles: np.ndarray, target_vertices: int,
                       root: Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decimate the reference mesh ``path`` (its ``vertices``, ``triangles``) to ``target_vertices``
    with :func:`facedis.prep.mesh_ops.decimate`. Returns (vertex_index_map (V',) int64 into the source
    topology, triangles (F',3) int32 over the kept vertices, meta.json ``decimation`` record)."""
    from facedis.prep import mesh_ops

    if target_vertices < 4:
        raise ValueError(f"--vertices {target_vertices}: need at least 4")
    print(f"decimating {path} ({len(vertices)} v / {len(triangles)} f) to {target_vertices} vertices ...",
          file=sys.stderr)
    vmap, tris = mesh_ops.decimate(vertices, triangles, target_vertices=int(target_vertices))
    vmap, tris = np.asarray(vmap, dtype=np.int64), np.asarray(tris, dtype=np.int32)
    path = Path(path)
    try:
        name = str(path.relative_to(root)) if root is not None else str(path)
    except ValueError:
        name = str(path)
    rec = decimation_record(vmap, tris, vertices, method=DECIMATION_METHOD, template=name,
                            template_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                            source_vertices=len(vertices), extra={"target_vertices": int(target_vertices)})
    return vmap, tris, rec
