"""The process a run lives in: devices, processes, precision, seeds and stop signals.

:class:`Runtime` is the only object of facedis that talks to Accelerate or
``torch.distributed``. The training code asks it for the rank and world size, to prepare a module
for training (device, synchronised BatchNorm, DDP, compile), to run a forward under autocast, to
back-propagate and step an optimiser at the run's precision, and to broadcast, reduce or gather
values across processes. Models, losses and step functions never see it.

Precision (``train.precision``): ``auto`` follows Accelerate's launch configuration (the
``accelerate config`` file, ``accelerate launch --mixed_precision``, or
``ACCELERATE_MIXED_PRECISION``); ``no``, ``bf16`` or ``fp16`` force it and say so when they
differ from Accelerate's choice. The resolved value is what the run records.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from typing import Any, Optional

import numpy as np
import torch

from facedis.config import ConfigError, RunConfig, TrainConfig
from facedis.distributed import convert_sync_batchnorm

PRECISIONS = ("no", "bf16", "fp16")


def resolve_precision(requested: str, environ=os.environ) -> tuple[str, Optional[str]]:
    """``(precision, note)``: ``auto`` -> Accelerate's launch choice (``no`` outside ``accelerate
    launch``); an explicit value wins, with a one-line ``note`` when it overrides Accelerate's."""
    launched = str(environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if launched not in PRECISIONS:
        raise ConfigError(f"ACCELERATE_MIXED_PRECISION={launched!r} is not supported by facedis; valid: "
                          f"{', '.join(PRECISIONS)}")
    if requested == "auto":
        return launched, None
    if requested not in PRECISIONS:
        raise ConfigError(f"train.precision={requested!r}; valid: auto, {', '.join(PRECISIONS)}")
    note = None
    if "ACCELERATE_MIXED_PRECISION" in environ and launched != requested:
        note = (f"[facedis] train.precision={requested} overrides Accelerate's mixed_precision={launched} "
                "(set train.precision=auto to follow Accelerate)")
    return requested, note


def cpu_threads(requested: int, environ=os.environ) -> Optional[int]:
    """Torch threads for a CPU process, or None to keep torch's default (which honours
    ``OMP_NUM_THREADS``). ``requested`` > 0 is used as given. 0 (auto) gives each process of
    ``accelerate launch`` its share of the cores: ``accelerate launch`` sets ``OMP_NUM_THREADS=1``
    unless told otherwise, which leaves a single-process CPU run on one core."""
    if requested > 0:
        return requested
    if "ACCELERATE_DYNAMO_BACKEND" not in environ:  # not started by `accelerate launch`
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_node = int(environ.get("LOCAL_WORLD_SIZE", environ.get("ACCELERATE_NUM_PROCESSES", "1")) or 1)
    return max(1, cores // max(per_node, 1))


def cpu_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo).
    Without it, bf16 autocast on CPU emulates the products and is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


# ---------------------------------------------------------------------------------------------
# seeds and random-number state
# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, as plain tensors/tuples for checkpoints."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# the runtime
# ---------------------------------------------------------------------------------------------
class Runtime:
    """One process of a run: the Accelerator, precision, and the stop flag.

    Precision goes through Accelerate (``accelerator.autocast``, ``accelerator.backward``) except
    for fp16, which keeps one GradScaler per optimiser here: Accelerate has a single loss scale for
    all optimisers (a discriminator overflow would shrink the VAE's) and no fp16 autocast on CPU.
    """

    def __init__(self, train: TrainConfig, run: Optional[RunConfig] = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        self.precision, note = resolve_precision(train.precision)
        cpu = train.cpu or not torch.cuda.is_available()
        accelerate_precision = "bf16" if self.precision == "bf16" else "no"
        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") != accelerate_precision:
            # Accelerate's state is process-wide: an earlier run in this process (a notebook, an
            # in-process sweep, the tests) may have used another precision; the process group stays
            AcceleratorState._reset_state(reset_partial_state=False)
        trackers = self._trackers(run)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=accelerate_precision, log_with=trackers or None,
            project_dir=str(run.resolved_dir()) if run is not None else None,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self._tracking = False
        acc = self.accelerator
        self.device = acc.device
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        self.sync_bn, self.compile = train.sync_bn, train.compile
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU does not support bfloat16; use fp16 or no")
        if note:
            self.print(note)
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu_bf16_matmul():
            self.print("[facedis] warning: train.precision=bf16 on a CPU without bf16 matrix units (no avx512_bf16 / "
                       "amx_bf16): bf16 is emulated and slower than fp32 here; use train.precision=no")
        if self.device.type == "cpu":
            threads = cpu_threads(train.cpu_threads)
            if threads is not None and threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self._scalers: dict[int, Any] = {}
        self.signal_received = 0  # set by the signal handler of this process
        self._old_handlers: dict = {}

    # ------------------------------------------------------------------ experiment trackers
    def _trackers(self, run: Optional[RunConfig]) -> list:
        """Accelerate trackers: TensorBoard in ``<run dir>/tb`` (``run.tensorboard``) and those of
        ``run.log_with``; a requested tracker that is not installed is a config error."""
        self.tensorboard = None
        if run is None:
            return []
        out: list = []
        if run.tensorboard:
            from accelerate.tracking import TensorBoardTracker

            self.tensorboard = TensorBoardTracker("tb", str(run.resolved_dir()))
            out.append(self.tensorboard)
        import importlib.util

        for name in run.log_with:
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"run.log_with asks for {name!r}, which is not installed: pip install {name}")
            out.append(name)
        return out

    def start_trackers(self, config: dict, run_name: str, purge_step: Optional[int] = None) -> None:
        """Start the trackers (once per run) with the flattened config as hyper-parameters;
        ``purge_step`` drops TensorBoard events at and after that step (a resumed run)."""
        if self._tracking or not self.accelerator.log_with:
            return
        if self.tensorboard is not None and purge_step is not None:
            self.tensorboard.init_kwargs["purge_step"] = purge_step
        self.accelerator.init_trackers("facedis", config=config, init_kwargs={
            "wandb": {"name": run_name}, "mlflow": {"run_name": run_name}})
        self._tracking = True

    def log(self, values: dict, step: int) -> None:
        if self._tracking:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None},
                                 step=step)

    def log_figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure to TensorBoard (main process; other trackers get the scalars only)."""
        if self._tracking and self.is_main and self.tensorboard is not None:
            self.tensorboard.writer.add_figure(tag, figure, step)

    def end_trackers(self) -> None:
        """Flush and close the trackers (``accelerator.end_training`` would also end the process group)."""
        if self._tracking:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self._tracking = False

    # ------------------------------------------------------------------ processes
    def print(self, *args) -> None:
        """Print on the main process (above a progress bar when one is showing)."""
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(a) for a in args))
            sys.stdout.flush()

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast(self, obj):
        """The main process's value of a picklable object, on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box)
        return box[0]

    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return self.accelerator.reduce(tensor.clone(), op) if self.world > 1 else tensor

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(tensor) if self.world > 1 else tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor)

    # ------------------------------------------------------------------ models and precision
    def prepare(self, module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(module on the device, what to call in training)``: BatchNorm synchronised over the
        global batch when there are several processes, then ``accelerator.prepare`` (DDP, the
        launch's dynamo backend), then ``torch.compile`` with ``train.compile``."""
        if self.world > 1 and self.sync_bn:
            module = convert_sync_batchnorm(module, self.device.type)
        module = module.to(self.device)
        call = self.accelerator.prepare(module)
        if self.compile and not hasattr(call, "_orig_mod"):
            call = torch.compile(call)
        return module, call

    def autocast(self):
        if self.precision == "bf16":
            return self.accelerator.autocast()
        if self.precision == "fp16":
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give ``optimizer`` its own GradScaler (fp16 only)."""
        if self.precision == "fp16":
            self._scalers[id(optimizer)] = torch.amp.GradScaler(self.device.type)

    def scaler(self, optimizer: torch.optim.Optimizer):
        return self._scalers.get(id(optimizer))

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, **kwargs) -> None:
        scaler = self.scaler(optimizer)
        if scaler is not None:
            scaler.scale(loss).backward(**kwargs)
        else:
            self.accelerator.backward(loss, **kwargs)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        scaler = self.scaler(optimizer)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    @contextlib.contextmanager
    def full_precision(self, module: torch.nn.Module):
        """Run ``module`` without the autocast that ``accelerator.prepare`` puts on its forward
        (evaluation measures millimetres in fp32)."""
        patched = module.__dict__.pop("forward", None)
        try:
            yield module
        finally:
            if patched is not None:
                module.forward = patched

    # ------------------------------------------------------------------ stop signals
    @contextlib.contextmanager
    def catch_stop_signals(self):
        """SIGTERM/SIGUSR1 set :attr:`signal_received` instead of killing the process (main
        thread only: e.g. a Ray Tune function trainable handles stops itself)."""
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                self.signal_received = signum

            for s in (signal.SIGTERM, signal.SIGUSR1):
                try:
                    self._old_handlers[s] = signal.signal(s, handler)
                except (ValueError, OSError):
                    pass
        try:
            yield
        finally:
            for s, h in self._old_handlers.items():
                try:
                    signal.signal(s, h)
                except (ValueError, OSError, TypeError):
                    pass
            self._old_handlers = {}
