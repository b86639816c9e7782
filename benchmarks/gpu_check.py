"""One-command check of a GPU machine (sized for ≤ 8 minutes on one GPU): does facedis train, fast, on it?

    python benchmarks/gpu_check.py                     # everything this machine can run
    python benchmarks/gpu_check.py --json out.json     # also write the raw results
    python benchmarks/gpu_check.py --quick             # fewer steps (a sanity run)
    python benchmarks/gpu_check.py --cpu               # the CPU mode even where a GPU is visible

With a CUDA device it runs

- **data**: a small synthetic data set prepared as the ``synth`` preset does on first use
  (``python -m facedis.prep.prepare synth ...``; ``--subjects``, ``--data-root``);
- **train**: the ``synth`` preset through the real entry point (``facedis/train.py``, one process
  per run, ``--train.epochs`` / ``--train.max_steps_per_epoch`` kept small) in fp32, bf16 and fp16
  (one GradScaler per optimiser), each eager and with ``train.compile=true``; each run must exit 0,
  with finite losses in every ``metrics.jsonl`` line and in ``metrics.json``, on the expected device
  and precision (``provenance.json``), and fp16 must have checkpointed both GradScalers;
- **step benchmark**: ``benchmarks/step.py --shapes coma --json ...`` (faithful, fast-fp32, fast-bf16
  at the CoMA shape, B=32), reporting samples/s and the % of the measured bf16 matmul peak;
- **prefetcher**: ``facedis.data.DevicePrefetcher`` yields the same batches as the plain loader, on
  the device, and its host->device copies overlap compute (pinned batches, timed against copying
  and computing one after the other);
- **DDP**: ``accelerate launch --multi_gpu --num_processes N facedis/train.py ...`` when more than
  one GPU is visible (world size, one summary, finite metrics).

Without a CUDA device (or with ``--cpu``) it runs the CPU parts: the data, fp32/bf16/fp16 training
on CPU (facedis runs fp16 on CPU through ``torch.autocast("cpu", float16)`` and a CPU GradScaler),
a short step benchmark (CoMA shape, batch 1, the fast step) and the prefetcher's batches; the rest
is listed as skipped with the reason. ``torch.compile`` on CPU builds C++ kernels for minutes, so
the compiled runs are skipped there unless ``--cpu-compile``; ``--cpu-ddp`` runs the DDP check with
two CPU processes (gloo).

It prints one table (check, device, precision, compile, status, time, key figure) and exits 1 when
any check failed (0 otherwise, 2 for a bad command line). ``--inject-nan`` is the self-test: the
fp32 eager run trains with ``optim.lr_vae=1e30``, its loss goes non-finite and the check must fail.
Outputs (data, run directories, one log per subprocess) go to ``--work`` (default: a new
temporary directory), and are kept for inspection.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_SCRIPT = ROOT / "facedis" / "train.py"
STEP_BENCH = ROOT / "benchmarks" / "step.py"

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # table name -> train.precision
NAN_LR = "1e30"  # --inject-nan: Adam moves every weight by ~lr, the next forward overflows


# ---------------------------------------------------------------------------------------------
# results and the table
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    check: str
    device: str
    precision: str = "-"
    compile: str = "-"
    status: str = "pass"  # pass | FAIL | skipped
    reason: str = ""  # why it failed or was skipped
    time_s: Optional[float] = None
    key: str = ""  # the key figure
    details: dict = field(default_factory=dict)
    log: Optional[str] = None

    def failed(self, reason: str) -> "Result":
        self.status, self.reason = "FAIL", reason
        return self


def skipped(check: str, device: str, reason: str, precision: str = "-", compile_: str = "-") -> Result:
    return Result(check, device, precision, compile_, status="skipped", reason=reason)


def status_text(r: Result) -> str:
    return f"skipped: {r.reason}" if r.status == "skipped" else r.status


def key_text(r: Result) -> str:
    if r.status == "FAIL":
        return r.reason + (f" (log: {r.log})" if r.log else "")
    return r.key


def format_table(results: list[Result]) -> str:
    head = ("check", "device", "precision", "compile", "status", "time", "key figure")
    rows = [(r.check, r.device, r.precision, r.compile, status_text(r),
             "-" if r.time_s is None else f"{r.time_s:.1f} s", key_text(r)) for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def guarded(fallback: Result, fn, *args):
    """``fn(*args)``; an exception inside a check makes ``fallback`` a failed row, so the table still prints."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any crash of a check is that check's failure
        return fallback.failed(f"{type(e).__name__}: {e}")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_logged(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None,
               cwd: Optional[Path] = None) -> tuple[int, float]:
    """Run ``cmd`` with stdout+stderr to ``log``; ``(exit status, seconds)``, status 124 on timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        # its own process group, so that a timeout also ends what it started (launcher workers, compile workers)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            f.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
            rc = 124
        except BaseException:  # Ctrl-C: take the run down with us
            _kill_group(p)
            raise
    return rc, time.perf_counter() - t


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the process group of ``p`` (started with ``start_new_session``, not yet reaped, so its
    id still names that group) and reap ``p``."""
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def stopped_line(log: Path) -> str:
    """The ``facedis: ...`` error line the entry point prints, or the log's last line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("facedis: ") and not ln.startswith("facedis: finished"):
            return ln
    return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def prepare_args(subjects: int, per_subject: int) -> list[str]:
    """The ``synth`` preset's ``data.prepare`` with fewer identities (same topology, V=300)."""
    return ["synth", "--subjects", str(subjects), "--per-subject", str(per_subject), "--frames-per-sequence", "4",
            "--vertices", "300", "--seed", "0", "--protocol", "unseen-identity"]


def check_data(root: Path, args, session: Path) -> Result:
    r = Result("data: prepare synth", "cpu")
    if (root / "meta.json").is_file():
        r.key = f"using the prepared set {root}"
    else:
        log = session / "logs" / "prepare.log"
        cmd = [sys.executable, "-m", "facedis.prep.prepare", *prepare_args(args.subjects, args.per_subject),
               "--out", str(root)]
        rc, r.time_s = run_logged(cmd, log, timeout=600, cwd=session)
        r.log = str(log)
        if rc != 0 or not (root / "meta.json").is_file():
            return r.failed(f"preparation exited {rc}")
    try:
        meta = json.loads((root / "meta.json").read_text())
        splits = meta.get("splits") or {}
        sizes = {k: (v.get("num_samples") if isinstance(v, dict) else v) for k, v in splits.items()}
        r.key = (r.key + "; " if r.key else "") + f"V={meta.get('num_vertices')}, " + \
            ", ".join(f"{k} {n}" for k, n in sizes.items())
    except (OSError, ValueError, AttributeError):
        pass
    return r


# ---------------------------------------------------------------------------------------------
# training runs (the real entry point, one subprocess each)
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainSpec:
    name: str
    precision: str  # fp32 | bf16 | fp16
    compile: bool
    device: str  # cuda | cpu
    inject_nan: bool = False


def train_overrides(spec: TrainSpec, args, data_root: Path, run_dir: Path, batch: int) -> list[str]:
    prep = "[" + ", ".join(prepare_args(args.subjects, args.per_subject)) + "]"
    over = [
        f"--data.root={data_root}", f"--data.prepare={prep}",
        f"--run.dir={run_dir}", f"--run.artefact_dir={run_dir / 'artefacts'}",
        f"--train.epochs={args.epochs}", f"--train.max_steps_per_epoch={args.steps}",
        f"--train.log_every_steps={args.steps}", "--train.progress=false", f"--train.batch_size={batch}",
        # quoted: YAML reads a bare `no` as false, which is not a precision
        f"--train.precision='{PRECISIONS[spec.precision]}'",
        f"--train.compile={'true' if spec.compile else 'false'}",
    ]
    if spec.device == "cpu":
        over.append("--train.cpu=true")
    if spec.inject_nan:
        over.append(f"--optim.lr_vae={NAN_LR}")
    return over


def check_run_dir(r: Result, run_dir: Path, spec_precision: str, device: str, epochs: int,
                  world: int = 1) -> Result:
    """The run directory of a finished run: finite losses everywhere, device, precision, world size."""
    mj, ml = run_dir / "metrics.json", run_dir / "metrics.jsonl"
    if not mj.is_file():
        return r.failed("no metrics.json (the run did not finish)")
    final = json.loads(mj.read_text())
    lines = [json.loads(x) for x in ml.read_text().splitlines() if x.strip()] if ml.is_file() else []
    if len(lines) != epochs:
        return r.failed(f"metrics.jsonl has {len(lines)} lines, expected {epochs}")
    for rec in [final, *lines]:
        bad = [k for k, v in rec.items() if k.startswith(("train/", "E_rec", "AVD_neu")) and not finite(v)]
        if bad:
            return r.failed(f"non-finite {', '.join(bad[:3])} (epoch {rec.get('epoch')})")
    if "train/total" not in final or "E_rec_mean" not in final:
        return r.failed("metrics.json lacks train/total or E_rec_mean")
    prov = json.loads((run_dir / "provenance.json").read_text())
    session = (prov.get("sessions") or [{}])[-1]
    r.device = session.get("device", r.device) + (f" x{world}" if world > 1 else "")
    if prov.get("precision") != PRECISIONS[spec_precision]:
        return r.failed(f"ran at precision {prov.get('precision')!r}, asked for {PRECISIONS[spec_precision]!r}")
    if not str(session.get("device", "")).startswith(device):
        return r.failed(f"ran on {session.get('device')!r}, expected {device}")
    if int(prov.get("world_size", 0)) != world:
        return r.failed(f"world size {prov.get('world_size')}, expected {world}")
    steps = int(final.get("global_step", 0))
    if steps < 1:
        return r.failed("no training step was taken")
    train_s = sum(x.get("time/epoch_s", 0.0) - x.get("time/eval_s", 0.0) for x in lines)
    r.details = {"final": final, "provenance_precision": prov.get("precision"), "global_step": steps}
    r.key = (f"loss {final['train/total']:.3g}, E_rec {final['E_rec_mean']:.2f} mm, "
             f"{steps} steps in {train_s:.1f} s")
    if spec_precision == "fp16":
        import torch

        state = torch.load(run_dir / "checkpoints" / "last" / "state.pt", map_location="cpu", weights_only=True)
        scalers = {k: state.get(k) for k in ("scaler_vae", "scaler_disc")}
        missing = [k for k, v in scalers.items() if not v]
        if missing:
            return r.failed(f"fp16 without GradScaler state ({', '.join(missing)})")
        scale = scalers["scaler_vae"].get("scale")
        scale = float(scale) if scale is not None else float("nan")
        if not finite(scale) or scale <= 0:
            return r.failed(f"VAE loss scale {scale}")
        r.key += f", loss scale {scale:g}"
        r.details["vae_loss_scale"] = scale
    return r


def run_training(spec: TrainSpec, args, data_root: Path, session: Path, env: dict) -> Result:
    run_dir = session / "runs" / spec.name
    log = session / "logs" / f"{spec.name}.log"
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--config", "synth",
           *train_overrides(spec, args, data_root, run_dir, args.batch)]
    r = Result("train synth" + (" (lr 1e30: must fail)" if spec.inject_nan else ""), spec.device, spec.precision,
               "yes" if spec.compile else "no", log=str(log))
    rc, r.time_s = run_logged(cmd, log, timeout=args.timeout, env=env, cwd=session)
    r.details["command"] = cmd
    if rc == 3:
        return r.failed(f"non-finite loss (exit 3): {stopped_line(log)}")
    if rc == 124:
        return r.failed(f"timed out after {args.timeout:.0f} s")
    if rc != 0:
        return r.failed(f"exit {rc}: {stopped_line(log)}")
    return check_run_dir(r, run_dir, spec.precision, spec.device, args.epochs)


def run_ddp(args, data_root: Path, session: Path, env: dict, nproc: int, device: str) -> Result:
    """``accelerate launch`` with ``nproc`` processes on the real training script."""
    name = f"ddp-{nproc}"
    run_dir = session / "runs" / name
    log = session / "logs" / f"{name}.log"
    precision = "bf16" if device == "cuda" else "fp32"
    batch = max(args.batch // nproc, 2) * nproc
    spec = TrainSpec(name, precision, False, device)
    env = dict(env)
    if device == "cpu":
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "bf16" if precision == "bf16" else "no",
           "--dynamo_backend", "no", "--main_process_port", "0",
           str(TRAIN_SCRIPT), "--config", "synth", *train_overrides(spec, args, data_root, run_dir, batch)]
    r = Result(f"DDP accelerate launch x{nproc}", f"{device} x{nproc}", precision, "no", log=str(log))
    rc, r.time_s = run_logged(cmd, log, timeout=args.timeout, env=env, cwd=session)
    r.details["command"] = cmd
    if rc != 0:
        return r.failed(("timed out" if rc == 124 else f"exit {rc}") + f": {stopped_line(log)}")
    r = check_run_dir(r, run_dir, precision, device, args.epochs, world=nproc)
    if r.status == "pass":
        summaries = log.read_text(errors="replace").count("facedis: finished")
        if summaries != 1:
            return r.failed(f"{summaries} final summaries printed (expected 1, from the main process)")
        r.key = f"world size {nproc}, global batch {batch}; " + r.key
    return r


# ---------------------------------------------------------------------------------------------
# the step benchmark (benchmarks/step.py as a subprocess, its --json parsed)
# ---------------------------------------------------------------------------------------------
def run_step_bench(args, session: Path, env: dict, cuda: bool, bf16: bool) -> list[Result]:
    """One row per variant; the rows share the benchmark's wall time equally."""
    device = "cuda" if cuda else "cpu"
    if cuda:
        variants = ["faithful", "fast-fp32"] + (["fast-bf16"] if bf16 else [])
        batch, steps, warmup = args.bench_batch or 32, (3 if args.quick else 10), (2 if args.quick else 3)
    else:
        variants = ["fast-fp32"] + (["fast-bf16"] if bf16 else [])
        batch, steps, warmup = args.bench_batch or 1, 1, 1
    if args.bench_variants:
        variants = [v.strip() for v in args.bench_variants.split(",") if v.strip()]
    out = session / "step-bench.json"
    log = session / "logs" / "step-bench.log"
    cmd = [sys.executable, str(STEP_BENCH), "--shapes", "coma", "--variants", ",".join(variants),
           "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--rounds", "1",
           "--device", device, "--json", str(out)]
    if not cuda:
        cmd.append("--quick")  # the smaller matmul-peak probe
    rc, secs = run_logged(cmd, log, timeout=args.timeout, env=env, cwd=session)
    results = []
    data = None
    if rc == 0 and out.is_file():
        try:
            data = json.loads(out.read_text())
        except ValueError:
            data = None
    rows = {row["variant"]: row for row in (data or {}).get("summary", [])}
    peaks = (data or {}).get("peaks", {})
    for v in variants:
        r = Result(f"step bench coma B={batch} {v}", device, "bf16" if v.endswith("bf16") else "fp32",
                   "no", time_s=secs / len(variants), log=str(log))
        row = rows.get(v)
        if data is None:
            results.append(r.failed(("timed out" if rc == 124 else f"exit {rc}") + ", no JSON written"))
            continue
        if row is None:
            results.append(r.failed("variant missing from the JSON (it failed; see the log)"))
            continue
        losses = [x.get("loss") for x in row.get("raw", [])]
        if not losses or not all(finite(x) for x in losses):
            results.append(r.failed(f"non-finite loss {losses}"))
            continue
        if not finite(row.get("samples_per_s")) or row["samples_per_s"] <= 0:
            results.append(r.failed(f"samples/s {row.get('samples_per_s')}"))
            continue
        parts = [f"{row['samples_per_s']:.1f} samples/s"]
        if row.get("pct_bf16") is not None:
            parts.append(f"{row['pct_bf16']:.1f}% of bf16 peak ({peaks['bf16'] / 1e12:.1f} TFLOP/s)")
        else:
            parts.append(f"{row['pct_fp32']:.1f}% of fp32 peak ({peaks['fp32'] / 1e9:.0f} GFLOP/s; no bf16 peak here)")
        if row.get("speedup") is not None and v != "faithful":
            parts.append(f"{row['speedup']:.2f}x faithful")
        r.key = ", ".join(parts)
        r.details = {k: row.get(k) for k in ("samples_per_s", "speedup", "mem_gib", "exec_gflops", "pct_fp32",
                                             "pct_bf16")} | {"peaks": peaks, "B": batch}
        results.append(r)
    return results


# ---------------------------------------------------------------------------------------------
# the prefetcher
# ---------------------------------------------------------------------------------------------
def check_prefetch_batches(data_root: Path, device: str, args) -> Result:
    """DevicePrefetcher over the training loader: the plain loader's batches, on ``device``."""
    import torch
    from torch.utils.data import DataLoader

    from facedis.data import DevicePrefetcher, FaceDataset
    from facedis.distributed import GlobalBatchSampler

    r = Result("prefetcher: same batches", device)
    t = time.perf_counter()
    ds = FaceDataset(data_root, "train")
    cuda = device == "cuda"

    def loader():  # as facedis.engine.train_loader builds it (pinned on CUDA, as the docstring asks)
        sampler = GlobalBatchSampler(len(ds), args.batch, seed=1, max_steps=4)
        sampler.set_epoch(0)
        return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0, pin_memory=cuda,
                          generator=torch.Generator().manual_seed(0))

    plain = list(loader())
    fetched = list(DevicePrefetcher(loader(), device))
    r.time_s = time.perf_counter() - t
    if not plain:
        return r.failed(f"the loader gave no batch (train split {len(ds)} samples, batch {args.batch})")
    if len(fetched) != len(plain):
        return r.failed(f"{len(fetched)} batches, the loader gave {len(plain)}")
    want = torch.device(device).type
    for i, (a, b) in enumerate(zip(plain, fetched)):
        if set(a) != set(b):
            return r.failed(f"batch {i}: keys {sorted(b)} != {sorted(a)}")
        for k, v in b.items():
            if torch.is_tensor(v):
                if v.device.type != want:
                    return r.failed(f"batch {i} {k} on {v.device}, expected {want}")
                if not torch.equal(v.cpu(), a[k]):
                    return r.failed(f"batch {i} {k} differs from the plain loader's")
    r.key = f"{len(plain)} batches x {len(plain[0])} tensors identical, on {want}"
    return r


def check_prefetch_overlap(args) -> Result:
    """Pinned batches through DevicePrefetcher while the current stream computes on each one,
    against copying then computing on one stream; the ratio of the two times is the overlap."""
    import torch

    from facedis.data import DevicePrefetcher

    r = Result("prefetcher: copy overlap", "cuda")
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    n, mib = 8, args.overlap_mib
    host = [{"vertices": torch.empty(mib * 2**18, pin_memory=True).fill_(1.0)} for _ in range(n)]
    w = torch.randn(2048, 2048, device=dev)
    sync = torch.cuda.synchronize

    def compute(x, k):
        acc = x.sum()
        for _ in range(k):
            acc = acc + (w @ w).sum()
        return acc

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    copy_s = min(timed(lambda: host[0]["vertices"].to(dev)) for _ in range(3))
    on_dev = host[0]["vertices"].to(dev)
    one = min(timed(lambda: compute(on_dev, 20)) for _ in range(3)) / 20
    k = max(1, round(copy_s / one))  # compute about as long as a copy
    del on_dev

    def serial():
        for b in host:
            compute(b["vertices"].to(dev), k)

    def prefetched():
        for b in DevicePrefetcher(host, dev):
            compute(b["vertices"], k)

    serial(), prefetched()  # warm-up
    t_serial = min(timed(serial) for _ in range(3))
    t_pref = min(timed(prefetched) for _ in range(3))
    ratio = t_serial / t_pref
    r.time_s = time.perf_counter() - t0
    r.details = {"copy_ms": copy_s * 1e3, "matmul_ms": one * 1e3, "k_matmuls": k, "serial_ms": t_serial * 1e3, "prefetched_ms": t_pref * 1e3,
                 "ratio": ratio, "batch_mib": mib, "batches": n}
    r.key = (f"{n} x {mib} MiB: serial {t_serial * 1e3:.1f} ms, prefetched {t_pref * 1e3:.1f} ms "
             f"({ratio:.2f}x; copy {copy_s * 1e3:.1f} ms/batch)")
    if ratio < args.min_overlap:
        return r.failed(r.key + f": below {args.min_overlap}x, the copies do not overlap compute")
    return r


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--cpu", action="store_true", help="the CPU mode even where a GPU is visible")
    ap.add_argument("--quick", action="store_true", help="fewer steps per run (GPU 5, CPU 2) and a shorter benchmark")
    ap.add_argument("--work", type=Path, default=None,
                    help="directory for the data, runs and logs (default: a new temporary directory)")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="a prepared synth-like data set to use, or where to prepare one (default: WORK/data)")
    ap.add_argument("--subjects", type=int, default=None, help="identities of the prepared set (GPU 100, CPU 20)")
    ap.add_argument("--per-subject", type=int, default=8, help="meshes per identity (default 8)")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps_per_epoch (GPU 20, CPU 3; quick 5 / 2)")
    ap.add_argument("--epochs", type=int, default=1, help="train.epochs (default 1)")
    ap.add_argument("--batch", type=int, default=32, help="train.batch_size, the preset's 32 by default")
    ap.add_argument("--precisions", default="fp32,bf16,fp16", help="comma list of fp32,bf16,fp16")
    ap.add_argument("--checks", default="data,train,bench,prefetch,ddp",
                    help="comma list of data,train,bench,prefetch,ddp (data is always prepared when needed)")
    ap.add_argument("--jobs", type=int, default=None, help="training runs at once (GPU 3, CPU 2)")
    ap.add_argument("--cpu-compile", action="store_true", help="CPU mode: also the train.compile=true runs (minutes)")
    ap.add_argument("--cpu-ddp", action="store_true", help="CPU mode: the DDP check with 2 CPU processes (gloo)")
    ap.add_argument("--ddp-procs", type=int, default=None, help="processes of the DDP check (default: every GPU)")
    ap.add_argument("--bench-batch", type=int, default=None, help="step benchmark batch (GPU 32, CPU 1)")
    ap.add_argument("--bench-variants", default=None,
                    help="step benchmark variants (GPU faithful,fast-fp32,fast-bf16; CPU fast-fp32[,fast-bf16])")
    ap.add_argument("--overlap-mib", type=int, default=128, help="size of a pinned batch in the overlap check")
    ap.add_argument("--min-overlap", type=float, default=1.25,
                    help="serial/prefetched time ratio the overlap check needs (default 1.25)")
    ap.add_argument("--timeout", type=float, default=480, help="seconds allowed per subprocess (default 480)")
    ap.add_argument("--inject-nan", action="store_true",
                    help=f"self-test: the fp32 eager run uses optim.lr_vae={NAN_LR}, its loss goes non-finite and "
                         "the check must exit 1")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    precs = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precs if p not in PRECISIONS]
    if bad or not precs:
        ap.error(f"--precisions: unknown {bad}; valid: {', '.join(PRECISIONS)}")
    args.precision_list = precs
    checks = {c.strip() for c in args.checks.split(",") if c.strip()}
    unknown = checks - {"data", "train", "bench", "prefetch", "ddp"}
    if unknown:
        ap.error(f"--checks: unknown {sorted(unknown)}; valid: data, train, bench, prefetch, ddp")
    args.check_set = checks
    if args.inject_nan and ("train" not in checks or "fp32" not in precs):
        ap.error("--inject-nan needs the train check with fp32 in --precisions")
    for name in ("steps", "epochs", "batch", "per_subject", "subjects", "jobs", "overlap_mib", "ddp_procs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.batch < 2:
        ap.error("--batch must be >= 2 (BatchNorm needs more than one sample)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    from facedis.runtime import cpu_bf16_matmul

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = n_gpu > 0 and not args.cpu
    no_gpu = "--cpu given" if (n_gpu and args.cpu) else "no CUDA device"
    device = "cuda" if cuda else "cpu"
    args.subjects = args.subjects or (100 if cuda else 20)
    args.steps = args.steps or ((5 if args.quick else 20) if cuda else (2 if args.quick else 3))
    jobs = args.jobs or (3 if cuda else min(2, os.cpu_count() or 1))
    cpu_bf16 = cpu_bf16_matmul()
    gpu_bf16 = cuda and torch.cuda.is_bf16_supported()

    work = args.work or Path(tempfile.mkdtemp(prefix="facedis-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    session = (work / f"check-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}").resolve()  # fresh run dirs
    session.mkdir(parents=True)
    data_root = (args.data_root or work / "data").resolve()
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu: the subprocesses must not pick the GPU up either

    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"# facedis GPU check  {time.strftime('%Y-%m-%d %H:%M:%S')}  mode: {device}"
          f"{'' if cuda else f' ({no_gpu})'}", flush=True)
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, {n_gpu} GPU(s) visible"
          f"{f' ({name})' if cuda else ''}; work dir {session}", flush=True)
    print(f"# data {data_root} ({args.subjects} identities x {args.per_subject}), runs: {args.epochs} epoch(s) x "
          f"{args.steps} steps, batch {args.batch}, precisions {','.join(args.precision_list)}", flush=True)

    results: list[Result] = []

    def note(r: Result) -> Result:
        print(f"#   {r.check:40s} {r.device:8s} {r.precision:5s} {r.compile:4s} {status_text(r)}"
              + (f"  {key_text(r)}" if r.status != "skipped" else ""), flush=True)
        return r

    # --- data
    need_data = bool(args.check_set & {"data", "train", "prefetch", "ddp"})
    data_ok = True
    if need_data:
        r = note(check_data(data_root, args, session))
        results.append(r)
        data_ok = r.status == "pass"

    # --- training
    if "train" in args.check_set:
        specs: list[TrainSpec] = []  # in table order: eager then compiled, fp32 bf16 fp16
        for comp in (False, True):
            for p in args.precision_list:
                if comp and not cuda and not args.cpu_compile:
                    continue
                if p == "bf16" and cuda and not gpu_bf16:
                    continue
                specs.append(TrainSpec(f"{p}-{'compile' if comp else 'eager'}", p, comp, device,
                                       inject_nan=args.inject_nan and p == "fp32" and not comp))
        if not data_ok:
            done = {s.name: Result("train synth", device, s.precision, "yes" if s.compile else "no").failed("no data set")
                    for s in specs}
        else:
            with futures.ThreadPoolExecutor(max_workers=jobs) as pool:
                # the compiled (slow) runs start first when several run at once
                fut = {pool.submit(guarded, Result("train synth", device, s.precision, "yes" if s.compile else "no"),
                                   run_training, s, args, data_root, session, env): s
                       for s in sorted(specs, key=lambda s: not s.compile)}
                done = {fut[f].name: note(f.result()) for f in futures.as_completed(fut)}
        results += [done[s.name] for s in specs]
        if cuda and not gpu_bf16 and "bf16" in args.precision_list:
            results.append(note(skipped("train synth", "cuda", "this GPU has no bf16", "bf16", "no,yes")))
        if not cuda and not args.cpu_compile:
            results.append(note(skipped("train synth", "cpu", "torch.compile on CPU takes minutes (--cpu-compile)",
                                        ",".join(args.precision_list), "yes")))
        if not cuda:
            results.append(note(skipped("train synth", "cuda", no_gpu, ",".join(args.precision_list), "no,yes")))

    # --- DDP (before the benchmark, which wants the machine to itself)
    if "ddp" in args.check_set:
        nproc = args.ddp_procs or n_gpu
        if cuda and n_gpu > 1:
            fallback = Result("DDP accelerate launch", "cuda")
            results.append(note(guarded(fallback, run_ddp, args, data_root, session, env, min(nproc, n_gpu), "cuda")
                                if data_ok else fallback.failed("no data set")))
        else:
            why = no_gpu if not cuda else f"{n_gpu} CUDA device visible (needs 2 or more)"
            results.append(note(skipped("DDP accelerate launch", "cuda", why)))
        if args.cpu_ddp:
            fallback = Result("DDP accelerate launch x2", "cpu")
            results.append(note(guarded(fallback, run_ddp, args, data_root, session, env, 2, "cpu")
                                if data_ok else fallback.failed("no data set")))

    # --- step benchmark
    if "bench" in args.check_set:
        bench = guarded(Result("step bench coma", device), run_step_bench, args, session, env, cuda,
                        gpu_bf16 if cuda else cpu_bf16)
        for r in bench if isinstance(bench, list) else [bench]:
            results.append(note(r))
        if cuda and not gpu_bf16:
            results.append(note(skipped("step bench coma fast-bf16", "cuda", "this GPU has no bf16", "bf16", "no")))
        if not cuda:
            if not cpu_bf16:
                results.append(note(skipped("step bench coma fast-bf16", "cpu", "no bf16 matmul units on this CPU",
                                            "bf16", "no")))
            results.append(note(skipped("step bench coma B=32 (% of bf16 peak)", "cuda", no_gpu, "fp32,bf16", "no")))

    # --- prefetcher
    if "prefetch" in args.check_set:
        fallback = Result("prefetcher: same batches", device)
        results.append(note(guarded(fallback, check_prefetch_batches, data_root, device, args) if data_ok
                            else fallback.failed("no data set")))
        if cuda:
            results.append(note(guarded(Result("prefetcher: copy overlap", "cuda"), check_prefetch_overlap, args)))
        else:
            results.append(note(skipped("prefetcher: copy overlap", "cuda",
                                        no_gpu + " (on CPU the prefetcher passes batches through)")))

    total = time.perf_counter() - t_start
    n_fail = sum(r.status == "FAIL" for r in results)
    n_pass = sum(r.status == "pass" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    print()
    print(format_table(results))
    print()
    for r in results:
        if r.status == "FAIL" and r.log:
            print(f"--- {r.check} ({r.precision}, compile {r.compile}) failed; last lines of {r.log}:")
            print(tail(Path(r.log)))
    verdict = "FAILED" if n_fail else "OK"
    print(f"gpu_check: {verdict}: {n_pass} passed, {n_fail} failed, {n_skip} skipped in {total:.0f} s "
          f"(mode {device}; outputs in {session})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "ok": not n_fail, "mode": device, "gpus": n_gpu, "gpu_name": name if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "work": str(session), "data_root": str(data_root),
            "seconds": total, "argv": sys.argv[1:] if argv is None else list(argv),
            "checks": [asdict(r) for r in results]}, indent=1, default=str))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
