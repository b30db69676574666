"""Fault injection: SIGKILL at random points, a full disk, broken numbers, two runs at once.

Each killed command is re-run to completion and compared with an uninterrupted run: the same
arrays, weights and predictions, and no temporary or lock file left behind.
"""

import csv
import errno
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tumorseg.checkpoint import load_checkpoint
from tumorseg.errors import TumorsegError
from tumorseg.inference import Predictor, predict
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.synth import synthesize
from tumorseg.training import TrainConfig, train

train_module = importlib.import_module("tumorseg.training.train")
run_files = importlib.import_module("tumorseg.training.run_files")

CLI = [sys.executable, "-m", "tumorseg.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: the same float sums
PREPARE = ["--crop", "32,32,32", "--min-tumour", "0", "--workers", "1"]
TRAIN = ["--filters", "4,8,16", "--epochs", "3", "--steps-per-epoch", "2", "--device", "cpu", "--seed", "1"]
PREDICT = ["--device", "cpu"]
TINY = TrainConfig(filters=[4, 8, 16], epochs=2, steps_per_epoch=2, device="cpu", seed=1)


def _tumorseg(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, errors="replace", env=ENV, timeout=300)


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, as in the subprocesses: on a shared 2-core machine two threads run 6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kill_at(args: list, ready, delay: float) -> bool:
    """Run `tumorseg args`, SIGKILL it `delay` s after `ready()` holds; False if it finished first."""
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    give_up = time.monotonic() + 300  # a run that hangs before `ready` fails the test instead of the suite
    while not ready() and proc.poll() is None and time.monotonic() < give_up:
        time.sleep(0.005)
    end = time.monotonic() + delay
    while time.monotonic() < end and proc.poll() is None:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.startswith((".tmp-", ".tumorseg.lock"))]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Uninterrupted runs of prepare and train on 4 tiny synthetic cases."""
    root = tmp_path_factory.mktemp("faults")
    synthesize(root / "data", 4, shape=(48, 48, 40), progress=False)
    for args in (("prepare", root / "data", root / "prep", *PREPARE), ("train", root / "prep", root / "run", *TRAIN)):
        done = _tumorseg(*args)
        assert done.returncode == 0, done.stderr
    return root


def _same_files(a: Path, b: Path, pattern: str, load) -> None:
    names = sorted(p.relative_to(a) for p in a.glob(pattern))
    assert names and names == sorted(p.relative_to(b) for p in b.glob(pattern))
    for name in names:
        assert np.array_equal(load(a / name), load(b / name)), name


def test_prepare_killed_and_rerun_equals_uninterrupted(tmp_path):
    # Half the BraTS resolution, ~25 ms per case here: the 48x48x40 cases took ~5 ms, faster than a kill can follow.
    synthesize(tmp_path / "data", 4, shape=(120, 120, 78), progress=False)
    reference = _tumorseg("prepare", tmp_path / "data", tmp_path / "reference", *PREPARE)
    assert reference.returncode == 0, reference.stderr
    rng, out = random.Random(0), tmp_path / "prep"
    args = ["prepare", tmp_path / "data", out, *PREPARE]
    finished = lambda: len([p for p in out.glob("records/*.json") if not p.name.startswith(".tmp-")])  # noqa: E731
    partial = []
    for done in (1, 2, 3):  # after `done` finished cases
        if _kill_at(args, lambda: finished() >= done, rng.uniform(0.0, 0.01)):
            partial.append(finished())
    assert any(0 < n < 4 for n in partial), partial  # killed mid-run, with work to keep and work to redo
    (out / "images").mkdir(exist_ok=True)
    (out / "images" / f".tmp-{_dead_pid()}-case.npy").write_bytes(b"\x93NUMPY partial")  # as a kill mid-write leaves
    done = _tumorseg(*args)
    assert done.returncode == 0, done.stderr
    _same_files(tmp_path / "reference", out, "*/*.npy", np.load)
    manifest = lambda folder: json.loads((folder / "manifest.json").read_text())["cases"]  # noqa: E731
    assert manifest(out) == manifest(tmp_path / "reference")
    assert _leftovers(out) == []


def _history(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(run / "metrics.csv"))]


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def test_train_killed_and_resumed_equals_uninterrupted(base, tmp_path):
    """Killed each time soon after the run wrote a checkpoint (epoch 1, then the resumed epoch 2),
    within a share of an epoch's time on this machine: the kills follow the run's progress, not the
    clock, so a faster or slower machine lands them too."""
    rng, run = random.Random(0), tmp_path / "run"
    epoch_s = min(float(row["seconds"]) for row in csv.DictReader(open(base / "run/metrics.csv")))
    killed = []
    for delay in (rng.uniform(0.0, 0.3) * epoch_s, rng.uniform(0.0, 0.1) * epoch_s):
        before = _mtime(run / "last.pt")
        killed.append(_kill_at(["train", base / "prep", run, *TRAIN, *(["--resume"] if before else [])],
                               lambda: _mtime(run / "last.pt") > before, delay))
    assert killed == [True, True] and load_checkpoint(run / "last.pt")["epoch"] == 2  # one epoch left to do
    done = _tumorseg("train", base / "prep", run, *TRAIN, *(["--resume"] if (run / "last.pt").exists() else []))
    assert done.returncode == 0, done.stderr
    for name in ("last.pt", "best.pt"):
        want, got = load_checkpoint(base / "run" / name), load_checkpoint(run / name)
        assert want["epoch"] == got["epoch"] and all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])
    assert _history(run) == _history(base / "run")
    assert _leftovers(run) == []


def test_best_checkpoint_is_the_epoch_metrics_marks_best(base):
    rows = list(csv.DictReader(open(base / "run/metrics.csv")))
    best = max(rows, key=lambda r: float(r["dice_mean"]))  # the first of equals, as training keeps
    assert load_checkpoint(base / "run/best.pt")["epoch"] == int(best["epoch"])


def test_kill_between_checkpoint_writes_keeps_best_pt_the_best_epoch(base, tmp_path, monkeypatch):
    """Killed right after the first file epoch 2 writes: a resumed run must end with best.pt
    holding the epoch metrics.csv shows best (epoch 2 here), whichever file that was."""

    class Killed(BaseException):
        pass

    real_save = run_files.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == 2:
            raise Killed

    run, dice = tmp_path / "run", iter([0.1, 0.3])
    monkeypatch.setattr(train_module, "mean_dice", lambda _: next(dice))
    monkeypatch.setattr(run_files, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(base / "prep", run, replace(TINY, epochs=3), progress=False)
    dice = iter([0.2])  # epoch 3: best.pt held epoch 2 whole, and the run went on from it
    monkeypatch.setattr(run_files, "save_checkpoint", real_save)
    train(base / "prep", run, replace(TINY, epochs=3), resume=True, progress=False)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [float(r["dice_mean"]) for r in rows] == [0.1, 0.3, 0.2]
    assert load_checkpoint(run / "best.pt")["epoch"] == 2 and load_checkpoint(run / "last.pt")["epoch"] == 3


def test_a_kill_in_the_first_save_leaves_a_run_to_resume_not_a_lone_best_pt(base, tmp_path, monkeypatch):
    """best.pt without last.pt is a finished run's model (train refuses the folder): the first epoch
    saved writes last.pt first, so a kill right after it is resumed and writes best.pt then."""
    class Killed(BaseException):
        pass

    real_save = run_files.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise Killed

    run = tmp_path / "run"
    monkeypatch.setattr(run_files, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(base / "prep", run, replace(TINY, epochs=2), progress=False)
    assert (run / "last.pt").exists() and not (run / "best.pt").exists()
    monkeypatch.setattr(run_files, "save_checkpoint", real_save)
    train(base / "prep", run, replace(TINY, epochs=2), resume=True, progress=False)
    assert load_checkpoint(run / "best.pt")["epoch"] in (1, 2) and load_checkpoint(run / "last.pt")["epoch"] == 2


def test_predict_killed_and_rerun_equals_uninterrupted(base, tmp_path):
    rng, out = random.Random(0), tmp_path / "pred"
    args = ["predict", base / "run/last.pt", base / "data", out, *PREDICT, "--tta"]  # TTA: slow enough to kill mid-run
    finished = lambda: len([p for p in out.glob("*.nii.gz") if not p.name.startswith(".tmp-")])  # noqa: E731
    partial = []
    for _ in range(2):  # after the first written case, or later
        if _kill_at(args, lambda: finished() >= 1, rng.uniform(0.0, 0.02)):
            partial.append(finished())
    assert any(0 < n < 4 for n in partial), partial
    for dest in (out, tmp_path / "uninterrupted"):
        done = _tumorseg(*args[:3], dest, *args[4:])
        assert done.returncode == 0, done.stderr
    _same_files(tmp_path / "uninterrupted", out, "*.nii.gz", lambda p: np.asarray(nib.load(p).dataobj))
    assert _leftovers(out) == []


HOLD = """
import sys, time
from tumorseg.lock import folder_lock
with folder_lock(sys.argv[1], "predict"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_run_into_a_busy_folder_is_refused(base, tmp_path):
    """A real holder process; the CLI's refusal is one line, train and predict are refused as well."""
    busy = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(busy)], stdout=subprocess.PIPE, text=True)
    in_use = f"{busy} is in use by tumorseg predict (pid {holder.pid} on "
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _tumorseg("prepare", base / "data", busy, *PREPARE)
        assert done.returncode == 2 and done.stderr.startswith(f"tumorseg prepare: error: {in_use}")
        assert done.stderr.count("\n") == 1
        with pytest.raises(TumorsegError, match=re.escape(in_use)):
            train(base / "prep", busy, TINY, progress=False)
        with pytest.raises(TumorsegError, match=re.escape(in_use)):
            predict(base / "run/last.pt", base / "data", busy, device="cpu", progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in busy.iterdir()) == [".tumorseg.lock"]  # the refused runs wrote nothing


def _no_space_for(marker: str, real, file_arg: int = 1):
    """`real` (np.save, nib.save, torch.save) failing with ENOSPC for files whose name has `marker`;
    the file (a path or an open file) is its argument `file_arg`."""

    def write(*args, **kwargs):
        if marker in str(getattr(args[file_arg], "name", args[file_arg])):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write


def test_full_disk_while_preparing_fails_that_case_only(base, tmp_path, monkeypatch):
    monkeypatch.setattr(np, "save", _no_space_for("BraTS20_Training_002", np.save, file_arg=0))
    res = prepare(base / "data", tmp_path / "prep", PrepareConfig(crop_size=(32, 32, 32), min_tumour=0.0), workers=1,
                  progress=False)
    assert list(res.failed) == ["BraTS20_Training_002"] and len(res.kept) == 3
    assert "BraTS20_Training_002.npy: cannot write (out of disk space; " in res.failed["BraTS20_Training_002"]
    assert _leftovers(tmp_path / "prep") == []


def test_disk_full_at_a_cases_image_leaves_no_mask_of_it(base, tmp_path, monkeypatch):
    """The mask is written first: a disk that fills at the image had left masks/<case>.npy behind,
    an array of a failed case that no manifest names."""
    image = f"images{os.sep}.tmp-{os.getpid()}-BraTS20_Training_002"
    monkeypatch.setattr(np, "save", _no_space_for(image, np.save, file_arg=0))
    res = prepare(base / "data", tmp_path / "prep", PrepareConfig(crop_size=(32, 32, 32), min_tumour=0.0), workers=1,
                  progress=False)
    assert list(res.failed) == ["BraTS20_Training_002"] and len(res.kept) == 3
    assert sorted(p.name for p in (tmp_path / "prep/masks").iterdir()) == sorted(f"{c}.npy" for c in res.kept)
    assert not (tmp_path / "prep/records/BraTS20_Training_002.json").exists()


def test_full_disk_while_predicting_fails_that_case_only(base, tmp_path, monkeypatch):
    monkeypatch.setattr(nib, "save", _no_space_for("BraTS20_Training_003", nib.save))
    res = predict(base / "run/last.pt", base / "data", tmp_path / "pred", device="cpu", progress=False)
    assert list(res.failed) == ["BraTS20_Training_003"] and len(res.written) == 3
    assert "BraTS20_Training_003.nii.gz: cannot write (out of disk space" in res.failed["BraTS20_Training_003"]
    assert _leftovers(tmp_path / "pred") == []


def test_full_disk_never_destroys_last_checkpoint(base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(base / "run/last.pt", run)  # epoch 3 of 3
    monkeypatch.setattr(torch, "save", _no_space_for("last.pt", torch.save))
    with pytest.raises(TumorsegError) as info:
        train(base / "prep", run, replace(TINY, epochs=4), resume=True, progress=False)
    message = str(info.value)
    assert "\n" not in message and f"{run / 'last.pt'}: cannot write (out of disk space" in message
    assert message.endswith(f"{run / 'last.pt'} keeps epoch 3, the last good one")
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt")["epoch"] == 3 and _leftovers(run) == []


def _with_broken_flair(base: Path, data: Path, value: float) -> Path:
    """Cases 001 and 002 of the base data, 002's FLAIR float32 with `value` at one voxel (NaN)
    or everywhere (a constant)."""
    for case in ("BraTS20_Training_001", "BraTS20_Training_002"):
        (data / case).mkdir(parents=True)
        for path in (base / "data" / case).iterdir():
            (data / case / path.name).symlink_to(path)
    flair = data / "BraTS20_Training_002/BraTS20_Training_002_flair.nii.gz"
    img = nib.load(flair.resolve())
    values = np.asarray(img.dataobj).astype(np.float32)
    if np.isnan(value):
        values[10, 10, 10] = value
    else:
        values[...] = value
    flair.unlink()
    nib.save(nib.Nifti1Image(values, img.affine), flair)
    return flair


def test_nan_in_a_scan_fails_that_case_only_in_predict(base, tmp_path):
    flair = _with_broken_flair(base, tmp_path / "data", np.nan)
    res = predict(base / "run/last.pt", tmp_path / "data", tmp_path / "pred", device="cpu", progress=False)
    assert res.failed == {"BraTS20_Training_002": f"BraTS20_Training_002: {flair} (flair) has 1 NaN or infinite voxel(s)"}
    assert [p.name for p in res.written] == ["BraTS20_Training_001.nii.gz"]


def test_constant_scan_is_a_warning_in_predict(base, tmp_path, capsys):
    flair = _with_broken_flair(base, tmp_path / "data", 0.0)
    res = predict(base / "run/last.pt", tmp_path / "data", tmp_path / "pred", device="cpu", progress=False)
    assert not res.failed and len(res.written) == 2
    assert f"warning: BraTS20_Training_002: {flair} (flair) holds the single value 0: a broken scan?" in capsys.readouterr().err


def _nan_loss(monkeypatch, bad_steps):
    """The training loss NaN at the given (0-based, counted over the run) steps."""
    real, calls = train_module.build_loss, []

    def build(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        class Broken(type(loss_fn)):
            def forward(self, *a, **k):
                loss = super().forward(*a, **k)
                if a[0].requires_grad:  # training steps, not validation
                    calls.append(len(calls))
                    if calls[-1] in bad_steps:
                        return loss * float("nan")
                return loss

        loss_fn.__class__ = Broken
        return loss_fn

    monkeypatch.setattr(train_module, "build_loss", build)


def test_nan_loss_skips_the_step_and_never_reaches_a_checkpoint(base, tmp_path, monkeypatch):
    _nan_loss(monkeypatch, {1, 2})  # the second of each epoch
    result = train(base / "prep", tmp_path / "run", TINY, progress=False)
    assert [row["skipped_steps"] for row in result.history] == [1, 1]
    state = load_checkpoint(tmp_path / "run/last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert [r["skipped_steps"] for r in csv.DictReader(open(tmp_path / "run/metrics.csv"))] == ["1", "1"]


def test_nan_loss_five_times_in_a_row_stops_training(base, tmp_path, monkeypatch):
    _nan_loss(monkeypatch, set(range(2, 100)))  # the count goes on across epochs: 1 in epoch 1, 3 in 2, 1 in 3
    run = tmp_path / "run"
    with pytest.raises(TumorsegError, match=r"NaN or infinite in 5 steps in a row \(epoch 3\).*keeps epoch 2, the last good one$"):
        train(base / "prep", run, replace(TINY, epochs=5, steps_per_epoch=3), progress=False)
    assert load_checkpoint(run / "last.pt")["epoch"] == 2 and _leftovers(run) == []


class _OutOfMemoryOnce(torch.nn.Module):
    """The network, except that its first call runs out of GPU memory holding an activation; the
    next call records whether that activation was freed first (`freed_before_retry`)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.activation, self.freed_before_retry = model, 0, None, None

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            activation = torch.zeros(1 << 20)  # alive while the traceback is: a GPU would still hold it
            self.activation = weakref.ref(activation)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.calls == 2:
            self.freed_before_retry = self.activation() is None
        return self.model(x)


def test_out_of_gpu_memory_in_prediction_retries_stitching_on_the_cpu(base, tmp_path, capsys):
    # float32: in bf16 the windows' batch size (8 against 1 in the retry) moves a few tied voxels
    predictor = Predictor.from_checkpoint(base / "run/last.pt", device="cpu", amp="off")
    predict(predictor, base / "data", tmp_path / "reference", progress=False)
    failing = _OutOfMemoryOnce(predictor.model)
    res = predict(replace(predictor, model=failing), base / "data", tmp_path / "pred", progress=False)
    assert not res.failed and len(res.written) == 4
    assert failing.freed_before_retry  # retried outside `except`: the failed pass's tensors gone
    assert capsys.readouterr().err.count("out of GPU memory; retrying with the windows one at a time and stitched on the CPU") == 1
    _same_files(tmp_path / "reference", tmp_path / "pred", "*.nii.gz", lambda p: np.asarray(nib.load(p).dataobj))


def test_out_of_gpu_memory_in_training_names_the_settings(base, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "train_epoch", no_memory)
    with pytest.raises(TumorsegError, match=r"^out of GPU memory in epoch 1 with batch 2 and patch \[32, 32, 32\]: "
                                            r"lower --batch-size or --patch; no epoch was saved$"):
        train(base / "prep", tmp_path / "run", TINY, progress=False)


def test_torchrun_ranks_share_the_predict_folder(tmp_path, monkeypatch):
    """Each rank locks its own file and sweeps only its own cases' temporaries (another rank's,
    maybe on another host, are live)."""
    from tumorseg.inference.ranks import claim
    from tumorseg.lock import folder_lock

    others, mine = tmp_path / f".tmp-{_dead_pid()}-a.nii.gz", tmp_path / f".tmp-{_dead_pid()}-b.nii.gz"
    others.write_bytes(b"")
    mine.write_bytes(b"")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with folder_lock(tmp_path, "predict"):  # rank 0 of the same job
        with claim(tmp_path, ["b.nii.gz"]):
            assert (tmp_path / ".tumorseg.lock.rank1").exists() and others.exists() and not mine.exists()
    assert list(tmp_path.iterdir()) == [others]


def test_a_case_folder_named_in_no_utf8_is_predicted_scored_and_reported(base, tmp_path):
    """An old zip's `patient_\\xe9` (held as a surrogate): evaluate's CSV, report's pages and figures
    keep its bytes instead of failing once all the work is done."""
    name = os.fsdecode(b"patient_\xe9")
    data = tmp_path / "data"
    shutil.copytree(next(p for p in sorted((base / "data").iterdir()) if p.is_dir()), data / name)
    for f in (data / name).iterdir():
        f.rename(f.with_name(f.name.split("_")[-1]))  # plain names: the case is its folder's
    done = _tumorseg("predict", base / "run/last.pt", data, tmp_path / "pred", *PREDICT, "--report")
    assert done.returncode == 0 and "report: open" in done.stdout, done.stderr
    assert not (tmp_path / "pred/report/volumes.csv").read_bytes().count(b"not reported")
    assert b"patient_\xe9" in (tmp_path / "pred/report/volumes.csv").read_bytes()
    assert b"patient_%E9" in (tmp_path / "pred/report/index.html").read_bytes()  # a link to the file itself
    done = _tumorseg("evaluate", tmp_path / "pred", data)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pred/metrics.csv").read_bytes().splitlines()[1].startswith(b"patient_\xe9,ok,")
