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

The small-model shapes time the real training loop instead (``facedis/train.py``, plain python,
steady-state steps/s of epoch 2 of 3, no evaluation, no D pretraining), on a synthetic data set
prepared once for the run:

- ``demo``      — the README demo: ``configs/synth.yaml`` as shipped (V=300, batch 32);
- ``coma-slim`` — the same slim model at the CoMA vertex count (V=5023, batch 16).

``--against DIR`` runs the same loop in another checkout (e.g. an older commit in a
``git worktree``) with the same model, data, batch, threads and allocator, interleaved round by
round, and prints the ratio: the side-by-side comparison the speed figures in
benchmarks/results-cpu.md are made with.

    python benchmarks/step.py --shapes demo,coma-slim,coma                      # all three
    git worktree add /tmp/old <commit> && python benchmarks/step.py --shapes demo,coma-slim --against /tmp/old
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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAME = ROOT.parent / "shared" / "data" / "flame2023_open" / "basis.npz"
SHAPES = {"coma": dict(V=5023, d=4), "facescape": dict(V=4547, d=64)}
LOOP_SHAPES = {  # the training loop on the demo preset's model; prepare: synth data set options
    "demo": dict(V=300, B=32, prepare=["--subjects", "400", "--per-subject", "4", "--vertices", "300"]),
    "coma-slim": dict(V=5023, B=16, prepare=["--subjects", "60", "--per-subject", "4", "--vertices", "5023"]),
}
DEMO_PRESET = ROOT / "configs" / "synth.yaml"
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
# the training loop on a small model (demo, coma-slim), in this checkout or another one
# ---------------------------------------------------------------------------------------------
def preset_overrides(preset: Path, batch: int) -> list[str]:
    """The demo preset's model, method, loss and fast-path settings as ``--key=value`` overrides,
    so another checkout trains exactly the same model (its own preset may differ)."""
    import yaml

    data = yaml.safe_load(preset.read_text())
    out = []
    for section in ("model", "method", "loss"):
        for key, value in (data.get(section) or {}).items():
            out.append(f"--{section}.{key}={json.dumps(value) if isinstance(value, list) else value}")
    out.append(f"--train.fast={data.get('train', {}).get('fast', False)}")
    out.append(f"--train.batch_size={batch}")
    return out


def tree_env(tree: Path) -> dict:
    """Environment that makes ``import facedis`` resolve to ``tree`` (ahead of any installed copy)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(tree), env.get("PYTHONPATH", "")) if x)
    env.pop("OMP_NUM_THREADS", None)
    return env


def prepare_loop_data(tree: Path, shape: str, out: Path) -> Path:
    """The shape's synthetic data set, prepared by ``tree``'s own preparation code."""
    root = out / f"data-{shape}-{tree.name}"
    if not (root / "meta.json").is_file():
        cmd = [sys.executable, "-m", "facedis.prep.prepare", "synth", *LOOP_SHAPES[shape]["prepare"],
               "--frames-per-sequence", "4", "--seed", "0", "--protocol", "unseen-identity", "--out", str(root)]
        p = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"data preparation in {tree} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return root


def run_loop(tree: Path, shape: str, data: Path, steps: int, out: Path, threads: Optional[int]) -> dict:
    """Steady-state steps/s of ``tree``'s training loop: epoch 2 of 3 (epoch 1 warms up)."""
    B = LOOP_SHAPES[shape]["B"]
    run_dir = out / f"run-{shape}-{tree.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(tree / "facedis" / "train.py"), "--config", str(tree / "configs" / "synth.yaml"),
           *preset_overrides(DEMO_PRESET, B), f"--data.root={data}", f"--run.dir={run_dir}",
           "--train.epochs=3", f"--train.max_steps_per_epoch={steps}", "--train.eval_every=1000",
           "--pretrain.enabled=false", "--train.progress=false", "--run.tensorboard=false"]
    env = tree_env(tree)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{shape} training loop in {tree} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rate = (lines[1]["global_step"] - lines[0]["global_step"]) / lines[1]["time/epoch_s"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"steps_per_s": rate, "samples_per_s": rate * B, "B": B}


def loop_benchmark(shapes: list[str], against: Optional[Path], rounds: int, steps: dict, threads) -> list[dict]:
    """Interleaved rounds of this checkout's (and ``against``'s) training loop per shape."""
    trees = [("facedis", ROOT)] + ([("against", against)] if against else [])
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="facedis-step-") as tmp:
        data = {(shape, name): prepare_loop_data(tree, shape, Path(tmp)) for shape in shapes for name, tree in trees}
        for r in range(rounds):
            for shape in shapes:
                for name, tree in trees:
                    res = run_loop(tree, shape, data[shape, name], steps[shape], Path(tmp), threads)
                    rates.setdefault((shape, name), []).append(res["samples_per_s"])
                    print(f"#   round {r + 1} {shape:9s} {name:8s} {res['steps_per_s']:7.2f} steps/s "
                          f"({res['samples_per_s']:.1f} samples/s)", flush=True)
    rows = []
    for shape in shapes:
        mine = statistics.median(rates[shape, "facedis"])
        row = dict(shape=shape, B=LOOP_SHAPES[shape]["B"], samples_per_s=mine, raw=rates[shape, "facedis"])
        if against:
            theirs = statistics.median(rates[shape, "against"])
            row.update(against_samples_per_s=theirs, speedup=mine / theirs, against_raw=rates[shape, "against"])
        rows.append(row)
    return rows


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
    ap.add_argument("--shapes", default=None, help="comma list of coma,facescape (step variants) and "
                    "demo,coma-slim (training loop)")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout (e.g. a git worktree of an older commit): time its training loop "
                         "on the demo/coma-slim shapes side by side and print the ratio")
    ap.add_argument("--loop-steps", default="demo=100,coma-slim=6",
                    help="steps per epoch of the training-loop shapes (default demo=100,coma-slim=6)")
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
    unknown = [x for x in shapes if x not in SHAPES and x not in LOOP_SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES) + sorted(LOOP_SHAPES)}")
    loop_shapes = [x for x in shapes if x in LOOP_SHAPES]
    shapes = [x for x in shapes if x in SHAPES]
    if args.against is not None and not (args.against / "facedis" / "train.py").is_file():
        ap.error(f"--against {args.against}: not a facedis checkout (no facedis/train.py)")
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

    loop_rows = []
    if loop_shapes:
        loop_steps = dict(kv.split("=") for kv in args.loop_steps.split(","))
        print(f"# training loop: plain python facedis/train.py, demo preset model, epoch 2 of 3, steps per epoch "
              f"{ {k: int(v) for k, v in loop_steps.items() if k in loop_shapes} }, {rounds} interleaved rounds"
              + (f", against {args.against}" if args.against else ""))
        loop_rows = loop_benchmark(loop_shapes, args.against.resolve() if args.against else None, rounds,
                                   {k: int(loop_steps[k]) for k in loop_shapes}, args.threads)

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
    if shapes:
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
    if loop_rows:
        print()
        print(f"{'shape':9s} {'B':>3s} {'samples/s':>10s}" + (f" {'against':>10s} {'ratio':>7s}" if args.against else ""))
        for row in loop_rows:
            print(f"{row['shape']:9s} {row['B']:3d} {row['samples_per_s']:10.1f}"
                  + (f" {row['against_samples_per_s']:10.1f} {row['speedup']:6.2f}x" if args.against else ""))
    print()
    for row in summary:
        if row["variant"] != "faithful" and row["speedup"] is not None:
            print(f"{row['shape']} {row['variant']} vs faithful: speed-up {row['speedup']:.2f}x, "
                  f"{mem_name} {row['mem_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device, B=B, peaks=peaks, summary=summary, loop=loop_rows,
                                                   against=str(args.against) if args.against else None,
                                                   tunables=os.environ.get("GLIBC_TUNABLES", "")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
