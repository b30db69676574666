import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tumorseg.errors import TumorsegError
from tumorseg.lock import LOCK_NAME, STALE_AFTER_S, folder_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is gone
    return proc.pid


def test_second_run_is_refused_naming_the_first(tmp_path):
    with folder_lock(tmp_path / "out", "predict") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "predict"
        with pytest.raises(TumorsegError, match=rf"out is in use by tumorseg predict \(pid {os.getpid()} on .*remove .*{LOCK_NAME}"):
            with folder_lock(tmp_path / "out", "train"):
                pass
        assert path.exists()  # the refused run leaves the holder's lock alone
    assert list((tmp_path / "out").iterdir()) == []


def test_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "command": "prepare", "started": 0}))
    with folder_lock(tmp_path, "prepare"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "which is gone; taking it over" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_lock_of_another_host_is_respected_while_it_is_touched(tmp_path, capsys):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "command": "train", "started": 0}))
    with pytest.raises(TumorsegError, match="in use by tumorseg train .* on elsewhere"):
        with folder_lock(tmp_path, "train"):
            pass
    old = lock.stat().st_mtime - STALE_AFTER_S - 1  # its holder stopped touching it: gone, wherever it ran
    os.utime(lock, (old, old))
    with folder_lock(tmp_path, "train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "which is gone; taking it over" in capsys.readouterr().err
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "train", "started": 0}))
    os.utime(lock, (old, old))  # a live pid, but of a process started after the lock: the pid was reused
    with folder_lock(tmp_path, "train"):
        pass


def test_a_suspended_holder_on_this_host_keeps_its_lock(tmp_path):
    """Ctrl-Z or SIGSTOP stops the heartbeat, not the run: it would write on when resumed."""
    import time

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        lock = tmp_path / LOCK_NAME
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "command": "train",
                                    "started": time.time()}))
        old = lock.stat().st_mtime - STALE_AFTER_S - 1
        os.utime(lock, (old, old))
        with pytest.raises(TumorsegError, match=rf"in use by tumorseg train \(pid {holder.pid} "):
            with folder_lock(tmp_path, "train"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_touches_its_lock(tmp_path, monkeypatch):
    import time

    import tumorseg.lock as lock_module

    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    with folder_lock(tmp_path, "predict") as path:
        os.utime(path, (1, 1))
        time.sleep(0.5)
        assert path.stat().st_mtime > 1


HOLD = """
import sys, time
from tumorseg.errors import TumorsegError
from tumorseg.lock import folder_lock
try:
    with folder_lock(sys.argv[1], "predict"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
except TumorsegError as exc:
    print(exc)
"""


def test_two_processes_at_once(tmp_path):
    """Real processes: the first holds the folder, the second is refused naming it, and once the
    first is killed (SIGKILL) the next run takes the lock over."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True)
        assert second.stdout.startswith(f"{tmp_path} is in use by tumorseg predict (pid {holder.pid} on ")
    finally:
        holder.kill()
        holder.wait()
    third = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True)
    assert third.stdout == "held\n" and "taking it over" in third.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unusable_output_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TumorsegError, match="cannot create the output folder"):
        with folder_lock(tmp_path / "file" / "out", "predict"):
            pass


def test_a_damaged_lock_is_one_line(tmp_path):
    """Bytes that are no UTF-8, or a folder in its place: one line, as for an empty lock."""
    (tmp_path / LOCK_NAME).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TumorsegError, match=rf"is in use by another tumorseg run \(its lock is being written or "
                                            rf"unreadable\); wait for it or remove .*{LOCK_NAME} if it is gone"):
        with folder_lock(tmp_path, "prepare"):
            pass
    os.utime(tmp_path / LOCK_NAME, (0, 0))  # old: an unreadable lock nobody can prove they hold is taken over
    with folder_lock(tmp_path, "prepare"):
        pass
    (tmp_path / "d" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(TumorsegError, match=rf"^{tmp_path / 'd' / LOCK_NAME}: a folder where tumorseg keeps its lock "
                                            r"file; remove it$"):
        with folder_lock(tmp_path / "d", "prepare"):
            pass


def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    """An empty lock left behind would turn the next run away as another run's."""
    import errno

    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.fh = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", Full)
    with pytest.raises(TumorsegError, match=rf"^{tmp_path / LOCK_NAME}: cannot write \(out of disk space; 1 KB needed; "):
        with folder_lock(tmp_path, "prepare"):
            pass
    assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.undo()
    with folder_lock(tmp_path, "prepare"):  # room again: the next run goes on
        pass


def test_a_reader_of_a_folder_a_live_run_writes_hears_of_it(tmp_path, capsys):
    """evaluate and report on a folder a predict still writes: its unfinished cases are not missing
    from the model, and the line says so; a run's own lock (predict --report) is no other run."""
    from tumorseg.evaluation import evaluate
    from tumorseg.lock import live_holder

    from factory import write_case

    truth = write_case(tmp_path / "data", "c0")
    (tmp_path / "preds").mkdir()
    assert live_holder(tmp_path / "preds") is None
    (tmp_path / "preds" / LOCK_NAME).write_text(json.dumps(
        {"pid": os.getppid(), "host": socket.gethostname(), "command": "predict", "started": time.time()}))
    assert live_holder(tmp_path / "preds").startswith(f"tumorseg predict (pid {os.getppid()} on ")
    with pytest.raises(TumorsegError):  # no predictions yet: the line before the error says why
        evaluate(tmp_path / "preds", tmp_path / "data", progress=False)
    assert f"warning: {tmp_path / 'preds'} is being written by tumorseg predict" in capsys.readouterr().err
    from tumorseg.report import report

    shutil.copy(truth / "c0_seg.nii.gz", tmp_path / "preds" / "c0.nii.gz")
    report(tmp_path / "preds", progress=False)
    assert "the cases it has not finished are not in this report" in capsys.readouterr().err
    with folder_lock(tmp_path / "mine", "predict"):
        assert live_holder(tmp_path / "mine") is None
    (tmp_path / "preds" / LOCK_NAME).rename(tmp_path / "preds" / f"{LOCK_NAME}.rank1")  # torchrun's rank 1 after rank 0
    assert live_holder(tmp_path / "preds").startswith("tumorseg predict (pid ")
    assert live_holder(tmp_path / "preds") is not None
