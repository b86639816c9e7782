"""Show each run of a grid: its job's scheduler state and its last metrics; or a sweep's progress.

    facedis status runs/ablation            # = python launch/status.py runs/ablation
    facedis status runs/ablation --json
    facedis status runs/tune-coma           # a sweep submitted with facedis submit --sweep
    facedis status sweeps/results/coma-...  # any facedis tune output directory

The job of a run is the last one recorded for its directory in ``<grid>/.launch/jobs.jsonl``
(written by ``facedis submit``); its state comes from ``sacct`` through submitit. The metrics are
the last line of the run's ``metrics.jsonl``; ``finished`` means ``metrics.json`` exists.

A sweep's directory (``<runs-root>/<name>/`` of ``facedis submit --sweep``, or a ``facedis tune``
output directory) shows its job, its trials done / running / failed / pending and the best trial so
far, read from Ray Tune's experiment directory (``tune/``: the experiment state file and each trial's
``result.json``); ``finished`` means the job wrote ``finished.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from facedis.cluster.ray_sweep import (finished_path, last_json_line, read_json, request_path, sweep_out,
                                       sweep_progress)
from facedis.cluster.submit import job_state, latest_jobs

SHOW = ("epoch", "E_rec_mean", "E_dis_ref_mean", "E_dis_vstd_mean", "AVD_neu_mean")


def run_dirs(grid_dir: Path) -> list[Path]:
    """``<grid>/<label>/seed<k>`` directories (labels starting with ``.`` or ``_`` are not runs)."""
    out = []
    for label in sorted(p for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        out += sorted((p for p in label.iterdir() if p.is_dir() and p.name.startswith("seed")),
                      key=lambda p: (len(p.name), p.name))
    return out


def collect(grid_dir: Path, query_scheduler: bool = True) -> list[dict]:
    grid_dir = Path(grid_dir).resolve()
    jobs = latest_jobs(grid_dir)
    dirs = {str(p.resolve()) for p in run_dirs(grid_dir)} if grid_dir.is_dir() else set()
    dirs |= set(jobs)
    rows = []
    for d in sorted(dirs):
        p = Path(d)
        rec = jobs.get(d)
        last = last_json_line(p / "metrics.jsonl")
        row = {
            "run": str(p.relative_to(grid_dir)) if p.is_relative_to(grid_dir) else d,
            "run_dir": d,
            "job_id": rec["job_id"] if rec else None,
            "cluster": rec.get("cluster") if rec else None,
            "state": (job_state(rec) if query_scheduler else "?") if rec else "-",
            "finished": (p / "metrics.json").is_file(),
            "last": last,
        }
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def render(rows: list[dict]) -> str:
    head = ["run", "job", "state", "finished", *SHOW]
    table = [head]
    for r in rows:
        last = r["last"] or {}
        table.append([r["run"], _fmt(r["job_id"]), r["state"], "yes" if r["finished"] else "no",
                      *(_fmt(last.get(k)) for k in SHOW)])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    done = sum(r["finished"] for r in rows)
    lines.append(f"{done}/{len(rows)} finished")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# sweeps


def sweep_dir(path: Path) -> Path | None:
    """The sweep output directory ``path`` names (a ``--sweep`` run directory or a tune output), or None."""
    path = Path(path)
    if request_path(path).is_file() or (sweep_out(path) / "sweep.json").is_file():
        return sweep_out(path)
    if (path / "sweep.json").is_file() and (path / "tune").exists():
        return path
    return None


def collect_sweep(path: Path, query_scheduler: bool = True) -> dict:
    """Progress of the sweep in ``path`` (:func:`facedis.cluster.ray_sweep.sweep_progress`) and its job."""
    path = Path(path).resolve()
    out = sweep_dir(path)
    run_dir = out.parent if out is not None and out.name == "sweep" and request_path(out.parent).is_file() else path
    info = sweep_progress(out) if out is not None else {"out": None, "started": False}
    rec = latest_jobs(run_dir).get(str(run_dir))
    info.update({
        "run_dir": str(run_dir),
        "job_id": rec["job_id"] if rec else None,
        "state": (job_state(rec) if query_scheduler else "?") if rec else "-",
        "finished": finished_path(run_dir).is_file(),
        "request": read_json(request_path(run_dir)),
    })
    return info


def render_sweep(info: dict) -> str:
    metrics = info.get("metrics") or []
    lines = [f"sweep {info['run_dir']}  job {_fmt(info.get('job_id'))}  state {info.get('state')}  "
             f"finished {'yes' if info.get('finished') else 'no'}"]
    if not info.get("started"):
        lines.append("not started yet (no sweep.json)")
        return "\n".join(lines)
    total = info["planned"] if info.get("planned") is not None else info["trials"]
    lines.append(f"trials: {info['done']} done, {info['running']} running, {info['failed']} failed, "
                 f"{info['pending']} pending (of {total})")
    head = ["trial", "status", "epochs", "objective", *metrics]
    table = [head] + [[r["trial_id"], r["status"], _fmt(r.get("epochs_done")), _fmt(r.get("objective")),
                       *(_fmt(r.get(m)) for m in metrics)] for r in info.get("rows", [])]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    b = info.get("best")
    if b:
        lines.append(f"best so far: {b['trial_id']}  objective={_fmt(b['objective'])}  "
                     + "  ".join(f"{m}={_fmt(b.get(m))}" for m in metrics) + f"  (epochs {_fmt(b.get('epochs_done'))})")
    else:
        lines.append("best so far: - (no trial has reported yet)")
    w = info.get("winner")
    if w:
        lines.append(f"selected: {w.get('trial_id')}  {w.get('yaml', '')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("grid_dir", type=Path, help="runs/<grid>, or a sweep's directory")
    p.add_argument("--json", action="store_true", help="one JSON object per run (a sweep: one object)")
    p.add_argument("--no-scheduler", action="store_true", help="do not call sacct (files only)")
    args = p.parse_args(argv)
    if not args.grid_dir.is_dir():
        print(f"{args.grid_dir}: no such directory", file=sys.stderr)
        return 2
    if sweep_dir(args.grid_dir) is not None:
        info = collect_sweep(args.grid_dir, query_scheduler=not args.no_scheduler)
        print(json.dumps(info, sort_keys=True, default=str) if args.json else render_sweep(info))
        return 0
    rows = collect(args.grid_dir, query_scheduler=not args.no_scheduler)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
    else:
        print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
