"""Benchmark: the faithful fp32 eager joint step vs the fast step (docs/fidelity.md, "The fast path").

In ONE run, at the CoMA shape (V=5023, d=4+4, −ne-gt: Laplacian on, D on, no BN in the joint D)
and the FaceScape shape (V=4547, d=64+64), it times

- ``faithful``  — the reference step: Conv1d(k=1), dense V×V Laplacian, non-detached fakes,
  full-VAE re-encode, fp32 eager (the default ``FidelityConfig`` with ``dense_laplacian``);
- ``fast-fp32`` — what ``train.fast=true`` runs (``facedis.components.step_fidelity`` and
  ``pointwise_mode``): detached fakes, encoder-only re-encode, sparse
  Laplacian, points-major GEMMs with the 1024-wide layer fused with BN+ReLU+max-pool;
- ``fast-bf16`` — the same under bf16 autocast (only where the CPU has bf16 matmul: avx512_bf16 /
  amx_bf16; always on CUDA);
- optionally ``lean`` (``--variants``) — waste removal only (detach + encoder-only + sparse).

Each variant runs in a fresh subprocess (so its peak RSS, ``ru_maxrss``, is its own), the variants
are interleaved round-robin over ``--rounds`` rounds, and the medians are reported. Both sides
run under the same allocator setting: the benchmark re-execs itself with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` unless ``--no-hugetlb`` (glibc ≥ 2.35 reads it; the
reference is ≈1.2× faster with it because large activations are no longer handed back to the
kernel and re-faulted every step). It also measures the machine's fp32 and bf16 matmul peaks and
reports achieved FLOP/s (``facedis.step.step_flops``) against them: ``ref-FLOP/s`` counts the
reference's FLOPs (37.5 GF/sample at CoMA, i.e. useful work per second), ``exec-FLOP/s`` the
GEMM FLOPs the variant actually executes.

    python benchmarks/step.py                 # full run (CPU: B=8; GPU: B=32)
    python benchmarks/step.py --quick         # sanity run (small steps, one round)
    python benchmarks/step.py --json out.json # also write the raw numbers

Every figure and ratio is printed as ``N.NNx`` (ratios to the faithful step of the same shape).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAME = ROOT.parent / "shared" / "data" / "flame2023_open" / "basis.npz"
SHAPES = {"coma": dict(V=5023, d=4), "facescape": dict(V=4547, d=64)}
HUGETLB = "glibc.malloc.hugetlb=1"


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    from facedis.runtime import cpu_bf16_matmul

    return cpu_bf16_matmul()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def matmul_peak(device: str, dtype_name: str, n: int, reps: int) -> float:
    """Best-of-``reps`` FLOP/s of an n×n×n matmul."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda" and dtype_name == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


# ---------------------------------------------------------------------------------------------
# one variant (child process)
# ---------------------------------------------------------------------------------------------
def make_problem(V: int, B: int, device: str, seed: int = 0):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    if V == 5023 and FLAME.is_file():
        d = np.load(FLAME)
        template, tri = d["template"].astype(np.float32), d["faces"].astype(np.int64)
    else:  # a strip mesh with the right vertex count (the Laplacian cost depends on V and degree)
        template = rng.normal(size=(V, 3)).astype(np.float32) * 0.1
        i = np.arange(V - 2)
        tri = np.stack([i, i + 1, i + 2], 1)
    g = torch.Generator().manual_seed(seed)
    base = torch.from_numpy(template)
    f = lambda: (base + 0.01 * torch.randn(B, V, 3, generator=g)).to(device)  # noqa: E731
    batch = {"vertices": f(), "partner": f(), "neutral": f()}
    return batch, base.to(device), tri


def run_variant(shape: str, variant: str, B: int, steps: int, warmup: int, device: str) -> dict:
    import torch

    from facedis.losses import uniform_laplacian
    from facedis.model import DisentanglingVAE, IdentityDiscriminator
    from facedis.components import pointwise_mode, step_fidelity
    from facedis.config import Config, FidelityConfig, LossConfig
    from facedis.step import Updates, joint_step

    V, d = SHAPES[shape]["V"], SHAPES[shape]["d"]
    torch.manual_seed(0)
    batch, mean_face, tri = make_problem(V, B, device)
    vae = DisentanglingVAE(V, d, d).to(device)
    disc = IdentityDiscriminator(use_bn=False).to(device)  # the joint D of −ne-gt runs without BN
    updates = Updates()
    if variant == "faithful":
        fid = FidelityConfig(dense_laplacian=True)
    elif variant == "lean":
        fid = FidelityConfig(detach_fakes=True, encoder_only_reencode=True)
    else:  # the fast path as `train.fast=true` resolves it
        cfg = Config()
        cfg.train.fast = True
        fid = step_fidelity(cfg)
        for m in (vae, disc):
            m.set_pointwise(pointwise_mode(cfg))
        if variant == "fast-bf16":
            updates = Updates(torch.bfloat16, torch.device(device).type)
        if variant.endswith("-compile"):
            vae, disc = torch.compile(vae), torch.compile(disc)
    lap = uniform_laplacian(tri, V, dense=fid.dense_laplacian).to(device)
    ov = torch.optim.Adam(vae.parameters(), lr=1e-4, weight_decay=1e-4)
    od = torch.optim.Adam(disc.parameters(), lr=1e-4)
    w = LossConfig(recon=100.0, kl_id=5e-7, kl_exp=5e-7, adv_id=1e-3, latent_consistency=1e-2, laplacian=1e-2,
                   neutral_recon=0.0, exp_recon=0.0)
    kw = dict(use_discriminator=True, neutral_gt=False, use_laplacian=True, fidelity=fid, updates=updates)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, before any step
    times = []
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        logs = joint_step(vae, disc, ov, od, batch, mean_face, lap, w, **kw)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    total = float(logs["total"])  # one host sync, after timing
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {
        "shape": shape, "variant": variant, "B": B, "times": times,
        "peak_rss_gib": peak / 2**20, "step_rss_gib": (peak - rss0) / 2**20, "loss": total,
        "threads": torch.get_num_threads(),
    }
    if cuda:
        res["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def variant_flops(shape: str, variant: str, B: int) -> tuple[float, float]:
    """(reference GEMM FLOPs, executed GEMM FLOPs) per step."""
    from facedis.step import step_flops

    V, d = SHAPES[shape]["V"], SHAPES[shape]["d"]
    ref = step_flops(V, B, d, d)["total"]
    if variant == "faithful":
        return ref, ref
    lean = dict(detach_fakes=True, encoder_only_reencode=True, dense_laplacian=False)
    if variant == "lean":
        return ref, step_flops(V, B, d, d, **lean)["total"]
    return ref, step_flops(V, B, d, d, fused_pointwise=True, **lean)["total"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sanity run: CoMA only, 1 timed step, 1 round")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 8 on CPU (2 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per subprocess (default 3; quick 1)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    ap.add_argument("--shapes", default=None, help="comma list of coma,facescape")
    ap.add_argument("--variants", default=None, help="comma list (default faithful,fast-fp32[,fast-bf16])")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: all)")
    ap.add_argument("--no-hugetlb", action="store_true", help="do not re-exec with GLIBC_TUNABLES=" + HUGETLB)
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:  # shape:variant:B:steps:warmup:device
        shape, variant, B, steps, warmup, device = args.child.split(":")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_variant(shape, variant, int(B), int(steps), int(warmup), device)), flush=True)
        return 0

    if not args.no_hugetlb and HUGETLB not in os.environ.get("GLIBC_TUNABLES", ""):
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES", ""), HUGETLB) if x)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    B = args.batch or (32 if cuda else (2 if args.quick else 8))
    steps = args.steps or (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    shapes = (args.shapes or ("coma" if args.quick else "coma,facescape")).split(",")
    bf16_ok = cuda or cpu_has_bf16()
    default_variants = "faithful,fast-fp32" + (",fast-bf16" if bf16_ok else "")
    variants = (args.variants or default_variants).split(",")

    print(f"# facedis step benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    dev_name = torch.cuda.get_device_name() if cuda else f"{cpu_model()} ({os.cpu_count()} logical CPUs)"
    print(f"# device: {device}  {dev_name}  torch {torch.__version__}  threads {args.threads or torch.get_num_threads()}")
    print(f"# GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (same for every variant)  "
          f"cpu bf16 matmul: {cpu_has_bf16()}  mkldnn: {torch.backends.mkldnn.is_available()}")
    print(f"# B={B}, {steps} timed steps after {args.warmup} warm-up per subprocess, {rounds} interleaved rounds, "
          f"variants {variants}, shapes {shapes}")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    n = 8192 if cuda else (1024 if args.quick else 2048)
    peaks = {"fp32": matmul_peak(device, "fp32", n, 5 if args.quick else 10)}
    if bf16_ok:
        peaks["bf16"] = matmul_peak(device, "bf16", n, 5 if args.quick else 10)
    print("# matmul peak (n=%d): " % n + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))

    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for shape in shapes:
            for variant in variants:
                cmd = [sys.executable, os.path.abspath(__file__),
                       "--child", f"{shape}:{variant}:{B}:{steps}:{args.warmup}:{device}"]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode != 0 or not line:
                    print(f"# {shape}/{variant} FAILED rc={p.returncode}\n{p.stderr[-3000:]}")
                    continue
                res = json.loads(line[-1][7:])
                results.setdefault((shape, variant), []).append(res)
                med = statistics.median(res["times"])
                print(f"#   round {r + 1} {shape:9s} {variant:10s} step {med:7.3f} s  "
                      f"({B / med:.2f} samples/s)  peak RSS {res['peak_rss_gib']:.2f} GiB", flush=True)

    print()
    mem_key = "gpu_peak_gib" if cuda else "peak_rss_gib"
    mem_name = "GPU peak" if cuda else "peak RSS"
    hdr = (f"{'shape':9s} {'variant':10s} {'samples/s':>10s} {'speed-up':>9s} {mem_name + ' GiB':>13s} {'mem ratio':>9s} "
           f"{'step-RSS GiB':>12s} {'ref-GFLOP/s':>11s} {'exec-GFLOP/s':>12s} {'% fp32 pk':>9s}"
           + (f" {'% bf16 pk':>9s}" if "bf16" in peaks else ""))
    print(hdr)
    summary = []
    for shape in shapes:
        base = results.get((shape, "faithful"))
        base_sps = B / statistics.median([t for r in base for t in r["times"]]) if base else None
        base_mem = max(r[mem_key] for r in base) if base else None
        for variant in variants:
            rs = results.get((shape, variant))
            if not rs:
                continue
            t = statistics.median([t for r in rs for t in r["times"]])
            sps = B / t
            mem = max(r[mem_key] for r in rs)
            step_mem = max(r["step_rss_gib"] for r in rs)
            ref_f, exec_f = variant_flops(shape, variant, B)
            ref_fs, exec_fs = ref_f / t, exec_f / t
            pk = peaks["bf16"] if variant.endswith("bf16") and "bf16" in peaks else peaks["fp32"]
            row = dict(shape=shape, variant=variant, samples_per_s=sps, speedup=sps / base_sps if base_sps else None,
                       mem_gib=mem, mem_ratio=mem / base_mem if base_mem else None, step_rss_gib=step_mem,
                       ref_gflops=ref_fs / 1e9, exec_gflops=exec_fs / 1e9, pct_peak=100 * exec_fs / pk,
                       pct_fp32=100 * exec_fs / peaks["fp32"],
                       pct_bf16=100 * exec_fs / peaks["bf16"] if "bf16" in peaks else None, raw=rs)
            summary.append(row)
            fmt = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
            print(f"{shape:9s} {variant:10s} {sps:10.2f} {fmt(row['speedup']):>9s} {mem:13.2f} {fmt(row['mem_ratio']):>9s} "
                  f"{step_mem:12.2f} {ref_fs / 1e9:11.1f} {exec_fs / 1e9:12.1f} {row['pct_fp32']:8.1f}%"
                  + (f" {row['pct_bf16']:8.1f}%" if row["pct_bf16"] is not None else ""))
    print()
    for row in summary:
        if row["variant"] != "faithful" and row["speedup"] is not None:
            print(f"{row['shape']} {row['variant']} vs faithful: speed-up {row['speedup']:.2f}x, "
                  f"{mem_name} {row['mem_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device, B=B, peaks=peaks, summary=summary,
                                                   tunables=os.environ.get("GLIBC_TUNABLES", "")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
