"""Where a training step's time goes: the demo preset's model (``configs/synth.yaml``) at the demo
shape (V=300, batch 32) or at the CoMA vertex count (``--shape coma-slim``: V=5023, batch 16).

Runs the real ``facedis.step.joint_step`` (the fast path, as ``train.fast`` runs it) on random faces
under ``torch.profiler``, then prints

- the step time, the GEMM FLOPs per step (``torch.utils.flop_counter``) and what they would cost at
  the machine's measured fp32 matmul peak (the floor no change to the non-GEMM code can beat);
- the profiler's self time grouped by kind: GEMMs (mm/addmm/bmm), the fused layer's arg-max,
  BatchNorm, ReLU, other element-wise ops, gathers/scatters, the optimiser, the rest;
- the top operators.

    python benchmarks/profile_step.py                      # demo shape, all threads
    python benchmarks/profile_step.py --shape coma-slim --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"demo": (300, 32), "coma-slim": (5023, 16)}
GROUPS = [  # (group, operator names); first match wins
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("fused layer arg-max", ("aten::max",)),
    ("BatchNorm", ("aten::native_batch_norm", "aten::native_batch_norm_backward")),
    ("ReLU", ("aten::clamp_min", "aten::threshold_backward", "aten::relu")),
    ("gather / scatter", ("aten::index", "aten::index_add_", "aten::_index_put_impl_", "aten::gather",
                          "aten::scatter_add_")),
    ("optimiser (Adam)", ("aten::_foreach_", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::sqrt")),
    ("other element-wise", ("aten::add", "aten::sub", "aten::mul", "aten::div", "aten::sum", "aten::copy_",
                            "aten::fill_", "aten::amax", "aten::eq", "aten::where", "aten::cat", "aten::pow",
                            "aten::exp", "aten::neg", "aten::abs", "aten::mean")),
]


def group_of(name: str) -> str:
    for group, names in GROUPS:
        if any(name == n or name.startswith(n) for n in names):
            return group
    return "rest"


def build(shape: str):
    from facedis.components import adam, build_models, step_fidelity
    from facedis.config import load_config
    from facedis.losses import uniform_laplacian
    from facedis.step import joint_step

    V, B = SHAPES[shape]
    torch.manual_seed(0)
    cfg = load_config("synth")
    vae, disc = build_models(cfg, V)
    fid = step_fidelity(cfg)
    mean = torch.randn(V, 3) * 0.1
    vae.set_input_reference(mean, 10.0)
    i = np.arange(V - 2)
    lap = uniform_laplacian(np.stack([i, i + 1, i + 2], 1), V)
    ov, od = adam(vae.parameters(), cfg.optim.lr_vae), adam(disc.parameters(), cfg.optim.lr_disc)
    batch = {k: mean + 0.01 * torch.randn(B, V, 3) for k in ("vertices", "partner", "neutral")}

    def step():
        return joint_step(vae, disc, ov, od, batch, mean, lap, cfg.loss, use_discriminator=True,
                          neutral_gt=cfg.method.neutral_gt, use_laplacian=True, fidelity=fid)

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=None, help="profiled steps (default 20 demo, 3 coma-slim)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step import matmul_peak

    steps = args.steps or (20 if args.shape == "demo" else 3)
    step = build(args.shape)
    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    peak = matmul_peak("cpu", "fp32", 2048, 10)
    events = prof.key_averages()
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key.startswith("aten::"):
            groups[group_of(e.key)] += e.self_cpu_time_total
    total = sum(groups.values())
    V, B = SHAPES[args.shape]
    print(f"# {args.shape}: V={V}, batch {B}, demo preset model, train.fast; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"step {dt * 1e3:.1f} ms ({1 / dt:.2f} steps/s); GEMM work {flops / 1e9:.2f} GFLOP/step = "
          f"{flops / dt / 1e9:.1f} GFLOP/s; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s -> "
          f"the GEMMs alone need >= {flops / peak * 1e3:.1f} ms")
    print(f"\n{'kind':22s} {'share':>6s} {'ms/step':>8s}")
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{g:22s} {100 * v / total:5.1f}% {v / total * dt * 1e3:8.1f}")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
