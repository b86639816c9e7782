"""Speed anchor: facedis's ``faithful`` joint step vs the authors' own step, side by side.

Every speed-up facedis reports is relative to ``faithful`` (``benchmarks/step.py``). This benchmark
checks that ``faithful`` itself runs as fast as the code it reproduces. In ONE run, at the CoMA
shape (V=5023, d=4+4) and optionally the FaceScape shape (V=4547, d=64+64), both in −ne-gt mode
(Laplacian on, discriminator on, no BN in the joint discriminator), it times

- ``authors``  — the authors' public modules (their ``Model/vae.py``, ``Model/discriminator.py``,
  ``Model/laplacian_loss.py``, imported from ``--reference-dir``) driven by their training
  script's step, reproduced here: one VAE forward; D step on the shuffled true and non-detached
  fake pairs with ``backward(retain_graph=True)``; then the VAE loss (reconstruction, both KLs
  with the CoMA decay, dense Laplacian, adversarial term through the just-updated D), the full-VAE
  re-encode of M̄+Δ_id with its L1 consistency, one backward, the VAE step; with their ``.item()``
  host reads (logging and visualisation themselves are left out);
- ``faithful`` — ``facedis.step.joint_step`` exactly as ``benchmarks/step.py`` runs its
  ``faithful`` variant (``pointwise="conv"``, default ``FidelityConfig`` with the dense Laplacian).

Both get the same random batch (``benchmarks/step.py``'s ``make_problem``), the same optimisers
(Adam, lr 1e-4, weight decay 1e-4 on the VAE), the same thread count and the same allocator
setting (the run re-execs itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` unless
``--no-hugetlb``). Each (side, shape) runs in a fresh subprocess, the sides are interleaved
round-robin over ``--rounds`` rounds, and the medians of all timed steps are reported, with the
ratio faithful / authors (1.00x = same speed).

``--against DIR`` adds the faithful step of another facedis checkout (e.g. the tree before a change)
as a third side of the same interleaved run. Besides samples/s (wall time), each side's median
process CPU time per step is reported: on a machine shared with other jobs it moves less than the
wall time.

The authors' code is not part of facedis and is never downloaded by this script. Get it once:

    git clone https://github.com/rmraaron/FaceExpDisentanglement /path/to/authors
    python benchmarks/anchor.py --reference-dir /path/to/authors
    python benchmarks/anchor.py --reference-dir /path/to/authors --shapes coma,facescape --rounds 3
    python benchmarks/anchor.py --reference-dir /path/to/authors --against /path/to/facedis-before
    python benchmarks/anchor.py --reference-dir /path/to/authors --profile   # op tables, one step each

Only ``Model/`` of that checkout is imported (it needs torch and numpy only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HUGETLB = "glibc.malloc.hugetlb=1"
SHAPES = {"coma": (5023, 4), "facescape": (4547, 64), "small": (500, 4)}  # V, d_id = d_exp ("small": a smoke run)
REFERENCE_FILES = ("Model/vae.py", "Model/discriminator.py", "Model/laplacian_loss.py", "Model/losses.py")
# the benchmark's loss weights (benchmarks/step.py); they do not change the cost of a step
WEIGHTS = dict(recon=100.0, kl_id=5e-7, kl_exp=5e-7, adv_id=1e-3, latent_consistency=1e-2, laplacian=1e-2)
LR, VAE_WEIGHT_DECAY, EPOCH = 1e-4, 1e-4, 1

HOW_TO_GET = (
    "benchmarks/anchor.py needs the authors' public code (it never downloads anything itself):\n"
    "    git clone https://github.com/rmraaron/FaceExpDisentanglement /path/to/authors\n"
    "    python benchmarks/anchor.py --reference-dir /path/to/authors"
)


def check_reference_dir(path: str | None) -> str | None:
    """None if ``path`` holds the authors' model files, else the message to print."""
    if not path:
        return "error: --reference-dir is required.\n" + HOW_TO_GET
    missing = [f for f in REFERENCE_FILES if not (Path(path) / f).is_file()]
    if missing:
        return f"error: --reference-dir {path} lacks {', '.join(missing)}.\n" + HOW_TO_GET
    return None


# ---------------------------------------------------------------------------------------------
# the two steps (child process)
# ---------------------------------------------------------------------------------------------
def _problem(shape: str, B: int):
    from benchmarks.step import make_problem

    V, d = SHAPES[shape]
    batch, mean_face, tri = make_problem(V, B, "cpu")
    return V, d, batch, mean_face, tri


def build_faithful(shape: str, B: int):
    """facedis's ``faithful`` step, built as ``benchmarks/step.py::run_variant`` builds it."""
    import torch

    from facedis.config import FidelityConfig, LossConfig
    from facedis.losses import uniform_laplacian
    from facedis.model import DisentanglingVAE, IdentityDiscriminator
    from facedis.step import Updates, joint_step

    torch.manual_seed(0)
    V, d, batch, mean_face, tri = _problem(shape, B)
    vae = DisentanglingVAE(V, d, d)
    disc = IdentityDiscriminator(use_bn=False)
    fid = FidelityConfig(dense_laplacian=True)
    lap = uniform_laplacian(tri, V, dense=True)
    ov = torch.optim.Adam(vae.parameters(), lr=LR, weight_decay=VAE_WEIGHT_DECAY)
    od = torch.optim.Adam(disc.parameters(), lr=LR)
    w = LossConfig(neutral_recon=0.0, exp_recon=0.0, **WEIGHTS)
    kw = dict(use_discriminator=True, neutral_gt=False, use_laplacian=True, fidelity=fid, updates=Updates())

    def step() -> float:
        return float(joint_step(vae, disc, ov, od, batch, mean_face, lap, w, **kw)["total"])

    return step


def build_authors(shape: str, B: int, reference_dir: str):
    """The authors' modules driven by their training script's joint step (CoMA, −ne-gt)."""
    import types

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.abspath(reference_dir))
    import Model.laplacian_loss as ref_lap  # noqa: E402  (the authors' modules)
    from Model.discriminator import Discriminator
    from Model.vae import VariationalAE

    ref_lap.device = torch.device("cpu")  # their Laplacian module hard-codes CUDA at import

    torch.manual_seed(0)
    V, d, batch, mean_face, tri = _problem(shape, B)
    args = types.SimpleNamespace(dataset="COMA", info_bn=False, use_bn=False, with_neutral_gt=False,
                                 id_discriminator_used=True, lambda1=WEIGHTS["recon"], lambda2=WEIGHTS["kl_id"],
                                 lambda3=WEIGHTS["kl_exp"], lambda4=WEIGHTS["adv_id"],
                                 lambda7=WEIGHTS["latent_consistency"], lambda8=WEIGHTS["laplacian"])
    vae = VariationalAE(args, V, d, d)
    disc = Discriminator(args, V, p=0.5, global_feat=True)
    opt_vae = torch.optim.Adam(vae.parameters(), lr=LR, weight_decay=VAE_WEIGHT_DECAY)
    opt_disc = torch.optim.Adam(disc.parameters(), lr=LR)
    laplacian = ref_lap.LaplacianLoss(vertices_number=V, faces=tri, average=True)
    mean = mean_face.unsqueeze(0)  # (1, V, 3) as they load it
    true_vertices, sample_id_vertices = batch["vertices"], batch["partner"]
    id_label_same = torch.ones(B, dtype=torch.long)
    expression_levels = torch.rand(B)
    kl_decay = (350 - EPOCH) / 350

    def step() -> float:
        vae.train()  # their first batch of an epoch runs in eval mode; every other one in train mode
        true_concat = torch.cat([true_vertices, sample_id_vertices], dim=2)
        pred, pred_neutral, _pred_exp, kl_id, kl_exp, z_id, _ = vae(true_vertices, expression_levels <= 0.1)
        pred_concat = torch.cat([true_vertices, pred_neutral + mean], dim=2)
        # ---- ID discriminator ----
        disc.train()
        combined = torch.cat([true_concat, pred_concat], dim=0)
        combined_label = torch.cat([id_label_same, torch.zeros_like(id_label_same)])
        shuffle_idx = torch.randperm(combined_label.shape[0])
        combined = combined[shuffle_idx]
        combined_label = combined_label[shuffle_idx]
        opt_disc.zero_grad()
        id_pred = disc(combined)
        id_loss = F.cross_entropy(id_pred, combined_label)
        id_loss.backward(retain_graph=True)
        opt_disc.step()
        id_correct = torch.exp(id_pred).max(1)[1].eq(combined_label.data).cpu().sum()
        id_loss.item(), id_correct.item()
        # ---- generator ----
        vae.train()
        opt_vae.zero_grad()
        l2_loss = F.mse_loss(pred, true_vertices - mean)
        kl_id, kl_exp = kl_decay * kl_id, kl_decay * kl_exp
        loss = args.lambda1 * l2_loss + args.lambda2 * kl_id + args.lambda3 * kl_exp
        lapla_loss = laplacian(pred_neutral + mean)
        loss += lapla_loss * args.lambda8
        _save_criteria = args.lambda1 * l2_loss.detach().clone()
        pred_vae = disc(torch.cat([true_vertices, pred_neutral + mean], dim=2))
        adv = F.cross_entropy(pred_vae, torch.ones(size=(pred.shape[0],), dtype=torch.long))
        loss += args.lambda4 * adv
        _acc = float(torch.exp(pred_vae).max(1)[1].cpu().sum().item()) / pred_vae.shape[0]
        l2_loss.item(), kl_id.item(), kl_exp.item(), lapla_loss.item(), adv.item()
        _, _, _, _, _, z_neutral, _ = vae(pred_neutral + mean, expression_levels <= 0.1)
        latent = F.l1_loss(z_neutral, z_id)
        loss += latent * args.lambda7
        latent.item()
        total = loss.item()
        loss.backward()
        opt_vae.step()
        return total

    return step


def run_child(side: str, shape: str, B: int, steps: int, warmup: int, reference_dir: str | None,
              profile: bool, threads: int | None, facedis_root: str | None = None) -> dict:
    import resource

    if facedis_root:  # time the faithful step of another facedis checkout (--against)
        sys.path.insert(0, os.path.abspath(facedis_root))
    import torch

    if threads:
        torch.set_num_threads(threads)
    step = build_authors(shape, B, reference_dir) if side == "authors" else build_faithful(shape, B)
    for _ in range(warmup):
        step()
    res = {"side": side, "shape": shape, "B": B, "threads": torch.get_num_threads()}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            t = time.perf_counter()
            step()
            res["times"] = [time.perf_counter() - t]
        res["table"] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=48)
        res["table_shapes"] = p.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40, max_shapes_column_width=70)
    else:
        times, cpu = [], []
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            res["loss"] = step()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        res["times"], res["cpu_times"] = times, cpu
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", default=None, help="a checkout of the authors' public code (required)")
    ap.add_argument("--shapes", default="coma", help="comma list of " + ",".join(SHAPES) + " (default coma)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: all)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler op table per side (1 step)")
    ap.add_argument("--against", action="append", default=[], metavar="DIR",
                    help="also time the faithful step of the facedis checkout in DIR (e.g. before a change), "
                         "interleaved with the others; repeatable")
    ap.add_argument("--facedis-root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-hugetlb", action="store_true", help="do not re-exec with GLIBC_TUNABLES=" + HUGETLB)
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    problem = check_reference_dir(args.reference_dir)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    if args.child:  # side:shape:B:steps:warmup
        side, shape, B, steps, warmup = args.child.split(":")
        res = run_child(side, shape, int(B), int(steps), int(warmup), args.reference_dir, args.profile, args.threads,
                        args.facedis_root)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    if not args.no_hugetlb and HUGETLB not in os.environ.get("GLIBC_TUNABLES", ""):
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES", ""), HUGETLB) if x)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)

    import torch

    shapes = args.shapes.split(",")
    roots = {"authors": None, "faithful": None}
    for i, d in enumerate(args.against):
        name = f"faithful@{Path(d).resolve().name or i}"
        roots[name if name not in roots else f"{name}#{i}"] = d
    sides = list(roots)
    rounds, steps = (1, 1) if args.profile else (args.rounds, args.steps)
    print(f"# facedis anchor: faithful vs the authors' step  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"# cpu: {os.cpu_count()} logical CPUs  torch {torch.__version__}  threads {args.threads or torch.get_num_threads()}"
          f"  GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (every side)")
    for side, d in roots.items():
        if d:
            print(f"# {side}: the faithful step of {d}")
    print(f"# B={args.batch}, {steps} timed steps after {args.warmup} warm-up per subprocess, {rounds} interleaved "
          f"rounds, shapes {shapes}")
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for shape in shapes:
            order = sides[r % len(sides):] + sides[:r % len(sides)]  # rotate who goes first
            for side in order:
                kind = "authors" if side == "authors" else "faithful"
                cmd = [sys.executable, os.path.abspath(__file__), "--reference-dir", args.reference_dir,
                       "--child", f"{kind}:{shape}:{args.batch}:{steps}:{args.warmup}"]
                if roots[side]:
                    cmd += ["--facedis-root", roots[side]]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if args.profile:
                    cmd += ["--profile"]
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode != 0 or not line:
                    print(f"# {shape}/{side} FAILED rc={p.returncode}\n{p.stderr[-3000:]}")
                    return 1
                res = json.loads(line[-1][7:])
                results.setdefault((shape, side), []).append(res)
                med = statistics.median(res["times"])
                cpu = f"  CPU {statistics.median(res['cpu_times']):7.3f} s" if "cpu_times" in res else ""
                print(f"#   round {r + 1} {shape:9s} {side:16s} step {med:7.3f} s  ({args.batch / med:.2f} samples/s){cpu}"
                      f"  peak RSS {res['peak_rss_gib']:.2f} GiB", flush=True)
                if args.profile:
                    print(f"\n## {shape} {side}: ops by self CPU time\n{res['table']}\n{res['table_shapes']}")

    if args.profile:
        return 0
    print()
    print(f"{'shape':9s} {'side':16s} {'samples/s':>9s} {'vs authors':>10s}   {'best s/s':>8s} {'vs authors':>10s}   "
          f"{'CPU s/step':>10s} {'CPU vs authors':>14s}")
    summary = []
    for shape in shapes:
        med = lambda side, key: statistics.median([t for r in results[(shape, side)] for t in r[key]])  # noqa: E731
        best = lambda side: args.batch / min(t for r in results[(shape, side)] for t in r["times"])  # noqa: E731
        base_sps, base_best, base_cpu = args.batch / med("authors", "times"), best("authors"), med("authors", "cpu_times")
        for side in sides:
            sps, cpu = args.batch / med(side, "times"), med(side, "cpu_times")
            row = dict(shape=shape, side=side, samples_per_s=sps, ratio=sps / base_sps, best_samples_per_s=best(side),
                       best_ratio=best(side) / base_best, cpu_s=cpu, cpu_ratio=base_cpu / cpu)
            summary.append(row)
            print(f"{shape:9s} {side:16s} {sps:9.2f} {row['ratio']:9.2f}x   {row['best_samples_per_s']:8.2f} "
                  f"{row['best_ratio']:9.2f}x   {cpu:10.2f} {row['cpu_ratio']:13.2f}x")
    print("\nsamples/s: from the median wall time of all timed steps; vs authors > 1.00x: faster than the authors' "
          "step.\nbest s/s: from the fastest timed step (the machine at its quietest; on a shared machine other jobs "
          "only ever slow a step down).\nCPU s/step: median process CPU time per step (all threads); its ratio is "
          "authors / side.")
    if args.json:
        raw = {f"{k[0]}/{k[1]}": [{x: y for x, y in r.items() if not x.startswith("table")} for r in v]
               for k, v in results.items()}
        Path(args.json).write_text(json.dumps(dict(B=args.batch, summary=summary, raw=raw,
                                                   tunables=os.environ.get("GLIBC_TUNABLES", "")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
