"""Submit training runs with submitit (entry script of a source checkout; the same as ``facedis submit ...``).

    python launch/submit.py --grid ablation --seeds 0 1 2 --gpus-per-node 4 --partition gpu --time 24:00:00
    python launch/submit.py --config configs/synth.yaml --seeds 0 --cluster local --gpus-per-node 0

Needs the ``cluster`` extra (``pip install -e '.[cluster]'``). The code lives in ``facedis/cluster/``;
see docs/cluster.md.
"""
import sys

from facedis.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("submit", sys.argv[1:], prog="python launch/submit.py"))
