"""A run directory and everything written into it.

``<run dir>/`` holds ``config.yaml`` (the resolved config), ``provenance.json`` (code version,
packages, data set hash, one entry per session), ``metrics.jsonl`` (one line per epoch),
``metrics.json`` (the final metrics, written last: its presence means the run is finished),
``checkpoints/last/`` (everything needed to resume bit-exactly), ``model.pt`` (the trained model)
and ``tb/`` (TensorBoard). Every file is written to a temporary name and renamed when complete,
so a crash never leaves a half-written file behind.

Only the main process writes; :meth:`RunDir.save_checkpoint` is the one call every process makes
(each saves its own random-number state).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from facedis.config import Config, ConfigError, config_from_dict, config_to_dict, save_config

RESUME_COMPATIBLE = {
    "train.epochs", "train.progress", "train.log_every_steps", "train.eval_every", "train.checkpoint_every",
    "train.checkpoint_every_steps", "train.image_every", "train.cpu", "train.cpu_threads", "train.eval_batch_size",
    "train.check_sync", "data.num_workers", "data.in_memory", "data.root", "data.prepare",
    "run.name", "run.out_dir", "run.dir", "run.artefact_dir", "run.tensorboard", "run.log_with",
}
"""Config keys that may differ between a run and the rerun that resumes it."""


# ---------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars, tensors and paths."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flat_dict(v, key))
        else:
            out[key] = v
    return out


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("facedis", "torch", "accelerate", "numpy", "h5py", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"git_sha": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except Exception:  # no git
        return {"git_sha": None}


# ---------------------------------------------------------------------------------------------
# the run directory
# ---------------------------------------------------------------------------------------------
class RunDir:
    """The files of one run. ``is_main``: this process writes (the others only read)."""

    def __init__(self, path: Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last"

    # ------------------------------------------------------------------ config and state
    def write_config(self, cfg: Config) -> None:
        """Write ``config.yaml``; refuse if the directory holds a checkpoint of another config."""
        if not self.is_main:
            return
        path = self.path / "config.yaml"
        self.path.mkdir(parents=True, exist_ok=True)
        if path.is_file() and self.checkpoint.is_dir():
            import yaml

            old = flat_dict(config_to_dict(config_from_dict(yaml.safe_load(path.read_text()) or {})))
            new = flat_dict(config_to_dict(cfg))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_COMPATIBLE)
            if diff:
                lines = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
                raise ConfigError(f"{self.path} holds a checkpoint of a run with a different config ({lines}); "
                                  "use another run.name / run.dir, or delete the run directory")
        save_config(cfg, path)

    def finished_metrics(self) -> Optional[dict]:
        """The final metrics of a finished run, or None."""
        done = self.path / "metrics.json"
        return json.loads(done.read_text()) if done.is_file() else None

    def write_provenance(self, cfg: Config, *, info, world_size: int, device, precision: str,
                         started_at: float, pretrained_disc: Optional[dict], session: dict) -> None:
        """Add this session to ``provenance.json`` (code, packages, data set, one entry per session)."""
        if not self.is_main:
            return
        path = self.path / "provenance.json"
        sessions = []
        if path.is_file():
            try:
                sessions = json.loads(path.read_text()).get("sessions", [])
            except Exception:
                sessions = []
        sessions.append({
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
            "hostname": socket.gethostname(), "world_size": world_size, "device": str(device),
            "precision": precision, "argv": list(sys.argv), "pid": os.getpid(), **session,
        })
        prov = {
            **git_info(),
            "versions": package_versions(),
            "dataset": {"name": info.meta.get("dataset"), "root": str(Path(cfg.data.root).resolve()),
                        "content_hash": info.content_hash, "mm_per_unit": info.mm_per_unit,
                        "num_vertices": info.num_vertices, "protocol": info.meta.get("protocol")},
            "mode": cfg.mode,
            "precision": precision,
            "pretrained_disc": pretrained_disc,
            "global_batch_size": cfg.train.batch_size,
            "per_process_batch_size": cfg.train.batch_size // world_size,
            "world_size": world_size,
            "hostname": socket.gethostname(),
            "sessions": sessions,
        }
        atomic_write_text(path, json.dumps(prov, indent=2, default=json_default))

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: dict) -> None:
        if self.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, default=json_default, allow_nan=True) + "\n")

    def reset_metrics(self, epochs_done: int = 0) -> None:
        """Drop the ``metrics.jsonl`` lines after ``epochs_done`` (a resumed run rewrites them)."""
        if not self.is_main:
            return
        p = self.path / "metrics.jsonl"
        if epochs_done == 0 or not p.is_file():
            atomic_write_text(p, "")
            return
        lines = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", 0) <= epochs_done]
        atomic_write_text(p, "".join(ln + "\n" for ln in lines))

    def write_final(self, metrics: dict, model_file: Optional[tuple[str, dict]] = None) -> None:
        """The model file (``(name, payload)``), then ``metrics.json``: the run is finished."""
        if not self.is_main:
            return
        if model_file is not None:
            atomic_torch_save(model_file[1], self.path / model_file[0])
        atomic_write_text(self.path / "metrics.json", json.dumps(metrics, indent=2, default=json_default))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, rt, state: dict, rank_state: dict, global_step: int) -> Path:
        """Every process calls this: each writes ``rank<r>.pt`` into a temporary directory, the
        main process adds ``state.pt`` (built lazily by ``state``'s values) and renames it to
        ``checkpoints/last``."""
        root = self.path / "checkpoints"
        tmp = root / f".tmp-last-{global_step}"
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        rt.wait()
        torch.save(rank_state, tmp / f"rank{rt.rank}.pt")
        if rt.is_main:
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({
                "epochs_done": state["epochs_done"], "step_in_epoch": state["step_in_epoch"],
                "global_step": global_step, "world_size": rt.world, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        rt.wait()
        if rt.is_main:
            last, old = root / "last", root / f".old-last-{global_step}"
            if last.exists():
                os.rename(last, old)
            os.rename(tmp, last)
            shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(".tmp-last-*"):
                shutil.rmtree(stale, ignore_errors=True)
        rt.wait()
        return self.checkpoint

    def find_checkpoint(self) -> Optional[Path]:
        """``checkpoints/last``, or the previous one if a crash came between the two renames."""
        root = self.path / "checkpoints"
        if (root / "last" / "state.pt").is_file():
            return root / "last"
        olds = sorted(root.glob(".old-last-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
        for p in reversed(olds):
            if (p / "state.pt").is_file():
                return p
        return None

    @staticmethod
    def load_checkpoint(path: Path, rank: int, world_size: int) -> tuple[dict, Optional[dict]]:
        """``(state, this rank's state or None when the world size changed)``."""
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rank_file = path / f"rank{rank}.pt"
        rank_state = None
        if rank_file.is_file() and state.get("world_size") == world_size:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return state, rank_state
