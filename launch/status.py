"""Job state and last metrics of a grid's runs (entry script of a source checkout; the same as
``facedis status ...``).

    python launch/status.py runs/ablation [--json] [--no-scheduler]

Needs the ``cluster`` extra. The code lives in ``facedis/cluster/status.py``; see docs/cluster.md.
"""
import sys

from facedis.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("status", sys.argv[1:], prog="python launch/status.py"))
