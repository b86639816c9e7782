"""Random search + ASHA against Optuna (multi-objective TPE) + Pareto stopping, on the synthetic set.

    python -m facedis.sweeps.compare --doc docs/sweeps.md          # the published comparison (~15 min, 2 CPUs)
    python -m facedis.sweeps.compare --seeds 0 1 --num-samples 4 --epochs 2 --out /tmp/cmp   # a quick look

Every *arm* (``--arms``, default ``random+asha optuna+pareto``) runs one ``facedis tune`` sweep per
sweep seed (``--seeds``, default 0 1 2) with the same trial budget (``--num-samples`` trials of
``--epochs`` epochs, evaluation every epoch, the same search space, data, model and resources),
sweeps run one after the other on one private Ray. For each sweep:

- the **hypervolume** (mm²) of its Pareto front in (E_dis, E_rec), the front taken over the trials
  that ran the whole budget (what the sweep itself selects from), with one fixed **reference
  point** for all sweeps: E_dis of the ``identity_map`` baseline (the input taken as its own
  neutral: no disentanglement at all) and E_rec of the ``mean_face`` baseline (the mean face
  for every input: no reconstruction at all), both measured by facedis on the comparison's test
  split (``--reference E_DIS,E_REC`` fixes it by hand instead). A trial worse than either trivial
  baseline adds nothing;
- the sweep's own **scalarised pick** (``--select median``): its E_dis, E_rec and the score
  ``E_dis/ref_dis + E_rec/ref_rec`` (fixed scales, so comparable between sweeps; lower is better);
- the number of trials that ran the whole budget, the epochs trained in all (early stopping
  saves epochs) and the wall time.

Writes ``--out`` (default ``sweeps/results/compare-synth``): ``<arm>-seed<k>/`` (each sweep's
``facedis tune`` output), ``reference/`` (the two baseline runs), ``compare.csv`` (one row per
sweep), ``compare.json``, ``compare.md`` (the tables) and ``--figure`` (default
``<out>/compare.png``: both arms' fronts, one panel per seed). ``--doc FILE`` also replaces the
block between ``<!-- sweep-compare:begin -->`` and ``<!-- sweep-compare:end -->`` in FILE (appended if
absent) with the tables and the figure. Every file is written atomically. A sweep that finished
earlier (its ``selection.json`` exists) is reused; one that was interrupted is resumed
(``facedis tune --resume``), so rerunning the command after a crash only runs what is missing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from facedis.sweeps import pareto, tune

DEFAULT_OUT = Path("sweeps") / "results" / "compare-synth"
DEFAULT_ARMS = ("random+asha", "optuna+pareto")
BEGIN, END = "<!-- sweep-compare:begin -->", "<!-- sweep-compare:end -->"

#: The comparison's data set: 40 synthetic identities x 8 frames at 300 vertices, 8 held out.
COMPARE_DATA = ["synth", "--subjects", "40", "--per-subject", "8", "--vertices", "300", "--seed", "0",
                "--test-fraction", "0.2"]
#: Every trial of every sweep (the sweep's --set): a slim model, evaluation every epoch, CPU.
COMPARE_SET: dict[str, Any] = {
    **{k: v for k, v in tune.SMOKE_SET.items() if k != "train.epochs"},  # epochs: the comparison's budget
    "train.batch_size": 16,
    "train.eval_batch_size": 64,
    "pretrain.batch_size": 16,
}
METRICS = tuple(tune.DEFAULT_METRICS)  # (E_dis key, E_rec key)


# --------------------------------------------------------------------------------------------
# small helpers


def _atomic_text(path: Path, text: str) -> None:
    from facedis.rundir import atomic_write_text

    atomic_write_text(Path(path), text)


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1; nan for fewer than two) over the finite values."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    m = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def parse_arm(arm: str) -> tuple[str, str]:
    """``"optuna+pareto"`` -> ``("optuna", "pareto")``; ``SystemExit`` for an unknown search or scheduler."""
    search, _, sched = arm.partition("+")
    sched = sched or tune.DEFAULT_SCHEDULER.get(search, "")
    if search not in tune.SEARCHES or sched not in tune.SCHEDULERS:
        raise SystemExit(f"--arms {arm!r}: expected SEARCH+SCHEDULER with SEARCH in {', '.join(tune.SEARCHES)} "
                         f"and SCHEDULER in {', '.join(tune.SCHEDULERS)}")
    return search, sched


# --------------------------------------------------------------------------------------------
# the data set and the reference point


def data_settings(out: Path) -> dict[str, Any]:
    """``data.root`` / ``data.prepare`` / ``run.artefact_dir`` overrides under ``out``."""
    return {"data.root": str(out / "data" / "synth-40x8-v300"), "data.prepare": list(COMPARE_DATA),
            "run.artefact_dir": str(out / "artefacts")}


def reference_point(out: Path, epochs: int) -> dict[str, Any]:
    """E_dis of ``identity_map`` and E_rec of ``mean_face``, measured on the comparison's test split
    (two baseline runs of :func:`facedis.engine.train`, each a fit and one evaluation)."""
    from facedis import engine
    from facedis.config import apply_overrides, load_config

    found = {}
    for kind in ("identity_map", "mean_face"):
        run_dir = out / "reference" / kind
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            found[kind] = json.loads(metrics_file.read_text())
            continue
        cfg = load_config("synth", overrides={**data_settings(out), **COMPARE_SET, "train.epochs": epochs,
                                              "model.kind": kind, "method.neutral_gt": False,
                                              "method.id_discriminator": False, "train.progress": False})
        cfg = apply_overrides(cfg, {"run.dir": str(run_dir), "run.name": f"compare-reference-{kind}"})
        tune.ensure_data(cfg)
        found[kind] = engine.train(cfg)
    ref = (float(found["identity_map"][METRICS[0]]), float(found["mean_face"][METRICS[1]]))
    return {"point": ref, "source": "baselines",
            "identity_map": {k: found["identity_map"].get(k) for k in METRICS},
            "mean_face": {k: found["mean_face"].get(k) for k in METRICS}}


# --------------------------------------------------------------------------------------------
# one sweep


def sweep_argv(out: Path, search: str, scheduler: str, seed: int, num_samples: int, epochs: int,
               num_cpus: int, max_concurrent: int) -> list[str]:
    """The ``facedis tune`` arguments of one sweep of the comparison."""
    fixed = {**data_settings(out.parent), **COMPARE_SET, "train.epochs": epochs}
    argv = ["--dataset", "synth", "--out", str(out), "--search", search, "--scheduler", scheduler,
            "--seed", str(seed), "--num-samples", str(num_samples), "--num-cpus", str(num_cpus),
            "--max-concurrent", str(max_concurrent), "--cpus-per-trial", "1", "--gpus-per-trial", "0",
            "--grace-epochs", "1", "--top-k", "1"]
    for k, v in fixed.items():
        argv += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return argv


def run_sweep(out: Path, argv: list[str]) -> float:
    """Run (or resume, or reuse) one sweep; returns the wall time spent on it now and earlier."""
    info = out / "compare-sweep.json"
    if (out / "selection.json").is_file() and info.is_file():
        return float(json.loads(info.read_text())["wall_s"])
    earlier = float(json.loads(info.read_text()).get("partial_wall_s", 0.0)) if info.is_file() else 0.0
    t0 = time.time()
    resume = (out / "sweep.json").is_file() and (out / "tune").is_dir()
    if (out / "sweep.json").is_file() and not resume:
        shutil.rmtree(out)  # created but never started: start again
    try:
        tune.run(["--resume", str(out)] if resume else argv)
    except BaseException:
        if out.is_dir():
            _atomic_text(info, json.dumps({"partial_wall_s": earlier + time.time() - t0}))
        raise
    wall = earlier + time.time() - t0
    _atomic_text(info, json.dumps({"wall_s": round(wall, 1), "argv": argv}))
    return wall


def sweep_row(out: Path, ref: tuple[float, float]) -> dict[str, Any]:
    """One sweep's numbers, read back from its own files (``trials.csv``, ``selection.json``)."""
    rows = list(csv.DictReader(open(out / "trials.csv", newline="")))
    sel = json.loads((out / "selection.json").read_text())
    done = [r for r in rows if r["completed"] == "True"]
    pts = [(_num(r.get(METRICS[0])), _num(r.get(METRICS[1]))) for r in done]
    front = pareto.pareto_front(pts)
    best = sel["best"][0] if sel.get("best") else {}
    pick = (_num(best.get(METRICS[0])), _num(best.get(METRICS[1])))
    return {
        "trials": len(rows), "completed": len(done),
        "epochs_trained": sum(int(v) for v in (_num(r.get("epochs_done")) for r in rows) if math.isfinite(v)),
        "front_size": len(front), "hypervolume": pareto.hypervolume(pts, ref),
        "pick_trial": best.get("trial_id", ""), "pick_E_dis": pick[0], "pick_E_rec": pick[1],
        "pick_score": pick[0] / ref[0] + pick[1] / ref[1],
        "front": [pts[i] for i in front], "points": pts,
    }


# --------------------------------------------------------------------------------------------
# report

COLUMNS = [  # (header, key, format)
    ("hypervolume (mm²) ↑", "hypervolume", "{:.3f}"),
    ("front size", "front_size", "{:.1f}"),
    ("completed trials", "completed", "{:.1f}"),
    ("epochs trained", "epochs_trained", "{:.1f}"),
    ("pick E_dis (mm)", "pick_E_dis", "{:.4f}"),
    ("pick E_rec (mm)", "pick_E_rec", "{:.3f}"),
    ("pick score ↓", "pick_score", "{:.4f}"),
    ("wall (s)", "wall_s", "{:.0f}"),
]


def _cell(values: Sequence[float], fmt: str) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "—"
    return fmt.format(m) + ("" if math.isnan(s) else " ± " + fmt.format(s))


def render(result: dict, figure_rel: str) -> str:
    """The markdown block: setup, mean ± std table, per-seed table, figure."""
    ref = result["reference"]["point"]
    arms, seeds = result["arms"], result["seeds"]
    by = {(r["arm"], r["seed"]): r for r in result["sweeps"]}
    lines = [
        f"Measured with `{result['command']}` on {result['date']}: {len(result['sweeps'])} sweeps, "
        f"{result['sweeps_wall_s'] / 60:.1f} min of sweeps in all on {result['num_cpus']} CPU cores "
        f"(a machine shared with other work: wall times are indicative).",
        "",
        f"Budget per sweep: {result['num_samples']} trials × {result['epochs']} epochs (evaluation every epoch), "
        f"{result['max_concurrent']} trials at a time, 1 CPU each; rungs at epochs "
        f"{', '.join(str(int(m)) for m in result['rungs'])} (ASHA and Pareto: grace 1, reduction factor 2; "
        f"Pareto stops a trial dominated by ≥ 2 others at a rung). Sweep seeds {', '.join(map(str, seeds))}. "
        f"Data: synthetic, {' '.join(COMPARE_DATA[1:])}; model: `model.width 0.125`, `decoder_hidden 32`, "
        f"batch 16; the default synth search space (λ1–λ5, latent sizes), mode +ne-gt+id-dis.",
        "",
        f"Reference point (E_dis, E_rec) = ({ref[0]:.4f}, {ref[1]:.4f}) mm: E_dis of the identity-map baseline, "
        f"E_rec of the mean-face baseline on the same test split. Hypervolume over each sweep's front of the "
        f"trials that ran the whole budget; pick = the sweep's own scalarised choice (`--select median`), "
        f"pick score = E_dis/{ref[0]:.4f} + E_rec/{ref[1]:.4f}. Mean ± std (ddof 1) over the {len(seeds)} sweep seeds.",
        "",
        "| arm | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for arm in arms:
        rows = [by[(arm, s)] for s in seeds if (arm, s) in by]
        lines.append(f"| {arm} | " + " | ".join(_cell([r[k] for r in rows], f) for _, k, f in COLUMNS) + " |")
    lines += ["", "Per sweep:", "", "| arm | seed | hypervolume (mm²) | front | completed | epochs | pick trial | "
              "pick E_dis (mm) | pick E_rec (mm) | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for s in seeds:
            r = by.get((arm, s))
            if r:
                lines.append(f"| {arm} | {s} | {r['hypervolume']:.3f} | {r['front_size']} | {r['completed']} | "
                             f"{r['epochs_trained']} | {r['pick_trial']} | {r['pick_E_dis']:.4f} | "
                             f"{r['pick_E_rec']:.3f} | {r['wall_s']:.0f} |")
    lines += ["", f"![fronts of both searches, one panel per sweep seed]({figure_rel})", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """One panel per seed: every arm's completed trials and front; the reference point dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facedis.curves import save_figure

    seeds, arms = result["seeds"], result["arms"]
    ref = result["reference"]["point"]
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.8), squeeze=False, dpi=110)
    by = {(r["arm"], r["seed"]): r for r in result["sweeps"]}
    for ax, s in zip(axes[0], seeds):
        for j, arm in enumerate(arms):
            r = by.get((arm, s))
            if not r:
                continue
            c = f"C{j}"
            pts = [p for p in r["points"] if all(math.isfinite(v) for v in p)]
            ax.scatter([p[1] for p in pts], [p[0] for p in pts], s=12, c=c, alpha=0.35)
            f = sorted(r["front"], key=lambda p: p[1])
            if f:
                xs, ys = [f[0][1]], [ref[0]]
                for p in f:  # the dominated region's outline: E_rec on x, E_dis on y
                    xs += [p[1], p[1]]
                    ys += [ys[-1], p[0]]
                xs.append(ref[1])
                ys.append(ys[-1])
                ax.plot(xs, ys, c=c, lw=1.2, label=f"{arm}: HV {r['hypervolume']:.3f}")
                ax.scatter([p[1] for p in f], [p[0] for p in f], s=26, c=c)
        ax.axvline(ref[1], c="0.5", ls="--", lw=0.8)
        ax.axhline(ref[0], c="0.5", ls="--", lw=0.8)
        ax.set_title(f"sweep seed {s}", fontsize=9)
        ax.set_xlabel(f"{METRICS[1]} (mm)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel(f"{METRICS[0]} (mm)")
    fig.suptitle(f"Pareto fronts, {result['num_samples']} trials × {result['epochs']} epochs per sweep "
                 f"(dashed: reference point)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def update_doc(doc: Path, block: str) -> None:
    """Replace the text between the markers in ``doc`` (append a section if they are absent); atomic."""
    text = doc.read_text() if doc.is_file() else ""
    new = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[:text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Random search vs Optuna on the synthetic set\n\n" + new + "\n"
    _atomic_text(doc, text)


def write_report(result: dict, out: Path, figure: Path, doc: Path | None) -> str:
    buf = io.StringIO(newline="")
    keys = ["arm", "search", "scheduler", "seed", "trials", "completed", "epochs_trained", "front_size",
            "hypervolume", "pick_trial", "pick_E_dis", "pick_E_rec", "pick_score", "wall_s", "out"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in result["sweeps"]:
        w.writerow(r)
    _atomic_text(out / "compare.csv", buf.getvalue())
    _atomic_text(out / "compare.json", json.dumps(result, indent=2, default=str))
    plot(result, figure)
    rel_doc = os.path.relpath(figure, doc.parent) if doc else os.path.relpath(figure, out)
    block = render(result, rel_doc)
    _atomic_text(out / "compare.md", render(result, os.path.relpath(figure, out)))
    if doc:
        update_doc(doc, block)
    return block


# --------------------------------------------------------------------------------------------
# CLI


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help="SEARCH+SCHEDULER pairs (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sweep seeds (default 0 1 2)")
    p.add_argument("--num-samples", type=int, default=12, help="trials per sweep (default 12)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per trial (default 8)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the private Ray (default 2)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at a time (default 2)")
    p.add_argument("--reference", help="fixed reference point E_DIS,E_REC in mm (default: the two baselines)")
    p.add_argument("--figure", type=Path, help="the plot (default <out>/compare.png)")
    p.add_argument("--doc", type=Path, help="markdown file whose sweep-compare block gets the tables and the plot")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    arms = [parse_arm(a) for a in args.arms]
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.arms)) != len(args.arms):
        raise SystemExit("--seeds and --arms must not repeat a value")
    if args.num_samples < 1 or args.epochs < 1:
        raise SystemExit("--num-samples and --epochs must be >= 1")
    t0 = time.time()
    tune.quiet_ray_env(local=True)
    from facedis.extras import require

    require("ray.tune", "sweep", "python -m facedis.sweeps.compare")
    if any(s == "optuna" for s, _ in arms):
        from facedis.sweeps.searchers import require_optuna

        require_optuna("python -m facedis.sweeps.compare (an optuna arm)")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    figure = (args.figure or out / "compare.png").expanduser().resolve()
    if args.reference:
        try:
            a, b = (float(x) for x in args.reference.split(","))
        except ValueError:
            raise SystemExit(f"--reference {args.reference!r}: expected E_DIS,E_REC (two numbers in mm)") from None
        ref = {"point": (a, b), "source": "--reference"}
    else:
        print("reference point: identity-map and mean-face baselines ...", flush=True)
        ref = reference_point(out, args.epochs)
    print(f"reference point (E_dis, E_rec) = ({ref['point'][0]:.4f}, {ref['point'][1]:.4f}) mm", flush=True)

    import ray

    tmp, owned = tune.init_ray(None, args.num_cpus, verbose=False)
    sweeps = []
    try:
        for seed in args.seeds:
            for (search, sched), arm in zip(arms, args.arms):
                d = out / f"{search}+{sched}-seed{seed}"
                argv_ = sweep_argv(d, search, sched, seed, args.num_samples, args.epochs, args.num_cpus,
                                   args.max_concurrent)
                print(f"\n=== {arm}, sweep seed {seed} -> {d}", flush=True)
                wall = run_sweep(d, argv_)
                row = sweep_row(d, ref["point"])
                row.update(arm=arm, search=search, scheduler=sched, seed=seed, wall_s=round(wall, 1), out=str(d))
                sweeps.append(row)
                print(f"=== {arm}, seed {seed}: hypervolume {row['hypervolume']:.4f} mm², front {row['front_size']}, "
                      f"{row['completed']}/{row['trials']} completed, {wall:.0f} s", flush=True)
    finally:
        if owned:
            ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    from facedis.sweeps.schedulers import rung_milestones

    cmd = "python -m facedis.sweeps.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": cmd.strip(), "date": time.strftime("%Y-%m-%d"), "arms": list(args.arms), "seeds": list(args.seeds),
        "num_samples": args.num_samples, "epochs": args.epochs, "num_cpus": args.num_cpus,
        "max_concurrent": args.max_concurrent, "rungs": rung_milestones(args.epochs, 1, 2),
        "reference": ref, "metrics": list(METRICS), "sweeps": sweeps, "total_wall_s": round(time.time() - t0, 1),
        "sweeps_wall_s": round(sum(r["wall_s"] for r in sweeps), 1),
    }
    block = write_report(result, out, figure, args.doc.expanduser().resolve() if args.doc else None)
    print("\n" + block)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.json'}, {figure}"
          + (f", {args.doc}" if args.doc else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
