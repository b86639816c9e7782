"""What runs inside a cluster job: the checkpointable training callable and a DDP probe.

One submitit task per GPU (or per CPU process). Every task calls :func:`setup_distributed`, which
exports the variables accelerate reads (``MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE`` from ``submitit.helpers.TorchDistributedEnvironment``, plus
``ACCELERATE_USE_CPU=true`` on CPU), then calls the one training function
``facedis.engine.train(cfg)``. The engine owns the ``Accelerator`` and auto-resumes from
``<run.dir>/checkpoints/last``, so a requeued job simply runs the same call again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facedis.extras import require

submitit = require("submitit", "cluster", "facedis submit")


@dataclass
class RunSpec:
    """One (config, seed) run of a grid. ``cfg`` is the resolved :class:`facedis.config.Config`."""

    grid: str
    label: str
    seed: int
    run_dir: str
    config_path: str
    overrides: dict[str, Any] = field(default_factory=dict)
    cfg: Any = None

    @property
    def key(self) -> str:
        return f"{self.label}/seed{self.seed}"


def read_final_metrics(run_dir: str | os.PathLike) -> dict | None:
    """``<run_dir>/metrics.json`` (present only when the run is complete), or ``None``."""
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def in_submitit_job() -> bool:
    try:
        submitit.JobEnvironment()
    except RuntimeError:
        return False
    return True


def setup_distributed(cpu: bool, threads: int | None = None) -> dict[str, str]:
    """Export the environment accelerate needs for this task; return the exported variables.

    Single-task jobs export nothing distributed (accelerate then runs one process). Multi-task
    jobs (one task per GPU, any number of nodes) get the torch env:// variables. GPUs are not
    re-masked: each task sees the node's GPUs and accelerate picks ``cuda:LOCAL_RANK``.
    """
    exported: dict[str, str] = {}
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        exported["ACCELERATE_USE_CPU"] = "true"
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            import torch

            torch.set_num_threads(int(threads))
        except Exception:  # pragma: no cover - torch always present in practice
            pass
    if not in_submitit_job():
        return exported
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            exported[k] = os.environ[k]
        del dist
    return exported


class TrainJob(submitit.helpers.Checkpointable):
    """Checkpointable submitit callable: ``TrainJob(cpu)(spec)`` trains ``spec.cfg``.

    On preemption or timeout submitit calls :meth:`checkpoint`, which resubmits a fresh instance
    with the same spec (nothing heavy is pickled); the engine resumes from its own checkpoint.
    A run whose ``metrics.json`` exists is not trained again.
    """

    def __init__(self, cpu: bool = False, threads: int | None = None) -> None:
        self.cpu = cpu
        self.threads = threads

    def __call__(self, spec: RunSpec) -> dict | None:
        setup_distributed(self.cpu, self.threads)
        done = read_final_metrics(spec.run_dir)
        if done is not None:
            print(f"[facedis.launch] {spec.run_dir}: already finished (metrics.json exists); skipping", flush=True)
            return done
        from facedis.engine import TrainingInterrupted, train

        print(f"[facedis.launch] {spec.key} on {socket.gethostname()} -> {spec.run_dir}", flush=True)
        on_slurm = in_submitit_job() and "SLURM_JOB_ID" in os.environ
        preempt_sig, submitit_handler, state = self._chain_preemption_signal() if on_slurm else (None, None, {})
        try:
            return train(spec.cfg)
        except TrainingInterrupted as e:
            if not on_slurm:
                raise
            print(f"[facedis.launch] {e}", flush=True)
            if state.get("preempted") and callable(submitit_handler):
                # submitit's own preemption/timeout path: checkpoint() -> requeue -> exit
                submitit_handler(preempt_sig, None)
            # SIGTERM from Slurm (scancel, scontrol requeue, preemption): the engine saved a checkpoint.
            # Write no result (the job is not finished): wait to be killed, or for a preemption signal.
            wait_to_be_killed()
            return None  # pragma: no cover - only reached if nobody kills us
        finally:
            if preempt_sig is not None and callable(submitit_handler):
                signal.signal(preempt_sig, submitit_handler)

    @staticmethod
    def _chain_preemption_signal():
        """Route submitit's preemption signal (USR2) through the engine first.

        While the engine trains it handles SIGUSR1 by saving a checkpoint at the current step and
        raising ``TrainingInterrupted``; we forward USR2 there, then run submitit's handler
        (``checkpoint`` -> requeue -> exit). Outside the engine's training loop USR2 goes straight to
        submitit (the run then resumes from its last periodic checkpoint).
        """
        try:
            sig = submitit.JobEnvironment()._usr_sig()
        except Exception:
            sig = signal.SIGUSR2
        original = signal.getsignal(sig)
        state = {"preempted": False}

        def handler(signum, frame):
            engine_handler = signal.getsignal(signal.SIGUSR1)
            if callable(engine_handler) and engine_handler is not handler:
                state["preempted"] = True
                engine_handler(signal.SIGUSR1, frame)
            elif callable(original):
                original(signum, frame)

        signal.signal(sig, handler)
        return sig, original, state

    def checkpoint(self, spec: RunSpec) -> submitit.helpers.DelayedSubmission:
        print(f"[facedis.launch] {spec.key}: preempted/timed out; requeueing (the engine resumes from its checkpoint)", flush=True)
        return submitit.helpers.DelayedSubmission(TrainJob(self.cpu, self.threads), spec)


def wait_to_be_killed(limit_s: float = 120.0) -> None:
    """A job that Slurm is cancelling, requeueing or preempting: write no result, wait for SIGKILL."""
    sys.stdout.flush()
    sys.stderr.flush()
    deadline = time.time() + limit_s
    while time.time() < deadline:
        time.sleep(0.5)
    print("[facedis.launch] interrupted but not killed; exiting without a result", flush=True)
    os._exit(1)


def probe_distributed(cpu: bool = True) -> dict[str, Any]:
    """Diagnostic job body: export the DDP environment, start accelerate, all-reduce the ranks.

    Returns what this task saw: the exported variables, accelerate's view (num_processes,
    process_index, distributed type) and the all-reduced sum of ranks (world*(world-1)/2 when the
    process group really works).
    """
    exported = setup_distributed(cpu, threads=1)
    from accelerate import PartialState
    import torch

    state = PartialState(cpu=cpu)
    total = None
    if state.num_processes > 1:
        t = torch.tensor([float(state.process_index)], device=state.device)
        torch.distributed.all_reduce(t)
        total = float(t.item())
        torch.distributed.barrier()
    out = {
        "hostname": socket.gethostname(),
        "env": exported,
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "local_process_index": state.local_process_index,
        "distributed_type": str(state.distributed_type),
        "rank_sum": total,
    }
    if state.num_processes > 1:
        torch.distributed.destroy_process_group()
    return out
