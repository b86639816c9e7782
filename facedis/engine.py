"""Training: ``train(cfg, report=None) -> dict`` and ``evaluate_run(run_dir)``.

Every entry point calls :func:`train` (``facedis/train.py``, the Ray Tune trainable, the cluster
job). It dispatches on ``model.kind``: the baselines are fitted by :mod:`facedis.baselines`, the
method is trained by :func:`train_vae`, which reads top to bottom:

1. :func:`~facedis.components.open_run`: check the config, start the runtime, prepare and load
   the data, write ``config.yaml``.
2. :func:`pretrain_discriminator`: same/different-identity pairs, cached under
   ``run.artefact_dir/disc-<key>/`` (the key hashes the data set, the ``pretrain`` section and
   the discriminator's architecture); skipped for ``-id-dis`` and when resuming.
3. :func:`build_joint`: the VAE and discriminator, their Adam optimisers and StepLR schedules.
4. Per epoch, :func:`facedis.loop.train_one_epoch` over :func:`facedis.step.joint_step` (the D
   step, then the VAE step with every loss term), then the schedules, the evaluation every
   ``train.eval_every`` epochs (:func:`facedis.evaluation.evaluate`), ``metrics.jsonl``,
   TensorBoard, a checkpoint, and ``report(metrics, checkpoint_dir)``.
5. ``model.pt`` and ``metrics.json`` (written last: its presence means finished).

Rerunning the same command resumes from ``checkpoints/last`` bit-exactly (on CPU);
SIGTERM/SIGUSR1 save a checkpoint and stop (:class:`~facedis.loop.TrainingInterrupted`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from facedis import step as steps
from facedis.baselines import run_baseline
from facedis.components import (
    OpenRun,
    adam,
    build_models,
    offset_scale,
    open_run,
    pretrain_key,
    step_fidelity,
)
from facedis.config import Config, ConfigError, apply_overrides, config_to_dict, load_config
from facedis.data import DevicePrefetcher, FaceDataset, PairDataset, SlotLoader
from facedis.distributed import GlobalBatchSampler, mix_seed, param_checksum, param_sha256, shard_indices
from facedis.evaluation import error_map_figure, eval_line, evaluate, summary
from facedis.inference import raw_units_of_meta
from facedis.loop import (
    LoopState,
    LossMeter,
    NonFiniteLossError,
    TrainingInterrupted,
    fetch,
    progress_bar,
    train_one_epoch,
)
from facedis.curves import write_run_curves
from facedis.rundir import RunDir, atomic_write_text, flat_dict, json_default, package_versions
from facedis.runtime import Runtime, rng_state, seed_everything, set_rng_state
from facedis.shards import DatasetError

__all__ = ["train", "train_vae", "evaluate_run", "pretrain_discriminator", "build_joint", "NonFiniteLossError",
           "TrainingInterrupted", "ReplicaDivergenceError"]

Reporter = Callable[[dict, Path], None]


class ReplicaDivergenceError(RuntimeError):
    """Processes hold different parameters (a DDP bug)."""


def train(cfg: Config, report: Optional[Reporter] = None) -> dict:
    """Train (or resume, or return the metrics of a finished run) and return the final metrics.

    ``report(metrics, checkpoint_dir)`` is called on the main process after every evaluation;
    ``metrics`` holds ``epoch``, the epoch's mean train losses (``train/<term>``), learning rates
    and the evaluation metrics (``E_rec_mean``, ``AVD_neu_mean``, ``E_dis_ref_mean``, ...).

    Raises :class:`ConfigError` before any work for a bad config, :class:`NonFiniteLossError`
    on a NaN/inf loss and :class:`TrainingInterrupted` after SIGTERM/SIGUSR1 (checkpoint saved).
    """
    if cfg.model.kind != "vae":
        return run_baseline(cfg, report)
    return train_vae(cfg, report)


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------
def train_vae(cfg: Config, report: Optional[Reporter] = None) -> dict:
    """The method's run (see the module docstring for the order)."""
    run: OpenRun = open_run(cfg)
    cfg, rt, data, rd = run.cfg, run.rt, run.data, run.run_dir
    finished = rd.finished_metrics()
    if finished is not None:
        rt.print(f"[facedis] {rd.path} is already finished (metrics.json exists); nothing to do")
        return finished
    resuming = rt.broadcast(rd.find_checkpoint() is not None)
    if resuming:
        disc_state, disc_record = None, {"restored_from_checkpoint": True}
    else:
        rt.start_trackers(tracker_config(cfg), cfg.run.name)
        disc_state, disc_record = pretrain_discriminator(cfg, rt, data)
    m = build_joint(cfg, rt, data, disc_state)
    tc = cfg.train
    sampler = GlobalBatchSampler(len(data.train), tc.batch_size, rt.world, rt.rank, seed=mix_seed(tc.seed, 2),
                                 max_steps=tc.max_steps_per_epoch)
    spe = sampler.steps_per_epoch()
    if spe == 0:
        raise ConfigError("the training split has fewer samples than one global batch")
    state = LoopState(meter=LossMeter(rt.device), log=True, where=f"Run directory: {rd.path}")
    last_eval: Optional[dict] = None
    last_train: dict = {}
    start_epoch = start_step = 0
    seed_everything(mix_seed(tc.seed, 4, rt.rank))  # per-rank training streams
    if resuming:
        path = rd.find_checkpoint()
        start_epoch, start_step, last_eval, last_train = restore_checkpoint(path, m, state, cfg, rt)
        rt.print(f"[facedis] resuming from {path} (epoch {start_epoch + 1}, step {start_step})")
        # TensorBoard drops the events written after the checkpoint
        rt.start_trackers(tracker_config(cfg), cfg.run.name, purge_step=state.global_step + 1)
    rd.reset_metrics(start_epoch)
    rd.write_provenance(cfg, info=data.info, world_size=rt.world, device=rt.device, precision=rt.precision,
                        started_at=run.started_at, pretrained_disc=disc_record,
                        session={"resumed_from": {"epochs_done": start_epoch, "step": start_step} if resuming else None})

    def save_checkpoint(epochs_done: int, step_in_epoch: int) -> Path:
        return rd.save_checkpoint(rt, checkpoint_state(m, state, rt, epochs_done, step_in_epoch, last_eval, last_train),
                                  {"rng": rng_state(), "rank": rt.rank, "params_sha256": param_sha256(m.vae, m.disc)},
                                  state.global_step)

    E = tc.epochs
    state.bar = progress_bar(rt, tc.progress, total=E * spe, desc="train", initial=start_epoch * spe + start_step)
    try:
        with rt.catch_stop_signals():
            for epoch in range(start_epoch, E):
                t_epoch = time.time()
                first = start_step if epoch == start_epoch else 0
                if state.bar is not None:
                    state.bar.set_description(f"epoch {epoch + 1}/{E}")
                kl = kl_scale(cfg, epoch)

                def joint(batch):
                    return steps.joint_step(m.vae_train, m.disc_train, m.opt_vae, m.opt_disc, batch, data.mean_face,
                                            m.laplacian, cfg.loss, use_discriminator=m.disc is not None,
                                            neutral_gt=cfg.method.neutral_gt, use_laplacian=m.laplacian is not None,
                                            kl_scale=kl, fidelity=m.fidelity, updates=rt)

                sampler.set_epoch(epoch, first)
                batches = DevicePrefetcher(train_loader(cfg, rt, data.train, sampler, epoch), rt.device)
                means = train_one_epoch(joint, batches, state, rt, epoch=epoch, first_step=first,
                                        steps_per_epoch=spe, log_every=tc.log_every_steps,
                                        checkpoint_every=tc.checkpoint_every_steps, save_checkpoint=save_checkpoint)
                last_train = {f"train/{k}": v for k, v in means.items()}
                with warnings.catch_warnings():  # fp16: a GradScaler-skipped first step makes StepLR warn
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                    for sched in (m.sched_vae, m.sched_disc):
                        if sched is not None:
                            sched.step()
                check_replicas(cfg, rt, m.vae, m.disc)
                rec = {"epoch": epoch + 1, "global_step": state.global_step, **last_train,
                       "lr/vae": m.opt_vae.param_groups[0]["lr"]}
                if m.opt_disc is not None:
                    rec["lr/disc"] = m.opt_disc.param_groups[0]["lr"]
                evaluated = (epoch + 1) % tc.eval_every == 0 or epoch + 1 == E
                per_vertex = None
                if evaluated:
                    t_eval = time.time()
                    last_eval, per_vertex = evaluate(m.vae, data, cfg, rt)
                    rec.update(last_eval)
                    rec["time/eval_s"] = time.time() - t_eval
                rec["time/epoch_s"] = time.time() - t_epoch
                rd.append_metrics(rec)
                log_epoch(rt, rec, data, per_vertex, image_due=(tc.image_every and (epoch + 1) % tc.image_every == 0)
                          or epoch + 1 == E)
                if evaluated:
                    rt.print(eval_line(epoch + 1, last_eval))
                    if rt.is_main:
                        write_run_curves(rd.path, title=f"{cfg.run.name}: {cfg.dataset} {cfg.mode}")
                if (epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == E or evaluated or state.stop:
                    path = save_checkpoint(epoch + 1, 0)
                else:
                    path = rd.checkpoint
                if evaluated and report is not None and rt.is_main:
                    report(dict(rec), path)
                if state.stop and epoch + 1 < E:
                    raise TrainingInterrupted(state.stop, path, epoch + 1, 0)
            if last_eval is None:  # resumed after the last epoch's checkpoint, before its evaluation
                last_eval, _ = evaluate(m.vae, data, cfg, rt)
    finally:
        if state.bar is not None:
            state.bar.close()
        rt.end_trackers()
    final = {**last_eval, **last_train, "epoch": E, "global_step": state.global_step, "seed": tc.seed,
             "dataset": cfg.dataset, "mode": cfg.mode}
    if rt.is_main:
        payload = model_payload(cfg, data, m.vae)
        payload["metrics"] = {k: v for k, v in final.items() if isinstance(v, (int, float, str)) or v is None}
        rd.write_final(final, ("model.pt", payload))
        print(summary(f"facedis: finished {cfg.dataset} {cfg.mode} ({E} epochs, {state.global_step} steps, world size "
                      f"{rt.world}, {rt.device.type}, precision {rt.precision}) in "
                      f"{(time.time() - run.started_at) / 60:.1f} min", final, rd.path,
                      "metrics.json, metrics.jsonl, curves.png, model.pt, config.yaml,\n    provenance.json, "
                      f"checkpoints/last/, tb/ (tensorboard --logdir {rd.path / 'tb'})") + next_steps(rd.path), flush=True)
    rt.wait()
    return final


def kl_scale(cfg: Config, epoch: int) -> float:
    """The KL weights' multiplier in epoch ``epoch`` (0-based): (T − epoch)/T with ``loss.kl_decay_epochs``."""
    from facedis.losses import kl_decay_scale

    T = cfg.loss.kl_decay_epochs
    return max(kl_decay_scale(epoch + 1, T), 0.0) if T > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# discriminator pretraining
# ---------------------------------------------------------------------------------------------
def pretrain_discriminator(cfg: Config, rt: Runtime, data) -> tuple[Optional[dict], dict]:
    """``(pretrained D state dict or None, record for provenance.json)``: from the artefact cache,
    or trained now and cached (atomically; concurrent runs keep the first artefact)."""
    if not cfg.method.id_discriminator:
        return None, {"skipped": "-id-dis: no discriminator is used"}
    if not cfg.pretrain.enabled or cfg.pretrain.epochs == 0:
        return None, {"skipped": "pretrain.enabled is false or pretrain.epochs is 0 (random D)"}
    key = pretrain_key(cfg, data.info.content_hash)
    art = Path(cfg.run.artefact_dir) / f"disc-{key['key']}"
    path = art / "disc.pt"
    if not rt.broadcast(path.is_file()):
        rt.print(f"[facedis] pretraining the identity discriminator ({cfg.pretrain.epochs} epochs) -> {art}")
        state_dict, history = train_discriminator(cfg, rt, data)
        if rt.is_main:
            tmp = art.with_name(f".{art.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"format": "facedis-disc/1", "state_dict": state_dict, "key": key["key"], "arch": key["arch"]},
                       tmp / "disc.pt")
            (tmp / "info.json").write_text(json.dumps({**key, "pretrain": config_to_dict(cfg)["pretrain"],
                                                       "history": history, "world_size": rt.world,
                                                       "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
            try:
                os.rename(tmp, art)
            except OSError:  # another run finished the same artefact first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        rt.wait()
    else:
        rt.print(f"[facedis] using the cached pretrained discriminator {art}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], {"artefact": str(art.resolve()), **key}


def train_discriminator(cfg: Config, rt: Runtime, data) -> tuple[dict, list]:
    """Train a fresh discriminator on same/different-identity pairs of the training split;
    ``(state dict, per-epoch history)``."""
    pc = cfg.pretrain
    seed_everything(mix_seed(pc.seed, 7, rt.rank))
    torch.manual_seed(mix_seed(pc.seed, 11))  # same D init on every rank
    _, disc = build_models(cfg, data.num_vertices, with_disc=True, disc_use_bn=pc.use_bn)
    disc, disc_train = rt.prepare(disc)
    opt = adam(disc.parameters(), lr=pc.lr)
    rt.add_optimizer(opt)
    torch.manual_seed(mix_seed(pc.seed, 13, rt.rank))
    ds = PairDataset(cfg.data.root, cfg.data.train_split, seed=pc.seed)
    if len(ds) < pc.batch_size:
        raise ConfigError(f"pretrain.batch_size={pc.batch_size} is larger than the training split "
                          f"({len(ds)} samples of {cfg.data.root}); lower pretrain.batch_size")
    sampler = GlobalBatchSampler(len(ds), pc.batch_size, rt.world, rt.rank, seed=mix_seed(pc.seed, 17),
                                 max_steps=cfg.train.max_steps_per_epoch)
    spe = sampler.steps_per_epoch()
    state = LoopState(meter=LossMeter(rt.device), postfix=("disc", "disc_acc"), where="(discriminator pretraining)",
                      bar=progress_bar(rt, cfg.train.progress, total=pc.epochs * spe, desc="pretrain D"))
    history = []
    for epoch in range(pc.epochs):
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        batches = ({k: v.to(rt.device, non_blocking=True) for k, v in fetch(ds, idx).items()} for idx in sampler)
        means = train_one_epoch(lambda b: steps.pretrain_disc_step(disc_train, opt, b, updates=rt), batches, state,
                                rt, epoch=epoch, first_step=0, steps_per_epoch=spe,
                                log_every=cfg.train.log_every_steps)
        rec = {"epoch": epoch + 1, **{f"pretrain/{k}": v for k, v in means.items()}}
        if epoch + 1 == pc.epochs or (epoch + 1) % 10 == 0:
            try:  # logging only; a test split with one identity has no different-identity pairs
                rec["pretrain/test_acc"] = discriminator_test_accuracy(disc, cfg, rt)
            except DatasetError as e:
                rt.print(f"[facedis] no D test accuracy: {e}")
        history.append(rec)
        rt.log({k: v for k, v in rec.items() if k != "epoch"}, step=epoch + 1)
    if state.bar is not None:
        state.bar.close()
    last = history[-1] if history else {}
    rt.print(f"[facedis] D pretraining done: loss {last.get('pretrain/disc', float('nan')):.4f}, "
             f"train acc {last.get('pretrain/disc_acc', float('nan')):.3f}, "
             f"test acc {last.get('pretrain/test_acc', float('nan')):.3f}")
    return {k: v.detach().cpu().clone() for k, v in disc.state_dict().items()}, history


@torch.no_grad()
def discriminator_test_accuracy(disc: torch.nn.Module, cfg: Config, rt: Runtime) -> float:
    """Accuracy on same/different pairs of the test split (eval mode, fp32, all processes)."""
    ds = PairDataset(cfg.data.root, cfg.data.test_split, seed=cfg.pretrain.seed + 1)
    was = disc.training
    disc.eval()
    idx, valid = shard_indices(len(ds), rt.world, rt.rank)
    bs = max(1, cfg.train.eval_batch_size // rt.world)
    correct = torch.zeros(2, dtype=torch.float64, device=rt.device)
    with rt.full_precision(disc):
        for i in range(0, len(idx), bs):
            b = {k: v.to(rt.device) for k, v in fetch(ds, idx[i:i + bs]).items()}
            logits = disc(torch.cat([b["a"], b["b"]], dim=-1))
            ok = (logits.argmax(1) == b["same"].long()).double()
            w = torch.tensor(valid[i:i + bs], dtype=torch.float64, device=rt.device)
            correct += torch.stack([(ok * w).sum(), w.sum()])
    disc.train(was)
    correct = rt.reduce(correct, "sum")
    return float(correct[0] / correct[1].clamp(min=1))


# ---------------------------------------------------------------------------------------------
# joint training: models, data, checkpoints, logging
# ---------------------------------------------------------------------------------------------
@dataclass
class JointModels:
    """What joint training updates. ``vae``/``disc`` are the plain modules (state dicts,
    evaluation); ``vae_train``/``disc_train`` what the step calls (DDP-wrapped / compiled)."""

    vae: torch.nn.Module
    vae_train: torch.nn.Module
    disc: Optional[torch.nn.Module]
    disc_train: Optional[torch.nn.Module]
    opt_vae: torch.optim.Optimizer
    opt_disc: Optional[torch.optim.Optimizer]
    sched_vae: object
    sched_disc: object
    laplacian: Optional[object]
    fidelity: object


def build_joint(cfg: Config, rt: Runtime, data, disc_state: Optional[dict]) -> JointModels:
    """The VAE (and the discriminator, from ``disc_state`` when given), prepared for training,
    with Adam (VAE weight decay ``optim.weight_decay_vae``) and StepLR for each."""
    from facedis.losses import uniform_laplacian

    torch.manual_seed(mix_seed(cfg.train.seed, 1))  # identical init on every rank
    vae, disc = build_models(cfg, data.num_vertices)
    if cfg.model.encoder_input != "absolute":
        vae.set_input_reference(data.mean_face.cpu(), offset_scale(data.info, cfg.data.train_split))
    if disc is not None and disc_state is not None:
        dropped = disc.load_pretrained(disc_state)
        if dropped:
            rt.print(f"[facedis] pretrained D loaded without its {len(dropped)} BatchNorm entries "
                     "(joint D runs without BN, as the reference)")
    vae, vae_train = rt.prepare(vae)
    disc_train = opt_disc = sched_disc = None
    if disc is not None:
        disc, disc_train = rt.prepare(disc)
    o = cfg.optim
    opt_vae = adam(vae.parameters(), lr=o.lr_vae, weight_decay=o.weight_decay_vae)
    sched_vae = torch.optim.lr_scheduler.StepLR(opt_vae, step_size=o.lr_step_epochs, gamma=o.lr_gamma)
    rt.add_optimizer(opt_vae)
    if disc is not None:
        opt_disc = adam(disc.parameters(), lr=o.lr_disc)
        sched_disc = torch.optim.lr_scheduler.StepLR(opt_disc, step_size=o.lr_step_epochs, gamma=o.lr_gamma)
        rt.add_optimizer(opt_disc)
    fid = step_fidelity(cfg, rt.world)
    lap = None
    if cfg.use_laplacian():
        lap = uniform_laplacian(np.asarray(data.info.triangles), data.num_vertices,
                                dense=fid.dense_laplacian).to(rt.device)
    return JointModels(vae, vae_train, disc, disc_train, opt_vae, opt_disc, sched_vae, sched_disc, lap, fid)


def train_loader(cfg: Config, rt: Runtime, dataset: FaceDataset, sampler: GlobalBatchSampler, epoch: int):
    """This epoch's batches: in-process, or from ``data.num_workers`` processes gathering into
    reused shared-memory slots (each batch is consumed before the next)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    g = torch.Generator().manual_seed(mix_seed(cfg.train.seed, 3, epoch, rt.rank))
    nw = cfg.data.num_workers
    if nw == 0:
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0, generator=g)
    return SlotLoader(dataset, max_batch=sampler.local_batch, num_workers=nw, sampler=sampler, batch_size=None,
                      generator=g, pin_memory=rt.device.type == "cuda", persistent_workers=False)


def checkpoint_state(m: JointModels, state: LoopState, rt: Runtime, epochs_done: int, step_in_epoch: int,
                     last_eval: Optional[dict], last_train: dict) -> dict:
    def sd(x):
        return None if x is None else {k: v.detach().cpu().clone() for k, v in x.state_dict().items()}

    def scaler(opt):
        s = rt.scaler(opt) if opt is not None else None
        return s.state_dict() if s is not None else None

    return {
        "format": "facedis-ckpt/1", "epochs_done": epochs_done, "step_in_epoch": step_in_epoch,
        "global_step": state.global_step, "vae": sd(m.vae), "disc": sd(m.disc),
        "opt_vae": m.opt_vae.state_dict(), "opt_disc": m.opt_disc.state_dict() if m.opt_disc is not None else None,
        "sched_vae": m.sched_vae.state_dict(),
        "sched_disc": m.sched_disc.state_dict() if m.sched_disc is not None else None,
        "scaler_vae": scaler(m.opt_vae), "scaler_disc": scaler(m.opt_disc),
        "accum": state.meter.state_dict(), "last_eval": last_eval, "last_train": last_train, "world_size": rt.world,
    }


def restore_checkpoint(path: Path, m: JointModels, state: LoopState, cfg: Config,
                       rt: Runtime) -> tuple[int, int, Optional[dict], dict]:
    """Load a checkpoint into ``m`` and ``state``; ``(epochs_done, step_in_epoch, last_eval, last_train)``.
    The random streams continue exactly when the world size is unchanged."""
    st, rank_state = RunDir.load_checkpoint(path, rt.rank, rt.world)
    m.vae.load_state_dict(st["vae"])
    m.opt_vae.load_state_dict(st["opt_vae"])
    m.sched_vae.load_state_dict(st["sched_vae"])
    if m.disc is not None and st["disc"] is not None:
        m.disc.load_state_dict(st["disc"])
        m.opt_disc.load_state_dict(st["opt_disc"])
        m.sched_disc.load_state_dict(st["sched_disc"])
    for opt, key in ((m.opt_vae, "scaler_vae"), (m.opt_disc, "scaler_disc")):
        scaler = rt.scaler(opt) if opt is not None else None
        if scaler is not None and st.get(key):
            scaler.load_state_dict(st[key])
    state.meter.load_state_dict(st["accum"])
    state.global_step = int(st["global_step"])
    if rank_state is not None:
        set_rng_state(rank_state["rng"])
    else:
        rt.print(f"[facedis] world size changed ({st.get('world_size')} -> {rt.world}): "
                 "RNG streams are reseeded (the data order is unchanged)")
        seed_everything(mix_seed(cfg.train.seed, 5, rt.rank, state.global_step))
    return int(st["epochs_done"]), int(st["step_in_epoch"]), st.get("last_eval"), st.get("last_train") or {}


def check_replicas(cfg: Config, rt: Runtime, *modules) -> None:
    """With several processes (and ``train.check_sync``): all hold the same parameters."""
    if rt.world == 1 or not cfg.train.check_sync:
        return
    c = param_checksum(*modules).to(rt.device)
    allc = rt.gather(c[None]).cpu()
    if not torch.equal(allc, allc[:1].expand_as(allc)):
        raise ReplicaDivergenceError(f"the {rt.world} processes hold different parameters: {allc.tolist()}")


def tracker_config(cfg: Config) -> dict:
    """The config as flat hyper-parameters for the experiment trackers (lists as text)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in flat_dict(config_to_dict(cfg)).items()}


def log_epoch(rt: Runtime, rec: dict, data, per_vertex: Optional[np.ndarray], image_due: bool) -> None:
    """An epoch's record to the trackers at its global step: train means under ``epoch/``,
    metrics under ``eval/``, learning rates as ``lr/``; the per-vertex error map as a figure."""
    step = rec["global_step"]
    rt.log({(f"epoch/{k}" if k.startswith("train/") else k if "/" in k else f"eval/{k}"): v
            for k, v in rec.items() if k not in ("epoch", "global_step")}, step=step)
    if per_vertex is not None and image_due:
        rt.log_figure("eval/error_map", error_map_figure(data.info, per_vertex,
                                                         f"E_rec per vertex, epoch {rec['epoch']}"), step)


def next_steps(run_dir: Path) -> str:
    return (f"\n  next: facedis apps figures --run {run_dir} --out {run_dir / 'figures'}   (pictures of what it learnt)"
            f"\n        facedis train --eval-only {run_dir}   (re-evaluate; --data.root=... for another data set)")


def model_payload(cfg: Config, data, vae: torch.nn.Module) -> dict:
    """``model.pt``: plain tensors and dicts, loadable with ``weights_only=True`` (``facedis.load``)."""
    info = data.info
    return {
        "format": "facedis-model/1",
        "vae": {k: v.detach().cpu().clone() for k, v in vae.state_dict().items()},
        "model_config": config_to_dict(cfg.model),
        "num_vertices": data.num_vertices,
        "mean_face": torch.as_tensor(np.asarray(info.mean_face), dtype=torch.float32),
        "template": torch.as_tensor(np.asarray(info.template), dtype=torch.float32),
        "triangles": torch.as_tensor(np.asarray(info.triangles), dtype=torch.int64),
        "vertex_index_map": None if info.vertex_index_map is None else torch.as_tensor(np.asarray(info.vertex_index_map), dtype=torch.int64),
        "source_vertices": (info.meta.get("decimation") or {}).get("source_vertices"),
        "mm_per_unit": data.mm_per_unit,
        "raw_units": raw_units_of_meta(info.meta),
        "dataset": cfg.dataset,
        "content_hash": info.content_hash,
        "mode": cfg.mode,
        "config": config_to_dict(cfg),
        "facedis_version": package_versions().get("facedis"),
    }


# ---------------------------------------------------------------------------------------------
# re-evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_run(run_dir: str | os.PathLike, overrides: dict | list | None = None, write: bool = True) -> dict:
    """Re-evaluate a run from its ``config.yaml`` and ``model.pt`` (or ``checkpoints/last``)
    and return the metrics; writes ``<run_dir>/eval.json`` (main process). ``overrides``
    (dotted keys) may change e.g. ``data.root`` or ``train.eval_batch_size``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.kind != "vae":
        raise ConfigError(f"{run_dir} is a {cfg.model.kind} baseline run: its metrics are in metrics.json; "
                          "rerun its config with another run.dir to refit")
    cfg = apply_overrides(apply_overrides(cfg, overrides or {}), {"run.dir": str(run_dir)})
    run = open_run(cfg, with_train=False, write_config=False)
    vae, _ = build_models(run.cfg, run.data.num_vertices, with_disc=False)
    if (run_dir / "model.pt").is_file():
        source = run_dir / "model.pt"
        vae.load_state_dict(torch.load(source, map_location="cpu", weights_only=True)["vae"])
    else:
        source = run_dir / "checkpoints" / "last" / "state.pt"
        if not source.is_file():
            raise FileNotFoundError(f"{run_dir}: neither model.pt nor checkpoints/last/state.pt")
        vae.load_state_dict(torch.load(source, map_location="cpu", weights_only=True)["vae"])
    metrics, _ = evaluate(vae.to(run.rt.device), run.data, run.cfg, run.rt)
    metrics = {**metrics, "source": str(source), "dataset": run.cfg.dataset, "mode": run.cfg.mode,
               "seed": run.cfg.train.seed}
    if write and run.rt.is_main:
        atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=2, default=json_default))
    return metrics
