"""Command line: train, resume or re-evaluate a run.

    accelerate launch facedis/train.py --config configs/synth.yaml [--section.key=value ...]
    accelerate launch facedis/train.py --config configs/coma.yaml --loss.adv_id=1e-5 --train.precision=bf16
    python facedis/train.py --eval-only runs/synth [--data.root=...]
    python facedis/train.py --config configs/synth.yaml --print-config

Overrides are dotted keys of :class:`facedis.config.Config` (``--key=value`` or ``--key value``);
unknown keys and wrong types stop before any work with the valid choices. Rerunning the same
command resumes from ``<run dir>/checkpoints/last``. Distributed: ``accelerate launch
--multi_gpu --num_processes N ...`` (CPU: ``ACCELERATE_USE_CPU=true`` and ``--main_process_port 0``);
``train.batch_size`` is the global batch. See docs/training.md.

Exit status: 0 done, 2 config error, 3 non-finite loss, 128+signal after SIGTERM/SIGUSR1
(checkpoint saved: rerun to continue).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script (`accelerate launch facedis/train.py`): do not let facedis/*.py shadow
    # top-level modules (e.g. `data`, `model`).
    sys.path.pop(0)

import argparse  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facedis/train.py",
        description="Train the identity/expression disentangling VAE (Gu, Pears & Sun, FG 2023).",
        epilog="Any other --section.key=value is a config override, e.g. --train.epochs=10 --loss.recon=600.",
    )
    p.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml) or a run's config.yaml")
    p.add_argument("--eval-only", type=Path, metavar="RUN_DIR", help="re-evaluate a finished run and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def split_overrides(rest: list[str]) -> list[str]:
    """``["--a.b=1", "--c.d", "2", "e.f=3"]`` -> ``["a.b=1", "c.d=2", "e.f=3"]``."""
    from facedis.config import ConfigError

    out, i = [], 0
    while i < len(rest):
        a = rest[i]
        key = a[2:] if a.startswith("--") else a
        if "=" in key:
            out.append(key)
        elif a.startswith("--") and "." in key and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(f"{key}={rest[i + 1]}")
            i += 1
        else:
            raise ConfigError(f"unrecognised argument {a!r}: overrides look like --section.key=value "
                              "(see --help and facedis/config.py)")
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from facedis import engine
    from facedis.config import ConfigError, load_config
    from facedis.loop import NonFiniteLossError, TrainingInterrupted

    args, rest = build_parser().parse_known_args(argv)
    try:
        overrides = split_overrides(rest)
        if args.eval_only:
            metrics = engine.evaluate_run(args.eval_only, overrides=overrides)
            from accelerate import PartialState

            if PartialState().is_main_process:
                print("\n".join(f"  {k}: {v}" for k, v in metrics.items()))
                print(f"written {args.eval_only / 'eval.json'}")
            return 0
        if args.config is None:
            raise ConfigError("--config PATH is required (e.g. configs/synth.yaml), or --eval-only RUN_DIR")
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
