"""What a run is made of, built from its config: the checked config, the data, the models, and
the step's switches.

:func:`open_run` is the one set-up sequence of every run (training, a baseline fit, a
re-evaluation): check the config, start the :class:`~facedis.runtime.Runtime`, prepare the data
set if it is missing, load it, and point at the run directory. :func:`step_fidelity` and
:func:`pointwise_mode` are the one place where ``train.fast`` is expanded into the switches the
step and the models read.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from facedis.config import Config, ConfigError, FidelityConfig, config_from_dict, config_hash, config_to_dict, validate
from facedis.rundir import RunDir
from facedis.runtime import Runtime


# ---------------------------------------------------------------------------------------------
# the fast path and the fidelity switches
# ---------------------------------------------------------------------------------------------
def step_fidelity(cfg: Config, world_size: int = 1) -> FidelityConfig:
    """The fidelity switches the training step runs with.

    ``train.fast`` turns on the switches that keep the parameter updates unchanged (detached fakes,
    encoder-only re-encode, sparse Laplacian); the switches that change results (``analytic_kl``,
    ``reencode_mu``, ``disc_bn_match``) stay as configured. With several processes and a
    discriminator the fakes are detached too: same updates, and DDP rejects the partial VAE
    backward of the non-detached D step.
    """
    fid = dataclasses.replace(cfg.fidelity)
    if cfg.train.fast:
        fid.detach_fakes = fid.encoder_only_reencode = True
        fid.dense_laplacian = False
    if world_size > 1 and cfg.method.id_discriminator:
        fid.detach_fakes = True
    return fid


def pointwise_mode(cfg: Config) -> str:
    """How the point-wise layers run: ``fused`` with ``train.fast``, else ``model.pointwise``."""
    return "fused" if cfg.train.fast else cfg.model.pointwise


def joint_disc_use_bn(cfg: Config) -> bool:
    """BatchNorm/dropout in the joint-training discriminator: the pretraining setting with
    ``fidelity.disc_bn_match``, else ``method.disc_use_bn`` (the reference: off except CoMA +ne-gt)."""
    return cfg.pretrain.use_bn if cfg.fidelity.disc_bn_match else cfg.method.disc_use_bn


# ---------------------------------------------------------------------------------------------
# config and models
# ---------------------------------------------------------------------------------------------
def check_config(cfg: Config) -> Config:
    """A validated copy. Raises ConfigError."""
    cfg = config_from_dict(config_to_dict(cfg))
    validate(cfg)
    if (cfg.method.disc_use_bn or cfg.pretrain.use_bn) and cfg.pretrain.batch_size < 2:
        raise ConfigError("pretrain.batch_size must be >= 2 with BatchNorm in the discriminator")
    return cfg


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with the multi-tensor (``foreach``) update. On CPU torch defaults to a per-parameter
    loop of about ten small ops per tensor; the multi-tensor path gives bit-identical updates
    (tests/test_fast_path.py) in a few batched ops, which matters for the small models."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def build_models(cfg: Config, num_vertices: int, *, with_disc: Optional[bool] = None,
                 disc_use_bn: Optional[bool] = None):
    """``(vae, disc)`` as plain modules on the current default device (``disc`` is None for
    ``-id-dis`` unless ``with_disc``). Works under ``torch.device("meta")``."""
    from facedis.model import DisentanglingVAE, IdentityDiscriminator

    m = cfg.model
    pw = pointwise_mode(cfg)
    vae = DisentanglingVAE(num_vertices, m.id_dim, m.exp_dim, width=m.width, decoder_hidden=m.decoder_hidden,
                           pointwise=pw, encoder_input=m.encoder_input,
                           decoder_init=m.decoder_init, encoder_channels=m.encoder_channels or None)
    want_d = cfg.method.id_discriminator if with_disc is None else with_disc
    disc = None
    if want_d:
        disc = IdentityDiscriminator(width=m.disc_width, dropout=m.disc_dropout, pointwise=pw,
                                     use_bn=joint_disc_use_bn(cfg) if disc_use_bn is None else disc_use_bn)
    return vae, disc


def offset_scale(info, train_split: str) -> float:
    """Scale of the encoder's offset channels: the mean face's spatial spread over the RMS offset
    of the training neutrals from it, so both channel groups have comparable size."""
    mean = np.asarray(info.mean_face, dtype=np.float64)
    spread = np.sqrt(((mean - mean.mean(0)) ** 2).sum(1).mean())
    neu = np.asarray(info.neutral(train_split), dtype=np.float64)
    neu = neu[~np.isnan(neu).any(axis=(1, 2))]
    rms = np.sqrt(((neu - mean) ** 2).sum(2).mean()) if len(neu) else 0.0
    return float(spread / rms) if rms > 0 else 1.0


def pretrain_key(cfg: Config, content_hash: str) -> dict:
    """What identifies a pretrained discriminator: the data set, the pretraining config, the D."""
    arch = {"width": cfg.model.disc_width, "dropout": cfg.model.disc_dropout, "use_bn": cfg.pretrain.use_bn,
            "train_split": cfg.data.train_split}
    parts = {"format": 1, "content_hash": content_hash, "pretrain": config_hash(cfg.pretrain), "arch": arch}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"key": key, **parts}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def ensure_prepared(cfg: Config, rt: Runtime) -> None:
    """Prepare ``data.root`` with ``data.prepare`` when it is missing (main process, under a lock
    shared by every job using the same root; the other processes wait)."""
    root = Path(cfg.data.root)
    if (root / "meta.json").is_file():
        return
    if not cfg.data.prepare:
        raise ConfigError(f"data.root={str(root)!r} is not a prepared data set (no meta.json) and "
                          "data.prepare is empty; run `facedis prepare ... --out "
                          f"{root}` first or set data.prepare")
    if rt.is_main:
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "meta.json").is_file():
                cmd = [sys.executable, "-m", "facedis.prep.prepare", *cfg.data.prepare, "--out", str(root)]
                print(f"[facedis] preparing the data set: {' '.join(cmd)}", flush=True)
                t = time.time()
                res = subprocess.run(cmd)
                if res.returncode != 0 or not (root / "meta.json").is_file():
                    raise RuntimeError(f"data preparation failed (exit {res.returncode}): {' '.join(cmd)}")
                print(f"[facedis] data set ready in {time.time() - t:.1f} s: {root}", flush=True)
    rt.wait()


@dataclass
class RunData:
    """The prepared data set of a run: its description and the two splits."""

    info: object
    test: object
    train: Optional[object]
    mean_face: torch.Tensor  # (V, 3) on the device

    @property
    def num_vertices(self) -> int:
        return int(self.info.num_vertices)

    @property
    def mm_per_unit(self) -> float:
        return float(self.info.mm_per_unit)


def load_data(cfg: Config, rt: Runtime, *, with_train: bool = True, with_partner: Optional[bool] = None) -> RunData:
    from facedis import data as fdata

    info = fdata.load_info(cfg.data.root)
    test = fdata.FaceDataset(cfg.data.root, cfg.data.test_split, in_memory=cfg.data.in_memory,
                             with_partner=False, seed=cfg.train.seed)
    train = None
    if with_train:
        partner = cfg.method.id_discriminator if with_partner is None else with_partner
        train = fdata.FaceDataset(cfg.data.root, cfg.data.train_split, in_memory=cfg.data.in_memory,
                                  with_partner=partner, seed=cfg.train.seed)
        if len(train) < cfg.train.batch_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                              f"({len(train)} samples)")
    mean_face = torch.as_tensor(np.asarray(info.mean_face), dtype=torch.float32).to(rt.device)
    return RunData(info=info, test=test, train=train, mean_face=mean_face)


# ---------------------------------------------------------------------------------------------
# the set-up of every run
# ---------------------------------------------------------------------------------------------
@dataclass
class OpenRun:
    cfg: Config
    rt: Runtime
    data: RunData
    run_dir: RunDir
    started_at: float


def open_run(cfg: Config, *, with_train: bool = True, write_config: bool = True) -> OpenRun:
    """Check the config, start the runtime, prepare and load the data, and write ``config.yaml``
    (refusing a run directory that holds a checkpoint of another config). The config written and
    returned has ``train.precision`` resolved to what the run uses."""
    started = time.time()
    cfg = check_config(cfg)
    rt = Runtime(cfg.train, cfg.run)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=rt.precision))
    world = rt.world
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (global) is not divisible by the "
                          f"world size {world}")
    if cfg.pretrain.batch_size % world and cfg.method.id_discriminator and cfg.pretrain.enabled:
        raise ConfigError(f"pretrain.batch_size={cfg.pretrain.batch_size} (global) is not divisible by "
                          f"the world size {world}")
    if cfg.train.batch_size // world < 2 and world > 1 and not cfg.train.sync_bn:
        raise ConfigError("per-process batch < 2 needs train.sync_bn=true (BatchNorm)")
    ensure_prepared(cfg, rt)
    data = load_data(cfg, rt, with_train=with_train)
    run_dir = RunDir(cfg.run.resolved_dir(), rt.is_main)
    if write_config:
        run_dir.write_config(cfg)
        rt.wait()
    return OpenRun(cfg=cfg, rt=rt, data=data, run_dir=run_dir, started_at=started)
