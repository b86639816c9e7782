"""Baselines in the same harness as the method (GitHub issue #10), selected by ``model.kind``.

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

They load data, evaluate and write their run directory through the engine
(``facedis.engine``): the same ``FaceDataset`` splits, the same test-split evaluation
(``_Trainer.evaluate``: E_rec, AVD_neu, AVD_neu_meanface, both E_dis, Kabsch for BU-3DFE) and
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

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from facedis.config import Config, ConfigError, config_from_dict, config_to_dict, validate

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
        from facedis.model import MLPDecoder, PointwiseMLP, _scaled, encoder_widths

        c = [3] + encoder_widths(width, encoder_channels)
        hidden = decoder_hidden if decoder_hidden is not None else _scaled(256, width)
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
# data through the engine's loaders
# ---------------------------------------------------------------------------------------------
def _split_arrays(ds, chunk: int = 256) -> dict[str, np.ndarray]:
    """A whole split of a ``FaceDataset`` as numpy arrays (vertices, neutral, subject, ...)."""
    from facedis.engine import _fetch

    n = len(ds)
    parts: dict[str, list] = {}
    for i in range(0, n, chunk):
        b = _fetch(ds, list(range(i, min(n, i + chunk))))
        for k in ("vertices", "neutral", "subject", "index"):
            if k in b:
                parts.setdefault(k, []).append(b[k].numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _with_neutral(arr: dict) -> dict:
    ok = np.isfinite(arr["neutral"]).all(axis=(1, 2))
    return {k: v[ok] for k, v in arr.items()}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
class _BaselineRun:
    def __init__(self, cfg: Config, report: Optional[Reporter]):
        from facedis import engine

        cfg = config_from_dict(config_to_dict(cfg))
        validate(cfg)
        if cfg.model.kind not in BASELINE_KINDS:
            raise ConfigError(f"model.kind={cfg.model.kind!r} is not a baseline; valid: {', '.join(BASELINE_KINDS)}")
        self.cfg, self.report, self.E = cfg, report, engine
        # The engine's trainer owns the Accelerator, the data loading, the run-directory files and
        # the evaluation; it is built for the VAE, so it gets a copy that says model.kind=vae and
        # is then handed the real config (written to config.yaml).
        as_vae = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind="vae"))
        tr = engine._Trainer(as_vae, eval_only=True)
        tr.cfg = cfg
        self.tr = tr

    def run(self) -> dict:
        tr, cfg, E = self.tr, self.cfg, self.E
        tr._make_accelerator()
        tr._ensure_data()
        tr._load_data()
        tr._setup_run_dir()
        self.run_dir = tr.run_dir
        done = self.run_dir / "metrics.json"
        if done.is_file():
            tr._print(f"[facedis] {self.run_dir} is already finished (metrics.json exists); nothing to do")
            return json.loads(done.read_text())
        tr.pretrain_record = {"skipped": f"baseline model.kind={cfg.model.kind}: no discriminator"}
        tr._write_provenance({"baseline": cfg.model.kind})
        if tr.is_main:
            E._atomic_write_text(self.run_dir / "metrics.jsonl", "")  # a rerun starts over
        E._seed_everything(cfg.train.seed)
        self.mean_face = np.asarray(tr.info.mean_face, dtype=np.float32)
        self.extra: dict = {}
        self.last_train: dict = {}
        self.epochs_done, self.global_step = 0, 0
        kind = cfg.model.kind
        if kind == "mean_face":
            module = MeanFaceBaseline(self.mean_face)
            payload = {"mean_face": torch.as_tensor(self.mean_face)}
        elif kind == "identity_map":
            module, payload = IdentityMapBaseline(self.mean_face), {}
        elif kind == "ridge":
            module = self._fit_ridge()
            payload = {}
        else:
            module = self._fit_supervised()
            payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                       "num_vertices": tr.V, "code_dim": cfg.model.id_dim, "width": cfg.model.width,
                       "encoder_channels": list(cfg.model.encoder_channels),
                       "decoder_hidden": cfg.model.decoder_hidden, "mean_face": torch.as_tensor(self.mean_face)}
        self.module = module
        tr.vae_raw = module.to(tr.device)
        metrics = self._evaluate(final=True)
        if tr.is_main:
            E._atomic_torch_save({"format": "facedis-baseline/1", "kind": kind, **payload,
                                  "config": config_to_dict(cfg), "metrics": metrics}, self.run_dir / "baseline.pt")
            E._atomic_write_text(done, json.dumps(metrics, indent=2, default=E._json_default))
            self._summary(metrics)
        tr.accelerator.wait_for_everyone()
        return metrics

    # ------------------------------------------------------------------ data
    def _train_arrays(self) -> dict:
        from facedis import data as fdata

        cfg = self.cfg
        ds = fdata.FaceDataset(cfg.data.root, cfg.data.train_split, in_memory=cfg.data.in_memory,
                               with_partner=False, seed=cfg.train.seed)
        arr = _split_arrays(ds)
        kept = _with_neutral(arr)
        if len(kept["subject"]) == 0:
            raise ConfigError(f"model.kind={cfg.model.kind}: no train sample has a neutral ground truth in "
                              f"{cfg.data.root} (split {cfg.data.train_split!r})")
        self.extra["num_train_samples"] = int(len(arr["subject"]))
        self.extra["num_train_samples_with_neutral"] = int(len(kept["subject"]))
        return kept

    # ------------------------------------------------------------------ ridge
    def _fit_ridge(self) -> RidgeBaseline:
        tr, cfg = self.tr, self.cfg
        t = time.time()
        a = self._train_arrays()
        n = len(a["subject"])
        X = a["vertices"].reshape(n, -1).astype(np.float64)
        Y = a["neutral"].reshape(n, -1).astype(np.float64)
        f, alpha, info = fit_ridge(X, Y, a["subject"], cfg.model.ridge_alphas, cfg.train.seed, tr.mm)
        A, B = f.factors(alpha)
        edge = alpha in (min(cfg.model.ridge_alphas), max(cfg.model.ridge_alphas)) and len(cfg.model.ridge_alphas) > 1
        self.extra.update({"ridge_alpha": alpha, "ridge_alpha_at_grid_edge": bool(edge),
                           "ridge_val_AVD_neu_mean": {repr(k): v for k, v in info["val"].items()},
                           "ridge_val_subjects": len(info["val_subjects"]),
                           "ridge_fit_subjects": len(info["fit_subjects"]), "ridge_rank": int(f.s.size),
                           "time/fit_s": time.time() - t})
        tr._print(f"[facedis] ridge: α={alpha:g} (validation AVD_neu mm: "
                  + ", ".join(f"{k:g}: {v:.3f}" for k, v in info["val"].items()) + ")"
                  + ("  [α at the edge of model.ridge_alphas]" if edge else ""))
        return RidgeBaseline(self.mean_face, f.x_mean, f.y_mean, A, B, alpha)

    # ------------------------------------------------------------------ supervised
    def _fit_supervised(self) -> SupervisedRegressor:
        tr, cfg, E = self.tr, self.cfg, self.E
        a = self._train_arrays()
        dev = tr.device
        X = torch.as_tensor(a["vertices"], dtype=torch.float32)
        T = torch.as_tensor(a["neutral"], dtype=torch.float32) - torch.as_tensor(self.mean_face)[None]
        n = X.shape[0]
        bs = min(cfg.train.batch_size, n)
        if bs < 2:
            raise ConfigError("the supervised baseline needs at least 2 train samples with a neutral (BatchNorm)")
        torch.manual_seed(E.mix_seed(cfg.train.seed, 1))
        model = SupervisedRegressor(tr.V, cfg.model.id_dim, width=cfg.model.width,
                                    encoder_channels=cfg.model.encoder_channels or None,
                                    decoder_hidden=cfg.model.decoder_hidden,
                                    pointwise=E.effective_pointwise(cfg)).to(dev)
        o = cfg.optim
        opt = torch.optim.Adam(model.parameters(), lr=o.lr_vae, weight_decay=o.weight_decay_vae)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.lr_step_epochs, gamma=o.lr_gamma)
        weight = cfg.loss.neutral_recon if cfg.loss.neutral_recon > 0 else cfg.loss.recon
        self.extra["supervised_loss_weight"] = weight
        g = torch.Generator().manual_seed(E.mix_seed(cfg.train.seed, 2))
        tc = cfg.train
        steps = n // bs  # drop the last partial batch (BatchNorm)
        if tc.max_steps_per_epoch:
            steps = min(steps, tc.max_steps_per_epoch)
        self.tr.vae_raw = model
        for epoch in range(tc.epochs):
            t0 = time.time()
            model.train()
            perm = torch.randperm(n, generator=g)
            tot = torch.zeros((), dtype=torch.float64, device=dev)
            for s in range(steps):
                idx = perm[s * bs:(s + 1) * bs]
                x, y = X[idx].to(dev, non_blocking=True), T[idx].to(dev, non_blocking=True)
                with tr.autocast():
                    pred = model.offset(x)
                loss = weight * F.mse_loss(pred.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.detach().double()
                self.global_step += 1
            mean_loss = float(tot / max(steps, 1))
            if not math.isfinite(mean_loss):
                raise E.NonFiniteLossError(f"supervised baseline: non-finite loss in epoch {epoch + 1}. Lower "
                                           f"optim.lr_vae or loss.neutral_recon. Run directory: {self.run_dir}")
            sched.step()
            self.epochs_done = epoch + 1
            self.last_train = {"train/neutral_recon": mean_loss}
            rec = {"epoch": epoch + 1, "global_step": self.global_step, **self.last_train,
                   "lr/vae": opt.param_groups[0]["lr"]}
            if (epoch + 1) % tc.eval_every == 0 and epoch + 1 < tc.epochs:
                rec.update(self._evaluate(final=False))
            rec["time/epoch_s"] = time.time() - t0
            self._log(rec, evaluated=(epoch + 1) % tc.eval_every == 0 and epoch + 1 < tc.epochs)
        return model

    # ------------------------------------------------------------------ evaluation and files
    def _evaluate(self, final: bool) -> dict:
        tr, cfg = self.tr, self.cfg
        t0 = time.time()
        ev, _ = tr.evaluate()
        if not final:
            return {**ev, "time/eval_s": time.time() - t0}
        epochs = self.epochs_done
        final_m = {**ev, **self.last_train, **self.extra, "epoch": epochs, "global_step": self.global_step,
                   "seed": cfg.train.seed, "dataset": cfg.dataset, "mode": f"baseline:{cfg.model.kind}",
                   "model_kind": cfg.model.kind, "E_rec_definition": E_REC_DEFINITION}
        rec = {"epoch": epochs, "global_step": self.global_step, **self.last_train, **ev,
               "time/eval_s": time.time() - t0}
        self._log(rec, evaluated=True)
        return final_m

    def _log(self, rec: dict, evaluated: bool) -> None:
        tr = self.tr
        if tr.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(self.E._dumps(rec) + "\n")
            if evaluated:
                tr.last_eval = rec
                tr._print(tr._eval_line(rec["epoch"]) if hasattr(tr, "_eval_line") else str(rec))
        if evaluated and self.report is not None and tr.is_main:
            self.report(dict(rec), self.run_dir)

    def _summary(self, m: dict) -> None:
        def f(k):
            v = m.get(k)
            return "   n/a" if not isinstance(v, (int, float)) else f"{v:7.3f}"

        print("\n".join([
            "",
            f"facedis: baseline {self.cfg.model.kind} on {self.cfg.dataset} finished in "
            f"{(time.time() - self.tr.t_start) / 60:.1f} min",
            f"  test split ({m.get('num_test_samples')} samples, {m.get('num_test_identities')} identities), mm:",
            f"    AVD_neu    mean {f('AVD_neu_mean')}  median {f('AVD_neu_median')}  std {f('AVD_neu_std')}",
            f"    E_dis ref  mean {f('E_dis_ref_mean')}  median {f('E_dis_ref_median')}",
            f"    E_dis vstd mean {f('E_dis_vstd_mean')}  median {f('E_dis_vstd_median')}",
            f"    E_rec      mean {f('E_rec_mean')}  (Δ_exp ≡ 0: distance of the predicted neutral to the input)",
            f"  run directory {self.run_dir}/: metrics.json, metrics.jsonl, config.yaml, provenance.json, baseline.pt",
        ]), flush=True)


def run_baseline(cfg: Config, report: Optional[Reporter] = None) -> dict:
    """Fit (or train) the baseline ``cfg.model.kind`` and evaluate it on the test split; write
    the run directory like ``engine.train`` and return the final metrics (``metrics.json``)."""
    return _BaselineRun(cfg, report).run()
