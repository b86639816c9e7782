"""The training loop every model shares: :func:`train_one_epoch`.

It calls a step function on each batch and keeps the loss bookkeeping on the device, without a
host sync per step. Every ``log_every`` steps (and at the epoch end) it makes one sync: the
window's mean losses go to the progress bar and TensorBoard, a NaN/inf in any term stops the run
naming the term and the step, and a stop signal received by any process is agreed on.
Discriminator pretraining, the joint VAE/discriminator training and the supervised baseline all
run through it.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf (the message names the term and the step)."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was saved, rerun the same command to continue."""

    def __init__(self, signum: int, checkpoint_dir: Path, epoch: int, step: int):
        self.signum, self.checkpoint_dir, self.epoch, self.step = signum, checkpoint_dir, epoch, step
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        super().__init__(f"{name} received: checkpoint saved at epoch {epoch + 1}, step {step} in "
                         f"{checkpoint_dir}; rerun the same command to continue")


def fetch(ds, indices: list[int]) -> dict:
    """A batch as a dict of stacked tensors (the data set's batched fast path when it has one)."""
    try:
        out = ds[indices]
        if isinstance(out, dict):
            return {k: torch.as_tensor(v) for k, v in out.items()}
    except (TypeError, IndexError, KeyError, ValueError):
        pass
    items = [ds[i] for i in indices]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def progress_bar(rt, enabled: bool, total: int, desc: str, initial: int = 0):
    """A tqdm bar on the main process (None elsewhere or when disabled)."""
    if not (rt.is_main and enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=True)


class LossMeter:
    """Per-term sums over the epoch and over the current log window, plus the first step at which
    each term was non-finite; all on the device, updated without host syncs."""

    def __init__(self, device):
        self.device = device
        self.keys: list[str] = []
        self.epoch_sum = self.window_sum = self.first_bad = None
        self.epoch_steps = self.window_steps = 0

    def _init(self, keys):
        self.keys = list(keys)
        n = len(self.keys)
        self.epoch_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.window_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.first_bad = torch.full((n,), -1, dtype=torch.int64, device=self.device)

    def add(self, logs: dict, global_step: int) -> None:
        if not self.keys:
            self._init(sorted(logs))
        vals = torch.stack([logs[k].detach().to(torch.float64) for k in self.keys])
        self.epoch_sum += vals
        self.window_sum += vals
        bad = ~torch.isfinite(vals) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, global_step), self.first_bad)
        self.epoch_steps += 1
        self.window_steps += 1

    def reset_epoch(self) -> None:
        if self.keys:
            self.epoch_sum.zero_()
            self.window_sum.zero_()
        self.epoch_steps = self.window_steps = 0

    def state_dict(self) -> dict:
        if not self.keys:
            return {"keys": []}
        return {"keys": list(self.keys), "epoch_sum": self.epoch_sum.cpu(), "window_sum": self.window_sum.cpu(),
                "first_bad": self.first_bad.cpu(), "epoch_steps": self.epoch_steps, "window_steps": self.window_steps}

    def load_state_dict(self, sd: dict) -> None:
        if not sd.get("keys"):
            return
        self._init(sd["keys"])
        self.epoch_sum.copy_(sd["epoch_sum"])
        self.window_sum.copy_(sd["window_sum"])
        self.first_bad.copy_(sd["first_bad"])
        self.epoch_steps, self.window_steps = sd["epoch_steps"], sd["window_steps"]


@dataclass
class LoopState:
    """What the loop carries across epochs (and checkpoints): the step count, the loss sums, the
    agreed stop signal."""

    meter: LossMeter
    global_step: int = 0
    stop: int = 0
    bar: object = None
    log: bool = False
    """Send the window means to the experiment trackers (``rt.log``)."""
    where: str = ""
    """Named in error messages (e.g. the run directory)."""
    postfix: tuple = field(default=("total", "recon", "neutral_recon", "disc", "disc_acc"))


def check_window(state: LoopState, rt, steps_per_epoch: int) -> dict:
    """The log-interval check: the window's mean losses (all processes), NaN/inf detection and the
    stop agreement. One host sync (two all-reduces with several processes)."""
    m = state.meter
    if not m.keys:
        return {}
    win = rt.reduce(m.window_sum / max(m.window_steps, 1), "mean")
    flags = torch.cat([m.first_bad.double(), torch.tensor([float(rt.signal_received)], dtype=torch.float64,
                                                          device=m.first_bad.device)])
    flags = rt.reduce(flags, "max")
    win_l, flags_l = win.tolist(), flags.tolist()
    m.window_sum.zero_()
    m.window_steps = 0
    bad = {k: int(s) for k, s in zip(m.keys, flags_l[:-1]) if s >= 0}
    if bad:
        first = min(bad.values())
        terms = [k for k, s in bad.items() if s == first]
        raise NonFiniteLossError(
            f"non-finite loss: term {', '.join(repr(t) for t in terms)} became NaN/inf at global step "
            f"{first + 1} (epoch {first // steps_per_epoch + 1}, batch {first % steps_per_epoch + 1}). Lower the "
            f"learning rate or the loss weight, or try train.precision=no. {state.where}".rstrip())
    if flags_l[-1] > 0:
        state.stop = int(flags_l[-1])
    return dict(zip(m.keys, win_l))


def train_one_epoch(step: Callable[[dict], dict], batches: Iterable[dict], state: LoopState, rt, *,
                    epoch: int, first_step: int, steps_per_epoch: int, log_every: int, tag: str = "train",
                    checkpoint_every: int = 0,
                    save_checkpoint: Optional[Callable[[int, int], Path]] = None) -> dict[str, float]:
    """Run ``step(batch) -> {term: 0-d tensor}`` over ``batches`` (the rest of epoch ``epoch``,
    which starts at step ``first_step`` when resuming) and return the epoch's mean of each term
    over all processes.

    With ``save_checkpoint(epochs_done, step_in_epoch)`` it checkpoints every ``checkpoint_every``
    global steps, and on a stop signal it checkpoints and raises :class:`TrainingInterrupted`.
    """
    if first_step == 0:
        state.meter.reset_epoch()
    s = first_step
    for batch in batches:
        logs = step(batch)
        state.meter.add(logs, state.global_step)
        state.global_step += 1
        s += 1
        if state.bar is not None:
            state.bar.update(1)
        if state.global_step % log_every == 0:
            win = check_window(state, rt, steps_per_epoch)
            if state.log:
                rt.log({f"{tag}/{k}": v for k, v in win.items()}, step=state.global_step)
            if state.bar is not None and win:
                state.bar.set_postfix({k: f"{win[k]:.3g}" for k in state.postfix if k in win}, refresh=False)
        if save_checkpoint is None:
            continue
        if checkpoint_every and state.global_step % checkpoint_every == 0 and s < steps_per_epoch:
            save_checkpoint(epoch, s)
        if rt.world == 1:
            state.stop = rt.signal_received  # one process: act at once; several: agreed in check_window
        if state.stop and s < steps_per_epoch:
            path = save_checkpoint(epoch, s)
            raise TrainingInterrupted(state.stop, path, epoch, s)
    check_window(state, rt, steps_per_epoch)
    m = state.meter
    means = rt.reduce(m.epoch_sum / max(m.epoch_steps, 1), "mean").tolist() if m.keys else []
    return dict(zip(m.keys, means))
