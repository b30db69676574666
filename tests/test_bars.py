import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from tumorseg.prepare import PrepareConfig, prepare

from factory import write_case


SRC = Path(__file__).resolve().parent.parent / "src" / "tumorseg"
INTERVAL = "from tumorseg.bars import progress_bar\nprint(progress_bar(total=1, file=open(os.devnull, 'w')).mininterval)"


def _interval(tmp_path, prelude: str = "", env: dict | None = None, stderr=None) -> str:
    """A bar's update interval in a fresh process whose stderr is a log file (or `stderr`)."""
    env = {**{k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}, **(env or {})}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.run([sys.executable, "-c", f"import os, sys, types\n{prelude}\n{INTERVAL}"], env=env,
                              stdout=subprocess.PIPE, stderr=stderr if stderr is not None else log, text=True, timeout=60)
    assert proc.returncode == 0, (tmp_path / "log").read_text()
    return proc.stdout.strip()


def test_bars_in_a_log_file_update_once_a_minute(tmp_path):
    """nohup, SLURM or `2> log`: tqdm's 0.1 s would write a line per training step; the Python API's
    bars as the command's (before, only the command set it, through TQDM_MININTERVAL)."""
    assert _interval(tmp_path) == "60.0"
    assert _interval(tmp_path, env={"TQDM_MININTERVAL": "5"}) == "5.0"  # the user's setting wins


def test_bars_in_a_terminal_or_a_notebook_keep_tqdms_pace(tmp_path):
    assert _interval(tmp_path, "sys.modules['ipykernel'] = types.ModuleType('ipykernel')") == "0.1"  # a Jupyter cell
    leader, follower = pty.openpty()
    try:
        assert _interval(tmp_path, stderr=follower) == "0.1"
    finally:
        os.close(leader)
        os.close(follower)


def test_every_bar_is_made_by_progress_bar():
    """A bar made by tqdm itself would update ten times a second in a log file."""
    made = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))
            if p.name != "bars.py" and re.search(r"\btqdm\(", p.read_text(encoding="utf-8"))]
    assert not made


def test_bars_take_a_stderr_without_isatty(tmp_path, monkeypatch):
    """A program's logger adapter with `write` and `flush` alone as stderr had made prepare raise."""
    class Adapter:
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    write_case(tmp_path / "raw", "c0")
    monkeypatch.setattr(sys, "stderr", Adapter())
    assert prepare(tmp_path / "raw", tmp_path / "prep", PrepareConfig(crop_size=(32, 32, 24)), workers=1).kept == ["c0"]
