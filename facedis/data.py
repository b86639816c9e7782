"""Data loading for prepared data sets (docs/architecture.md "Data loading", docs/data-format.md).

Public API::

    load_info(root) -> DatasetInfo
    FaceDataset(root, split, in_memory="auto", with_partner=True, seed=0)   # training items
    PairDataset(root, split, seed=0, in_memory="auto")                      # D pretraining pairs
    make_train_loader(info_or_root, split, batch_size, shuffle=True, seed=0, num_workers=0,
                      drop_last=True, in_memory="auto", with_partner=True, pair=False,
                      reuse_buffers=False, **loader_kwargs)
    SlotLoader(dataset, max_batch=..., num_workers=..., **loader_kwargs)  # workers write into reused shared slots
    collate_batch(batch) -> dict       # the collate_fn for the batched fast path

Randomness (partners, pair labels) is a pure function of ``(seed, epoch, index)``: call
``dataset.set_epoch(epoch)`` before each epoch (it reaches running and persistent workers through
shared memory), and a resumed run draws exactly the same partners. Item order is the sampler's
business (``DistributedSampler``, accelerate's sharding); items do not depend on which process or
worker reads them.

Fast path: with ``in_memory`` the whole split is one ``(N,V,3)`` float32 tensor (shared with
fork/spawn workers, not copied), and ``dataset[list_of_indices]`` / ``__getitems__`` gather a
whole batch with ``index_select``. ``collate_batch`` passes such a batch through unchanged and
falls back to ``default_collate`` otherwise, so the datasets also work with a plain DataLoader.
Without ``in_memory`` the HDF5 shards are opened lazily in each process (re-opened when the pid
changes) and read one mesh at a time: in h5py a loop of single-mesh reads is about 15x faster
than one fancy-indexed read of a sorted index list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from facedis.shards import DatasetError, read_arrays, read_meta

__all__ = ["DatasetInfo", "load_info", "FaceDataset", "PairDataset", "SlotLoader", "DevicePrefetcher", "make_train_loader",
           "collate_batch"]


# ---------------------------------------------------------------------------------------- info


@dataclass
class DatasetInfo:
    root: Path
    meta: dict
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def num_vertices(self) -> int:
        return int(self.meta["num_vertices"])

    @property
    def triangles(self) -> np.ndarray:
        return self.arrays["triangles"].astype(np.int32)

    @property
    def mean_face(self) -> np.ndarray:
        return self.arrays["mean_face"]

    @property
    def template(self) -> np.ndarray | None:
        return self.arrays.get("template")

    @property
    def vertex_index_map(self) -> np.ndarray | None:
        return self.arrays.get("vertex_index_map")

    @property
    def landmarks(self) -> np.ndarray | None:
        return self.arrays.get("landmarks")

    @property
    def mm_per_unit(self) -> float:
        return float(self.meta["units"]["mm_per_unit"])

    @property
    def subjects(self) -> list[str]:
        return list(self.meta["subjects"])

    @property
    def expressions(self) -> list[str]:
        return list(self.meta["expressions"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    @property
    def splits(self) -> list[str]:
        return sorted(self.meta["splits"])

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["num_samples"])

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / n for n in self._split(split)["shards"]]

    def neutral(self, split: str) -> np.ndarray:
        """(S,V,3) per-subject neutral ground truth as seen by ``split`` (NaN rows: none)."""
        key = f"neutral/{split}"
        if key not in self.arrays:
            raise DatasetError(f"{self.root / 'meta.h5'}: no neutral ground truth for split {split!r}")
        return self.arrays[key]

    def _split(self, split: str) -> dict:
        try:
            return self.meta["splits"][split]
        except KeyError:
            raise DatasetError(f"{self.root}: no split {split!r} (has {sorted(self.meta['splits'])})") from None


def load_info(root: str | os.PathLike) -> DatasetInfo:
    root = Path(root)
    return DatasetInfo(root=root, meta=read_meta(root), arrays=read_arrays(root))


# ---------------------------------------------------------------------------------------- randomness


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, epoch: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0,1): a pure function of (seed, epoch, stream, index)."""
    with np.errstate(over="ignore"):
        h = _splitmix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.zeros(1, np.uint64))
        h = _splitmix(h ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        h = _splitmix(h ^ np.uint64(stream))
        x = _splitmix(h ^ np.asarray(index, dtype=np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


# ---------------------------------------------------------------------------------------- datasets


class _LazyBatch(list):
    """A batch gathered in one go. ``collate_batch`` returns ``.batch`` unchanged; anything else
    (e.g. ``default_collate``) sees a list of per-item dicts, built on demand."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        super().__init__()
        self.batch = batch
        self._n = len(next(iter(batch.values())))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return {k: v[i] for k, v in self.batch.items()}

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def __reduce__(self):
        return (_LazyBatch, (self.batch,))


def collate_batch(batch):
    """collate_fn for FaceDataset/PairDataset: a pre-gathered batch passes through unchanged."""
    if isinstance(batch, _LazyBatch):
        return batch.batch
    if isinstance(batch, (dict, _SlotRef)):
        return batch
    return default_collate(batch)


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def _resolve_in_memory(in_memory, nbytes: int) -> bool:
    if in_memory in (True, "yes", "true", "on"):
        return True
    if in_memory in (False, "no", "false", "off"):
        return False
    if in_memory == "auto":
        return nbytes <= _available_bytes() // 4
    raise ValueError(f"in_memory must be 'auto', 'yes' or 'no' (or a bool), got {in_memory!r}")


class _SplitData:
    """Vertices of one split: an in-RAM tensor, or lazily opened HDF5 shards."""

    def __init__(self, info: DatasetInfo, split: str, in_memory):
        self.paths = info.shard_paths(split)
        self.V = info.num_vertices
        labels: dict[str, list] = {k: [] for k in ("subject", "expression", "level", "is_neutral")}
        sizes = []
        for p in self.paths:
            try:
                with h5py.File(p, "r") as f:
                    sizes.append(int(f["vertices"].shape[0]))
                    for k in labels:
                        labels[k].append(f[k][()])
            except (OSError, KeyError) as e:
                raise DatasetError(f"{p}: cannot be read ({e}); run `prepare.py check {info.root}`") from None
        self.n = int(sum(sizes))
        if self.n != info.num_samples(split):
            raise DatasetError(f"{info.root}: split {split!r} has {self.n} samples on disk, meta.json says "
                               f"{info.num_samples(split)}")
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cat = lambda k, dt: np.concatenate(labels[k]).astype(dt) if labels[k] else np.zeros(0, dt)  # noqa: E731
        self.subject = cat("subject", np.int64)
        self.expression = cat("expression", np.int64)
        self.level = cat("level", np.float32)
        self.is_neutral = cat("is_neutral", np.bool_)
        self.in_memory = _resolve_in_memory(in_memory, self.n * self.V * 3 * 4)
        self.vertices: torch.Tensor | None = None
        self._files: list[h5py.File] | None = None
        self._pid: int | None = None
        if self.in_memory:
            arr = np.empty((self.n, self.V, 3), dtype=np.float32)
            for p, a, b in zip(self.paths, self.offsets[:-1], self.offsets[1:]):
                with h5py.File(p, "r") as f:
                    if b > a:
                        f["vertices"].read_direct(arr, dest_sel=np.s_[a:b])
            self.vertices = torch.from_numpy(arr)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_files"] = None  # h5py handles cannot be pickled; reopened lazily in the new process
        d["_pid"] = None
        return d

    def _open(self) -> list[h5py.File]:
        if self._files is None or self._pid != os.getpid():
            self._files = [h5py.File(p, "r") for p in self.paths]
            self._pid = os.getpid()
        return self._files

    def gather(self, idx: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """(len(idx), V, 3) float32 tensor of the given sample indices (written into ``out`` if given)."""
        if out is None:
            out = torch.empty((len(idx), self.V, 3), dtype=torch.float32)
        if self.vertices is not None:
            # torch's index_select copies rows in parallel and is ~2-3x faster than np.take here
            torch.index_select(self.vertices, 0, torch.from_numpy(np.asarray(idx, dtype=np.int64)), out=out)
            return out
        files = self._open()
        o = out.numpy()
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for k, (i, s) in enumerate(zip(idx.tolist(), shard.tolist())):
            files[s]["vertices"].read_direct(o, source_sel=np.s_[i - self.offsets[s]], dest_sel=np.s_[k])
        return out


def _layout(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[list, int]:
    """Byte layout of named tensors packed into one buffer (64-byte aligned): ``[(name, offset,
    nbytes, shape, dtype)], total bytes``."""
    layout, total = [], 0
    for name, shape, dt in specs:
        shape = tuple(int(x) for x in shape)
        nbytes = int(np.prod(shape)) * dt.itemsize
        layout.append((name, total, nbytes, shape, dt))
        total += (nbytes + 63) // 64 * 64
    return layout, total


def _carve(buf: torch.Tensor, layout: list) -> dict[str, torch.Tensor]:
    return {name: buf[off:off + nbytes].view(dt).view(shape) for name, off, nbytes, shape, dt in layout}


def _new_buffer(total: int) -> torch.Tensor:
    """A uint8 buffer; in a DataLoader worker it lives in shared memory, so the whole batch crosses
    to the main process as a single file descriptor (one shared storage per tensor costs ~1 ms
    each to pass)."""
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(max(total, 1), device="cpu")
        return torch.empty(0, dtype=torch.uint8).new(storage)[:total]
    return torch.empty(total, dtype=torch.uint8)


class _SlotRef:
    """What a worker returns when the dataset writes batches into shared slots: which slot, and
    how the batch is laid out in it (a few hundred bytes instead of the batch)."""

    __slots__ = ("slot", "layout")

    def __init__(self, slot: int, layout: list):
        self.slot, self.layout = slot, layout

    def __reduce__(self):
        return (_SlotRef, (self.slot, self.layout))


class _Slots:
    """Batch buffers in shared memory, allocated in the main process before the workers start
    (fork inherits them, spawn receives them once) and reused batch after batch: a worker gathers
    straight into its next slot and sends only a :class:`_SlotRef`. No per-batch allocation,
    page faults or file-descriptor passing (with 2 workers on 2 cores those cost ~7x the gather).

    Worker ``w`` (of ``W``) owns slots ``[w*R, (w+1)*R)`` and uses them round-robin. DataLoader
    keeps at most ``prefetch_factor`` batches in flight per worker, so while the consumer holds
    the latest ``hold`` batches none of their slots is rewritten when
    ``R >= prefetch_factor + ceil((hold + 1) / W) + 1``."""

    def __init__(self, num_workers: int, prefetch_factor: int, nbytes: int, hold: int = 2):
        self.num_workers = int(num_workers)
        self.per_worker = int(prefetch_factor) + -(-(hold + 1) // self.num_workers) + 1
        self.nbytes = int(nbytes)
        n = self.num_workers * self.per_worker
        self.buffer = torch.empty((n, max(self.nbytes, 1)), dtype=torch.uint8).share_memory_()
        self._next = torch.zeros(self.num_workers, dtype=torch.int64).share_memory_()

    def claim(self) -> tuple[int, torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        w = info.id
        k = int(self._next[w])
        self._next[w] = k + 1
        slot = w * self.per_worker + k % self.per_worker
        return slot, self.buffer[slot]

    def reset(self) -> None:
        self._next.zero_()


class SlotLoader:
    """A DataLoader whose workers write batches into reused shared-memory slots
    (:class:`_Slots`) of ``max_batch`` items. ``loader_kwargs`` go to the DataLoader
    (``batch_size``, or ``batch_size=None`` with a sampler that yields index lists).

    Iterating yields dict batches whose tensors are *views of the slots*: a batch stays valid
    while the consumer holds at most ``hold`` (default 2) newer batches, which is what a training
    loop does; ``.clone()`` what you keep longer. With ``num_workers=0`` it is a plain DataLoader
    (in-process gathers, fresh tensors).

    Used by the engine when ``data.num_workers > 0`` and by ``make_train_loader(reuse_buffers=True)``.
    """

    def __init__(self, dataset: "_Base", *, max_batch: int, num_workers: int, prefetch_factor: int = 2,
                 hold: int = 2, **loader_kwargs: Any):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.slots: _Slots | None = None
        if self.num_workers > 0:
            self.slots = _Slots(self.num_workers, prefetch_factor, dataset.batch_nbytes(max_batch), hold)
            loader_kwargs.update(num_workers=self.num_workers, prefetch_factor=prefetch_factor)
        else:
            loader_kwargs.update(num_workers=0)
        loader_kwargs.setdefault("collate_fn", collate_batch)
        self.loader = DataLoader(dataset, **loader_kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        slots = self.slots
        if slots is not None:
            # (re)attached here: the workers see the dataset as it is when they start, and another
            # SlotLoader over the same dataset may have attached its own slots since
            self.dataset.attach_slots(slots)
            if not self.loader.persistent_workers:
                slots.reset()
        buf = slots.buffer if slots is not None else None
        for item in self.loader:
            if isinstance(item, _SlotRef):
                yield _carve(buf[item.slot], item.layout)
            else:
                yield item


class _Base(Dataset):
    def __init__(self, root, split: str, in_memory="auto", seed: int = 0):
        self.info = root if isinstance(root, DatasetInfo) else load_info(root)
        self.root = self.info.root
        self.split = split
        self.seed = int(seed)
        self.data = _SplitData(self.info, split, in_memory)
        neutral = self.info.neutral(split) if f"neutral/{split}" in self.info.arrays else None
        self.neutral_gt = torch.from_numpy(np.ascontiguousarray(neutral, dtype=np.float32)) if neutral is not None else None
        # items grouped by subject: order[start[s]:start[s]+count[s]] are subject s's items
        S = len(self.info.subjects)
        self.subject = self.data.subject
        self._order = np.argsort(self.subject, kind="stable").astype(np.int64)
        self._count = np.bincount(self.subject, minlength=S).astype(np.int64)
        self._start = np.concatenate([[0], np.cumsum(self._count)[:-1]]).astype(np.int64)
        # epoch in shared memory: set_epoch in the main process reaches (persistent) workers
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.slots: _Slots | None = None

    def attach_slots(self, slots: "_Slots | None") -> None:
        """Write batches gathered in DataLoader workers into these shared slots (see SlotLoader)."""
        self.slots = slots

    def batch_nbytes(self, n: int) -> int:
        return _layout(self._specs(n))[1]

    def _specs(self, n: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _buffers(self, n: int, allow_slot: bool = True) -> tuple[dict[str, torch.Tensor], _SlotRef | None]:
        """The output tensors of an ``n``-item batch: carved from a shared slot in a worker with
        slots attached (then also the :class:`_SlotRef` to return), else from a new buffer."""
        layout, total = _layout(self._specs(n))
        if allow_slot and self.slots is not None and torch.utils.data.get_worker_info() is not None:
            if total > self.slots.nbytes:
                raise ValueError(f"a batch of {n} items needs {total} bytes, the loader's slots hold {self.slots.nbytes}")
            slot, buf = self.slots.claim()
            return _carve(buf, layout), _SlotRef(slot, layout)
        return _carve(_new_buffer(total), layout), None

    @property
    def in_memory(self) -> bool:
        return self.data.in_memory

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return self.data.n

    def _idx(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -self.data.n or idx.max() >= self.data.n):
            raise IndexError(f"index out of range for {self.data.n} samples")
        return np.where(idx < 0, idx + self.data.n, idx)

    def _same_subject(self, idx: np.ndarray, u: np.ndarray) -> np.ndarray:
        s = self.subject[idx]
        k = np.minimum((u * self._count[s]).astype(np.int64), self._count[s] - 1)
        return self._order[self._start[s] + k]

    def _other_subject(self, idx: np.ndarray, u: np.ndarray) -> np.ndarray:
        s = self.subject[idx]
        n_other = self.data.n - self._count[s]
        if (n_other <= 0).any():
            raise DatasetError(f"{self.root}: split {self.split!r} has a single subject; no different-identity pairs")
        r = np.minimum((u * n_other).astype(np.int64), n_other - 1)
        r = np.where(r >= self._start[s], r + self._count[s], r)
        return self._order[r]

    def __getitem__(self, index):
        if isinstance(index, (list, tuple, np.ndarray, torch.Tensor)):
            out, ref = self._gather(self._idx(index))
            return ref if ref is not None else out
        out, _ = self._gather(self._idx([index]), allow_slot=False)
        return {k: v[0] for k, v in out.items()}

    def __getitems__(self, indices: Sequence[int]):
        out, ref = self._gather(self._idx(indices))
        return ref if ref is not None else _LazyBatch(out)

    def _gather(self, idx: np.ndarray, allow_slot: bool = True) -> tuple[dict[str, torch.Tensor], _SlotRef | None]:
        out, ref = self._buffers(len(idx), allow_slot)
        self._fill(idx, out)
        return out, ref

    def _fill(self, idx: np.ndarray, out: dict[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class FaceDataset(_Base):
    """Training/eval items of one split.

    Item -> ``vertices (V,3) f32, neutral (V,3) f32, partner (V,3) f32, subject i64, expression i64,
    level f32, is_neutral bool, index i64, partner_index i64`` (``partner``/``partner_index`` only
    with ``with_partner``). ``partner`` is uniform over the same subject's items of the split (the
    item itself included), a function of ``(seed, epoch, index)``.
    """

    def __init__(self, root, split: str, in_memory="auto", with_partner: bool = True, seed: int = 0):
        super().__init__(root, split, in_memory, seed)
        self.with_partner = with_partner

    def partner_indices(self, indices, epoch: int | None = None) -> np.ndarray:
        idx = self._idx(indices)
        u = _uniform(self.seed, self.epoch if epoch is None else epoch, 1, idx)
        return self._same_subject(idx, u)

    def _specs(self, n: int) -> list:
        mesh = ((n, self.data.V, 3), torch.float32)
        keys = ["vertices"] + (["neutral"] if self.neutral_gt is not None else []) \
            + (["partner"] if self.with_partner else [])
        lab = ["subject", "expression", "index"] + (["partner_index"] if self.with_partner else [])
        return ([(k, *mesh) for k in keys] + [(k, (n,), torch.int64) for k in lab]
                + [("level", (n,), torch.float32), ("is_neutral", (n,), torch.bool)])

    def _fill(self, idx: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        d = self.data
        s = d.subject[idx]
        d.gather(idx, out["vertices"])
        if self.neutral_gt is not None:
            torch.index_select(self.neutral_gt, 0, torch.from_numpy(np.asarray(s, dtype=np.int64)), out=out["neutral"])
        labels = {"subject": s, "expression": d.expression[idx], "index": idx,
                  "level": d.level[idx], "is_neutral": d.is_neutral[idx]}
        if self.with_partner:
            p = self.partner_indices(idx)
            d.gather(p, out["partner"])
            labels["partner_index"] = p
        for k, v in labels.items():
            out[k].numpy()[:] = v


class PairDataset(_Base):
    """Identity pairs for discriminator pretraining (docs/method.md#discriminator-pretraining).

    Item ``i`` -> ``{"a": X_i, "b": X_j, "same": i64}``: ``same ~ Bernoulli(0.5)``; same → ``j``
    uniform over the same subject's items (``i`` included), different → uniform over all items of
    other subjects. A function of ``(seed, epoch, i)``; also returns ``a_index``/``b_index``.
    """

    def __init__(self, root, split: str, seed: int = 0, in_memory="auto"):
        super().__init__(root, split, in_memory, seed)

    def pair_indices(self, indices, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(partner indices, same labels) for the given item indices."""
        idx = self._idx(indices)
        ep = self.epoch if epoch is None else epoch
        same = _uniform(self.seed, ep, 2, idx) < 0.5
        u = _uniform(self.seed, ep, 3, idx)
        j = np.where(same, self._same_subject(idx, u), self._other_subject(idx, u) if (~same).any() else 0)
        return j.astype(np.int64), same.astype(np.int64)

    def _specs(self, n: int) -> list:
        mesh = ((n, self.data.V, 3), torch.float32)
        return [("a", *mesh), ("b", *mesh)] + [(k, (n,), torch.int64) for k in ("same", "a_index", "b_index")]

    def _fill(self, idx: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        j, same = self.pair_indices(idx)
        self.data.gather(idx, out["a"])
        self.data.gather(j, out["b"])
        for k, v in (("same", same), ("a_index", idx), ("b_index", j)):
            out[k].numpy()[:] = v


# ---------------------------------------------------------------------------------------- loaders


def make_train_loader(info_or_root, split: str, batch_size: int, shuffle: bool = True, seed: int = 0,
                      num_workers: int = 0, drop_last: bool = True, *, in_memory="auto",
                      with_partner: bool = True, pair: bool = False, reuse_buffers: bool = False,
                      **loader_kwargs: Any):
    """A DataLoader over :class:`FaceDataset` (or :class:`PairDataset` with ``pair=True``) with the
    batched fast path. Shuffling uses a generator seeded with ``seed``; pass the loader to
    ``accelerate.prepare`` (it shards it). Call ``loader.dataset.set_epoch(epoch)`` every epoch.
    Extra keyword arguments go to ``DataLoader`` (e.g. ``pin_memory``, ``persistent_workers``,
    ``multiprocessing_context``).

    ``reuse_buffers=True`` (with ``num_workers > 0``) returns a :class:`SlotLoader` instead: the
    workers write into reused shared-memory slots, ~7x faster on 2 cores, but a batch is only valid
    while you hold at most 2 newer ones (a training loop's pattern); not for ``accelerate.prepare``."""
    if pair:
        ds: _Base = PairDataset(info_or_root, split, seed=seed, in_memory=in_memory)
    else:
        ds = FaceDataset(info_or_root, split, in_memory=in_memory, with_partner=with_partner, seed=seed)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    kw: dict[str, Any] = dict(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                              collate_fn=collate_batch, generator=gen)
    if num_workers > 0:
        kw["persistent_workers"] = True
        kw["prefetch_factor"] = 4
    kw.update(loader_kwargs)
    if reuse_buffers and num_workers > 0:
        return SlotLoader(ds, max_batch=batch_size, num_workers=num_workers, **kw)
    return DataLoader(ds, num_workers=num_workers, **kw)


# ---------------------------------------------------------------------------------------- device copies


class DevicePrefetcher:
    """Overlap host->device copies with compute: iterates ``loader`` one batch ahead, copying each
    dict of tensors with ``non_blocking=True`` on a side CUDA stream (the loader should use
    ``pin_memory=True``). On CPU it is a plain pass-through (``num_workers`` already overlaps
    loading with compute there)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self):
        return len(self.loader)

    def _copy(self, batch):
        if self.stream is None:
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.cuda.stream(self.stream):
            return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def __iter__(self):
        it = iter(self.loader)
        try:
            nxt = self._copy(next(it))
        except StopIteration:
            return
        while True:
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                for v in nxt.values():
                    if torch.is_tensor(v):
                        v.record_stream(torch.cuda.current_stream(self.device))
            cur = nxt
            try:
                nxt = self._copy(next(it))
            except StopIteration:
                yield cur
                return
            yield cur
