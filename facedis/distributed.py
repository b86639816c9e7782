"""Distributed helpers of the engine: the global-batch sampler and BatchNorm synchronisation.

Global batch semantics (docs/training.md): ``train.batch_size`` is the *global* batch. Every
epoch draws one permutation of the training set from ``(seed, epoch)`` only, cuts it into
global batches, and gives rank ``r`` of ``W`` the slice ``[r·B/W, (r+1)·B/W)`` of each. A global
batch is therefore the same set of samples for any world size, and resuming at step ``k`` of an
epoch just skips the first ``k`` global batches.

BatchNorm: ``torch.nn.SyncBatchNorm`` only runs on GPUs. :class:`GlobalBatchNorm` is a drop-in
replacement (same parameters, buffers and state-dict keys) that reduces the batch statistics
with a differentiable ``all_reduce`` on any backend (gloo on CPU included). With it, DDP over W
processes computes the same function and gradients as one process with the global batch.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class GlobalBatchSampler:
    """Yields this rank's share (a list of dataset indices) of each global batch of an epoch.

    Args:
        num_samples: data set size.
        global_batch: B, divisible by ``world_size``.
        world_size, rank: the process group.
        seed: the permutation of epoch ``e`` depends on ``(seed, e)`` only.
        shuffle: draw a permutation (training) or keep the order.
        drop_last: drop the final incomplete global batch (always true for training: BatchNorm
            and equal per-rank shards need full batches).
        max_steps: cap the number of global batches per epoch (0 = no cap).
    """

    def __init__(self, num_samples: int, global_batch: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, max_steps: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.world_size, self.rank = int(world_size), int(rank)
        self.seed, self.shuffle, self.drop_last, self.max_steps = int(seed), shuffle, drop_last, int(max_steps)
        self.local_batch = self.global_batch // self.world_size
        self.epoch, self.start_step = 0, 0

    def steps_per_epoch(self) -> int:
        n = self.num_samples // self.global_batch if self.drop_last else -(-self.num_samples // self.global_batch)
        return min(n, self.max_steps) if self.max_steps > 0 else n

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        return max(self.steps_per_epoch() - self.start_step, 0)

    def global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        return [order[i * self.global_batch:(i + 1) * self.global_batch] for i in range(self.steps_per_epoch())]

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for b in self.global_batches()[self.start_step:]:
            yield b[lo:hi].tolist()


def shard_indices(num_samples: int, world_size: int, rank: int) -> tuple[list[int], list[bool]]:
    """Evaluation sharding: rank r takes ``r, r+W, ...``, padded (with flag False) to equal length."""
    per = -(-num_samples // world_size) if num_samples else 0
    idx = list(range(rank, num_samples, world_size))
    valid = [True] * len(idx)
    while len(idx) < per:
        idx.append(idx[-1] if idx else 0)
        valid.append(False)
    return idx, valid


# ---------------------------------------------------------------------------------------------
# BatchNorm synchronisation
# ---------------------------------------------------------------------------------------------
def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are over the batch of *all* processes.

    Same parameters and buffers as ``nn.BatchNorm1d/2d`` (state dicts are interchangeable).
    Two differentiable all-reduces per call (the mean, then the centred sum of squares), in
    float32, on any backend. Outside training mode or without a process group of size > 1 it is
    the ordinary BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, C] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()  # statistics in fp32 (fp64 stays fp64)
        count = torch.full((1,), xf.numel() // C, dtype=xf.dtype, device=x.device)
        s = _all_reduce_sum(torch.cat([xf.sum(dims), count]))
        n = s[-1]
        mean = s[:-1] / n
        xc = xf - mean.view(shape)
        var = _all_reduce_sum((xc * xc).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / (n - 1)).clamp(min=1.0)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.to(xf.dtype).view(shape) + self.bias.to(xf.dtype).view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Replace every BatchNorm by a synchronised one: ``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm` elsewhere. Parameters and buffers are carried over."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device_type))
    return out


def param_checksum(*modules: nn.Module | None) -> torch.Tensor:
    """A float64 fingerprint of all parameters and buffers (equal for bit-identical replicas)."""
    parts = []
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            v = t.detach().double().reshape(-1)
            if v.numel() == 0:
                continue
            w = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device).remainder_(97).add_(1)
            parts.append(torch.stack([v.sum(), (v * w).sum(), (v * v).sum()]))
    if not parts:
        return torch.zeros(3, dtype=torch.float64)
    return torch.stack(parts).sum(0)


def param_sha256(*modules: nn.Module | None) -> str:
    """SHA-256 over the bytes of all parameters and buffers (exact replica comparison)."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, t in list(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                     else t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
