"""Shared helpers of the applications: read a whole split of a prepared data set, find a run's
data set, pick samples.

A split is read straight from its shards (the format in ``docs/architecture.md``), in shard
order, so sample indices are stable and everything downstream is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from facedis.shards import read_arrays, read_meta


@dataclass
class Split:
    """All samples of one split, in stored units (n = number of samples, S = number of subjects)."""

    root: Path
    name: str
    vertices: np.ndarray  # (n, V, 3) float32
    subject: np.ndarray  # (n,) int64
    expression: np.ndarray  # (n,) int64
    level: np.ndarray  # (n,) float32
    is_neutral: np.ndarray  # (n,) bool
    neutral_gt: np.ndarray  # (S, V, 3) float32, NaN rows for subjects without one in this split
    triangles: np.ndarray  # (F, 3)
    mean_face: np.ndarray  # (V, 3) train mean
    mm_per_unit: float
    subjects: list
    expressions: list
    content_hash: str

    def __len__(self) -> int:
        return len(self.vertices)

    def neutral_of(self, idx) -> np.ndarray:
        """Ground-truth neutral of the subjects of samples ``idx`` -> (len(idx), V, 3)."""
        return self.neutral_gt[self.subject[np.asarray(idx)]]

    def subject_name(self, s: int) -> str:
        return str(self.subjects[s]) if s < len(self.subjects) else str(s)

    def expression_name(self, e: int) -> str:
        return str(self.expressions[e]) if e < len(self.expressions) else str(e)


def load_split(root, split: str = "test", max_samples: Optional[int] = None) -> Split:
    """Read a split of a prepared data set into memory."""
    root = Path(root)
    meta = read_meta(root)
    if split not in meta["splits"]:
        raise KeyError(f"{root}: no split {split!r}; splits: {sorted(meta['splits'])}")
    arrays = read_arrays(root)
    cols: dict[str, list] = {k: [] for k in ("vertices", "subject", "expression", "level", "is_neutral")}
    total = 0
    for name in meta["splits"][split]["shards"]:
        with h5py.File(root / name, "r") as f:
            for k in cols:
                cols[k].append(f[k][()])
            total += len(f["subject"])
        if max_samples is not None and total >= max_samples:
            break
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    if max_samples is not None:
        cat = {k: v[:max_samples] for k, v in cat.items()}
    S = len(meta.get("subjects", []))
    neutral = arrays.get(f"neutral/{split}")
    if neutral is None:
        neutral = np.full((max(S, int(cat["subject"].max()) + 1),) + cat["vertices"].shape[1:], np.nan, np.float32)
    return Split(
        root=root, name=split,
        vertices=cat["vertices"].astype(np.float32), subject=cat["subject"].astype(np.int64),
        expression=cat["expression"].astype(np.int64), level=cat["level"].astype(np.float32),
        is_neutral=cat["is_neutral"].astype(bool), neutral_gt=np.asarray(neutral, np.float32),
        triangles=np.asarray(arrays["triangles"], np.int64), mean_face=np.asarray(arrays["mean_face"], np.float32),
        mm_per_unit=float(meta["units"]["mm_per_unit"]), subjects=list(meta.get("subjects", [])),
        expressions=list(meta.get("expressions", [])), content_hash=str(meta.get("content_hash", "")),
    )


def run_data_root(run_dir, model=None) -> Optional[Path]:
    """The data set a run was trained on: the checkpoint's ``data_root``, else ``data.root`` of
    the run's ``config.yaml`` (tried relative to the working directory, then to the run's parent
    folders). None if it cannot be found (:func:`facedis.inference.find_data_root`)."""
    from facedis.inference import find_data_root

    return find_data_root(run_dir, model.meta if model is not None else None)


def check_same_data(model, split: Split) -> None:
    """Refuse a data set whose topology differs from the model's template."""
    if split.vertices.shape[1] != model.num_vertices:
        raise ValueError(f"{split.root}: {split.vertices.shape[1]} vertices, the model has {model.num_vertices}")
    if split.triangles.shape != model.triangles.shape or not np.array_equal(split.triangles, model.triangles):
        raise ValueError(f"{split.root}: its triangles differ from the model's training template")
