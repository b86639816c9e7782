"""Ray Tune sweeps over the paper's loss weights (λ1–λ5) and latent sizes; Pareto pick of (E_dis, E_rec).

    facedis tune --dataset coma --num-samples 32 --gpus-per-trial 0.5 --mode +ne-gt+id-dis
    facedis tune --dataset coma --mode search --space loss.recon=loguniform:1000:10000 --train.epochs=100
    facedis tune --dataset coma --resume                                    # the newest coma sweep, after a crash
    facedis tune --resume sweeps/results/coma-20260101-120000               # a given sweep
    facedis tune --dataset synth --smoke-test                               # ~1 min on 2 CPU cores
    facedis tune --dataset coma --search optuna --num-samples 64            # multi-objective TPE + Pareto stopping

(``python sweeps/tune.py ...`` in a source checkout is the same command.) Needs Ray Tune:
``pip install 'facedis[sweep]'``; ``--search optuna`` needs Optuna too: ``pip install 'facedis[optuna]'``.
Fixed config overrides are ``--section.key=value`` as everywhere (``--set section.key=value`` is the same).

Search (``--search``): ``random`` (Ray Tune's seeded random search; default) or ``optuna``
(Optuna's multi-objective sampler over (E_dis, E_rec), :mod:`facedis.sweeps.searchers`).
Early stopping (``--scheduler``): ``asha`` (on the scalar ``objective``; the default with random
search), ``pareto`` (:class:`facedis.sweeps.schedulers.ParetoRungScheduler`: stops a trial at a rung
only when enough trials at that rung dominate it in (E_dis, E_rec); the default with Optuna) or
``fifo`` (no early stopping). ``python -m facedis.sweeps.compare`` runs both searches with the same
budget and seeds and reports the hypervolume of their fronts (docs/sweeps.md).

Every trial is one call of :func:`facedis.engine.train` (the only training loop): the trainable
(:func:`trainable`) builds the trial's Config from the base preset plus the sampled values,
forwards every evaluation to ``tune.report`` with the engine's checkpoint directory, and on a
restore copies the Tune checkpoint to ``<run.dir>/checkpoints/last``, where the engine resumes.

Output (``sweeps/results/<dataset>-<time>/`` under the current directory, or ``--out``), see docs/sweeps.md:
``trials.csv`` (every trial, last reported values, on-front flag and score), ``pareto.png``,
``best1-<trial>.yaml`` … (complete resolved configs: ``facedis train --config`` and
``facedis submit --grid sweep:<out>`` take them unchanged), ``sweep.json`` (what ``--resume``
needs), ``tune/`` (Ray Tune's experiment directory) and ``runs/<trial>/`` (each trial's run dir).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from facedis.extras import require
from facedis.sweeps import pareto, spaces

SEARCHES = ("random", "optuna")  # facedis.sweeps.searchers (imported with Ray)
SCHEDULERS = ("asha", "pareto", "fifo")
#: ``--scheduler`` default per ``--search``
DEFAULT_SCHEDULER = {"random": "asha", "optuna": "pareto"}

#: Where sweeps go without ``--out`` (relative to the current directory), as ``<dataset>-<time>/``.
RESULTS_DIR = Path("sweeps") / "results"
#: ``--resume`` given without a directory
LATEST = Path("<latest>")

DEFAULT_METRICS = ("E_dis_ref_mean", "E_rec_mean")

#: Scales that make E_dis and E_rec comparable in the ASHA objective (mm; the paper's "Ours").
#: objective = E_dis / scale_dis + E_rec / scale_rec.  Synth has no paper numbers: plain sum.
OBJECTIVE_SCALES: dict[str, tuple[float, float]] = {
    "coma": (0.176, 0.783),
    "bu3dfe": (0.443, 1.421),
    "facescape": (0.77, 3.11),   # Table III has no E_rec; AVD_neu stands in for its scale
    "synth": (1.0, 1.0),
}

#: ``--smoke-test``: tiny data, slim model, 3 epochs, evaluation every epoch (fixed overrides).
SMOKE_SET: dict[str, Any] = {
    "train.epochs": 3,
    "train.eval_every": 1,
    "train.batch_size": 8,
    "train.eval_batch_size": 16,
    "train.log_every_steps": 1000,
    "train.cpu": True,
    "model.width": 0.125,
    "model.encoder_channels": [],
    "model.decoder_hidden": 32,
    "model.disc_width": 0.125,
    "pretrain.epochs": 1,
    "pretrain.batch_size": 8,
    "data.num_workers": 0,
}
SMOKE_SPACE: dict[str, Any] = {"model.id_dim": "choice:2,4", "model.exp_dim": "choice:2,4"}
# 2 of the 6 subjects held out: D pretraining's test accuracy needs two test identities
SMOKE_DATA = ["synth", "--subjects", "6", "--per-subject", "8", "--vertices", "300", "--seed", "0",
              "--test-fraction", "0.34"]

#: Overrides every trial gets (and the written best configs do not).
TRIAL_SET: dict[str, Any] = {"train.progress": False}

_RESULT_KEYS = ("epoch", "E_rec_mean", "E_dis_ref_mean", "E_dis_vstd_mean", "AVD_neu_mean")


# --------------------------------------------------------------------------------------------
# environment


def quiet_ray_env(local: bool) -> None:
    """Env vars that keep Ray Tune quiet and save its state often (set before ``import ray``;
    an existing value wins)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100")
    # save the experiment state (what --resume reads) every 2 s instead of >= 10 s: a crash loses less
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if local:  # a private single-node Ray: loopback only, no token file
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def init_ray(address: str | None, num_cpus: int | None, verbose: bool) -> tuple[str | None, bool]:
    """Start (or join, with ``address``) Ray; returns (the temp dir to delete afterwards or None,
    whether this call started it). A Ray already initialised in this process without ``address``
    (``facedis tune compare`` runs several sweeps on one private Ray) is used as it is."""
    import ray

    kw = dict(include_dashboard=False, log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR")
    if address:
        ray.init(address=address, **kw)
        return None, True
    if ray.is_initialized():
        return None, False
    tmp = tempfile.mkdtemp(prefix="rayfd", dir="/tmp")  # short: AF_UNIX paths are limited to 107 bytes
    ray.init(num_cpus=num_cpus, _temp_dir=tmp, **kw)
    return tmp, True


# --------------------------------------------------------------------------------------------
# base config and data


def _abs(p: str) -> str:
    return str(Path(p).expanduser().resolve()) if p else p


def base_config(config_path: Path, fixed: dict[str, Any]):
    """The base preset plus ``--set`` overrides, with every path made absolute (trials run elsewhere)."""
    from facedis.config import apply_overrides, load_config, validate

    cfg = load_config(config_path)
    fixed = {k: v for k, v in spaces.expand_sample(fixed).items()} if fixed else {}
    if fixed:
        cfg = apply_overrides(cfg, fixed)
    cfg.data.root = _abs(cfg.data.root)
    cfg.run.artefact_dir = _abs(cfg.run.artefact_dir)
    validate(cfg)
    return cfg


def ensure_data(cfg) -> None:
    """Prepare ``cfg.data.root`` once, before the trials, if it is missing (``data.prepare`` args)."""
    root = Path(cfg.data.root)
    if (root / "meta.json").is_file():
        return
    if not cfg.data.prepare:
        raise SystemExit(f"data set {root} is missing and the preset has no data.prepare; "
                         f"run facedis prepare first")
    cmd = [sys.executable, "-m", "facedis.prep.prepare", *cfg.data.prepare, "--out", str(root)]
    print("preparing data:", " ".join(cmd), flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True)


def trial_config(base: dict, sample: dict, extra: dict | None = None):
    """Base config dict + a sampled point (virtual keys expanded) + ``extra`` -> validated Config."""
    from facedis.config import apply_overrides, config_from_dict, validate

    cfg = apply_overrides(config_from_dict(base), {**spaces.expand_sample(sample), **(extra or {})})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# the trainable


def _scalar_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
    return out


def _import_train(spec: str):
    """``"facedis.engine:train"`` -> the function."""
    import importlib

    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name or "train")


def trainable(config: dict, base: dict, run_root: str, trial_set: dict, scales: tuple[float, float],
              metrics: tuple[str, str], threads: int, train_fn: str = "facedis.engine:train") -> None:
    """One trial: a thin adapter over :func:`facedis.engine.train` (no training loop here).

    ``config`` is the sampled point (dotted keys, ``loss.kl``/``mode`` virtual keys). The run
    directory is ``<run_root>/<trial id>``. A Tune checkpoint (restore after a crash, or a
    scheduler pause) replaces ``checkpoints/last`` there, so the engine resumes from exactly the
    state Tune last recorded; without one the trial starts from scratch.
    """
    import torch
    from ray import tune

    train = _import_train(train_fn)
    torch.set_num_threads(max(1, threads))
    ctx = tune.get_context()
    run_dir = Path(run_root) / ctx.get_trial_id()
    cfg = trial_config(base, config, {**trial_set, "run.dir": str(run_dir), "run.name": ctx.get_trial_id()})
    last = run_dir / "checkpoints" / "last"
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a retried trial: start clean
    else:
        with checkpoint.as_directory() as d:
            shutil.rmtree(last, ignore_errors=True)
            last.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(d, last)
        (run_dir / "metrics.json").unlink(missing_ok=True)  # not finished until the engine says so
    epochs = cfg.train.epochs
    dis_key, rec_key = metrics

    def report(m: dict, checkpoint_dir: Path) -> None:
        out = _scalar_metrics(m)
        d, r = out.get(dis_key), out.get(rec_key)
        if isinstance(d, (int, float)) and isinstance(r, (int, float)):
            out["objective"] = d / scales[0] + r / scales[1]
        out["epochs_done"] = engine_epochs_done(out, epochs)
        out["progress"] = out["epochs_done"] / max(1, epochs)
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    train(cfg, report=report)


def engine_epochs_done(metrics: dict, epochs: int) -> int:
    """Number of finished epochs at a report. The engine's ``epoch`` counts finished epochs
    (1-based: the report after the first epoch says 1)."""
    return int(metrics.get("epoch", 0))


# --------------------------------------------------------------------------------------------
# selection and output


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarise(results: list[dict], metrics=DEFAULT_METRICS, k: int = 1, method: str = "median",
              weight: float = 0.5, eligible: str = "completed") -> tuple[list[dict], list[int], list[int]]:
    """Rows (one per trial, in order) with ``on_front``/``score``/``selected``; front and chosen indices.

    ``results``: dicts with ``trial_id``, ``status``, ``completed`` (bool), ``metrics`` (last
    report) and ``config``. ``eligible="completed"`` restricts the front to trials that ran the
    whole budget (ASHA-stopped trials stand at an earlier epoch); falls back to all when none did.
    """
    pts = [(r["metrics"].get(metrics[0], math.nan), r["metrics"].get(metrics[1], math.nan)) for r in results]
    pts = [tuple(float(v) if _is_num(v) else math.nan for v in p) for p in pts]
    ok = [i for i, r in enumerate(results) if r["completed"]] if eligible == "completed" else []
    if not ok:
        ok = list(range(len(results)))
    sub = [pts[i] for i in ok]
    front = [ok[j] for j in pareto.pareto_front(sub)]
    sc_sub = pareto.scores(sub, method, weight)
    sc = [math.nan] * len(results)
    for j, i in enumerate(ok):
        sc[i] = sc_sub[j]
    chosen = sorted(front, key=lambda i: (sc[i], i))[:k]
    rows = []
    for i, r in enumerate(results):
        row = {
            "trial_id": r["trial_id"], "status": r["status"], "completed": r["completed"],
            "eligible": i in ok, "on_front": i in front, "score": sc[i],
            "selected_rank": chosen.index(i) + 1 if i in chosen else "",
            "num_results": r.get("num_results", ""),
        }
        row.update({f"config/{k_}": v for k_, v in r["config"].items()})
        row.update({k_: v for k_, v in r["metrics"].items() if isinstance(v, (int, float, str, bool))})
        row["path"] = r.get("path", "")
        row["error"] = r.get("error", "")
        rows.append(row)
    return rows, front, chosen


def write_csv(rows: list[dict], path: Path) -> None:
    import csv

    first = ["trial_id", "status", "completed", "eligible", "on_front", "selected_rank", "score", "num_results"]
    keys = list(first)
    for row in rows:
        for k in row:
            if k not in keys:
                keys.append(k)
    cfg_keys = [k for k in keys if k.startswith("config/")]
    main = [k for k in _RESULT_KEYS + ("objective", "epochs_done", "training_iteration") if k in keys]
    rest = [k for k in keys if k not in first and k not in cfg_keys and k not in main]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=first + cfg_keys + main + rest)
    w.writeheader()
    for row in rows:
        w.writerow(row)
    _atomic_text(path, buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary name in the same directory, then rename)."""
    from facedis.rundir import atomic_write_text

    atomic_write_text(Path(path), text)


def collect(result_grid, epochs: int) -> list[dict]:
    """ResultGrid -> plain dicts for :func:`summarise` (last report of every trial)."""
    out = []
    for r in result_grid:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id") or Path(r.path).name
        try:
            n = len(r.metrics_dataframe) if r.metrics_dataframe is not None else 0
        except Exception:  # noqa: BLE001 - progress.csv unreadable: count unknown
            n = ""
        done = int(m.get("epochs_done", -1)) >= epochs
        status = "error" if r.error else ("completed" if done else ("stopped" if m else "no-result"))
        out.append({
            "trial_id": trial_id, "status": status, "completed": done and not r.error,
            "metrics": {k: v for k, v in m.items() if k != "config"}, "config": dict(r.config or {}),
            "path": r.path, "num_results": n, "error": (str(r.error).splitlines() or [""])[0][:300] if r.error else "",
        })
    out.sort(key=lambda d: d["trial_id"])
    return out


def write_outputs(out: Path, state: dict, results: list[dict], k: int, method: str, weight: float,
                  eligible: str) -> dict:
    """trials.csv, pareto.png and best<k>-<trial>.yaml under ``out``; returns a summary."""
    from facedis.config import save_config

    metrics = tuple(state["metrics"])
    rows, front, chosen = summarise(results, metrics, k, method, weight, eligible)
    write_csv(rows, out / "trials.csv")
    pts = [(r["metrics"].get(metrics[0], math.nan), r["metrics"].get(metrics[1], math.nan)) for r in results]
    pts = [tuple(float(v) if _is_num(v) else math.nan for v in p) for p in pts]
    dimmed = [i for i, row in enumerate(rows) if not row["eligible"]]
    title = f"{state['dataset']} sweep: {len(results)} trials, {method} pick"
    pareto.plot_front(pts, [r["trial_id"] for r in results], front, chosen, out / "pareto.png",
                      xlabel=f"{metrics[1]} (mm)", ylabel=f"{metrics[0]} (mm)", title=title, dimmed=dimmed)
    for old in list(out.glob("best*.yaml")):
        old.unlink()
    best = []
    for rank, i in enumerate(chosen, 1):
        r = results[i]
        cfg = trial_config(state["base"], r["config"], {"run.dir": "", "run.name": f"{state['dataset']}-sweep-{r['trial_id']}"})
        path = out / f"best{rank}-{r['trial_id']}.yaml"
        save_config(cfg, path)
        best.append({"rank": rank, "trial_id": r["trial_id"], "yaml": str(path), "score": rows[i]["score"],
                     "config": r["config"], **{m: r["metrics"].get(m) for m in metrics}})
    summary = {"num_trials": len(results), "front": [results[i]["trial_id"] for i in front], "best": best,
               "metrics": list(metrics), "method": method, "weight": weight, "eligible": eligible}
    _atomic_text(out / "selection.json", json.dumps(summary, indent=2, default=str))
    return summary


# --------------------------------------------------------------------------------------------
# progress lines


def _progress_callback(metrics):
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            vals = "  ".join(f"{m}={result[m]:.4g}" for m in metrics if _is_num(result.get(m)))
            print(f"[{trial.trial_id}] epoch {result.get('epoch', '?')}  {vals}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"[{trial.trial_id}] done", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{trial.trial_id}] ERROR (see {trial.path})", flush=True)

    return Progress()


# --------------------------------------------------------------------------------------------
# CLI


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", choices=sorted(spaces.SPACES), help="data set (selects the preset <dataset> and the space)")
    p.add_argument("--config", type=Path, help="base preset: a YAML file or a shipped preset's name (default: the preset <dataset>)")
    p.add_argument("--mode", default="+ne-gt+id-dis", help=f"fixed mode ({', '.join(spaces.MODES)}) or 'search'")
    p.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                   help="search dimension, e.g. loss.recon=loguniform:100:10000, model.id_dim=choice:4,8 (repeatable)")
    p.add_argument("--space-file", type=Path, help="YAML mapping KEY: SPEC merged over the data set's space")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_",
                   help="fixed override for trials AND the written best configs, the same as --KEY=VALUE (repeatable)")
    p.add_argument("--trial-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the trials only (a cheaper sweep budget, e.g. train.epochs=50)")
    p.add_argument("--num-samples", type=int, default=None, help="trials to sample (default 16; smoke test 4)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="default 1 (fractional allowed)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="default 1 if Ray sees a GPU, else 0 (fractional allowed: 0.5 = two trials per GPU)")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most this many trials at once (default: resources decide)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto or ray://host:10001)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private local Ray (default: all)")
    p.add_argument("--search", choices=SEARCHES, default="random",
                   help="random (Ray Tune's seeded random search) or optuna (multi-objective Optuna over the two "
                        "--metrics; needs facedis[optuna])")
    p.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe",
                   help="Optuna sampler with --search optuna: multi-objective TPE (default) or NSGA-II")
    p.add_argument("--startup-trials", type=int, default=None,
                   help="TPE: random trials before it models the front (default: a third of --num-samples, 4..10)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="early stopping: asha (scalar objective), pareto (stops only trials dominated by "
                        "--dominated-by others at a rung) or fifo (none); default asha with --search random, "
                        "pareto with --search optuna")
    p.add_argument("--asha-metric", default="objective",
                   help="metric ASHA compares (default objective = E_dis/s_dis + E_rec/s_rec, scales per data set)")
    p.add_argument("--grace-epochs", type=int, default=None,
                   help="first rung of asha/pareto in epochs (default: max(eval_every, epochs/8))")
    p.add_argument("--reduction-factor", type=float, default=2, help="rung spacing of asha/pareto (and ASHA's cut)")
    p.add_argument("--dominated-by", type=int, default=2,
                   help="pareto: a trial is stopped at a rung when at least this many trials recorded there dominate it")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="the two Pareto objectives (E_dis key, E_rec key)")
    p.add_argument("--select", choices=["median", "rank"], default="median", help="scalarised pick among the front (pareto.py)")
    p.add_argument("--weight", type=float, default=0.5, help="weight of E_dis in the scalarised pick (0..1)")
    p.add_argument("--top-k", type=int, default=None, help="best configs to write (default 3; smoke test 1)")
    p.add_argument("--eligible", choices=["completed", "all"], default="completed",
                   help="trials the front is taken over (completed = ran the whole budget)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (random search or Optuna sampler)")
    p.add_argument("--out", type=Path, help=f"output directory (default {RESULTS_DIR}/<dataset>-<time>)")
    p.add_argument("--resume", type=Path, metavar="OUT", nargs="?", const=LATEST,
                   help="resume the sweep in OUT after a crash (other options are read from OUT/sweep.json); "
                        f"without OUT: --out, else the newest {RESULTS_DIR}/<dataset>-* of --dataset")
    p.add_argument("--smoke-test", action="store_true", help="tiny synth sweep: 4 trials x 3 epochs, ~1 min on 2 cores")
    p.add_argument("--verbose", action="store_true", help="show trial logs and Ray output")
    p.add_argument("--train-fn", default="facedis.engine:train", help=argparse.SUPPRESS)  # tests of the adapter
    return p


def latest_sweep(dataset: str, smoke_test: bool = False, root: Path = RESULTS_DIR) -> Path:
    """The newest ``<root>/<dataset>[-smoke]-<time>/`` holding a ``sweep.json`` (``SystemExit`` if none)."""
    prefix = f"{dataset}-smoke-" if smoke_test else f"{dataset}-"
    found = sorted(d for d in Path(root).glob(f"{prefix}*") if (d / "sweep.json").is_file()
                   and (smoke_test or not d.name.startswith(f"{dataset}-smoke-")))
    if not found:
        raise SystemExit(f"--resume: no {dataset} sweep in {root}/ to resume; give its directory (--resume OUT)")
    return found[-1]  # <time> is YYYYmmdd-HHMMSS: the names sort by time


def _resume_dir(args) -> Path:
    if args.resume is not LATEST:
        return args.resume
    if args.out:
        return args.out
    if not args.dataset:
        raise SystemExit("--resume without OUT needs --dataset (the newest sweep of that data set) or --out")
    return latest_sweep(args.dataset, args.smoke_test)


def _new_state(args, argv=None) -> tuple[Path, dict]:
    if not args.dataset:
        raise SystemExit("--dataset is required (or --resume OUT)")
    fixed = spaces.parse_assignments(args.set_)
    trial_set = spaces.parse_assignments(args.trial_set)
    space_cli = spaces.parse_assignments(args.space)
    from facedis.config import ConfigError, resolve_preset

    try:
        config_path = resolve_preset(args.config or args.dataset)
    except ConfigError as e:
        raise SystemExit(f"--config: {e}") from None
    if args.smoke_test:
        fixed = {**SMOKE_SET, **fixed}
        space_cli = {**SMOKE_SPACE, **space_cli}
    space = spaces.build_space(args.dataset, args.mode, space_cli, args.space_file, {})
    # keys searched are not fixed; a --set key that is also in the space is fixed (removed from the space)
    for k in fixed:
        space.pop(k, None)
        for tied, members in spaces.TIED.items():
            if k == tied or k in members:
                space.pop(tied, None)
    cfg = base_config(config_path, fixed)
    if args.smoke_test:  # node-local defaults; a multi-node sweep passes shared paths with --set
        if "data.root" not in fixed:
            data = Path(tempfile.gettempdir()) / "facedis-smoke" / "synth-6x8-v300-t2"
            cfg.data.root, cfg.data.prepare = str(data), list(SMOKE_DATA)
        if "run.artefact_dir" not in fixed:
            cfg.run.artefact_dir = str(Path(tempfile.gettempdir()) / "facedis-smoke" / "artefacts")
    from facedis.config import config_to_dict

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or RESULTS_DIR / f"{args.dataset}{'-smoke' if args.smoke_test else ''}-{stamp}")
    out = out.expanduser().resolve()
    if (out / "sweep.json").exists():
        raise SystemExit(f"{out} already holds a sweep; use --resume {out} or another --out")
    num_samples = args.num_samples or (4 if args.smoke_test else 16)
    state = {
        "dataset": args.dataset, "config": str(Path(config_path).resolve()), "mode": args.mode,
        "space": {k: v for k, v in space.items()}, "trial_set": {**TRIAL_SET, **trial_set},
        "base": config_to_dict(cfg), "metrics": [m.strip() for m in args.metrics.split(",")][:2],
        "num_samples": num_samples, "seed": args.seed, "search": args.search, "sampler": args.sampler,
        "startup_trials": args.startup_trials, "scheduler": args.scheduler or DEFAULT_SCHEDULER[args.search],
        "asha_metric": args.asha_metric, "grace_epochs": args.grace_epochs, "reduction_factor": args.reduction_factor,
        "dominated_by": args.dominated_by,
        "scales": list(OBJECTIVE_SCALES.get(args.dataset, (1.0, 1.0))), "smoke_test": args.smoke_test,
        "created": stamp, "argv": sys.argv[1:] if argv is None else list(argv),
        "train_fn": args.train_fn,
    }
    if len(state["metrics"]) != 2:
        raise SystemExit("--metrics needs two comma-separated keys: E_dis key, E_rec key")
    if args.dominated_by < 1:
        raise SystemExit(f"--dominated-by must be >= 1, got {args.dominated_by}")
    if args.reduction_factor <= 1:
        raise SystemExit(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    from facedis.sweeps.searchers import check_space

    check_space(state["space"], args.search)
    return out, state


def make_scheduler(state: dict, epochs: int, eval_every: int):
    """The sweep's ``TrialScheduler`` (``state["scheduler"]``: asha, pareto or fifo)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    kind = state.get("scheduler", "asha")
    max_t = max(epochs, 1)
    grace = min(state.get("grace_epochs") or max(eval_every, epochs // 8, 1), max_t)
    rf = state.get("reduction_factor", 2)
    if kind == "asha":
        return ASHAScheduler(time_attr="epochs_done", metric=state["asha_metric"], mode="min",
                             max_t=max_t, grace_period=grace, reduction_factor=rf)
    if kind == "pareto":
        from facedis.sweeps.schedulers import ParetoRungScheduler

        return ParetoRungScheduler(metrics=state["metrics"], time_attr="epochs_done", max_t=max_t,
                                   grace_period=grace, reduction_factor=rf, dominated_by=state.get("dominated_by", 2))
    if kind == "fifo":
        return FIFOScheduler()
    raise SystemExit(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The options; ``--section.key=value`` words are fixed overrides, appended to ``--set``."""
    from facedis.config import ConfigError, split_cli_overrides

    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(argv[:-1]):  # `--mode -ne-gt+id-dis`: a value, not an option
        if word == "--mode" and re.fullmatch(r"(?:[+-](?:ne-gt|id-dis))+", argv[i + 1]):
            argv[i:i + 2] = [f"--mode={argv[i + 1]}"]
            break
    args, rest = parser.parse_known_args(argv)
    try:
        args.set_ = [*args.set_, *split_cli_overrides(rest)]
    except ConfigError as e:
        parser.error(str(e))
    return args


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    args = parse_args(argv, prog)
    t0 = time.time()
    quiet_ray_env(local=not args.address)  # before ray is imported
    require("ray.tune", "sweep", "facedis tune")  # before any work: a clear error naming the extra
    if args.search == "optuna" and not args.resume:
        from facedis.sweeps.searchers import require_optuna

        require_optuna()  # before any work too: names facedis[optuna]
    if args.resume:
        out = _resume_dir(args).expanduser().resolve()
        if not (out / "sweep.json").is_file():
            raise SystemExit(f"--resume: {out} holds no sweep (no sweep.json)")
        state = json.loads((out / "sweep.json").read_text())
        if state.get("search", "random") == "optuna":
            from facedis.sweeps.searchers import require_optuna

            require_optuna("facedis tune --resume of an Optuna sweep")
        saved = state.get("resources", {})
    else:
        out, state = _new_state(args, argv)
        saved = {}
    smoke = state["smoke_test"]
    res = {
        "cpus": args.cpus_per_trial if args.cpus_per_trial is not None else saved.get("cpus", 1.0),
        "gpus": args.gpus_per_trial if args.gpus_per_trial is not None else saved.get("gpus"),
        "max_concurrent": args.max_concurrent if args.max_concurrent is not None else saved.get("max_concurrent", 2 if smoke else None),
    }
    top_k = args.top_k or (1 if smoke else 3)

    from facedis.config import config_from_dict

    base_cfg = config_from_dict(state["base"])
    ensure_data(base_cfg)  # once, before the trials, at an absolute path

    import ray
    from ray import tune

    from facedis.sweeps.searchers import make_searcher

    num_cpus = args.num_cpus or (2 if smoke and not args.address else None)
    tmp, owned = init_ray(args.address, num_cpus, args.verbose)
    try:
        if res["gpus"] is None:
            res["gpus"] = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        state["resources"] = res
        state["ray_temp_dir"] = tmp  # for cleaning up after a crash (a private local Ray only)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_text(out / "sweep.json", json.dumps(state, indent=2, default=str))
        trial_set = dict(state["trial_set"])
        if res["gpus"] == 0:
            trial_set["train.cpu"] = True
        epochs = trial_config(state["base"], {}, trial_set).train.epochs
        metrics = tuple(state["metrics"])
        fn = tune.with_parameters(trainable, base=state["base"], run_root=str(out / "runs"), trial_set=trial_set,
                                  scales=tuple(state["scales"]), metrics=metrics,
                                  threads=max(1, int(res["cpus"])), train_fn=state.get("train_fn", "facedis.engine:train"))
        resources = {"cpu": res["cpus"], **({"gpu": res["gpus"]} if res["gpus"] else {})}
        fn = tune.with_resources(fn, resources)
        exp_dir = out / "tune"
        if args.resume:
            if not tune.Tuner.can_restore(str(exp_dir)):
                raise SystemExit(f"nothing to resume in {exp_dir}")
            print(f"resuming {exp_dir}", flush=True)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=fn, resume_unfinished=True, resume_errored=True)
        else:
            eval_every = trial_config(state["base"], {}, trial_set).train.eval_every
            scheduler = make_scheduler(state, epochs, eval_every)
            search_alg = make_searcher(state.get("search", "random"), metrics=metrics, seed=state["seed"],
                                       num_samples=state["num_samples"], budget=max(epochs, 1),
                                       sampler=state.get("sampler", "tpe"), startup_trials=state.get("startup_trials"))
            tuner = tune.Tuner(
                fn,
                param_space=spaces.to_param_space(state["space"]),
                tune_config=tune.TuneConfig(
                    num_samples=state["num_samples"], scheduler=scheduler, search_alg=search_alg,
                    max_concurrent_trials=res["max_concurrent"],
                    trial_dirname_creator=lambda t: t.trial_id),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(out), verbose=1 if args.verbose else 0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=1),
                    callbacks=[_progress_callback([metrics[0], metrics[1], "objective"])]),
            )
            print(f"sweep {state['dataset']} -> {out}\nsearch {state.get('search', 'random')}, scheduler "
                  f"{state.get('scheduler', 'asha')}; search space ({state['num_samples']} samples, "
                  f"{res['cpus']:g} CPU / {res['gpus']:g} GPU per trial):\n{spaces.describe(state['space'])}", flush=True)
        grid = tuner.fit()
        results = collect(grid, epochs)
    finally:
        if owned:
            ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = write_outputs(out, state, results, top_k, args.select, args.weight, args.eligible)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["out"] = str(out)
    _print_summary(summary, out, metrics)
    return summary


def _print_summary(summary: dict, out: Path, metrics) -> None:
    print(f"\n{summary['num_trials']} trials in {summary['wall_s']} s; Pareto front ({metrics[0]}, {metrics[1]}): "
          f"{', '.join(summary['front']) or '(empty)'}")
    if summary["best"]:
        b = summary["best"][0]
        vals = ", ".join(f"{k}={v}" for k, v in b["config"].items())
        print(f"winner: trial {b['trial_id']}  {metrics[0]}={b[metrics[0]]:.4f} mm  {metrics[1]}={b[metrics[1]]:.4f} mm  "
              f"score={b['score']:.3f}\n  {vals}")
    else:
        print("no winner: no trial reported both metrics")
    print(f"files in {out}:\n  trials.csv  pareto.png  selection.json  "
          + "  ".join(Path(b["yaml"]).name for b in summary["best"])
          + f"\ntrain a winner:  facedis train --config {summary['best'][0]['yaml'] if summary['best'] else '<yaml>'}"
          + f"\non the cluster:  facedis submit --grid sweep:{out}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    summary = run(argv, prog)
    return 0 if summary["best"] else 1


if __name__ == "__main__":
    sys.exit(main())
