"""`python -m tumorseg`: the `tumorseg` command where its script is not on PATH (a job's python, a
source tree on PYTHONPATH)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
