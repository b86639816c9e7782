"""Baselines in the same harness as the method, selected by ``model.kind``.

==================  ==========================================================================
``model.kind``      predicted identity (neutral) of an input face ``x``
==================  ==========================================================================
``mean_face``       the training split's mean face ``M̄`` for every input (``meta.h5 mean_face``)
``identity_map``    ``x`` itself (the input taken as its own neutral)
``ridge``           ``ȳ + (x − x̄) W``: ridge regression from the flattened face to its flattened
                    neutral, intercept not penalised, ``W = (X_cᵀX_c + αI)⁻¹ X_cᵀ Y_c``;
                    ``α`` chosen from ``model.ridge_alphas`` by AVD_neu on a validation set of
                    train SUBJECTS (20 %, at least one, drawn with ``train.seed``), then refitted
                    on the whole train split
``supervised``      the method's PointNet encoder (``model.width``, ``model.pointwise``) -> a
                    ``model.id_dim`` code -> one MLP decoder (``model.decoder_hidden``) to the
                    neutral's offset from ``M̄``, trained on face -> neutral pairs with
                    ``loss.neutral_recon`` · MSE (``loss.recon`` if that is 0), Adam
                    (``optim.lr_vae``, ``optim.weight_decay_vae``), StepLR, ``train.epochs``,
                    ``train.batch_size``, ``train.seed``: the "+ne-gt without disentanglement"
                    deep baseline (Conv-MeshAE on expressive -> neutral pairs, Kacem et al.)
==================  ==========================================================================

They are set up, evaluated and written like the method's runs (``facedis.components.open_run``,
``facedis.evaluation.evaluate``, ``facedis.rundir.RunDir``; the supervised regressor trains
through ``facedis.loop.train_one_epoch``): the same ``FaceDataset`` splits, the same test-split
evaluation (E_rec, AVD_neu, AVD_neu_meanface, both E_dis, Kabsch for BU-3DFE) and
the same files (``config.yaml``, ``provenance.json``, ``metrics.jsonl``, atomic ``metrics.json``),
so ``launch/aggregate.py`` tables them next to the method. Baselines are wrapped as modules with
the VAE's ``forward(x, mode="mean")`` contract (offsets from ``M̄``), computing in float64 so
that e.g. the identity map reproduces ``x`` exactly.

**E_rec of a baseline.** A baseline has no expression branch: its full-face output is its
identity output (``Δ_exp ≡ 0``), so ``E_rec`` = distance between the predicted neutral and the
input. It is 0 for ``identity_map``, ``‖M̄ − x‖`` for ``mean_face`` and roughly the size of the
expression for a regressor that neutralises well. It is *not* an autoencoder reconstruction
error and must not be read as "the method reconstructs better/worse"; it is reported (finite) so
that every run has the same ``metrics.json`` keys (``launch/aggregate.py`` treats a non-finite
key as a failed run). ``metrics.json`` says so in ``E_rec_definition``.

Baselines do not write ``model.pt`` (that file is the VAE's inference format); the fitted
parameters that are small go to ``baseline.pt`` (mean face, supervised weights; ridge keeps only
its α, which refits in seconds). They run in one process (under ``accelerate launch`` with
several processes every rank fits the same model and evaluation is sharded as for the VAE).
A rerun of a finished run returns its ``metrics.json``; an interrupted ``supervised`` run
restarts from epoch 0 (no checkpoints: it is small).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from facedis.components import OpenRun, adam, open_run, pointwise_mode
from facedis.config import Config, ConfigError, config_to_dict
from facedis.curves import write_run_curves
from facedis.distributed import mix_seed
from facedis.evaluation import eval_line, evaluate, summary
from facedis.loop import LossMeter, LoopState, fetch, progress_bar, train_one_epoch
from facedis.runtime import seed_everything
from facedis.step import FP32

BASELINE_KINDS = ("mean_face", "identity_map", "ridge", "supervised")
VAL_FRACTION = 0.2
"""Fraction of the train subjects held out to choose the ridge α."""

E_REC_DEFINITION = ("baseline: full-face output = predicted neutral (no expression branch, Δ_exp ≡ 0); "
                    "E_rec = distance(predicted neutral, input), not an autoencoder reconstruction error")

Reporter = Callable[[dict, Path], None]


# ---------------------------------------------------------------------------------------------
# the baselines as modules with the VAE's eval contract
# ---------------------------------------------------------------------------------------------
@dataclass
class BaselineOutput:
    """What ``step.eval_forward`` reads from a model: offsets from the mean face, (B, V, 3)."""

    recon: torch.Tensor
    id_offset: torch.Tensor
    exp_offset: torch.Tensor


class _Baseline(nn.Module):
    """``forward(x, mode="mean")`` -> ``BaselineOutput`` with ``recon == id_offset`` (Δ_exp ≡ 0).

    Offsets are float64 so that ``mean_face + offset`` (float32 + float64 -> float64) is exact
    for the identity map."""

    def __init__(self, mean_face):
        super().__init__()
        self.register_buffer("mean_face64", torch.as_tensor(np.asarray(mean_face), dtype=torch.float64))

    def neutral(self, x: torch.Tensor) -> torch.Tensor:  # (B, V, 3) float64 absolute neutral
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mode: str = "mean"):
        if mode == "encode":
            raise ValueError(f"{type(self).__name__} has no latent codes")
        off = self.neutral(x) - self.mean_face64
        return BaselineOutput(recon=off, id_offset=off, exp_offset=torch.zeros_like(off))


class MeanFaceBaseline(_Baseline):
    def neutral(self, x):
        return self.mean_face64.expand(x.shape[0], -1, -1)


class IdentityMapBaseline(_Baseline):
    def neutral(self, x):
        return x.to(torch.float64)


class RidgeBaseline(_Baseline):
    """``neutral(x) = ȳ + ((x − x̄) A) B`` with the low-rank factors of the ridge solution
    ``W = A B``, ``A = V diag(s / (s² + α))``, ``B = Uᵀ Y_c`` (thin SVD ``X_c = U S Vᵀ``)."""

    def __init__(self, mean_face, x_mean, y_mean, A, B, alpha: float):
        super().__init__(mean_face)
        self.alpha = float(alpha)
        for name, a in (("x_mean", x_mean), ("y_mean", y_mean), ("A", A), ("B", B)):
            self.register_buffer(name, torch.as_tensor(np.asarray(a), dtype=torch.float64))

    def neutral(self, x):
        n = x.shape[0]
        xc = x.reshape(n, -1).to(torch.float64) - self.x_mean
        return (self.y_mean + (xc @ self.A) @ self.B).reshape(x.shape)


class SupervisedRegressor(nn.Module):
    """The VAE's PointNet encoder -> ``Linear`` to a ``code_dim`` code -> one ``MLPDecoder`` to
    the neutral's offset from the mean face (deterministic: no sampling, no KL)."""

    def __init__(self, num_vertices: int, code_dim: int, width: float = 1.0, decoder_hidden: Optional[int] = None,
                 pointwise: str = "conv", encoder_channels=None):
        super().__init__()
        from facedis.model import MLPDecoder, PointwiseMLP, scaled_width, encoder_widths

        c = [3] + encoder_widths(width, encoder_channels)
        hidden = decoder_hidden if decoder_hidden is not None else scaled_width(256, width)
        self.num_vertices = num_vertices
        self.encoder = PointwiseMLP(c, use_bn=True, pointwise=pointwise)
        self.fc_code = nn.Linear(c[-1], code_dim)
        self.decoder = MLPDecoder(code_dim, num_vertices, hidden)

    def offset(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc_code(self.encoder(x)))

    def forward(self, x: torch.Tensor, mode: str = "mean"):
        if mode == "encode":
            raise ValueError("SupervisedRegressor has no VAE encoding")
        off = self.offset(x)
        return BaselineOutput(recon=off, id_offset=off, exp_offset=torch.zeros_like(off))


# ---------------------------------------------------------------------------------------------
# ridge: closed form, validation split of subjects
# ---------------------------------------------------------------------------------------------
def split_val_subjects(subjects, seed: int, fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of the distinct subject ids into (fit subjects, validation subjects):
    ``max(1, round(fraction · S))`` validation subjects, at least one fit subject. Needs S ≥ 2."""
    subj = np.unique(np.asarray(subjects, dtype=np.int64))
    if subj.size < 2:
        raise ConfigError(f"the ridge baseline needs at least 2 train subjects with a neutral (found {subj.size}) "
                          "to carve out a validation set")
    n_val = min(max(1, int(round(fraction * subj.size))), subj.size - 1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7269646765]))  # "ridge"
    val = np.sort(rng.choice(subj, size=n_val, replace=False))
    return np.setdiff1d(subj, val), val


@dataclass
class RidgeFactors:
    x_mean: np.ndarray  # (D,)
    y_mean: np.ndarray  # (D,)
    U: np.ndarray  # (n, r)
    s: np.ndarray  # (r,)
    Vt: np.ndarray  # (r, D)
    UtYc: np.ndarray  # (r, D)

    def factors(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) with W = A @ B."""
        return self.Vt.T * (self.s / (self.s**2 + alpha))[None], self.UtYc

    def predict(self, X: np.ndarray, alpha: float) -> np.ndarray:
        A, B = self.factors(alpha)
        return self.y_mean + ((X - self.x_mean) @ A) @ B


def ridge_factorise(X: np.ndarray, Y: np.ndarray) -> RidgeFactors:
    """Thin SVD of the centred inputs; every α then costs two small matrix products.
    X, Y (n, D) float64."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    xm, ym = X.mean(0), Y.mean(0)
    U, s, Vt = np.linalg.svd(X - xm, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(X.shape) * np.finfo(np.float64).eps
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    return RidgeFactors(xm, ym, U, s, Vt, U.T @ (Y - ym))


def _avd_mm(pred_flat: np.ndarray, target_flat: np.ndarray, mm: float) -> float:
    n = pred_flat.shape[0]
    d = np.linalg.norm((pred_flat - target_flat).reshape(n, -1, 3), axis=-1).mean(-1) * mm
    return float(d.mean())


def fit_ridge(X: np.ndarray, Y: np.ndarray, subjects: np.ndarray, alphas, seed: int, mm_per_unit: float = 1.0):
    """Choose α on a validation set of subjects (AVD_neu in mm), refit on all rows.

    X, Y (n, D) flattened faces and their neutrals; subjects (n,). Returns
    ``(factors on all rows, alpha, info)`` with ``info = {"val": {alpha: AVD_neu mm}, "fit_subjects",
    "val_subjects"}``."""
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a >= 0 and math.isfinite(a)) for a in alphas):
        raise ConfigError(f"model.ridge_alphas must be a non-empty list of finite numbers >= 0, got {alphas}")
    subjects = np.asarray(subjects, dtype=np.int64)
    fit_s, val_s = split_val_subjects(subjects, seed)
    fit_rows, val_rows = np.isin(subjects, fit_s), np.isin(subjects, val_s)
    f = ridge_factorise(X[fit_rows], Y[fit_rows])
    val = {a: _avd_mm(f.predict(X[val_rows], a), Y[val_rows], mm_per_unit) for a in alphas}
    best = min(alphas, key=lambda a: (val[a], -a))  # ties: the stronger regularisation
    full = ridge_factorise(X, Y)
    info = {"val": val, "fit_subjects": fit_s.tolist(), "val_subjects": val_s.tolist()}
    return full, best, info


# ---------------------------------------------------------------------------------------------
# the supervised regressor's training step
# ---------------------------------------------------------------------------------------------
def supervised_step(model: SupervisedRegressor, opt: torch.optim.Optimizer, batch: dict, weight: float,
                    updates=FP32) -> dict[str, torch.Tensor]:
    """One step on face -> neutral-offset pairs (``vertices``, ``target`` (B,V,3)):
    ``weight`` · MSE, backward, optimiser step. Returns the detached loss as ``neutral_recon``."""
    model.train()
    with updates.autocast():
        pred = model.offset(batch["vertices"])
    loss = weight * F.mse_loss(pred.float(), batch["target"])
    opt.zero_grad(set_to_none=True)
    updates.backward(loss, opt)
    updates.step(opt)
    return {"neutral_recon": loss.detach()}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def split_arrays(ds, chunk: int = 256) -> dict[str, np.ndarray]:
    """A whole split of a ``FaceDataset`` as numpy arrays (vertices, neutral, subject, index)."""
    n = len(ds)
    parts: dict[str, list] = {}
    for i in range(0, n, chunk):
        b = fetch(ds, list(range(i, min(n, i + chunk))))
        for k in ("vertices", "neutral", "subject", "index"):
            if k in b:
                parts.setdefault(k, []).append(b[k].numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def run_baseline(cfg: Config, report: Optional[Reporter] = None) -> dict:
    """Fit (or train) the baseline ``cfg.model.kind``, evaluate it on the test split, write the run
    directory like the method's run and return the final metrics (``metrics.json``)."""
    if cfg.model.kind not in BASELINE_KINDS:
        raise ConfigError(f"model.kind={cfg.model.kind!r} is not a baseline; valid: {', '.join(BASELINE_KINDS)}")
    return _BaselineRun(open_run(cfg, with_train=False), report).run()


class _BaselineRun:
    """One baseline run: fit, evaluate with the method's evaluation, write the run directory."""

    def __init__(self, run: OpenRun, report: Optional[Reporter]):
        self.cfg, self.rt, self.data, self.rd = run.cfg, run.rt, run.data, run.run_dir
        self.started_at = run.started_at
        self.report = report
        self.extra: dict = {}
        self.last_train: dict = {}
        self.epochs_done = self.global_step = 0

    def run(self) -> dict:
        cfg, rt, rd = self.cfg, self.rt, self.rd
        finished = rd.finished_metrics()
        if finished is not None:
            rt.print(f"[facedis] {rd.path} is already finished (metrics.json exists); nothing to do")
            return finished
        kind = cfg.model.kind
        rd.write_provenance(cfg, info=self.data.info, world_size=rt.world, device=rt.device, precision=rt.precision,
                            started_at=self.started_at,
                            pretrained_disc={"skipped": f"baseline model.kind={kind}: no discriminator"},
                            session={"baseline": kind})
        rd.reset_metrics()  # a rerun starts over
        seed_everything(cfg.train.seed)
        self.mean_face = np.asarray(self.data.info.mean_face, dtype=np.float32)
        if kind == "mean_face":
            module = MeanFaceBaseline(self.mean_face)
            payload = {"mean_face": torch.as_tensor(self.mean_face)}
        elif kind == "identity_map":
            module, payload = IdentityMapBaseline(self.mean_face), {}
        elif kind == "ridge":
            module, payload = self._fit_ridge(), {}
        else:
            module = self._fit_supervised()
            payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                       "num_vertices": self.data.num_vertices, "code_dim": cfg.model.id_dim, "width": cfg.model.width,
                       "encoder_channels": list(cfg.model.encoder_channels),
                       "decoder_hidden": cfg.model.decoder_hidden, "mean_face": torch.as_tensor(self.mean_face)}
        metrics = self._evaluate(module.to(rt.device), final=True)
        if rt.is_main:
            rd.write_final(metrics, ("baseline.pt", {"format": "facedis-baseline/1", "kind": kind, **payload,
                                                     "config": config_to_dict(cfg), "metrics": metrics}))
            write_run_curves(rd.path, title=f"{cfg.run.name}: baseline {kind} on {cfg.dataset}")
            print(summary(f"facedis: baseline {kind} on {cfg.dataset} finished in "
                          f"{(time.time() - self.started_at) / 60:.1f} min", metrics, rd.path,
                          "metrics.json, metrics.jsonl, curves.png, config.yaml, provenance.json, baseline.pt",
                          e_rec_note="  (Δ_exp ≡ 0: distance of the predicted neutral to the input)"), flush=True)
        rt.wait()
        return metrics

    # ------------------------------------------------------------------ data
    def _train_arrays(self) -> dict:
        from facedis.data import FaceDataset

        cfg = self.cfg
        ds = FaceDataset(cfg.data.root, cfg.data.train_split, in_memory=cfg.data.in_memory,
                         with_partner=False, seed=cfg.train.seed)
        arr = split_arrays(ds)
        ok = np.isfinite(arr["neutral"]).all(axis=(1, 2))
        kept = {k: v[ok] for k, v in arr.items()}
        if len(kept["subject"]) == 0:
            raise ConfigError(f"model.kind={cfg.model.kind}: no train sample has a neutral ground truth in "
                              f"{cfg.data.root} (split {cfg.data.train_split!r})")
        self.extra["num_train_samples"] = int(len(arr["subject"]))
        self.extra["num_train_samples_with_neutral"] = int(len(kept["subject"]))
        return kept

    # ------------------------------------------------------------------ ridge
    def _fit_ridge(self) -> RidgeBaseline:
        cfg = self.cfg
        t = time.time()
        a = self._train_arrays()
        n = len(a["subject"])
        X = a["vertices"].reshape(n, -1).astype(np.float64)
        Y = a["neutral"].reshape(n, -1).astype(np.float64)
        f, alpha, info = fit_ridge(X, Y, a["subject"], cfg.model.ridge_alphas, cfg.train.seed, self.data.mm_per_unit)
        A, B = f.factors(alpha)
        edge = alpha in (min(cfg.model.ridge_alphas), max(cfg.model.ridge_alphas)) and len(cfg.model.ridge_alphas) > 1
        self.extra.update({"ridge_alpha": alpha, "ridge_alpha_at_grid_edge": bool(edge),
                           "ridge_val_AVD_neu_mean": {repr(k): v for k, v in info["val"].items()},
                           "ridge_val_subjects": len(info["val_subjects"]),
                           "ridge_fit_subjects": len(info["fit_subjects"]), "ridge_rank": int(f.s.size),
                           "time/fit_s": time.time() - t})
        self.rt.print(f"[facedis] ridge: α={alpha:g} (validation AVD_neu mm: "
                      + ", ".join(f"{k:g}: {v:.3f}" for k, v in info["val"].items()) + ")"
                      + ("  [α at the edge of model.ridge_alphas]" if edge else ""))
        return RidgeBaseline(self.mean_face, f.x_mean, f.y_mean, A, B, alpha)

    # ------------------------------------------------------------------ supervised
    def _fit_supervised(self) -> SupervisedRegressor:
        cfg, rt = self.cfg, self.rt
        tc = cfg.train
        a = self._train_arrays()
        dev = rt.device
        X = torch.as_tensor(a["vertices"], dtype=torch.float32)
        T = torch.as_tensor(a["neutral"], dtype=torch.float32) - torch.as_tensor(self.mean_face)[None]
        n = X.shape[0]
        bs = min(tc.batch_size, n)
        if bs < 2:
            raise ConfigError("the supervised baseline needs at least 2 train samples with a neutral (BatchNorm)")
        torch.manual_seed(mix_seed(tc.seed, 1))
        model = SupervisedRegressor(self.data.num_vertices, cfg.model.id_dim, width=cfg.model.width,
                                    encoder_channels=cfg.model.encoder_channels or None,
                                    decoder_hidden=cfg.model.decoder_hidden, pointwise=pointwise_mode(cfg)).to(dev)
        o = cfg.optim
        opt = adam(model.parameters(), lr=o.lr_vae, weight_decay=o.weight_decay_vae)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.lr_step_epochs, gamma=o.lr_gamma)
        rt.add_optimizer(opt)
        weight = cfg.loss.neutral_recon if cfg.loss.neutral_recon > 0 else cfg.loss.recon
        self.extra["supervised_loss_weight"] = weight
        g = torch.Generator().manual_seed(mix_seed(tc.seed, 2))
        steps = n // bs  # drop the last partial batch (BatchNorm)
        if tc.max_steps_per_epoch:
            steps = min(steps, tc.max_steps_per_epoch)
        state = LoopState(meter=LossMeter(dev), where=f"(supervised baseline) Run directory: {self.rd.path}",
                          bar=progress_bar(rt, tc.progress, total=tc.epochs * steps, desc="supervised"))
        try:
            for epoch in range(tc.epochs):
                t0 = time.time()
                perm = torch.randperm(n, generator=g)
                batches = ({"vertices": X[idx].to(dev, non_blocking=True), "target": T[idx].to(dev, non_blocking=True)}
                           for idx in (perm[s * bs:(s + 1) * bs] for s in range(steps)))
                means = train_one_epoch(lambda b: supervised_step(model, opt, b, weight, updates=rt), batches, state,
                                        rt, epoch=epoch, first_step=0, steps_per_epoch=steps,
                                        log_every=tc.log_every_steps)
                sched.step()
                self.epochs_done, self.global_step = epoch + 1, state.global_step
                self.last_train = {f"train/{k}": v for k, v in means.items()}
                rec = {"epoch": epoch + 1, "global_step": self.global_step, **self.last_train,
                       "lr/vae": opt.param_groups[0]["lr"]}
                evaluated = (epoch + 1) % tc.eval_every == 0 and epoch + 1 < tc.epochs
                if evaluated:
                    rec.update(self._evaluate(model, final=False))
                rec["time/epoch_s"] = time.time() - t0
                self._log(rec, evaluated)
        finally:
            if state.bar is not None:
                state.bar.close()
        return model

    # ------------------------------------------------------------------ evaluation and files
    def _evaluate(self, module, final: bool) -> dict:
        cfg = self.cfg
        t0 = time.time()
        ev, _ = evaluate(module, self.data, cfg, self.rt)
        if not final:
            return {**ev, "time/eval_s": time.time() - t0}
        final_m = {**ev, **self.last_train, **self.extra, "epoch": self.epochs_done, "global_step": self.global_step,
                   "seed": cfg.train.seed, "dataset": cfg.dataset, "mode": f"baseline:{cfg.model.kind}",
                   "model_kind": cfg.model.kind, "E_rec_definition": E_REC_DEFINITION}
        rec = {"epoch": self.epochs_done, "global_step": self.global_step, **self.last_train, **ev,
               "time/eval_s": time.time() - t0}
        self._log(rec, evaluated=True)
        return final_m

    def _log(self, rec: dict, evaluated: bool) -> None:
        self.rd.append_metrics(rec)
        if evaluated:
            self.rt.print(eval_line(rec["epoch"], rec))
            if self.report is not None and self.rt.is_main:
                self.report(dict(rec), self.rd.path)
