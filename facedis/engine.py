"""The one training loop: ``train(cfg, report=None) -> dict``, and ``evaluate_run(run_dir)``.

Every entry point calls :func:`train` (``facedis/train.py``, the Ray Tune trainable, the cluster
job). It owns the single ``Accelerator`` and runs, in order (docs/training.md):

1. **Data**: prepares ``data.root`` with ``data_prep/prepare.py`` (main process; the others wait)
   when it is missing and ``data.prepare`` is set.
2. **Discriminator pretraining** (method-spec §3) on same/different pairs, cached under
   ``run.artefact_dir/disc-<key>/`` where the key hashes the data set's ``content_hash``, the
   ``pretrain`` section and the D architecture. Skipped when the artefact exists, when
   ``pretrain.enabled`` is false, and entirely for ``-id-dis`` (that D would never be used; the
   reference still builds and loads it, which changes nothing).
3. **Joint training** in the reference order (``step.joint_step``: D step, then the VAE step with
   every loss term), Adam (VAE weight decay 1e-4), ``StepLR(lr_step_epochs, lr_gamma)`` for both
   optimisers stepped once per epoch.
4. **Evaluation** every ``train.eval_every`` epochs and at the end on the test split: E_rec,
   AVD_neu (plus the mean-face baseline ``AVD_neu_meanface``), E_dis (both definitions), in mm,
   deterministic μ codes, eval mode, gathered across ranks. ``report(metrics, checkpoint_dir)``
   runs on the main process after every evaluation.

The run directory (``cfg.run.resolved_dir()``) holds ``config.yaml``, ``provenance.json``,
``metrics.jsonl``, ``metrics.json`` (written last, atomically: its presence means finished),
``tb/``, ``checkpoints/last/`` and ``model.pt``. Rerunning the same command resumes from
``checkpoints/last`` bit-exactly (CPU); SIGTERM/SIGUSR1 save a checkpoint and stop.

Hot loop: no host syncs per step. Losses accumulate on the device; finiteness (and, under DDP,
a pending stop signal) is checked every ``train.log_every_steps`` steps and at the epoch end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml

from facedis.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_hash,
    config_to_dict,
    save_config,
    validate,
)
from facedis.shards import DatasetError
from facedis.distributed import (
    GlobalBatchSampler,
    convert_sync_batchnorm,
    mix_seed,
    param_checksum,
    param_sha256,
    shard_indices,
)

Reporter = Callable[[dict, Path], None]

TEST_KILL_ENV = "FACEDIS_TEST_SIGKILL_AFTER_STEP"
"""Test hook: SIGKILL this process right after global step N (tests/test_resume.py)."""

# Differences between a saved run config and a rerun's config that do not prevent resuming.
RESUME_COMPATIBLE = {
    "train.epochs", "train.progress", "train.log_every_steps", "train.eval_every", "train.checkpoint_every",
    "train.checkpoint_every_steps", "train.image_every", "train.cpu", "train.eval_batch_size",
    "train.check_sync", "data.num_workers", "data.in_memory", "data.root", "data.prepare",
    "run.name", "run.out_dir", "run.dir", "run.artefact_dir", "run.tensorboard",
}


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf (the message names the term and the step)."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was saved, rerun the same command to continue."""

    def __init__(self, signum: int, checkpoint_dir: Path, epoch: int, step: int):
        self.signum, self.checkpoint_dir, self.epoch, self.step = signum, checkpoint_dir, epoch, step
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        super().__init__(f"{name} received: checkpoint saved at epoch {epoch + 1}, step {step} in "
                         f"{checkpoint_dir}; rerun the same command to continue")


class ReplicaDivergenceError(RuntimeError):
    """Processes hold different parameters (a DDP bug)."""


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _dumps(obj) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat_dict(v, key))
        else:
            out[key] = v
    return out


def _fetch(ds, indices: list[int]) -> dict:
    """A batch as a dict of stacked tensors (the data set's batched fast path when it has one)."""
    try:
        out = ds[indices]
        if isinstance(out, dict):
            return {k: torch.as_tensor(v) for k, v in out.items()}
    except (TypeError, IndexError, KeyError, ValueError):
        pass
    items = [ds[i] for i in indices]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def resolve_config(cfg: Config) -> Config:
    """A validated copy with the shorthands expanded (``train.fast``). Raises ConfigError."""
    cfg = config_from_dict(config_to_dict(cfg))
    validate(cfg)
    if cfg.model.kind != "vae":
        raise ConfigError(f"model.kind={cfg.model.kind!r}: the engine trains the VAE only; baselines are "
                          "fitted by facedis.baselines (valid here: 'vae')")
    if cfg.method.disc_use_bn or cfg.pretrain.use_bn:
        if cfg.pretrain.batch_size < 2:
            raise ConfigError("pretrain.batch_size must be >= 2 with BatchNorm in the discriminator")
    return cfg


def effective_pointwise(cfg: Config) -> str:
    """The point-wise layer mode the models run with (``train.fast`` selects the fused path)."""
    try:
        from facedis.step import fast_path

        return fast_path(cfg).pointwise
    except ImportError:
        return "linear" if cfg.train.fast else cfg.model.pointwise


def joint_disc_use_bn(cfg: Config) -> bool:
    """BN/dropout of the joint-training D: the pretraining setting with ``fidelity.disc_bn_match``,
    else ``method.disc_use_bn`` (the reference: off except CoMA +ne-gt, method-spec §0.3)."""
    return cfg.pretrain.use_bn if cfg.fidelity.disc_bn_match else cfg.method.disc_use_bn


def build_models(cfg: Config, num_vertices: int, *, with_disc: Optional[bool] = None, disc_use_bn: Optional[bool] = None):
    """``(vae, disc)`` as plain modules on the current default device (``disc`` is None for
    ``-id-dis`` unless ``with_disc``). Works under ``torch.device("meta")``."""
    from facedis.model import DisentanglingVAE, IdentityDiscriminator

    m = cfg.model
    pw = effective_pointwise(cfg)
    vae = DisentanglingVAE(num_vertices, m.id_dim, m.exp_dim, width=m.width, decoder_hidden=m.decoder_hidden,
                           pointwise=pw, encoder_input=m.encoder_input,
                           decoder_init=m.decoder_init, encoder_channels=m.encoder_channels or None)
    want_d = cfg.method.id_discriminator if with_disc is None else with_disc
    disc = None
    if want_d:
        disc = IdentityDiscriminator(width=m.disc_width, use_bn=joint_disc_use_bn(cfg) if disc_use_bn is None else disc_use_bn,
                                     dropout=m.disc_dropout, pointwise=pw)
    return vae, disc


def pretrain_key(cfg: Config, content_hash: str) -> dict:
    """What identifies a pretrained discriminator: the data set, the pretraining config, the D."""
    arch = {"width": cfg.model.disc_width, "dropout": cfg.model.disc_dropout, "use_bn": cfg.pretrain.use_bn,
            "train_split": cfg.data.train_split}
    parts = {"format": 1, "content_hash": content_hash, "pretrain": config_hash(cfg.pretrain), "arch": arch}
    import hashlib

    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"key": key, **parts}


def _git_info() -> dict:
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


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("facedis", "torch", "accelerate", "numpy", "h5py", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# mixed precision: one GradScaler per optimiser
# ---------------------------------------------------------------------------------------------
class _Backward:
    """``backward(loss, **kw)`` for the step functions. With fp16 it scales the loss with the
    GradScaler of the optimiser whose ``zero_grad`` ran last: ``joint_step`` always calls
    ``opt.zero_grad(); backward(loss); opt.step()`` for D and then for the VAE, so each loss is
    scaled by its own optimiser's scaler."""

    def __init__(self):
        self.scaler = None

    def __call__(self, loss: torch.Tensor, **kwargs) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(**kwargs)


class _ScaledOptimizer:
    """An optimiser with its own ``torch.amp.GradScaler`` (fp16): ``step`` unscales, skips on
    inf/NaN, updates the scale. D and VAE gradients differ by orders of magnitude, so each keeps
    its own loss scale (one shared scaler would let a D overflow shrink the VAE's scale)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler, backward: _Backward):
        self.optimizer, self.scaler, self._backward = optimizer, scaler, backward

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._backward.scaler = self.scaler

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd):
        self.optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# device-side loss accumulation
# ---------------------------------------------------------------------------------------------
class _Accumulator:
    """Per-term sums over the epoch and over the current log window, plus the first step at
    which each term was non-finite; all on the device, updated without host syncs."""

    def __init__(self, device):
        self.device = device
        self.keys: list[str] = []
        self.epoch_sum = self.window_sum = self.first_bad = None
        self.epoch_steps = 0
        self.window_steps = 0

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


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
class _Trainer:
    """State of one ``train`` call (models, optimisers, loaders, run directory). Private: use
    :func:`train` / :func:`evaluate_run`."""

    def __init__(self, cfg: Config, report: Optional[Reporter] = None, *, eval_only: bool = False):
        self.cfg = resolve_config(cfg)
        self.report = report
        self.eval_only = eval_only
        self.run_dir = self.cfg.run.resolved_dir()
        self.t_start = time.time()
        self._signal = 0  # set by the signal handler (this process)
        self._stop = 0  # the agreed stop (all processes)
        self._old_handlers: dict = {}
        self.writer = None
        self.pbar = None

    # ------------------------------------------------------------------ set-up
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cpu = self.cfg.train.cpu or not torch.cuda.is_available()
        # Mixed precision is handled here (autocast + one GradScaler per optimiser), not by accelerate.
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="no",
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        acc = self.accelerator
        self.device = acc.device
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        if self.cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={self.cfg.train.batch_size} (global) is not divisible by the "
                              f"world size {self.world}")
        if self.cfg.pretrain.batch_size % self.world and self.cfg.method.id_discriminator and self.cfg.pretrain.enabled:
            raise ConfigError(f"pretrain.batch_size={self.cfg.pretrain.batch_size} (global) is not divisible by "
                              f"the world size {self.world}")
        if self.cfg.train.batch_size // self.world < 2 and self.world > 1 and not self.cfg.train.sync_bn:
            raise ConfigError("per-process batch < 2 needs train.sync_bn=true (BatchNorm)")
        prec = self.cfg.train.precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        if prec == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU does not support bfloat16; use fp16 or no")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _bcast(self, objs: list) -> list:
        """The main process's values of a list of picklable objects, on every rank."""
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(objs)
        return objs

    def _print(self, *args) -> None:
        if self.is_main:
            msg = " ".join(str(a) for a in args)
            if self.pbar is not None:
                self.pbar.write(msg)
            else:
                print(msg, flush=True)

    def _ensure_data(self) -> None:
        root = Path(self.cfg.data.root)
        if not (root / "meta.json").is_file():
            if not self.cfg.data.prepare:
                raise ConfigError(f"data.root={str(root)!r} is not a prepared data set (no meta.json) and "
                                  "data.prepare is empty; run `python data_prep/prepare.py ... --out "
                                  f"{root}` first or set data.prepare")
            if self.is_main:
                import fcntl

                # Several jobs of an array (or trials of a sweep) may share one data root: the first
                # prepares it under an exclusive lock, the others wait and then find it complete.
                root.parent.mkdir(parents=True, exist_ok=True)
                with open(root.parent / f".{root.name}.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if not (root / "meta.json").is_file():
                        cmd = [sys.executable, "-m", "data_prep.prepare", *self.cfg.data.prepare, "--out", str(root)]
                        print(f"[facedis] preparing the data set: {' '.join(cmd)}", flush=True)
                        t = time.time()
                        res = subprocess.run(cmd)
                        if res.returncode != 0 or not (root / "meta.json").is_file():
                            raise RuntimeError(f"data preparation failed (exit {res.returncode}): {' '.join(cmd)}")
                        print(f"[facedis] data set ready in {time.time() - t:.1f} s: {root}", flush=True)
            self.accelerator.wait_for_everyone()

    def _load_data(self) -> None:
        from facedis import data as fdata

        cfg = self.cfg
        self.info = fdata.load_info(cfg.data.root)
        self.V = int(self.info.num_vertices)
        self.mm = float(self.info.mm_per_unit)
        self.mean_face = torch.as_tensor(np.asarray(self.info.mean_face), dtype=torch.float32).to(self.device)
        self.test_ds = fdata.FaceDataset(cfg.data.root, cfg.data.test_split, in_memory=cfg.data.in_memory,
                                         with_partner=False, seed=cfg.train.seed)
        if not self.eval_only:
            self.train_ds = fdata.FaceDataset(cfg.data.root, cfg.data.train_split, in_memory=cfg.data.in_memory,
                                              with_partner=cfg.method.id_discriminator, seed=cfg.train.seed)
            if len(self.train_ds) < cfg.train.batch_size:
                raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                                  f"({len(self.train_ds)} samples)")

    def _setup_run_dir(self) -> None:
        """Main process: config.yaml (checked against an existing one), provenance.json."""
        run_dir = self.run_dir
        cfg_path = run_dir / "config.yaml"
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if cfg_path.is_file() and (run_dir / "checkpoints" / "last").is_dir():
                old = _flat_dict(yaml.safe_load(cfg_path.read_text()) or {})
                new = _flat_dict(config_to_dict(self.cfg))
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_COMPATIBLE)
                if diff:
                    lines = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
                    raise ConfigError(f"{run_dir} holds a checkpoint of a run with a different config ({lines}); "
                                      "use another run.name / run.dir, or delete the run directory")
            save_config(self.cfg, cfg_path)
        self.accelerator.wait_for_everyone()

    def _write_provenance(self, extra: dict) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "provenance.json"
        sessions = []
        if path.is_file():
            try:
                sessions = json.loads(path.read_text()).get("sessions", [])
            except Exception:
                sessions = []
        session = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t_start)),
            "hostname": socket.gethostname(),
            "world_size": self.world,
            "device": str(self.device),
            "precision": self.cfg.train.precision,
            "argv": list(sys.argv),
            "pid": os.getpid(),
            **extra,
        }
        sessions.append(session)
        prov = {
            **_git_info(),
            "versions": _versions(),
            "dataset": {"name": self.info.meta.get("dataset"), "root": str(Path(self.cfg.data.root).resolve()),
                        "content_hash": self.info.content_hash, "mm_per_unit": self.mm,
                        "num_vertices": self.V, "protocol": self.info.meta.get("protocol")},
            "mode": self.cfg.mode,
            "pretrained_disc": getattr(self, "pretrain_record", None),
            "global_batch_size": self.cfg.train.batch_size,
            "per_process_batch_size": self.cfg.train.batch_size // self.world,
            "world_size": self.world,
            "hostname": socket.gethostname(),
            "sessions": sessions,
        }
        _atomic_write_text(path, json.dumps(prov, indent=2, default=_json_default))

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. a Ray Tune function trainable: the caller handles stops

        def handler(signum, frame):
            self._signal = signum

        for s in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old_handlers[s] = signal.signal(s, handler)
            except (ValueError, OSError):
                pass

    def _restore_signal_handlers(self) -> None:
        for s, h in self._old_handlers.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError, TypeError):
                pass
        self._old_handlers = {}

    def _open_writer(self, purge_step: Optional[int] = None) -> None:
        if self.is_main and self.cfg.run.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)

    # ------------------------------------------------------------------ models
    def _wrap(self, module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """-> (raw module on the device, the module to call: DDP-wrapped / compiled)."""
        if self.world > 1 and self.cfg.train.sync_bn:
            module = convert_sync_batchnorm(module, self.device.type)
        module = module.to(self.device)
        call = module
        if self.cfg.train.compile:
            call = torch.compile(call)
        if self.world > 1:
            call = self.accelerator.prepare(call)
        return module, call

    def _unwrap_sd(self, module) -> dict:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    # ------------------------------------------------------------------ D pretraining
    def _pretrain(self) -> Optional[dict]:
        """Pretrained D state dict (from the cache or trained now), or None when not used."""
        cfg = self.cfg
        if not cfg.method.id_discriminator:
            self.pretrain_record = {"skipped": "-id-dis: no discriminator is used"}
            return None
        if not cfg.pretrain.enabled or cfg.pretrain.epochs == 0:
            self.pretrain_record = {"skipped": "pretrain.enabled is false or pretrain.epochs is 0 (random D)"}
            return None
        key = pretrain_key(cfg, self.info.content_hash)
        art = Path(cfg.run.artefact_dir) / f"disc-{key['key']}"
        path = art / "disc.pt"
        exists = self._bcast([path.is_file()])
        if not exists[0]:
            self._print(f"[facedis] pretraining the identity discriminator ({cfg.pretrain.epochs} epochs) -> {art}")
            sd, history = self._run_pretraining()
            if self.is_main:
                tmp = art.with_name(f".{art.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                torch.save({"format": "facedis-disc/1", "state_dict": sd, "key": key["key"],
                            "arch": key["arch"]}, tmp / "disc.pt")
                (tmp / "info.json").write_text(json.dumps({**key, "pretrain": config_to_dict(cfg)["pretrain"],
                                                           "history": history, "world_size": self.world,
                                                           "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
                try:
                    os.rename(tmp, art)
                except OSError:  # another run finished the same artefact first: keep theirs
                    shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.wait_for_everyone()
        else:
            self._print(f"[facedis] using the cached pretrained discriminator {art}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self.pretrain_record = {"artefact": str(art.resolve()), **key}
        return ckpt["state_dict"]

    def _run_pretraining(self) -> tuple[dict, list]:
        from facedis import data as fdata
        from facedis.step import pretrain_disc_step

        cfg, pc = self.cfg, self.cfg.pretrain
        _seed_everything(mix_seed(pc.seed, 7, self.rank))
        torch.manual_seed(mix_seed(pc.seed, 11))  # same D init on every rank
        _, disc = build_models(cfg, self.V, with_disc=True, disc_use_bn=pc.use_bn)
        raw, call = self._wrap(disc)
        opt = torch.optim.Adam(raw.parameters(), lr=pc.lr)
        torch.manual_seed(mix_seed(pc.seed, 13, self.rank))
        ds = fdata.PairDataset(cfg.data.root, cfg.data.train_split, seed=pc.seed)
        if len(ds) < pc.batch_size:
            raise ConfigError(f"pretrain.batch_size={pc.batch_size} is larger than the training split "
                              f"({len(ds)} samples of {cfg.data.root}); lower pretrain.batch_size")
        sampler = GlobalBatchSampler(len(ds), pc.batch_size, self.world, self.rank, seed=mix_seed(pc.seed, 17),
                                     max_steps=cfg.train.max_steps_per_epoch)
        backward = _Backward()
        scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        sopt = _ScaledOptimizer(opt, scaler, backward)
        history = []
        steps = sampler.steps_per_epoch()
        bar = self._bar(total=pc.epochs * steps, desc="pretrain D")
        step = 0
        for epoch in range(pc.epochs):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            acc = _Accumulator(self.device)
            for idx in sampler:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in _fetch(ds, idx).items()}
                logs = pretrain_disc_step(call, sopt, batch, backward=backward, autocast_ctx=self.autocast)
                acc.add(logs, step)
                step += 1
                if bar is not None:
                    bar.update(1)
            means = self._reduce_means(acc.epoch_sum / max(acc.epoch_steps, 1))
            rec = {"epoch": epoch + 1, **{f"pretrain/{k}": v for k, v in zip(acc.keys, means)}}
            if not all(math.isfinite(v) for v in means):
                raise NonFiniteLossError(f"discriminator pretraining: non-finite loss at epoch {epoch + 1}: {rec}")
            if epoch + 1 == pc.epochs or (epoch + 1) % 10 == 0:
                try:  # logging only; a test split with one identity has no different-identity pairs
                    rec["pretrain/test_acc"] = self._pretrain_test_acc(raw)
                except DatasetError as e:
                    self._print(f"[facedis] no D test accuracy: {e}")
            history.append(rec)
            if bar is not None:
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in rec.items() if k != "epoch"})
            if self.writer is not None:
                for k, v in rec.items():
                    if k != "epoch":
                        self.writer.add_scalar(k, v, epoch + 1)
        if bar is not None:
            bar.close()
        last = history[-1] if history else {}
        self._print(f"[facedis] D pretraining done: loss {last.get('pretrain/disc', float('nan')):.4f}, "
                    f"train acc {last.get('pretrain/disc_acc', float('nan')):.3f}, "
                    f"test acc {last.get('pretrain/test_acc', float('nan')):.3f}")
        return self._unwrap_sd(raw), history

    @torch.no_grad()
    def _pretrain_test_acc(self, disc) -> float:
        from facedis import data as fdata

        ds = fdata.PairDataset(self.cfg.data.root, self.cfg.data.test_split, seed=self.cfg.pretrain.seed + 1)
        was = disc.training
        disc.eval()
        idx, valid = shard_indices(len(ds), self.world, self.rank)
        bs = max(1, self.cfg.train.eval_batch_size // self.world)
        correct = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(idx), bs):
            b = {k: v.to(self.device) for k, v in _fetch(ds, idx[i:i + bs]).items()}
            logits = disc(torch.cat([b["a"], b["b"]], dim=-1))
            ok = (logits.argmax(1) == b["same"].long()).double()
            m = torch.tensor(valid[i:i + bs], dtype=torch.float64, device=self.device)
            correct += torch.stack([(ok * m).sum(), m.sum()])
        disc.train(was)
        correct = self.accelerator.reduce(correct, "sum") if self.world > 1 else correct
        return float(correct[0] / correct[1].clamp(min=1))

    # ------------------------------------------------------------------ joint training set-up
    def _offset_scale(self) -> float:
        """Scale of the encoder's offset channels: the mean face's spatial spread over the RMS
        offset of the training neutrals from it, so both channel groups have comparable size."""
        mean = np.asarray(self.info.mean_face, dtype=np.float64)
        spread = np.sqrt(((mean - mean.mean(0)) ** 2).sum(1).mean())
        neu = np.asarray(self.info.neutral(self.cfg.data.train_split), dtype=np.float64)
        neu = neu[~np.isnan(neu).any(axis=(1, 2))]
        rms = np.sqrt(((neu - mean) ** 2).sum(2).mean()) if len(neu) else 0.0
        return float(spread / rms) if rms > 0 else 1.0

    def _build_joint(self, disc_sd: Optional[dict]) -> None:
        from facedis.losses import uniform_laplacian
        from facedis.step import StepWeights

        cfg = self.cfg
        torch.manual_seed(mix_seed(cfg.train.seed, 1))  # identical init on every rank
        vae, disc = build_models(cfg, self.V)
        if cfg.model.encoder_input != "absolute":
            vae.set_input_reference(self.mean_face.cpu(), self._offset_scale())
        if disc is not None and disc_sd is not None:
            dropped = disc.load_pretrained(disc_sd)
            if dropped:
                self._print(f"[facedis] pretrained D loaded without its {len(dropped)} BatchNorm entries "
                            "(joint D runs without BN, as the reference)")
        self.vae_raw, self.vae = self._wrap(vae)
        self.disc_raw = self.disc = None
        if disc is not None:
            self.disc_raw, self.disc = self._wrap(disc)
        o = cfg.optim
        self.opt_vae_raw = torch.optim.Adam(self.vae_raw.parameters(), lr=o.lr_vae, weight_decay=o.weight_decay_vae)
        self.sched_vae = torch.optim.lr_scheduler.StepLR(self.opt_vae_raw, step_size=o.lr_step_epochs, gamma=o.lr_gamma)
        self.backward = _Backward()
        fp16 = self.amp_dtype == torch.float16
        self.scaler_vae = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.opt_vae = _ScaledOptimizer(self.opt_vae_raw, self.scaler_vae, self.backward)
        self.opt_disc_raw = self.sched_disc = self.opt_disc = self.scaler_disc = None
        if self.disc_raw is not None:
            self.opt_disc_raw = torch.optim.Adam(self.disc_raw.parameters(), lr=o.lr_disc)
            self.sched_disc = torch.optim.lr_scheduler.StepLR(self.opt_disc_raw, step_size=o.lr_step_epochs,
                                                              gamma=o.lr_gamma)
            self.scaler_disc = torch.amp.GradScaler(self.device.type) if fp16 else None
            self.opt_disc = _ScaledOptimizer(self.opt_disc_raw, self.scaler_disc, self.backward)
        self.use_lap = cfg.use_laplacian()
        dense = bool(getattr(cfg.fidelity, "dense_laplacian", False)) and not cfg.train.fast
        self.lap = (uniform_laplacian(np.asarray(self.info.triangles), self.V, dense=dense).to(self.device)
                    if self.use_lap else None)
        L = cfg.loss
        self.weights = StepWeights(recon=L.recon, kl_id=L.kl_id, kl_exp=L.kl_exp, adv_id=L.adv_id,
                                   neutral_recon=L.neutral_recon, exp_recon=L.exp_recon,
                                   latent_consistency=L.latent_consistency, laplacian=L.laplacian)
        from facedis.step import FIDELITY_OPTIONS

        fid = {k: v for k, v in dataclasses.asdict(cfg.fidelity).items() if k in FIDELITY_OPTIONS}
        if cfg.train.fast:  # the update-preserving fast switches (docs/fidelity.md)
            fid["detach_fakes"] = fid["encoder_only_reencode"] = True
        if self.world > 1 and self.disc is not None and not fid["detach_fakes"]:
            # Same updates (the VAE grads of the D step are discarded anyway, method-spec §0.5), but a
            # partial backward through DDP(vae) would break its reducer.
            fid["detach_fakes"] = True
        self.fidelity = fid
        self.sampler = GlobalBatchSampler(len(self.train_ds), cfg.train.batch_size, self.world, self.rank,
                                          seed=mix_seed(cfg.train.seed, 2), max_steps=cfg.train.max_steps_per_epoch)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError("the training split has fewer samples than one global batch")

    def _loader(self, epoch: int):
        from torch.utils.data import DataLoader

        from facedis import data as fdata

        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)
        g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, 3, epoch, self.rank))
        nw = self.cfg.data.num_workers
        if nw > 0:  # workers gather into reused shared-memory slots; each batch is consumed before the next
            return fdata.SlotLoader(self.train_ds, max_batch=self.sampler.local_batch, num_workers=nw,
                                    sampler=self.sampler, batch_size=None, generator=g, pin_memory=self.device.type == "cuda",
                                    persistent_workers=False)
        return DataLoader(self.train_ds, sampler=self.sampler, batch_size=None, num_workers=0, generator=g)

    def _prefetch(self, loader):
        try:
            from facedis.step import DevicePrefetcher
        except ImportError:
            return ({k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in loader)
        return DevicePrefetcher(loader, self.device)

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    def _save_checkpoint(self, epochs_done: int, step_in_epoch: int) -> Path:
        """Atomic: every rank writes into a temporary directory, the main process renames it."""
        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        tmp = root / f".tmp-last-{self.global_step}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank_state = {"rng": _rng_state(), "rank": self.rank,
                      "params_sha256": param_sha256(self.vae_raw, self.disc_raw)}
        torch.save(rank_state, tmp / f"rank{self.rank}.pt")
        if self.is_main:
            state = {
                "format": "facedis-ckpt/1",
                "epochs_done": epochs_done, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
                "vae": self._unwrap_sd(self.vae_raw),
                "disc": self._unwrap_sd(self.disc_raw) if self.disc_raw is not None else None,
                "opt_vae": self.opt_vae_raw.state_dict(),
                "opt_disc": self.opt_disc_raw.state_dict() if self.opt_disc_raw is not None else None,
                "sched_vae": self.sched_vae.state_dict(),
                "sched_disc": self.sched_disc.state_dict() if self.sched_disc is not None else None,
                "scaler_vae": self.scaler_vae.state_dict() if self.scaler_vae is not None else None,
                "scaler_disc": self.scaler_disc.state_dict() if self.scaler_disc is not None else None,
                "accum": self.accum.state_dict(),
                "last_eval": self.last_eval,
                "last_train": self.last_train,
                "world_size": self.world,
            }
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"epochs_done": epochs_done, "step_in_epoch": step_in_epoch,
                                                       "global_step": self.global_step, "world_size": self.world,
                                                       "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        acc.wait_for_everyone()
        if self.is_main:
            last, old = root / "last", root / f".old-last-{self.global_step}"
            if last.exists():
                os.rename(last, old)
            os.rename(tmp, last)
            shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(".tmp-last-*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return self.ckpt_dir

    def _find_checkpoint(self) -> Optional[Path]:
        root = self.run_dir / "checkpoints"
        if (root / "last" / "state.pt").is_file():
            return root / "last"
        olds = sorted(root.glob(".old-last-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
        for p in reversed(olds):  # crashed between the two renames
            if (p / "state.pt").is_file():
                return p
        return None

    def _load_checkpoint(self, path: Path) -> tuple[int, int]:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        self.vae_raw.load_state_dict(state["vae"])
        if self.disc_raw is not None and state["disc"] is not None:
            self.disc_raw.load_state_dict(state["disc"])
        self.opt_vae_raw.load_state_dict(state["opt_vae"])
        self.sched_vae.load_state_dict(state["sched_vae"])
        if self.opt_disc_raw is not None and state["opt_disc"] is not None:
            self.opt_disc_raw.load_state_dict(state["opt_disc"])
            self.sched_disc.load_state_dict(state["sched_disc"])
        if self.scaler_vae is not None and state["scaler_vae"]:
            self.scaler_vae.load_state_dict(state["scaler_vae"])
        if self.scaler_disc is not None and state["scaler_disc"]:
            self.scaler_disc.load_state_dict(state["scaler_disc"])
        self.accum.load_state_dict(state["accum"])
        self.last_eval = state.get("last_eval")
        self.last_train = state.get("last_train") or {}
        self.global_step = int(state["global_step"])
        rank_file = path / f"rank{self.rank}.pt"
        if rank_file.is_file() and state.get("world_size") == self.world:
            _set_rng_state(torch.load(rank_file, map_location="cpu", weights_only=True)["rng"])
        else:
            self._print(f"[facedis] world size changed ({state.get('world_size')} -> {self.world}): "
                        "RNG streams are reseeded (the data order is unchanged)")
            _seed_everything(mix_seed(self.cfg.train.seed, 5, self.rank, self.global_step))
        return int(state["epochs_done"]), int(state["step_in_epoch"])

    # ------------------------------------------------------------------ logging helpers
    def _bar(self, total: int, desc: str, initial: int = 0):
        if not (self.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=True)

    def _reduce_means(self, vec: torch.Tensor) -> list[float]:
        if self.world > 1:
            vec = self.accelerator.reduce(vec.clone(), "mean")
        return vec.tolist()

    def _check_window(self, epoch: int) -> dict:
        """The log-interval check: one host sync (and two all-reduces under DDP)."""
        acc = self.accum
        if not acc.keys:
            return {}
        win = acc.window_sum / max(acc.window_steps, 1)
        flags = torch.cat([acc.first_bad.double(), torch.tensor([float(self._signal)], dtype=torch.float64,
                                                                 device=self.device)])
        if self.world > 1:
            win = self.accelerator.reduce(win.clone(), "mean")
            flags = self.accelerator.reduce(flags, "max")
        win_l, flags_l = win.tolist(), flags.tolist()
        acc.window_sum.zero_()
        acc.window_steps = 0
        bad = {k: int(s) for k, s in zip(acc.keys, flags_l[:-1]) if s >= 0}
        if bad:
            first = min(bad.values())
            terms = [k for k, s in bad.items() if s == first]
            spe = self.steps_per_epoch
            raise NonFiniteLossError(
                f"non-finite loss: term {', '.join(repr(t) for t in terms)} became NaN/inf at global step "
                f"{first + 1} (epoch {first // spe + 1}, batch {first % spe + 1}). Lower the learning rate or "
                f"the loss weight, or try train.precision=no. Run directory: {self.run_dir}")
        if flags_l[-1] > 0:
            self._stop = int(flags_l[-1])
        return dict(zip(acc.keys, win_l))

    def _check_sync(self) -> None:
        if self.world == 1 or not self.cfg.train.check_sync:
            return
        c = param_checksum(self.vae_raw, self.disc_raw).to(self.device)
        allc = self.accelerator.gather(c[None]).cpu()
        if not torch.equal(allc, allc[:1].expand_as(allc)):
            raise ReplicaDivergenceError(f"the {self.world} processes hold different parameters: {allc.tolist()}")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[dict, np.ndarray]:
        """Test-split metrics in mm (fp32, μ codes, eval mode), gathered across ranks."""
        from facedis import metrics as M
        from facedis.step import eval_forward

        cfg = self.cfg
        vae = self.vae_raw
        was = vae.training
        vae.eval()
        align = cfg.train.eval_align
        kabsch = align == "kabsch" or (align == "auto" and cfg.dataset == "bu3dfe")
        n = len(self.test_ds)
        idx, valid = shard_indices(n, self.world, self.rank)
        bs = max(1, cfg.train.eval_batch_size // self.world)
        mean_np = np.asarray(self.info.mean_face, dtype=np.float64)
        cols = {k: [] for k in ("index", "valid", "subject", "e_rec", "avd", "avd_mf")}
        ident, vsum = [], np.zeros(self.V)
        for i in range(0, len(idx), bs):
            chunk = idx[i:i + bs]
            b = _fetch(self.test_ds, chunk)
            x = b["vertices"].to(self.device)
            pred = eval_forward(vae, x, self.mean_face)
            full = pred.full.double().cpu().numpy()
            idn = pred.identity.double().cpu().numpy()
            xv = b["vertices"].double().numpy()
            neu = (b["neutral"].double().numpy() if "neutral" in b
                   else np.full(b["vertices"].shape, np.nan))  # no neutral ground truth in this split
            if kabsch:
                full = M.kabsch_align(full, xv)
                has = np.isfinite(neu).all(axis=(1, 2))
                if has.any():
                    idn[has] = M.kabsch_align(idn[has], neu[has])
            v_ok = np.asarray(valid[i:i + bs], dtype=bool)
            cols["index"].append(np.asarray(chunk))
            cols["valid"].append(v_ok)
            cols["subject"].append(b["subject"].numpy())
            cols["e_rec"].append(M.per_sample_vertex_distance(full, xv, self.mm))
            cols["avd"].append(M.per_sample_vertex_distance(idn, neu, self.mm))
            cols["avd_mf"].append(M.per_sample_vertex_distance(np.broadcast_to(mean_np, neu.shape), neu, self.mm))
            vsum += (np.linalg.norm(full - xv, axis=-1) * self.mm)[v_ok].sum(0)
            ident.append(idn.astype(np.float32))
        vae.train(was)
        local = {k: torch.from_numpy(np.concatenate(v) if v else np.zeros(0)).to(self.device) for k, v in cols.items()}
        local["identity"] = torch.from_numpy(np.concatenate(ident) if ident else np.zeros((0, self.V, 3), np.float32)).to(self.device)
        vsum_t = torch.from_numpy(vsum).to(self.device)
        if self.world > 1:
            local = {k: self.accelerator.gather_for_metrics(v) for k, v in local.items()}
            vsum_t = self.accelerator.reduce(vsum_t, "sum")
        out: dict = {}
        if self.is_main:
            g = {k: v.cpu().numpy() for k, v in local.items()}
            keep = g["valid"].astype(bool)
            order = np.argsort(g["index"][keep], kind="stable")
            g = {k: v[keep][order] for k, v in g.items()}
            for name, key in (("E_rec", "e_rec"), ("AVD_neu", "avd"), ("AVD_neu_meanface", "avd_mf")):
                vals = g[key][np.isfinite(g[key])]
                s = M.summarize(vals) if vals.size else {"mean": None, "std": None, "median": None}
                for stat in ("mean", "std", "median"):
                    out[f"{name}_{stat}"] = s[stat]
            subj = g["subject"].astype(np.int64)
            ref = M.edis_reference(g["identity"], subj, self.mm)  # already in stored units
            vst = M.edis_vertex_std(g["identity"], subj, self.mm)
            out.update({"E_dis_ref_mean": ref["mean"], "E_dis_ref_median": ref["median"],
                        "E_dis_vstd_mean": vst["mean"], "E_dis_vstd_median": vst["median"],
                        "num_test_samples": int(keep.sum()), "num_test_identities": int(np.unique(subj).size),
                        "eval_align": "kabsch" if kabsch else "none"})
        box = self._bcast([out])
        per_vertex = (vsum_t.cpu().numpy() / max(n, 1))
        return box[0], per_vertex

    def _error_map_figure(self, per_vertex: np.ndarray, title: str):
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        t = np.asarray(self.info.template if getattr(self.info, "template", None) is not None else self.info.mean_face)
        fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=100)
        sc = ax.scatter(t[:, 0], t[:, 1], c=per_vertex, s=3, cmap="viridis")
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title, fontsize=9)
        fig.colorbar(sc, ax=ax, fraction=0.046, label="mean vertex error (mm)")
        return fig

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        self._make_accelerator()
        self._ensure_data()
        self._load_data()
        self._setup_run_dir()
        done = self.run_dir / "metrics.json"
        if done.is_file():
            metrics = json.loads(done.read_text())
            self._print(f"[facedis] {self.run_dir} is already finished (metrics.json exists); nothing to do")
            return metrics
        self._open_writer()
        ckpt = self._find_checkpoint()
        broadcast_ok = self._bcast([ckpt is not None])
        disc_sd = None if broadcast_ok[0] else self._pretrain()
        if broadcast_ok[0]:
            self.pretrain_record = {"restored_from_checkpoint": True}
        self._build_joint(disc_sd)
        self.accum = _Accumulator(self.device)
        self.last_eval, self.last_train, self.global_step = None, {}, 0
        start_epoch, start_step = 0, 0
        _seed_everything(mix_seed(cfg.train.seed, 4, self.rank))  # per-rank training streams
        if broadcast_ok[0]:
            path = self._find_checkpoint()
            start_epoch, start_step = self._load_checkpoint(path)
            self._print(f"[facedis] resuming from {path} (epoch {start_epoch + 1}, step {start_step})")
            if self.writer is not None:
                self.writer.close()
                self.writer = None
                self._open_writer(purge_step=self.global_step + 1)
            self._truncate_jsonl(start_epoch)
        self._write_provenance({"resumed_from": {"epochs_done": start_epoch, "step": start_step} if broadcast_ok[0] else None})
        self._install_signal_handlers()
        try:
            self._fit(start_epoch, start_step)
            return self._finish()
        finally:
            self._restore_signal_handlers()
            if self.pbar is not None:
                self.pbar.close()
                self.pbar = None
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    def _truncate_jsonl(self, epochs_done: int) -> None:
        if not self.is_main:
            return
        p = self.run_dir / "metrics.jsonl"
        if not p.is_file():
            return
        lines = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", 0) <= epochs_done]
        _atomic_write_text(p, "".join(ln + "\n" for ln in lines))

    def _fit(self, start_epoch: int, start_step: int) -> None:
        from facedis.losses import kl_decay_scale
        from facedis.step import joint_step

        cfg, tc = self.cfg, self.cfg.train
        E, spe = tc.epochs, self.steps_per_epoch
        kill_after = int(os.environ.get(TEST_KILL_ENV, "0") or 0)
        self.pbar = self._bar(total=E * spe, desc="train", initial=start_epoch * spe + start_step)
        use_d = self.disc is not None
        for epoch in range(start_epoch, E):
            t_epoch = time.time()
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                self.accum.reset_epoch()
            self.sampler.set_epoch(epoch, first)
            kl = max(kl_decay_scale(epoch + 1, cfg.loss.kl_decay_epochs), 0.0) if cfg.loss.kl_decay_epochs > 0 else 1.0
            if self.pbar is not None:
                self.pbar.set_description(f"epoch {epoch + 1}/{E}")
            step = first
            for batch in self._prefetch(self._loader(epoch)):
                logs = joint_step(self.vae, self.disc, self.opt_vae, self.opt_disc, batch, self.mean_face, self.lap,
                                  self.weights, use_discriminator=use_d, neutral_gt=cfg.method.neutral_gt,
                                  use_laplacian=self.use_lap, kl_scale=kl, fidelity=self.fidelity,
                                  backward=self.backward, autocast_ctx=self.autocast)
                self.accum.add(logs, self.global_step)
                self.global_step += 1
                step += 1
                if self.pbar is not None:
                    self.pbar.update(1)
                if self.global_step % tc.log_every_steps == 0:
                    win = self._check_window(epoch)
                    if self.writer is not None:
                        for k, v in win.items():
                            self.writer.add_scalar(f"train/{k}", v, self.global_step)
                    if self.pbar is not None and win:
                        show = ("total", "recon", "neutral_recon", "disc", "disc_acc")
                        self.pbar.set_postfix({k: f"{win[k]:.3g}" for k in show if k in win}, refresh=False)
                if tc.checkpoint_every_steps and self.global_step % tc.checkpoint_every_steps == 0 and step < spe:
                    self._save_checkpoint(epoch, step)
                if self.world == 1:
                    self._stop = self._signal  # one process: act at once; DDP: agreed in _check_window
                if self._stop and step < spe:
                    path = self._save_checkpoint(epoch, step)
                    raise TrainingInterrupted(self._stop, path, epoch, step)
                if kill_after and self.global_step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            # ---- epoch end ----
            self._check_window(epoch)
            means = self._reduce_means(self.accum.epoch_sum / max(self.accum.epoch_steps, 1))
            self.last_train = {f"train/{k}": v for k, v in zip(self.accum.keys, means)}
            with warnings.catch_warnings():  # fp16: a GradScaler-skipped first step makes StepLR warn
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.sched_vae.step()
                if self.sched_disc is not None:
                    self.sched_disc.step()
            self._check_sync()
            rec = {"epoch": epoch + 1, "global_step": self.global_step, **self.last_train,
                   "lr/vae": self.opt_vae_raw.param_groups[0]["lr"]}
            if self.opt_disc_raw is not None:
                rec["lr/disc"] = self.opt_disc_raw.param_groups[0]["lr"]
            evaluated = (epoch + 1) % tc.eval_every == 0 or epoch + 1 == E
            per_vertex = None
            if evaluated:
                t_eval = time.time()
                self.last_eval, per_vertex = self.evaluate()
                rec.update(self.last_eval)
                rec["time/eval_s"] = time.time() - t_eval
            rec["time/epoch_s"] = time.time() - t_epoch
            if self.is_main:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(_dumps(rec) + "\n")
                if self.writer is not None:
                    for k, v in rec.items():
                        if isinstance(v, (int, float)) and k not in ("epoch",) and v is not None:
                            tag = k if "/" in k else f"eval/{k}"
                            self.writer.add_scalar(f"epoch/{k}" if k.startswith("train/") else tag, v, epoch + 1)
                    img_due = tc.image_every and (epoch + 1) % tc.image_every == 0
                    if per_vertex is not None and (img_due or epoch + 1 == E):
                        self.writer.add_figure("eval/error_map", self._error_map_figure(
                            per_vertex, f"E_rec per vertex, epoch {epoch + 1}"), epoch + 1)
                    self.writer.flush()
                if evaluated:
                    self._print(self._eval_line(epoch + 1))
            ckpt_due = (epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == E or evaluated or self._stop
            path = self._save_checkpoint(epoch + 1, 0) if ckpt_due else self.ckpt_dir
            if evaluated and self.report is not None and self.is_main:
                self.report(dict(rec), path)
            if self._stop and epoch + 1 < E:
                raise TrainingInterrupted(self._stop, path, epoch + 1, 0)

    def _eval_line(self, epoch: int) -> str:
        m = self.last_eval or {}

        def f(k):
            v = m.get(k)
            return "n/a" if v is None else f"{v:.3f}"

        return (f"[facedis] epoch {epoch}: E_rec {f('E_rec_mean')} mm, AVD_neu {f('AVD_neu_mean')} mm "
                f"(mean face {f('AVD_neu_meanface_mean')}), E_dis ref {f('E_dis_ref_mean')} / "
                f"vstd {f('E_dis_vstd_mean')} mm")

    # ------------------------------------------------------------------ the end
    def _model_payload(self) -> dict:
        from facedis.config import config_to_dict as c2d

        info = self.info
        return {
            "format": "facedis-model/1",
            "vae": self._unwrap_sd(self.vae_raw),
            "model_config": c2d(self.cfg.model),
            "num_vertices": self.V,
            "mean_face": torch.as_tensor(np.asarray(info.mean_face), dtype=torch.float32),
            "template": torch.as_tensor(np.asarray(info.template), dtype=torch.float32),
            "triangles": torch.as_tensor(np.asarray(info.triangles), dtype=torch.int64),
            "mm_per_unit": self.mm,
            "dataset": self.cfg.dataset,
            "content_hash": info.content_hash,
            "mode": self.cfg.mode,
            "config": c2d(self.cfg),
            "facedis_version": _versions().get("facedis"),
        }

    def _finish(self) -> dict:
        cfg = self.cfg
        if self.last_eval is None:  # e.g. resumed after the last epoch's checkpoint without its eval
            self.last_eval, _ = self.evaluate()
        final = {**self.last_eval, **self.last_train, "epoch": cfg.train.epochs, "global_step": self.global_step,
                 "seed": cfg.train.seed, "dataset": cfg.dataset, "mode": cfg.mode}
        if self.is_main:
            payload = self._model_payload()
            payload["metrics"] = {k: v for k, v in final.items() if isinstance(v, (int, float, str)) or v is None}
            _atomic_torch_save(payload, self.run_dir / "model.pt")
            _atomic_write_text(self.run_dir / "metrics.json", json.dumps(final, indent=2, default=_json_default))
            self._summary(final)
        self.accelerator.wait_for_everyone()
        return final

    def _summary(self, m: dict) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        wall = time.time() - self.t_start

        def f(k):
            v = m.get(k)
            return "   n/a" if v is None else f"{v:7.3f}"

        lines = [
            "",
            f"facedis: finished {self.cfg.dataset} {self.cfg.mode} ({self.cfg.train.epochs} epochs, "
            f"{self.global_step} steps, world size {self.world}, {self.device.type}) in {wall / 60:.1f} min",
            f"  test split ({m.get('num_test_samples')} samples, {m.get('num_test_identities')} identities), mm:",
            f"    E_rec      mean {f('E_rec_mean')}  median {f('E_rec_median')}  std {f('E_rec_std')}",
            f"    AVD_neu    mean {f('AVD_neu_mean')}  median {f('AVD_neu_median')}  std {f('AVD_neu_std')}",
            f"    (mean face AVD_neu {f('AVD_neu_meanface_mean')})",
            f"    E_dis ref  mean {f('E_dis_ref_mean')}  median {f('E_dis_ref_median')}",
            f"    E_dis vstd mean {f('E_dis_vstd_mean')}  median {f('E_dis_vstd_median')}",
            f"  run directory {self.run_dir}/: metrics.json, metrics.jsonl, model.pt, config.yaml,",
            "    provenance.json, checkpoints/last/, tb/ (tensorboard --logdir " + str(self.run_dir / "tb") + ")",
        ]
        print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def train(cfg: Config, report: Optional[Reporter] = None) -> dict:
    """Train (or resume, or return the metrics of a finished run) and return the final metrics.

    ``report(metrics, checkpoint_dir)`` is called on the main process after every evaluation;
    ``metrics`` holds ``epoch``, the epoch's mean train losses (``train/<term>``), learning rates
    and the evaluation metrics (``E_rec_mean``, ``AVD_neu_mean``, ``E_dis_ref_mean``, ...).

    Raises :class:`ConfigError` before any work for a bad config, :class:`NonFiniteLossError`
    on a NaN/inf loss and :class:`TrainingInterrupted` after SIGTERM/SIGUSR1 (checkpoint saved).
    """
    if cfg.model.kind != "vae":  # baselines (docs/results.md) fit and evaluate through this engine's helpers
        from facedis.baselines import run_baseline

        return run_baseline(cfg, report)
    return _Trainer(cfg, report).run()


def evaluate_run(run_dir: str | os.PathLike, overrides: dict | list | None = None, write: bool = True) -> dict:
    """Re-evaluate a run from its ``config.yaml`` and ``model.pt`` (or ``checkpoints/last``)
    and return the metrics; writes ``<run_dir>/eval.json`` (main process). ``overrides``
    (dotted keys) may change e.g. ``data.root`` or ``train.eval_batch_size``."""
    from facedis.config import apply_overrides, load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.kind != "vae":
        raise ConfigError(f"{run_dir} is a {cfg.model.kind} baseline run: its metrics are in metrics.json; "
                          "rerun its config with another run.dir to refit")
    cfg = apply_overrides(cfg, {**({} if overrides is None else
                                   (dict(overrides) if isinstance(overrides, dict) else
                                    dict(__import__("facedis.config", fromlist=["parse_override"]).parse_override(o)
                                         for o in overrides))),
                                "run.dir": str(run_dir)})
    tr = _Trainer(cfg, eval_only=True)
    tr._make_accelerator()
    tr._ensure_data()
    tr._load_data()
    vae, _ = build_models(tr.cfg, tr.V, with_disc=False)
    if (run_dir / "model.pt").is_file():
        payload = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
        vae.load_state_dict(payload["vae"])
        source = run_dir / "model.pt"
    else:
        path = tr.run_dir / "checkpoints" / "last" / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: neither model.pt nor checkpoints/last/state.pt")
        vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["vae"])
        source = path
    tr.vae_raw = vae.to(tr.device)
    metrics, _ = tr.evaluate()
    metrics = {**metrics, "source": str(source), "dataset": tr.cfg.dataset, "mode": tr.cfg.mode,
               "seed": tr.cfg.train.seed}
    if write and tr.is_main:
        _atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=2, default=_json_default))
    return metrics
