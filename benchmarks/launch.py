"""Benchmark: training step rate of the demo under different launch commands, side by side.

Compares, interleaved over ``--rounds`` rounds on the same prepared data set:

- ``plain``  — ``accelerate launch facedis/train.py --config configs/synth.yaml`` with no flags
  (what a user of Accelerate types; ``accelerate launch`` would set ``OMP_NUM_THREADS=1``);
- ``tuned``  — the same with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` and
  ``--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
  --num_cpu_threads_per_process <cores>``;
- ``python`` — ``python facedis/train.py --config configs/synth.yaml``.

Each run trains 3 short epochs without discriminator pretraining and evaluation until the end;
the figure is the steady-state rate of epoch 2 (steps / wall time of the epoch). Prints a table
with the median over rounds and the ratio to ``tuned``.

    python benchmarks/launch.py --data data/synth            # prepared demo data set
    python benchmarks/launch.py --data data/synth --rounds 3 --steps 150
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commands(cores: int) -> dict[str, tuple[list[str], dict]]:
    accel = [sys.executable, "-m", "accelerate.commands.launch"]
    train = ["facedis/train.py", "--config", "configs/synth.yaml"]
    plain_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GLIBC_TUNABLES")}
    return {
        "plain": ([*accel, *train], plain_env),
        "tuned": ([*accel, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(cores), *train],
                  {**plain_env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
        "python": ([sys.executable, *train], plain_env),
    }


def run_once(name: str, cmd: list[str], env: dict, data: str, steps: int, out: Path) -> float:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    over = [f"--data.root={data}", f"--run.dir={run_dir}", "--train.epochs=3", f"--train.max_steps_per_epoch={steps}",
            "--train.eval_every=1000", "--pretrain.enabled=false", "--train.progress=false",
            "--run.tensorboard=false"]
    r = subprocess.run([*cmd, *over], env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    e2 = lines[1]
    return (e2["global_step"] - lines[0]["global_step"]) / e2["time/epoch_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a prepared synth data set (configs/synth.yaml's data.root)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100, help="steps per epoch")
    ap.add_argument("--variants", default="plain,tuned,python")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cmds = commands(cores)
    names = args.variants.split(",")
    rates: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="facedis-launch-") as tmp:
        for r in range(args.rounds):
            for n in names:
                cmd, env = cmds[n]
                rates[n].append(run_once(n, cmd, env, str(Path(args.data).resolve()), args.steps, Path(tmp)))
                print(f"# round {r + 1} {n:7s} {rates[n][-1]:.2f} steps/s", flush=True)
    base = statistics.median(rates["tuned"]) if "tuned" in rates else None
    print(f"\n# {cores} cores; epoch 2 of 3, {args.steps} steps per epoch, median of {args.rounds} rounds")
    print(f"{'launch':8s} {'steps/s':>8s} {'vs tuned':>9s}  command")
    for n in names:
        med = statistics.median(rates[n])
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"{n:8s} {med:8.2f} {ratio:>9s}  {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmds[n][0]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
