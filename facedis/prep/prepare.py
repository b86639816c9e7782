"""Prepare a facedis data set: ``facedis prepare {synth,coma,bu3dfe,facescape,custom,check} ...``
(the same as ``python data_prep/prepare.py ...`` in a source checkout, or ``python -m facedis.prep.prepare``).

Each data source is a module ``facedis/prep/<name>.py`` registered in :data:`SOURCES` and imported
lazily (only the chosen one is imported). A source module exposes::

    def add_arguments(parser: argparse.ArgumentParser) -> None   # its own options
    def prepare(args: argparse.Namespace) -> pathlib.Path          # writes the data set, returns its path

This script adds ``--out`` (required), ``--overwrite`` and ``--shard-size`` to every source
unless the module's ``add_arguments`` already defines them, runs ``prepare``, then validates the
result with :func:`facedis.shards.check_dataset` and prints a summary.

``facedis prepare check <dir> [--no-hashes]`` validates an existing data set; it exits
with status 1 and a message naming the bad file when a shard is missing, truncated or modified.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

#: subcommand -> (module, one-line description). Add a data set by adding a line here.
SOURCES: dict[str, tuple[str, str]] = {
    "synth": ("facedis.prep.synth", "synthetic CoMA-like faces from the embedded ICT-FaceKit model"),
    "coma": ("facedis.prep.coma", "CoMA (12 subjects, FLAME topology; seen-identity protocol)"),
    "bu3dfe": ("facedis.prep.bu3dfe", "BU-3DFE (100 subjects; unseen-identity protocol)"),
    "facescape": ("facedis.prep.facescape", "FaceScape (unseen-identity protocol, decimated)"),
    "custom": ("facedis.prep.custom", "your own registered meshes (one topology)"),
}


def load_source(name: str):
    """Import the module of data source ``name`` (clear error when it is not available)."""
    modname = SOURCES[name][0]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise SystemExit(f"prepare: data source {name!r} is not available ({modname} is missing)") from None
        raise
    for attr in ("add_arguments", "prepare"):
        if not callable(getattr(mod, attr, None)):
            raise SystemExit(f"prepare: {modname} does not define {attr}()")
    return mod


def _add_common(p: argparse.ArgumentParser) -> None:
    have = set(p._option_string_actions)
    if "--out" not in have:
        p.add_argument("--out", required=True, help="output data set directory")
    if "--overwrite" not in have:
        p.add_argument("--overwrite", action="store_true", help="replace an existing data set at --out")
    if "--shard-size" not in have:
        p.add_argument("--shard-size", type=int, default=2048, help="samples per shard file (default 2048)")


def build_parser(command: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only the source named ``command`` (if any) is imported to add its options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*SOURCES, "check"]) + "}")
    for name, (_, help_) in SOURCES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            load_source(name).add_arguments(sp)
            _add_common(sp)
    cp = sub.add_parser("check", help="validate a prepared data set and print a summary",
                        description="validate a prepared data set and print a summary")
    cp.add_argument("root", help="data set directory")
    cp.add_argument("--no-hashes", action="store_true", help="skip sha256 verification of the files")
    cp.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _print_summary(summary: dict) -> None:
    print(f"data set {summary['root']}: {summary['dataset']} ({summary['protocol']}), "
          f"V={summary['num_vertices']}, F={summary['num_triangles']}, content {summary['content_hash'][:16]}")
    for split, s in summary["splits"].items():
        extra = f", {s['subjects_without_neutral']} without neutral GT" if s["subjects_without_neutral"] else ""
        print(f"  {split:>6}: {s['samples']} samples, {s['subjects']} subjects, {s['shards']} shard(s){extra}")


def check(root: str, verify_hashes: bool = True, as_json: bool = False) -> int:
    from facedis.shards import DatasetError, check_dataset

    try:
        summary = check_dataset(root, verify_hashes=verify_hashes)
    except DatasetError as e:
        print(f"check FAILED: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        _print_summary(summary)
        print("check OK" + ("" if verify_hashes else " (hashes not verified)"))
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SOURCES else None, prog=prog).parse_args(argv)
    if args.command == "check":
        return check(args.root, verify_hashes=not args.no_hashes, as_json=args.json)
    mod = load_source(args.command)
    t0 = time.perf_counter()
    out = Path(mod.prepare(args))
    elapsed = time.perf_counter() - t0
    from facedis.shards import check_dataset

    summary = check_dataset(out, verify_hashes=False)
    _print_summary(summary)
    print(f"prepared {args.command} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
