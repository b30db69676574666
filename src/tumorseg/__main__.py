"""`python -m tumorseg`: the `tumorseg` command where its script is not on PATH (a job's python, a
source tree on PYTHONPATH)."""

from .cli import run

if __name__ == "__main__":
    run()
