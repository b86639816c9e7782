"""Submit training runs to Slurm (or locally) with submitit: one job per (config, seed).

    facedis submit --config coma --seeds 0 1 2 \\
        --nodes 1 --gpus-per-node 4 --partition gpu --time 24:00:00
    facedis submit --grid ablation --seeds 0 1 2 --gpus-per-node 1 --partition gpu --time 12:00:00
    facedis submit --grid sweep:sweeps/results/coma-20260101-120000 --seeds 0 1 2 ...
    facedis submit --config synth --seeds 0 --cluster local --gpus-per-node 0 --train.epochs=2
    facedis submit --sweep coma --nodes 2 --gpus-per-node 4 --cpus-per-task 32 --time 24:00:00 \\
        -- --num-samples 64 --gpus-per-trial 0.5

(``python launch/submit.py ...`` in a source checkout is the same command.) Needs submitit:
``pip install 'facedis[cluster]'``. ``--config`` takes YAML files or shipped preset names; config
overrides for every run are ``--section.key=value`` as everywhere (``--set section.key=value`` is the same).

Runs land in ``<runs-root>/<grid>/<label>/seed<k>/`` (``cfg.run.dir``); submitit logs in
``<runs-root>/<grid>/.submitit/``; every submission is appended to
``<runs-root>/<grid>/.launch/jobs.jsonl`` (read by ``facedis status``). All (config, seed) runs
of one call go out as one job array. Finished runs (``metrics.json`` present) and runs whose
last job is still queued or running are skipped, so resubmitting a grid completes it.

Every argument is checked first (:func:`validate_args`: resources and ``--slurm`` values,
seeds, the grid and its configs), by pure functions that need no Slurm and no submitit executor; a
bad one exits with status 2 before anything is created or submitted.

Jobs are checkpointable: on preemption/timeout submitit requeues them and the engine resumes from
``<run.dir>/checkpoints/last``. Multi-GPU/multi-node jobs run one task per GPU under DDP.

``--sweep <data set or preset>`` submits a Ray Tune sweep instead: one job with one task per node that
starts a Ray cluster in the allocation and runs ``facedis tune`` on it (the options after ``--``;
``facedis/cluster/ray_sweep.py``). It lands in ``<runs-root>/<name>/`` (``--grid-name``, default
``tune-<data set or preset>``); resubmitting the same command resumes an unfinished sweep, and a
requeued job resumes it by itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from facedis.extras import require

submitit = require("submitit", "cluster", "facedis submit/status")

from facedis.cluster.grids import GridEntry, apply_grid_modes, configs_as_grid, resolve_grid  # noqa: E402
from facedis.cluster.job import RunSpec, TrainJob, probe_distributed, read_final_metrics  # noqa: E402
from facedis.cluster.ray_sweep import (RESERVED_TUNE_OPTIONS, RaySweepJob, SweepSpec, atomic_write,  # noqa: E402
                                       describe, finished_path, read_json, request_path, sweep_out)

# Values written into the sbatch script by submitit must be plain tokens (no spaces, quotes, newlines).
_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@%+=/\[\]-]+$")
IN_FLIGHT = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
             "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "READY", "SIGNALING", "STAGE_OUT"}


def safe_token(value: str, what: str) -> str:
    value = str(value)
    if not _SAFE_TOKEN.match(value):
        raise ValueError(f"{what}={value!r}: only letters, digits and _.,:@%+=/[]- are allowed")
    return value


def parse_time(text: str) -> int:
    """Slurm time ``[D-]HH:MM:SS``, ``[D-]HH:MM``, ``MM:SS``, ``MM`` or ``D-HH`` -> minutes (rounded up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad --time {text!r}; use HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    days = int(days or 0)
    if c is not None:
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:
        secs = int(a) * 3600 + int(b) * 60 if days else int(a) * 60 + int(b)
    else:
        secs = int(a) * 3600 if days else int(a) * 60
    total = days * 86400 + secs
    if total <= 0:
        raise argparse.ArgumentTypeError(f"--time {text!r} must be positive")
    return max(1, math.ceil(total / 60))


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    k, v = text.split("=", 1)
    return k.strip(), v


# --------------------------------------------------------------------------------------------
# planning


def _absolutise(cfg, cwd: Path):
    """Relative data/artefact paths are relative to the submission directory, wherever the job starts."""
    from facedis.config import apply_overrides

    fix = {}
    for key, value in (("data.root", cfg.data.root), ("run.artefact_dir", cfg.run.artefact_dir)):
        if value and not Path(value).is_absolute():
            fix[key] = str((cwd / value).resolve())
    return apply_overrides(cfg, fix) if fix else cfg


def plan_runs(entries: list[GridEntry], grid: str, seeds: Sequence[int], runs_root: Path,
              common: Sequence[str] = ()) -> list[RunSpec]:
    """Resolve every (entry, seed) into a validated config with its run directory (no I/O besides reading YAML)."""
    from facedis.config import apply_overrides, load_config, parse_override

    cwd = Path.cwd()
    common_kv = dict(parse_override(o) for o in common)
    specs = []
    for e in entries:
        for seed in seeds:
            run_dir = (runs_root / grid / e.label / f"seed{seed}").resolve()
            overrides = {**e.overrides, **common_kv}
            cfg = load_config(e.config, overrides=overrides)
            cfg = apply_overrides(cfg, {"train.seed": int(seed), "run.dir": str(run_dir),
                                        "run.name": f"{grid}/{e.label}/seed{seed}"})
            cfg = _absolutise(cfg, cwd)
            specs.append(RunSpec(grid, e.label, int(seed), str(run_dir), str(e.config), overrides, cfg))
    return specs


# --------------------------------------------------------------------------------------------
# manifest (what was submitted where)


def manifest_path(grid_dir: Path) -> Path:
    return grid_dir / ".launch" / "jobs.jsonl"


def read_manifest(grid_dir: Path) -> list[dict]:
    p = manifest_path(grid_dir)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def latest_jobs(grid_dir: Path) -> dict[str, dict]:
    """run_dir -> the last manifest record for it."""
    last: dict[str, dict] = {}
    for rec in read_manifest(grid_dir):
        last[rec["run_dir"]] = rec
    return last


def _append_manifest(grid_dir: Path, records: list[dict]) -> None:
    p = manifest_path(grid_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def job_state(rec: dict) -> str:
    """Scheduler state of a manifest record's job (``sacct`` via submitit for Slurm)."""
    if rec.get("cluster") == "slurm":
        try:
            return submitit.SlurmJob(folder=rec["folder"], job_id=str(rec["job_id"])).state
        except Exception as e:  # sacct missing / unreachable
            return f"UNKNOWN ({type(e).__name__})"
    return "UNKNOWN"


# --------------------------------------------------------------------------------------------
# validation: pure functions (no submitit executor, no scheduler, no file written). The CLI runs
# them on every argument before it plans, creates a directory or builds an executor.

MAX_SEED = 2**32 - 1  # numpy's seed range; the engine seeds numpy with the run's seed
# --slurm keys that have their own option (a --slurm value would silently win over it)
_SLURM_KEYS_WITH_OPTION = {"partition": "--partition", "signal_delay_s": "--signal-delay-s",
                           "array_parallelism": "--array-parallelism", "time": "--time", "nodes": "--nodes",
                           "ntasks_per_node": "--tasks-per-node", "cpus_per_task": "--cpus-per-task",
                           "gpus_per_node": "--gpus-per-node", "mem": "--mem-gb", "job_name": "the grid name"}


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """At least one seed; each an integer in [0, 2**32 - 1]; no seed twice (two jobs, one run directory)."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise ValueError(f"--seeds: {s!r} is not an integer in [0, {MAX_SEED}]")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"--seeds: {dup} given more than once")
    return seeds


def _slurm_parameter_names() -> set[str] | None:
    """Names submitit's Slurm executor accepts (read from the class: no executor, no ``srun`` needed)."""
    try:
        return set(submitit.SlurmExecutor._valid_parameters())
    except Exception:  # a submitit without this helper: submitit itself checks at update_parameters
        return None


def _count(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def executor_parameters(cluster: str = "slurm", *, nodes: int = 1, gpus_per_node: int = 0,
                        tasks_per_node: int | None = None, cpus_per_task: int | None = None,
                        mem_gb: float | None = None, partition: str | None = None, timeout_min: int = 60,
                        signal_delay_s: int = 120, array_parallelism: int = 256, max_timeouts: int = 3,
                        job_name: str = "facedis", slurm_extra: dict[str, str] | None = None,
                        one_task_per_node: bool = False) -> dict[str, Any]:
    """Validate the resources of a submission; return the parameters for ``executor.update_parameters``.

    Pure: raises ``ValueError`` for an unknown cluster, a bad count, a GPU job with a task count that
    is not one per GPU, an unknown or duplicated ``--slurm`` key, or a value that is not a plain token
    (it would be written into the sbatch script). Slurm-only values are checked on every cluster.
    ``one_task_per_node`` (Ray sweeps): one task holds all of its node's GPUs and CPUs.
    """
    if cluster not in ("slurm", "local", "debug"):
        raise ValueError(f"cluster must be slurm, local or debug, got {cluster!r}")
    _count(nodes, "--nodes", 1)
    _count(gpus_per_node, "--gpus-per-node", 0)
    if tasks_per_node is not None:
        _count(tasks_per_node, "--tasks-per-node", 1)
    if cpus_per_task is not None:
        _count(cpus_per_task, "--cpus-per-task", 1)
    if mem_gb is not None and (isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or not mem_gb > 0):
        raise ValueError(f"--mem-gb must be a positive number, got {mem_gb!r}")
    _count(timeout_min, "--time (minutes)", 1)
    _count(signal_delay_s, "--signal-delay-s", 0)
    _count(array_parallelism, "--array-parallelism", 1)
    _count(max_timeouts, "--max-timeouts", 0)
    tasks = 1 if one_task_per_node else tasks_per_node or max(1, gpus_per_node)
    if one_task_per_node and tasks_per_node not in (None, 1):
        raise ValueError(f"one task per node: tasks_per_node={tasks_per_node}; drop --tasks-per-node")
    if gpus_per_node and tasks != gpus_per_node and not one_task_per_node:
        raise ValueError(f"one task per GPU: tasks_per_node={tasks} but gpus_per_node={gpus_per_node}; "
                         "drop --tasks-per-node")
    params: dict[str, Any] = {
        "name": safe_token(job_name, "job name"),
        "timeout_min": int(timeout_min),
        "nodes": int(nodes),
        "tasks_per_node": int(tasks),
        "cpus_per_task": int(cpus_per_task or (8 if gpus_per_node else 1)),
    }
    if gpus_per_node:
        params["gpus_per_node"] = int(gpus_per_node)
    if mem_gb:
        params["mem_gb"] = mem_gb
    slurm: dict[str, Any] = {}
    if partition is not None:
        slurm["slurm_partition"] = safe_token(partition, "partition")
    slurm["slurm_signal_delay_s"] = int(signal_delay_s)
    slurm["slurm_array_parallelism"] = int(array_parallelism)
    valid = _slurm_parameter_names()
    for k, v in (slurm_extra or {}).items():
        name = safe_token(k, "--slurm key").replace("-", "_")
        if name in _SLURM_KEYS_WITH_OPTION:
            raise ValueError(f"--slurm {k}=...: use {_SLURM_KEYS_WITH_OPTION[name]} instead")
        if valid is not None and name not in valid:
            raise ValueError(f"--slurm {k}=...: unknown Slurm parameter; valid: {', '.join(sorted(valid))}")
        slurm[f"slurm_{name}"] = safe_token(v, f"--slurm {k}")
    if cluster == "slurm":
        params.update(slurm)
    return params


# --------------------------------------------------------------------------------------------
# executor


def make_executor(folder: Path, cluster: str = "slurm", *, max_timeouts: int = 3, **resources) -> submitit.AutoExecutor:
    """A submitit executor for one task per GPU (or ``tasks_per_node`` CPU processes) per node.

    ``resources`` are :func:`executor_parameters`' keywords; they are validated before submitit is
    called (building a Slurm executor needs ``srun``; rejecting a bad value does not).
    """
    params = executor_parameters(cluster, max_timeouts=max_timeouts, **resources)
    kwargs: dict[str, Any] = {"cluster": cluster}
    if cluster == "slurm":
        kwargs["slurm_max_num_timeout"] = max_timeouts
    ex = submitit.AutoExecutor(folder=str(folder), **kwargs)
    ex.update_parameters(**params)
    return ex


def submit_specs(ex: submitit.AutoExecutor, specs: list[RunSpec], *, cpu: bool, threads: int | None) -> list:
    """Submit all runs as one job array (``map_array``); returns the submitit jobs in ``specs`` order."""
    if not specs:
        return []
    fn = TrainJob(cpu=cpu, threads=threads)
    if len(specs) == 1:
        return [ex.submit(fn, specs[0])]
    return list(ex.map_array(fn, specs))


# --------------------------------------------------------------------------------------------
# CLI


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("what to run")
    g.add_argument("--config", nargs="+", default=[],
                   help="config file(s) or shipped preset name(s); with --grid, the grid's modes are applied to each")
    g.add_argument("--grid", help="named grid (facedis/cluster/grids.py: ablation, paper, synth-ablation, ...) or sweep:<dir>")
    g.add_argument("--sweep", metavar="DATASET|PRESET",
                   help="submit a Ray Tune sweep of this data set (synth, coma, bu3dfe, facescape) or preset: one job, "
                        "a Ray cluster over its nodes, `facedis tune` on it; tune options go after --")
    g.add_argument("--grid-name", help="directory under --runs-root (default: the grid name, or the config's stem; "
                                       "with --sweep: tune-<data set or preset>[-smoke])")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (default: 0)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run, the same as --KEY=VALUE, e.g. --train.epochs=10 (repeatable)")
    g.add_argument("--runs-root", default="runs", help="root of the run directories (default: runs)")
    r = p.add_argument_group("resources")
    r.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU; 0 = CPU (ACCELERATE_USE_CPU=true)")
    r.add_argument("--tasks-per-node", type=int, help="CPU only: processes per node (default 1; with GPUs = gpus-per-node)")
    r.add_argument("--cpus-per-task", type=int, help="default 8 with GPUs, 1 on CPU")
    r.add_argument("--mem-gb", type=float, help="memory per node")
    r.add_argument("--partition", help="Slurm partition")
    r.add_argument("--time", type=parse_time, default=parse_time("04:00:00"), metavar="HH:MM:SS",
                   help="wall-time limit per job (default 04:00:00); jobs requeue themselves on timeout")
    r.add_argument("--signal-delay-s", type=int, default=120, help="USR2 this many seconds before the limit (checkpoint + requeue)")
    r.add_argument("--max-timeouts", type=int, default=3, help="requeues after timeouts before giving up (preemptions do not count)")
    r.add_argument("--array-parallelism", type=int, default=256, help="max simultaneously running array tasks")
    r.add_argument("--slurm", dest="slurm_extra", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="any other submitit slurm_* parameter, e.g. --slurm account=abc --slurm qos=high")
    r.add_argument("--ray-join-timeout-s", type=float, default=300.0,
                   help="--sweep: seconds the head waits for every node's Ray to join before the job fails (default 300)")
    b = p.add_argument_group("behaviour")
    b.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the jobs and print their results (default: yes for local/debug, no for slurm)")
    b.add_argument("--force", action="store_true", help="submit even if the run's last job is still queued/running")
    b.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    b.add_argument("--probe", action="store_true",
                   help="instead of training, submit one job with these resources that checks the DDP environment")
    return p


def _entries_from_args(args) -> tuple[str, list[GridEntry]]:
    """The grid's directory name and entries (reads grid/sweep YAML names only; ``ValueError`` if bad)."""
    if args.grid and args.config:
        entries = apply_grid_modes(args.config, args.grid)
        name = args.grid_name or f"{args.grid}-{'+'.join(Path(c).stem for c in args.config)}"
    elif args.grid:
        name, entries = resolve_grid(args.grid)
        name = args.grid_name or name
    elif args.config:
        entries = configs_as_grid(args.config)
        name = args.grid_name or "+".join(e.label for e in entries)
    else:
        raise ValueError("give --config and/or --grid")
    return safe_token(name, "grid name"), entries


def _resources(args) -> dict[str, Any]:
    """:func:`make_executor` keywords (bar the job name) of the parsed CLI arguments."""
    return dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                cpus_per_task=(args.cpus_per_task or 1) if args.probe else args.cpus_per_task,
                mem_gb=args.mem_gb, partition=args.partition,
                timeout_min=min(args.time, 15) if args.probe else args.time, signal_delay_s=args.signal_delay_s,
                array_parallelism=args.array_parallelism, max_timeouts=args.max_timeouts,
                slurm_extra=dict(args.slurm_extra))


def validate_args(args) -> tuple[dict[str, Any], str | None, list[GridEntry]]:
    """Check every CLI argument before anything is planned, created or submitted.

    Returns (executor keywords, grid name, grid entries); the grid is ``(None, [])`` for ``--probe``.
    Raises ``ValueError`` naming the bad argument. Needs no scheduler and no submitit executor.
    """
    if getattr(args, "tune_args", None):
        raise ValueError(f"options after -- ({' '.join(args.tune_args)}) are facedis tune options: only with --sweep")
    if args.seeds is None:
        args.seeds = [0]
    resources = _resources(args)
    executor_parameters(args.cluster, **resources)
    if args.probe:
        return resources, None, []
    check_seeds(args.seeds)
    grid, entries = _entries_from_args(args)  # a safe grid name makes a safe job name
    return resources, grid, entries


def wait_for(jobs: list, specs: list[RunSpec]) -> int:
    """Block until every job ends; print one line per run; return the number of failed runs."""
    import pdb

    failed = 0
    post_mortem = pdb.post_mortem
    if not sys.stdin.isatty():  # the debug executor opens pdb on errors: not without a terminal
        pdb.post_mortem = lambda *a, **k: None
    try:
        failed = _wait_all(jobs, specs)
    finally:
        pdb.post_mortem = post_mortem
    return failed


def _wait_all(jobs: list, specs: list[RunSpec]) -> int:
    failed = 0
    for job, spec in zip(jobs, specs):
        try:
            res = job.result()
            if isinstance(res, list):  # multi-task job: rank 0 first
                res = res[0]
            keys = {k: res[k] for k in ("E_rec_mean", "E_dis_ref_mean", "AVD_neu_mean") if isinstance(res, dict) and k in res}
            print(f"done    {spec.key}  job {job.job_id}  {keys}")
        except Exception as e:  # FailedJobError, UncompletedJobError
            failed += 1
            msg = str(e).strip().splitlines()
            print(f"FAILED  {spec.key}  job {job.job_id}: {msg[-1] if msg else type(e).__name__}")
    return failed


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None):
    """(parser, options); ``--section.key=value`` words are config overrides, appended to ``--set``.
    Words after ``--`` are ``facedis tune`` options (``--sweep``), in ``args.tune_args``."""
    from facedis.config import ConfigError, split_cli_overrides

    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tune_args = argv[:cut], argv[cut + 1:]
    args, rest = parser.parse_known_args(argv)
    args.tune_args = tune_args
    try:
        args.overrides = [*args.overrides, *split_cli_overrides(rest)]
    except ConfigError as e:
        parser.error(str(e))
    return parser, args


# --------------------------------------------------------------------------------------------
# Ray Tune sweeps (--sweep): one job, one task per node, facedis/cluster/ray_sweep.py


def sweep_target(target: str) -> tuple[str, list[str]]:
    """``--sweep`` value -> (directory stem, ``facedis tune`` options selecting it).

    A data set with a search space (``synth``, ``coma``, ...) -> ``--dataset <it>``; otherwise a preset
    (shipped name or YAML file) -> ``--dataset <its data set> --config <its absolute path>``.
    """
    from facedis.config import ConfigError, load_config, resolve_preset
    from facedis.sweeps import spaces

    if target in spaces.SPACES:
        return target, ["--dataset", target]
    try:
        path = Path(resolve_preset(target)).resolve()
        dataset = load_config(path).dataset
    except (ConfigError, OSError, ValueError) as e:
        raise ValueError(f"--sweep {target!r}: neither a data set ({', '.join(sorted(spaces.SPACES))}) "
                         f"nor a preset that loads ({e})") from None
    if dataset not in spaces.SPACES:
        raise ValueError(f"--sweep {target!r}: its data set {dataset!r} has no search space "
                         f"(sweepable: {', '.join(sorted(spaces.SPACES))})")
    return path.stem, ["--dataset", dataset, "--config", str(path)]


def validate_sweep_args(args, prog: str | None = None) -> tuple[dict[str, Any], str, list[str]]:
    """Check a ``--sweep`` submission before anything is created or submitted (pure; no Slurm needed).

    Returns (executor keywords, sweep directory name, ``facedis tune`` options). Raises ``ValueError``
    naming the bad argument; the ``facedis tune`` options are parsed by its own parser (which exits
    with status 2 on an unknown or malformed option).
    """
    from facedis.sweeps import tune

    if args.cluster != "slurm":
        raise ValueError("--sweep starts Ray on a Slurm allocation: --cluster slurm (on this machine run facedis tune)")
    for given, what in ((args.config, "--config"), (args.grid, "--grid"), (args.probe, "--probe"),
                        (args.seeds is not None, "--seeds"), (args.tasks_per_node is not None, "--tasks-per-node")):
        if given:
            raise ValueError(f"--sweep and {what} do not go together: a sweep is one Ray job, one task per node")
    if args.cpus_per_task is None:
        raise ValueError("--sweep needs --cpus-per-task: the CPUs Ray may use on each node")
    if not (isinstance(args.ray_join_timeout_s, (int, float)) and args.ray_join_timeout_s > 0):
        raise ValueError(f"--ray-join-timeout-s must be positive, got {args.ray_join_timeout_s!r}")
    resources = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                     mem_gb=args.mem_gb, partition=args.partition, timeout_min=args.time,
                     signal_delay_s=args.signal_delay_s, max_timeouts=args.max_timeouts,
                     slurm_extra=dict(args.slurm_extra), one_task_per_node=True)
    executor_parameters("slurm", **resources)
    for word in args.tune_args:
        opt = word.split("=", 1)[0]
        if opt in RESERVED_TUNE_OPTIONS:
            raise ValueError(f"{opt} after --: the sweep job sets it (the job's own Ray head; output in the run "
                             "directory; resuming is automatic)")
        if opt in ("--dataset", "--config"):
            raise ValueError(f"{opt} after --: give the data set or preset as --sweep")
    stem, target = sweep_target(args.sweep)
    tune_argv = [*target, *(f"--set={o}" for o in args.overrides), *args.tune_args]
    ns = tune.parse_args(list(tune_argv), prog=f"{prog or 'facedis submit'} --sweep {args.sweep} --")
    cpus, gpus = ns.cpus_per_trial, ns.gpus_per_trial
    if cpus is not None and cpus > args.cpus_per_task:
        raise ValueError(f"--cpus-per-trial {cpus:g} > --cpus-per-task {args.cpus_per_task}: no node could run a trial")
    if gpus is not None and gpus > args.gpus_per_node:
        raise ValueError(f"--gpus-per-trial {gpus:g} > --gpus-per-node {args.gpus_per_node}: no node could run a trial")
    name = safe_token(args.grid_name or f"tune-{stem}{'-smoke' if ns.smoke_test else ''}", "sweep name")
    return resources, name, tune_argv


def submit_sweep(parser: argparse.ArgumentParser, args, prog: str | None = None) -> int:
    """``--sweep``: validate, skip a finished or running sweep, submit one :class:`RaySweepJob`."""
    try:
        resources, name, tune_argv = validate_sweep_args(args, prog)
    except ValueError as e:
        parser.error(str(e))  # exit status 2; nothing was created or submitted
    run_dir = (Path(args.runs_root) / name).resolve()
    request = {"sweep": args.sweep, "tune_argv": tune_argv}
    old = read_json(request_path(run_dir))
    if old is not None and old.get("tune_argv") != tune_argv:
        parser.error(f"{run_dir} holds a sweep submitted with other options ({' '.join(old.get('tune_argv', []))}); "
                     "submit the same options to resume it, or give --grid-name for a new sweep")
    spec = SweepSpec(name=name, run_dir=str(run_dir), tune_argv=tune_argv, nodes=args.nodes,
                     cpus_per_node=args.cpus_per_task, gpus_per_node=args.gpus_per_node, cwd=str(Path.cwd()),
                     join_timeout_s=float(args.ray_join_timeout_s),
                     stop_grace_s=float(max(5, min(60, args.signal_delay_s // 2))))
    print(f"sweep {name}: {describe(spec)}")
    if finished_path(run_dir).is_file() and not args.force:
        print(f"skip    {name}: finished ({finished_path(run_dir)} exists); nothing to submit")
        return 0
    rec = latest_jobs(run_dir).get(str(run_dir))
    if rec and not args.force and rec.get("cluster") == "slurm":
        state = job_state(rec)
        if state.split()[0] in IN_FLIGHT:
            print(f"skip    {name}: job {rec['job_id']} is {state}")
            return 0
    if args.dry_run:
        print(f"would   submit the sweep -> {sweep_out(run_dir)}")
        return 0
    folder = run_dir / ".submitit" / "%j"
    ex = make_executor(folder, "slurm", job_name=f"facedis-{name}", **resources)  # needs srun
    atomic_write(request_path(run_dir), json.dumps(request, indent=2))
    job = ex.submit(RaySweepJob(), spec)
    _append_manifest(run_dir, [{
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cluster": "slurm", "kind": "sweep", "job_id": str(job.job_id),
        "folder": str(folder), "run_dir": str(run_dir), "label": name, "sweep": args.sweep, "tune_argv": tune_argv,
        "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "cpus_per_task": args.cpus_per_task,
    }])
    print(f"submit  {name}  job {job.job_id}  -> {sweep_out(run_dir)}")
    print(f"logs: {run_dir / '.submitit'}   status: facedis status {run_dir}")
    if args.wait:
        try:
            res = job.results()[0]
        except Exception as e:  # FailedJobError, UncompletedJobError
            msg = str(e).strip().splitlines()
            print(f"FAILED  {name}  job {job.job_id}: {msg[-1] if msg else type(e).__name__}")
            return 1
        print(f"done    {name}  job {job.job_id}  {res.get('done')} trials done, {res.get('failed')} failed")
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser, args = parse_args(argv, prog)
    if args.sweep:
        return submit_sweep(parser, args, prog)
    try:
        resources, grid, entries = validate_args(args)
    except ValueError as e:
        parser.error(str(e))  # exit status 2; nothing was planned, created or submitted
    cpu = args.gpus_per_node == 0
    runs_root = Path(args.runs_root).resolve()
    wait = args.wait if args.wait is not None else args.cluster != "slurm"

    if args.probe:
        folder = runs_root / "_probe" / ".submitit" / "%j"
        ex = make_executor(folder, args.cluster, job_name="facedis-probe", **resources)
        job = ex.submit(probe_distributed, cpu)
        print(f"probe job {job.job_id}; waiting ...", flush=True)
        results = job.results()
        for r in results:
            print(json.dumps(r, sort_keys=True))
        return 0

    try:  # loads every config with its overrides: a bad key or value is an argument error too
        specs = plan_runs(entries, grid, args.seeds, runs_root, args.overrides)
    except ValueError as e:
        parser.error(str(e))
    grid_dir = runs_root / grid
    last = latest_jobs(grid_dir)
    todo, skipped = [], []
    for s in specs:
        if read_final_metrics(s.run_dir) is not None:
            skipped.append((s, "finished (metrics.json exists)"))
            continue
        rec = last.get(s.run_dir)
        if rec and not args.force and rec.get("cluster") == "slurm" and args.cluster == "slurm":
            state = job_state(rec)
            if state.split()[0] in IN_FLIGHT:
                skipped.append((s, f"job {rec['job_id']} is {state}"))
                continue
        todo.append(s)

    print(f"grid {grid}: {len(specs)} runs ({len(entries)} configs x {len(args.seeds)} seeds) -> {grid_dir}")
    for s, why in skipped:
        print(f"skip    {s.key}: {why}")
    if args.dry_run:
        for s in todo:
            print(f"would   {s.key}  {s.config_path}  {s.overrides}")
        return 0
    if not todo:
        print("nothing to submit")
        return 0

    folder = grid_dir / ".submitit" / "%j"
    ex = make_executor(folder, args.cluster, job_name=f"facedis-{grid}", **resources)  # Slurm: needs srun
    for s in todo:  # the run directory exists from submission on, so never-started runs are visible
        Path(s.run_dir).mkdir(parents=True, exist_ok=True)
    threads = args.cpus_per_task or (None if args.gpus_per_node else 1)
    jobs = submit_specs(ex, todo, cpu=cpu, threads=threads)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    _append_manifest(grid_dir, [{
        "time": now, "cluster": args.cluster, "job_id": str(j.job_id), "folder": str(folder),
        "run_dir": s.run_dir, "label": s.label, "seed": s.seed, "config": s.config_path,
        "overrides": s.overrides, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
        "tasks_per_node": args.tasks_per_node or max(1, args.gpus_per_node),
    } for j, s in zip(jobs, todo)])
    for j, s in zip(jobs, todo):
        print(f"submit  {s.key}  job {j.job_id}  -> {s.run_dir}")
    print(f"logs: {grid_dir / '.submitit'}   status: facedis status {grid_dir}")
    if wait:
        return 1 if wait_for(jobs, todo) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
