"""Prepare a data set (entry script of a source checkout; the same as ``facedis prepare ...``).

    python data_prep/prepare.py synth --out data/synth
    python data_prep/prepare.py {coma,bu3dfe,facescape,custom} --raw DIR --out DIR ...
    python data_prep/prepare.py check data/synth

The code lives in ``facedis/prep/`` (installed with facedis); see docs/datasets.md.
"""
import sys

from facedis.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("prepare", sys.argv[1:], prog="python data_prep/prepare.py"))
