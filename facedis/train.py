"""Command line: train, resume or re-evaluate a run (``facedis train`` is this module's ``main``).

    facedis train --config synth [--section.key=value ...]          # a shipped preset, from any directory
    accelerate launch facedis/train.py --config configs/synth.yaml [--section.key=value ...]
    accelerate launch facedis/train.py --config configs/coma.yaml --loss.adv_id=1e-5 --train.precision=bf16
    accelerate launch -m facedis train --config coma                 # the same, installed (no checkout)
    facedis train --eval-only runs/synth [--data.root=...]
    facedis train --config synth --print-config

``--config`` takes a YAML file or the name of a shipped preset (``synth``, ``coma``,
``rows/coma-negt-iddis``; ``configs/<name>.yaml`` works from any directory). Overrides are dotted
keys of :class:`facedis.config.Config` (``--key=value``, ``--key value`` or ``--set key=value``;
``--help`` lists them all); unknown keys and wrong types stop before any work with the valid
choices. Rerunning the same command resumes from ``<run dir>/checkpoints/last``. Distributed:
``accelerate launch --multi_gpu --num_processes N ...`` (CPU: ``ACCELERATE_USE_CPU=true`` and
``--main_process_port 0``); ``train.batch_size`` is the global batch. See docs/training.md.

Exit status: 0 done, 2 config error, 3 non-finite loss, 128+signal after SIGTERM/SIGUSR1
(checkpoint saved: rerun to continue).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script (`accelerate launch facedis/train.py`): Python put facedis/ first on sys.path;
    # take it off, so facedis/*.py cannot shadow top-level modules (e.g. `data`, `model`, `distributed`).
    sys.path.pop(0)

import argparse  # noqa: E402


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from facedis.config import fields_help

    p = argparse.ArgumentParser(
        prog=prog,
        description="Train the identity/expression disentangling VAE (Gu, Pears & Sun, FG 2023).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any --section.key=value (or --set section.key=value) is a config override, "
               "e.g. --train.epochs=10 --loss.recon=600.\n\n" + fields_help(),
    )
    p.add_argument("--config", type=Path,
                   help="YAML file, or a shipped preset: synth, coma, bu3dfe, facescape, rows/<row>, "
                        "or configs/<name>.yaml (a run's config.yaml works too)")
    p.add_argument("--eval-only", type=Path, metavar="RUN_DIR", help="re-evaluate a finished run and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, the same as --KEY=VALUE (repeatable)")
    return p


def split_overrides(rest: list[str]) -> list[str]:
    """``["--a.b=1", "--c.d", "2", "e.f=3"]`` -> ``["a.b=1", "c.d=2", "e.f=3"]``
    (:func:`facedis.config.split_cli_overrides`)."""
    from facedis.config import split_cli_overrides

    return split_cli_overrides(rest)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from facedis import engine
    from facedis.config import ConfigError, load_config
    from facedis.loop import NonFiniteLossError, TrainingInterrupted

    args, rest = build_parser(prog).parse_known_args(argv)
    try:
        overrides = split_overrides(args.set_) + split_overrides(rest)
        if args.eval_only:
            metrics = engine.evaluate_run(args.eval_only, overrides=overrides)
            from accelerate import PartialState

            if PartialState().is_main_process:
                print("\n".join(f"  {k}: {v}" for k, v in metrics.items()))
                print(f"written {args.eval_only / 'eval.json'}")
            return 0
        if args.config is None:
            raise ConfigError("--config PRESET is required (e.g. --config synth or configs/synth.yaml), or --eval-only RUN_DIR")
        cfg = load_config(args.config, overrides=overrides)
        if args.print_config:
            import yaml

            from facedis.config import config_to_dict

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        engine.train(cfg)
        return 0
    except ConfigError as e:
        print(f"facedis: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"facedis: stopped: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        print(f"facedis: {e}", file=sys.stderr)
        return 128 + int(e.signum)


if __name__ == "__main__":
    sys.exit(main())
