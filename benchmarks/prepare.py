"""Benchmark: packing a CoMA-sized PLY tree into shards (meshes/s).

Generates ``--meshes`` FLAME-topology (5,023 v / 9,976 f) binary little-endian PLY frames in the
CoMA layout (``FaceTalk_*/<seq>/<seq>.NNNNNN.ply``; FLAME-open basis from ../shared when present,
else a random 5,023-vertex mesh with the same file size), then times
``facedis.prep.coma.prepare`` (two streaming passes: levels, then shards) end to end.

    python benchmarks/prepare.py --meshes 2000 --workers 2
Target: >= 500 meshes/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from facedis.prep import coma
from facedis.prep.meshio import read_ply, write_ply

FLAME = Path(__file__).resolve().parents[2] / "shared" / "data" / "flame2023_open" / "basis.npz"


def make_tree(root: Path, n: int, subjects: int = 4, sequences: int = 5, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    if FLAME.is_file():
        d = np.load(FLAME)
        T, F, B = d["template"].astype(np.float64), d["faces"], d["shapedirs"].astype(np.float64)
    else:
        T = rng.normal(size=(5023, 3)) * 0.1
        F = rng.integers(0, 5023, size=(9976, 3)).astype(np.int32)
        B = rng.normal(size=(5023, 3, 10)) * 0.003
    per = n // (subjects * sequences)
    names = ["bareteeth", "cheeks_in", "eyebrow", "high_smile", "mouth_side"][:sequences]
    for s in range(subjects):
        neutral = T + B @ rng.standard_normal(B.shape[2])
        for q in names:
            d = root / f"FaceTalk_{s:03d}_TA" / q
            d.mkdir(parents=True)
            field = rng.normal(size=T.shape) * 0.002
            for t in range(per):
                write_ply(d / f"{q}.{t + 1:06d}.ply", neutral + np.sin(np.pi * t / max(per - 1, 1)) * field, F)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meshes", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    work = Path(a.dir or tempfile.mkdtemp(prefix="facedis-bench-prepare-"))
    raw, out = work / "raw", work / "out"
    if raw.exists():
        shutil.rmtree(raw)
    t0 = time.perf_counter()
    make_tree(raw, a.meshes)
    files = sorted(raw.rglob("*.ply"))
    gen_s = time.perf_counter() - t0
    # raw reader speed (single process, warm page cache)
    t0 = time.perf_counter()
    for p in files[:500]:
        read_ply(p, faces=False)
    read_ms = (time.perf_counter() - t0) / min(500, len(files)) * 1e3
    p = argparse.ArgumentParser()
    coma.add_arguments(p)
    args = p.parse_args(["--raw", str(raw), "--out", str(out), "--overwrite", "--workers", str(a.workers),
                         "--progress", "0", "--test-period", "100", "--test-length", "10"])
    t0 = time.perf_counter()
    coma.prepare(args)
    prep_s = time.perf_counter() - t0
    res = {"meshes": len(files), "workers": a.workers, "cpu_count": os.cpu_count(),
           "generate_s": round(gen_s, 2), "read_ply_ms_per_mesh": round(read_ms, 3),
           "prepare_s": round(prep_s, 2), "meshes_per_s": round(len(files) / prep_s, 1),
           "flame_topology": FLAME.is_file()}
    print(json.dumps(res))
    if not a.keep and a.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
