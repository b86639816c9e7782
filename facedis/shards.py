"""The on-disk data set format: HDF5 shards plus metadata (docs/architecture.md, docs/data-format.md).

Writing is atomic at the level of the whole data set: everything goes to a hidden temporary
directory next to the destination, which is renamed into place only once every shard and the
metadata are complete. A crashed preparation leaves a ``.<name>.tmp-<pid>`` directory, never a
half data set that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT = "facedis-shards/1"
SAMPLE_FIELDS = ("vertices", "subject", "expression", "level", "is_neutral")
_DTYPES = {
    "subject": np.int32,
    "expression": np.int32,
    "level": np.float32,
    "is_neutral": np.bool_,
}


class DatasetError(RuntimeError):
    """A prepared data set is missing, incomplete or corrupt (the message names the file)."""


def facedis_version() -> str:
    try:
        from importlib.metadata import version

        return version("facedis")
    except Exception:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_h5_array(f: h5py.File, name: str, arr: np.ndarray, chunks=None) -> None:
    f.create_dataset(name, data=arr, chunks=chunks, track_times=False)


class ShardWriter:
    """Accumulate samples per split and write ``<split>-NNNNN.h5`` shards of ``shard_size`` samples.

    Use as a context manager::

        with ShardWriter(out, num_vertices=V) as w:
            w.add("train", vertices, subject=..., expression=..., level=..., is_neutral=...)
            w.finish(meta={...}, arrays={"triangles": tris, ...}, neutral={"train": (S,V,3), ...})

    ``finish`` computes the train-split mean face, fills ``neutral/<split>`` from the samples
    flagged ``is_neutral`` for splits without an explicit array, hashes everything and renames the
    temporary directory into place. Leaving the ``with`` block without ``finish`` (an exception)
    deletes the temporary directory.
    """

    def __init__(self, out_dir: str | os.PathLike, *, num_vertices: int, num_subjects: int,
                 shard_size: int = 2048, overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.num_vertices = int(num_vertices)
        self.num_subjects = int(num_subjects)
        self.shard_size = int(shard_size)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self._buffers: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self._buffered: dict[str, int] = defaultdict(int)
        self._shards: dict[str, list[str]] = defaultdict(list)
        self._counts: dict[str, int] = defaultdict(int)
        self._subjects: dict[str, set] = defaultdict(set)
        self._sum: dict[str, np.ndarray] = {}
        self._neutral_sum: dict[str, np.ndarray] = {}
        self._neutral_n: dict[str, np.ndarray] = {}
        self._finished = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # ------------------------------------------------------------------ writing
    def add(self, split: str, vertices: np.ndarray, *, subject, expression, level, is_neutral) -> None:
        """Append ``n`` samples (``vertices`` (n,V,3) or (V,3)) to ``split``."""
        if not split.isidentifier():
            raise ValueError(f"split name {split!r} must be a plain identifier")
        v = np.asarray(vertices, dtype=np.float32)
        if v.ndim == 2:
            v = v[None]
        n = v.shape[0]
        if v.shape[1:] != (self.num_vertices, 3):
            raise ValueError(f"vertices shape {v.shape} does not match (n, {self.num_vertices}, 3)")
        if not np.isfinite(v).all():
            raise ValueError("vertices contain NaN or inf")
        cols = {
            "subject": np.broadcast_to(np.asarray(subject, dtype=np.int32), (n,)),
            "expression": np.broadcast_to(np.asarray(expression, dtype=np.int32), (n,)),
            "level": np.broadcast_to(np.asarray(level, dtype=np.float32), (n,)),
            "is_neutral": np.broadcast_to(np.asarray(is_neutral, dtype=np.bool_), (n,)),
        }
        if cols["subject"].min(initial=0) < 0 or cols["subject"].max(initial=0) >= self.num_subjects:
            raise ValueError(f"subject ids must be in [0, {self.num_subjects})")
        buf = self._buffers[split]
        buf["vertices"].append(v)
        for k, c in cols.items():
            buf[k].append(np.array(c))
        self._buffered[split] += n
        self._counts[split] += n
        self._subjects[split].update(int(s) for s in np.unique(cols["subject"]))
        v64 = v.astype(np.float64)
        if split not in self._sum:
            V = self.num_vertices
            self._sum[split] = np.zeros((V, 3))
            self._neutral_sum[split] = np.zeros((self.num_subjects, V, 3))
            self._neutral_n[split] = np.zeros(self.num_subjects, dtype=np.int64)
        self._sum[split] += v64.sum(0)
        neu = cols["is_neutral"]
        if neu.any():
            np.add.at(self._neutral_sum[split], cols["subject"][neu], v64[neu])
            np.add.at(self._neutral_n[split], cols["subject"][neu], 1)
        while self._buffered[split] >= self.shard_size:
            self._flush(split, self.shard_size)

    def _flush(self, split: str, count: int | None = None) -> None:
        buf = self._buffers[split]
        if not buf["vertices"]:
            return
        cat = {k: np.concatenate(buf[k]) for k in SAMPLE_FIELDS}
        count = len(cat["vertices"]) if count is None else count
        name = f"{split}-{len(self._shards[split]):05d}.h5"
        with h5py.File(self.tmp_dir / name, "w", libver="v110") as f:
            _write_h5_array(f, "vertices", cat["vertices"][:count], chunks=(1, self.num_vertices, 3))
            for k in SAMPLE_FIELDS[1:]:
                _write_h5_array(f, k, cat[k][:count].astype(_DTYPES[k]))
        self._shards[split].append(name)
        rest = {k: cat[k][count:] for k in SAMPLE_FIELDS}
        self._buffers[split] = defaultdict(list, {k: [v] for k, v in rest.items()} if len(rest["vertices"]) else {})
        self._buffered[split] = len(rest["vertices"])

    def neutral_means(self, split: str) -> np.ndarray:
        """Per-subject mean of the samples flagged ``is_neutral`` in ``split`` (NaN where none)."""
        n = self._neutral_n[split]
        out = np.full((self.num_subjects, self.num_vertices, 3), np.nan, dtype=np.float32)
        has = n > 0
        out[has] = (self._neutral_sum[split][has] / n[has, None, None]).astype(np.float32)
        return out

    def finish(self, *, meta: dict[str, Any], arrays: dict[str, np.ndarray],
               neutral: dict[str, np.ndarray] | None = None) -> Path:
        """Write ``meta.h5``/``meta.json`` and move the data set into place. Returns its path."""
        for split in list(self._buffers):
            self._flush(split)
        if "train" not in self._counts:
            raise ValueError("a data set needs a 'train' split")
        for key in ("subjects", "expressions", "units"):
            if key not in meta:
                raise ValueError(f"meta needs {key!r}")
        if len(meta["subjects"]) != self.num_subjects:
            raise ValueError(f"meta['subjects'] has {len(meta['subjects'])} names, writer has {self.num_subjects} subjects")
        neutral = dict(neutral or {})
        for split in self._counts:
            neutral.setdefault(split, self.neutral_means(split))
        mean_face = (self._sum["train"] / self._counts["train"]).astype(np.float32)
        with h5py.File(self.tmp_dir / "meta.h5", "w", libver="v110") as f:
            _write_h5_array(f, "mean_face", mean_face)
            for k, a in sorted(arrays.items()):
                _write_h5_array(f, k, np.asarray(a))
            for split, a in sorted(neutral.items()):
                a = np.asarray(a, dtype=np.float32)
                if a.shape != (self.num_subjects, self.num_vertices, 3):
                    raise ValueError(f"neutral[{split!r}] has shape {a.shape}")
                _write_h5_array(f, f"neutral/{split}", a)
        files = sorted(n for names in self._shards.values() for n in names) + ["meta.h5"]
        hashes = {n: sha256_file(self.tmp_dir / n) for n in files}
        content = hashlib.sha256("".join(f"{n}:{hashes[n]}\n" for n in files).encode()).hexdigest()
        info = {
            "format": FORMAT,
            "facedis_version": facedis_version(),
            **meta,
            "num_vertices": self.num_vertices,
            "splits": {
                s: {"num_samples": self._counts[s], "shards": self._shards[s],
                    "subjects": sorted(self._subjects[s])}
                for s in sorted(self._counts)
            },
            "shard_sha256": hashes,
            "content_hash": content,
        }
        (self.tmp_dir / "meta.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if self.out_dir.exists():
            trash = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.replace(self.out_dir, trash)
            os.replace(self.tmp_dir, self.out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp_dir, self.out_dir)
        self._finished = True
        return self.out_dir


# ---------------------------------------------------------------------- reading


def read_meta(root: str | os.PathLike) -> dict:
    """Read ``meta.json`` of a prepared data set, with a clear error when it is not one."""
    root = Path(root)
    path = root / "meta.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: data set directory does not exist (prepare it with facedis prepare)")
    if not path.is_file():
        tmp = sorted(root.parent.glob(f".{root.name}.tmp-*"))
        hint = f" (found an unfinished preparation {tmp[0]})" if tmp else ""
        raise DatasetError(f"{path}: missing; {root} is not a complete facedis data set{hint}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_arrays(root: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of ``meta.h5`` (``neutral/<split>`` keys included)."""
    path = Path(root) / "meta.h5"
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    out[name] = obj[()]
            f.visititems(visit)
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read as HDF5 ({e})") from None
    return out


def check_dataset(root: str | os.PathLike, verify_hashes: bool = True) -> dict:
    """Validate a prepared data set; return a summary or raise DatasetError naming the bad file."""
    root = Path(root)
    meta = read_meta(root)
    V = int(meta["num_vertices"])
    problems = []
    for name, digest in sorted(meta["shard_sha256"].items()):
        p = root / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif verify_hashes and sha256_file(p) != digest:
            problems.append(f"{p}: content does not match its recorded sha256 (truncated or modified)")
    if problems:
        raise DatasetError("data set check failed:\n  " + "\n  ".join(problems))
    arrays = read_arrays(root)
    for key in ("mean_face", "triangles"):
        if key not in arrays:
            raise DatasetError(f"{root / 'meta.h5'}: missing array {key!r}")
    if arrays["mean_face"].shape != (V, 3):
        raise DatasetError(f"{root / 'meta.h5'}: mean_face shape {arrays['mean_face'].shape} != ({V}, 3)")
    tris = arrays["triangles"]
    if tris.min() < 0 or tris.max() >= V:
        raise DatasetError(f"{root / 'meta.h5'}: triangle indices outside [0, {V})")
    summary: dict[str, Any] = {"root": str(root), "dataset": meta.get("dataset"), "protocol": meta.get("protocol"),
                               "num_vertices": V, "num_triangles": int(len(tris)),
                               "content_hash": meta["content_hash"], "splits": {}}
    nsub = len(meta.get("subjects", []))
    for split, s in meta["splits"].items():
        n = 0
        subj = set()
        for name in s["shards"]:
            p = root / name
            try:
                with h5py.File(p, "r") as f:
                    missing = [k for k in SAMPLE_FIELDS if k not in f]
                    if missing:
                        raise DatasetError(f"{p}: missing datasets {missing}")
                    m = f["vertices"].shape[0]
                    if f["vertices"].shape[1:] != (V, 3):
                        raise DatasetError(f"{p}: vertices shape {f['vertices'].shape}, expected (n, {V}, 3)")
                    for k in SAMPLE_FIELDS[1:]:
                        if f[k].shape != (m,):
                            raise DatasetError(f"{p}: {k} has shape {f[k].shape}, expected ({m},)")
                    sub = f["subject"][()]
                    if len(sub) and (sub.min() < 0 or sub.max() >= nsub):
                        raise DatasetError(f"{p}: subject ids outside the {nsub} subjects of meta.json")
                    subj.update(np.unique(sub).tolist())
                    n += m
            except OSError as e:
                raise DatasetError(f"{p}: cannot be read as HDF5 ({e})") from None
        if n != s["num_samples"]:
            raise DatasetError(f"{root}: split {split!r} has {n} samples on disk, meta.json says {s['num_samples']}")
        neu = arrays.get(f"neutral/{split}")
        missing_neutral = 0 if neu is None else int(sum(np.isnan(neu[i]).any() for i in subj))
        summary["splits"][split] = {"samples": n, "subjects": len(subj), "shards": len(s["shards"]),
                                    "subjects_without_neutral": missing_neutral}
    return summary
