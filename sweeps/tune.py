"""Ray Tune sweep (entry script of a source checkout; the same as ``facedis tune ...``).

    python sweeps/tune.py --dataset synth --smoke-test
    python sweeps/tune.py --dataset coma --num-samples 64 --gpus-per-trial 0.5 --mode +ne-gt+id-dis
    python sweeps/tune.py --dataset coma --resume

Needs the ``sweep`` extra (``pip install -e '.[sweep]'``). The code lives in ``facedis/sweeps/``;
see docs/sweeps.md. Results go to ``sweeps/results/`` under the current directory.
"""
import sys

from facedis.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("tune", sys.argv[1:], prog="python sweeps/tune.py"))
