"""``python -m facedis ...`` = the ``facedis`` command (facedis/cli.py)."""
import sys

from facedis.cli import main

if __name__ == "__main__":
    sys.exit(main())
