"""The ``facedis`` command: one entry point for every tool.

    facedis train --config synth [--section.key=value ...]     # = accelerate launch facedis/train.py
    facedis prepare synth --out data/synth                      # = python data_prep/prepare.py
    facedis tune --dataset synth --smoke-test                   # = python sweeps/tune.py   (facedis[sweep])
    facedis submit --grid ablation --seeds 0 1 2 ...            # = python launch/submit.py (facedis[cluster])
    facedis status runs/ablation                                # = python launch/status.py (facedis[cluster])
    facedis aggregate runs/ablation --out reports/ablation      # = python launch/aggregate.py
    facedis apps figures --run runs/synth                       # = python -m facedis.apps
    facedis --version

Each sub-command runs the ``main(argv)`` of the module the source checkout's script calls, so the
two are one code path. ``python -m facedis ...`` is the same command (e.g. under
``accelerate launch -m facedis train ...``). ``facedis <command> --help`` lists the options; for
``train`` it lists every config field with its type, default and meaning.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys

import facedis
from facedis.extras import MissingExtraError

#: sub-command -> (module whose ``main(argv)`` runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("facedis.train", "train, resume or re-evaluate a run"),
    "prepare": ("facedis.prep.prepare", "prepare (or check) a data set"),
    "tune": ("facedis.sweeps.tune", "Ray Tune sweep over loss weights and latent sizes (needs facedis[sweep])"),
    "submit": ("facedis.cluster.submit", "submit runs to Slurm or locally with submitit (needs facedis[cluster])"),
    "status": ("facedis.cluster.status", "job state and last metrics of a grid's runs (needs facedis[cluster])"),
    "aggregate": ("facedis.cluster.aggregate", "a grid's runs as the paper's tables"),
    "apps": ("facedis.apps.__main__", "applications of a trained run: transfer, interpolate, recognise, figures"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facedis", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Adversarial 3D face disentanglement of identity and expression "
                                            "(Gu, Pears & Sun, FG 2023).",
                                epilog="Run 'facedis <command> --help' for a command's options.")
    p.add_argument("-V", "--version", action="version", version=f"facedis {facedis.__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def run_command(name: str, argv: list[str], prog: str | None = None) -> int:
    """Run sub-command ``name`` with ``argv``; a missing extra is a one-line error (exit status 1)."""
    module = COMMANDS[name][0]
    prog = prog or f"facedis {name}"
    try:
        main = importlib.import_module(module).main
        kwargs = {"prog": prog} if "prog" in inspect.signature(main).parameters else {}
        return int(main(list(argv), **kwargs) or 0)
    except MissingExtraError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    parser.parse_args(argv)  # --help, --version, or an error naming the commands (exit status 2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
