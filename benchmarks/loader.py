"""Training-loader throughput: samples/s of FaceDataset batches (face + partner + neutral).

    python benchmarks/loader.py                      # generates a V=5023 synthetic set in a temp dir
    python benchmarks/loader.py --root data/synth --workers 2 --batch-size 32

Reports samples/s for the in-RAM fast path with the requested worker counts (default 0 and 2).
With workers, two loaders are measured: the engine's (``SlotLoader``: workers gather into reused
shared-memory slots, what training uses when ``data.num_workers > 0``) and a plain DataLoader
whose workers return a freshly allocated shared-memory batch each time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

def _prepare(out: Path, subjects: int, per_subject: int, vertices: int) -> None:
    from facedis.prep import synth

    opts = synth.default_options(subjects=subjects, per_subject=per_subject, region="face", vertices=vertices)
    synth.write(synth.generate(**opts), out)


def bench(root, workers: int, batch_size: int, epochs: int, in_memory: str, touch: bool,
          reuse: bool) -> tuple[float, int]:
    from facedis.data import make_train_loader

    loader = make_train_loader(root, "train", batch_size=batch_size, shuffle=True, seed=0, num_workers=workers,
                               drop_last=True, in_memory=in_memory, reuse_buffers=reuse)
    n = 0
    loader.dataset.set_epoch(0)
    for b in loader:  # warm-up epoch: starts the workers
        pass
    t0 = time.perf_counter()
    for ep in range(1, epochs + 1):
        loader.dataset.set_epoch(ep)
        for b in loader:
            n += len(b["vertices"])
            if touch:
                float(b["vertices"][:, 0, 0].sum() + b["partner"][:, 0, 0].sum() + b["neutral"][:, 0, 0].sum())
    dt = time.perf_counter() - t0
    assert b["vertices"].shape[1:] == b["partner"].shape[1:] == b["neutral"].shape[1:]
    V = b["vertices"].shape[1]
    del loader
    return n / dt, V


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="prepared data set (default: generate one in a temp dir)")
    p.add_argument("--vertices", type=int, default=5023)
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--per-subject", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--in-memory", default="yes", choices=["yes", "no", "auto"])
    p.add_argument("--touch", action="store_true", help="read one value of every mesh of every batch")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "synth5023"
            t0 = time.perf_counter()
            _prepare(root, args.subjects, args.per_subject, args.vertices)
            print(f"prepared {args.subjects * args.per_subject} meshes in {time.perf_counter() - t0:.1f} s")
        for w in args.workers:
            for reuse in ([False] if w == 0 else [True, False]):
                rate, V = bench(root, w, args.batch_size, args.epochs, args.in_memory, args.touch, reuse)
                kind = "in-process" if w == 0 else ("SlotLoader (engine)" if reuse else "plain DataLoader")
                print(f"V={V} batch={args.batch_size} workers={w} {kind:20s} in_memory={args.in_memory}: "
                      f"{rate:>9,.0f} samples/s (face + partner + neutral)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
