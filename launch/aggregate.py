"""A grid's runs as the paper's tables (entry script of a source checkout; the same as
``facedis aggregate ...``).

    python launch/aggregate.py runs/ablation --out reports/ablation [--seeds 0 1 2]

The code lives in ``facedis/cluster/aggregate.py``; see docs/cluster.md.
"""
import sys

from facedis.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("aggregate", sys.argv[1:], prog="python launch/aggregate.py"))
