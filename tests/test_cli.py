"""The command line as a user meets it: each subcommand end to end, errors as one line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorseg.cli import build_parser, main

from factory import write_case


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for i in range(3):
        write_case(root / "raw", f"BraTS20_Training_00{i}", seed=i)
    assert main(["prepare", str(root / "raw"), str(root / "prep"), "--crop", "32", "--workers", "1"]) == 0
    assert main(["train", str(root / "prep"), str(root / "run"), "--filters", "4,8,16", "--epochs", "3",
                 "--val-every", "2", "--tta", "--postprocess"]) == 0
    return root


def test_prepare_says_its_settings_and_metrics_csv_marks_the_best_epoch(trained, capsys):
    import csv

    from tumorseg.checkpoint import load_checkpoint

    assert main(["prepare", str(trained / "raw"), str(trained / "prep"), "--crop", "32", "--workers", "1"]) == 0
    assert ("settings: channels t2,t1ce,flair, minmax scaling, crop 32x32x32 (fixed), min tumour 1%, spacing 1x1x1 mm"
            in capsys.readouterr().out)
    with open(trained / "run/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and [bool(r["val_loss"]) for r in rows] == [False, True, True]
    best = load_checkpoint(trained / "run/best.pt")["epoch"]
    assert [r["epoch"] for r in rows if r["best"] == "1"] == [str(best)] and best in (2, 3)


def test_train_flags_set_the_checkpoints_inference(trained):
    from tumorseg.checkpoint import load_checkpoint

    state = load_checkpoint(trained / "run/best.pt")
    assert state["config"]["tta"] and state["config"]["postprocess"] and state["inference"]["tta"]
    assert state["inference"]["postprocess_largest_tumour"] is state["history"][-1]["largest_tumour"]


def test_version():
    proc = subprocess.run([sys.executable, "-m", "tumorseg", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("tumorseg 0.")


def test_help_is_instant_and_lists_commands():
    for module in ("tumorseg", "tumorseg.cli"):  # `python -m tumorseg` where the script is not on PATH
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: tumorseg ")
        for command in ("synth", "cases", "prepare", "train", "predict", "evaluate", "show", "report", "export", "demo"):
            assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tumorseg", "evaluate", "/nonexistent", "/nonexistent"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "tumorseg evaluate: error:" in proc.stderr


def test_every_command_runs_a_function():
    from tumorseg.cli import COMMANDS

    assert set(COMMANDS) == set(build_parser().commands)  # a command added to the parser alone would be a KeyError


def test_synth(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert main(["synth", str(tmp_path), "--cases", "2", "--shape", "32,32,24", "--seed", "1"]) == 0
    assert "TQDM_MININTERVAL" not in os.environ  # the command's setting (`run`), not main's: a caller's bars keep theirs
    assert "wrote 2 synthetic cases" in capsys.readouterr().out
    assert nib.load(tmp_path / "BraTS20_Training_002/BraTS20_Training_002_seg.nii.gz").shape == (32, 32, 24)
    assert main(["synth", str(tmp_path), "--cases", "0"]) == 2
    assert "error" in capsys.readouterr().err


def test_demo_refuses_zero_epochs_before_any_work(tmp_path, capsys):
    """0 is not "unset": the demo once ran its full 40 epochs for --epochs 0."""
    for value in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["demo", str(tmp_path / "demo"), "--epochs", value])
        assert exit_.value.code == 2 and f"--epochs: expected a whole number >= 1, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_predict_evaluate_show(trained, capsys):
    run, raw, out = trained / "run", trained / "raw", trained / "pred"
    assert main(["predict", str(run / "best.pt"), str(raw), str(out), "--plots", "--no-tta", "--no-postprocess"]) == 0
    assert "predicted 3 case(s)" in capsys.readouterr().out
    pred = nib.load(out / "BraTS20_Training_000.nii.gz")
    assert pred.shape == (40, 40, 32) and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    assert (out / "BraTS20_Training_000.png").exists()
    assert main(["predict", str(run / "best.pt"), str(raw), str(out), "--no-tta", "--no-postprocess"]) == 0
    assert "3 already done (--force to redo them)" in capsys.readouterr().out
    assert main(["predict", str(run), str(raw), str(out)]) == 2  # the checkpoint's TTA: other labels than the files'
    assert "3 prediction(s) there come from another model or other settings" in capsys.readouterr().err
    assert main(["evaluate", str(out), str(raw), "--out", str(trained / "m.csv")]) == 0
    report = capsys.readouterr().out
    assert "WT" in report and (trained / "m.csv").exists() and (trained / "m_summary.json").exists()
    png = trained / "show.png"
    assert main(["show", str(raw / "BraTS20_Training_001"), "--pred", str(out / "BraTS20_Training_001.nii.gz"), "--out", str(png), "--view", "axial"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_only_the_cases_asked_for(trained, tmp_path, capsys):
    run, raw, out = trained / "run", trained / "raw", tmp_path / "pred"
    ids = "BraTS20_Training_002, BraTS20_Training_000"
    assert main(["predict", str(run / "best.pt"), str(raw), str(out), "--no-tta", "--cases", ids]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["BraTS20_Training_000.nii.gz", "BraTS20_Training_002.nii.gz"]
    (out / "other.nii.gz").symlink_to(out / "BraTS20_Training_000.nii.gz")  # not asked about: not "extra"
    assert main(["evaluate", str(out), str(raw), "--cases", "BraTS20_Training_000"]) == 0
    summary = __import__("json").loads((out / "metrics_summary.json").read_text())
    assert summary["cases"] == 1 and summary["extra"] == [] and summary["missing"] == []
    capsys.readouterr()
    assert main(["predict", str(run / "best.pt"), str(raw), str(out), "--cases", "BraTS20_Training_009"]) == 2
    with pytest.raises(SystemExit):
        main(["evaluate", str(out), str(raw), "--cases", ","])
    err = capsys.readouterr().err
    assert f"error: {raw}: no case(s) BraTS20_Training_009 among its 3" in err
    assert "expected case ids separated by commas" in err
    assert main(["evaluate", str(out), str(raw), "--cases", "BraTS20_Training_000", "--challenge", "brats-met"]) == 0
    assert "BraTS 2023+ lesion-wise (MET" in capsys.readouterr().out
    from tumorseg.layouts import discover_cases

    assert [c.case_id for c in discover_cases(raw, only="BraTS20_Training_001")] == ["BraTS20_Training_001"]
    with pytest.raises(__import__("tumorseg.errors").errors.TumorsegError, match="an empty selection of cases"):
        discover_cases(raw, only=[])


def test_user_errors_are_one_line(trained, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["predict", str(tmp_path / "junk.pt"), str(trained / "raw"), str(tmp_path / "o")]) == 2
    assert main(["evaluate", str(tmp_path / "none"), str(trained / "raw")]) == 2
    assert main(["show", str(tmp_path / "missing_case")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([l for l in err.splitlines() if "error:" in l]) == 3


def test_layouts_conventions_and_geometry_flags(trained, tmp_path, capsys):
    """synth --layout, prepare --spacing, predict --labels, evaluate --labels/--challenge."""
    assert main(["synth", str(tmp_path / "msd"), "--cases", "2", "--shape", "32,32,24", "--layout", "msd"]) == 0
    assert (tmp_path / "msd/dataset.json").is_file() and len(list((tmp_path / "msd/imagesTr").iterdir())) == 2
    assert main(["prepare", str(tmp_path / "msd"), str(tmp_path / "prep"), "--crop", "16", "--spacing", "2",
                 "--channels", "t2,t1ce,flair", "--workers", "1"]) == 0
    manifest = (tmp_path / "prep/manifest.json").read_text()
    assert '"layout": "msd"' in manifest and '"network_shape": [\n    16,\n    16,\n    12\n   ]' in manifest
    assert main(["predict", str(trained / "run/best.pt"), str(tmp_path / "msd"), str(tmp_path / "pred"),
                 "--labels", "brats2020"]) == 0
    pred = nib.load(tmp_path / "pred/BRATS_001.nii.gz")
    assert pred.shape == (32, 32, 24) and b"labels=brats2020:1,2,4" in bytes(pred.header["descrip"])
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "msd"), "--challenge", "MET"]) in (0, 1)
    out = capsys.readouterr().out
    assert "BraTS 2023+ lesion-wise (MET" in out and "LesionDice" in out
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "msd/labelsTr"), "--labels", "msd"]) in (0, 1)
    with pytest.raises(SystemExit):  # argparse: one line, exit code 2
        main(["prepare", str(tmp_path / "msd"), str(tmp_path / "bad"), "--spacing", "0,1,1"])
    assert "expected 3 positive numbers, got '0,1,1'" in capsys.readouterr().err


def test_a_mistyped_option_is_the_commands_error_with_the_nearest_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "a.pt", "cases", "out", "--overlapp", "0.2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: tumorseg predict")
    assert "tumorseg predict: error: unrecognized arguments: --overlapp (did you mean --overlap?) 0.2" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "preds", "truth", "surplus"])
    assert "tumorseg evaluate: error: unrecognized arguments: surplus\n" in capsys.readouterr().err


def test_evaluate_says_when_it_replaces_earlier_scores(trained, tmp_path, capsys):
    preds = tmp_path / "preds"
    preds.mkdir()
    seg = trained / "raw" / "BraTS20_Training_000" / "BraTS20_Training_000_seg.nii.gz"
    (preds / "BraTS20_Training_000.nii.gz").symlink_to(seg)
    args = ["evaluate", str(preds), str(trained / "raw"), "--only-predicted"]
    assert main(args) == 0 and "held earlier scores" not in capsys.readouterr().out
    assert main(args) == 0 and f"note: {preds / 'metrics.csv'} held earlier scores" in capsys.readouterr().out


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """scancel, docker stop and torchrun stop a command with SIGTERM: the lock and temporaries go, the
    progress bar ends before one last line, exit code 143, and the caller's handler is back."""
    import signal

    import tumorseg.prepare.run as run_module

    for i in range(3):
        write_case(tmp_path / "raw", f"BraTS20_Training_00{i}", seed=i)
    real, calls = run_module.prepare_case, []

    def terminated_on_the_second(case, config, out_dir):
        calls.append(case.case_id)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(case, config, out_dir)

    monkeypatch.setattr(run_module, "prepare_case", terminated_on_the_second)
    before = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "raw"), str(tmp_path / "prep"), "--crop", "32", "--workers", "1"]) == 143
    err = capsys.readouterr().err
    assert err.endswith("\ntumorseg prepare: terminated\n") and "Traceback" not in err
    assert "prepare:  33%" in err.splitlines()[-2]  # the bar's last state, its own line, before the last line
    assert signal.getsignal(signal.SIGTERM) is before
    left = sorted(p.name for p in (tmp_path / "prep").rglob("*") if p.is_file())
    assert left == ["BraTS20_Training_000.json", "BraTS20_Training_000.npy", "BraTS20_Training_000.npy"], left
    monkeypatch.setattr(run_module, "prepare_case", real)
    assert main(["prepare", str(tmp_path / "raw"), str(tmp_path / "prep"), "--crop", "32", "--workers", "1"]) == 0
    assert "taking it over" not in capsys.readouterr().err  # the lock was released, not left for the next run


def test_an_interrupt_mid_epoch_ends_the_bar_before_the_resume_line(trained, tmp_path, monkeypatch, capsys):
    """In a log file (not a terminal) the epoch's bar keeps its last state and ends its line, so the
    interrupt's lines start their own (a cleared bar left a carriage return before them)."""
    import importlib

    engine = importlib.import_module("tumorseg.training.engine")
    real = engine.forward_backward
    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        if (run / "last.pt").exists():  # the first epoch saved: Ctrl-C in the second one's first step
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_backward", interrupted)
    capsys.readouterr()
    assert main(["train", str(trained / "prep"), str(run), "--filters", "4,8,16", "--epochs", "3"]) == 130
    lines = capsys.readouterr().err.split("\n")
    assert lines[-3:] == [f"interrupted: {run / 'last.pt'} holds epoch 1; continue with --resume",
                          "tumorseg train: interrupted", ""]
    assert lines[-4].rsplit("\r", 1)[-1].startswith("epoch 2:")  # the bar's last state, on its own line


def test_a_second_sigterm_stops_a_stuck_clean_up(tmp_path):
    """The first SIGTERM cleans up as Ctrl-C does; a second one during that clean-up (a pool's
    shutdown waiting on its workers) stops the process at once instead of leaving it hung."""
    code = ("import os, signal, time\nfrom tumorseg import cli\n"
            "def stuck(args):\n"
            "    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(5)\n"
            "    finally:\n        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(60)\n"
            "cli.COMMANDS['synth'] = stuck\n"
            f"raise SystemExit(cli.main(['synth', {str(tmp_path / 'raw')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 143 and "terminated again: stopping without cleaning up" in proc.stderr, proc.stderr


def test_sigterm_to_every_process_of_a_training_with_loader_workers(trained, tmp_path):
    """`scancel` signals the whole job: the loader's workers leave it to the training process, which
    names the epoch to resume from (a worker killed by it made torch raise over that line)."""
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tumorseg.cli", "train", str(trained / "prep"), str(run),
                             "--filters", "4,8,16", "--epochs", "50", "--workers", "2"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # into the next epoch, its workers loading
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert re.search(r"terminated: .*last\.pt holds epoch \d+; continue with --resume\ntumorseg train: terminated\n$", err)


def test_options_may_stand_between_a_commands_positionals():
    """`predict A.pt B.onnx --force DATA OUT`: argparse alone ended the models at the option and named OUT unrecognised."""
    from tumorseg.cli import parse

    args = parse(["predict", "a.pt", "b.onnx", "--force", "data", "out", "--cases", "x"])
    assert (args.checkpoint, args.input, args.out_dir, args.force, args.command) == (
        [Path("a.pt"), Path("b.onnx")], Path("data"), Path("out"), True, "predict")
    assert parse(["evaluate", "--workers", "2", "preds", "gt"]).workers == 2


def test_a_loader_stopped_while_it_starts_its_workers_leaves_no_traceback(capsys, monkeypatch):
    """A SIGTERM while the DataLoader starts its workers: the half-made iterator's `__del__` raised
    AttributeError, printed by Python after the run's last line (a flaky test's output in CI)."""
    import gc

    import torch

    from tumorseg.cli import unraisable_hook

    class Noisy:
        def __del__(self):
            raise AttributeError("other")

    monkeypatch.setattr(sys, "unraisablehook", unraisable_hook)  # as `run` sets it for the command
    object.__new__(torch.utils.data.dataloader._MultiProcessingDataLoaderIter)  # half made, then collected
    gc.collect()
    assert capsys.readouterr().err == ""
    Noisy()
    gc.collect()
    assert "AttributeError: other" in capsys.readouterr().err  # any other: Python's own say


def test_a_sigterm_python_swallowed_is_delivered_again(monkeypatch):
    """A SIGTERM landing in logging's fork callback (as the DataLoader starts its workers) raised
    `Terminated` where Python only reports it: the training went on, then failed on its killed
    workers with exit 2 (a clean-clone run's flaky test). It is delivered again and stops the run."""
    import signal
    import time

    from tumorseg import cli
    from tumorseg.errors import Terminated

    class InAForkCallback:
        def __del__(self):  # where Python reports, and swallows, what is raised
            cli._terminate(signal.SIGTERM, None)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "unraisablehook", cli.unraisable_hook)
    try:
        with pytest.raises(Terminated):
            InAForkCallback()
            time.sleep(5)  # the run going on: the signal comes again within it
        assert signal.getsignal(signal.SIGTERM) == cli._stop_now  # armed again for a second one
    finally:
        signal.signal(signal.SIGTERM, before)
