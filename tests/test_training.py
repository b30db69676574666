import importlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tumorseg import bars
from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.networks import build_network
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.data import split_ids
from tumorseg.inference import Predictor
from tumorseg.prepare import load_manifest
from tumorseg.prepare.split import fold_split
from tumorseg.training import TrainConfig, build_loss, load_checkpoint, resolve_config, train
from tumorseg.training.distributed import DistContext
from tumorseg.training.run_files import cases_digest, split_digest

train_module = importlib.import_module("tumorseg.training.train")
engine = importlib.import_module("tumorseg.training.engine")
postprocess_module = importlib.import_module("tumorseg.inference.postprocess")

from factory import interrupt_training, write_case

TINY = dict(filters=[4, 8, 16], batch_size=2, lr=3e-3, seed=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    for i in range(5):
        write_case(root / "raw", f"c{i}", seed=i)
    prepare(root / "raw", root / "prep", PrepareConfig(crop_size=(32, 32, 32), val_fraction=0.4), workers=1, progress=False)
    return root / "prep"


def _weights(run_dir, name="last.pt"):
    return load_checkpoint(run_dir / name)["model"]


def test_training_reduces_the_loss(prepared, tmp_path):
    result = train(prepared, tmp_path / "run", TrainConfig(epochs=6, lr=1e-2, **{k: v for k, v in TINY.items() if k != "lr"}), progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert (tmp_path / "run/metrics.csv").read_text().count("\n") == 7
    assert (tmp_path / "run/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model: unet3d" in (tmp_path / "run/config.yaml").read_text()


def test_resume_equals_uninterrupted(prepared, tmp_path):
    cfg = dict(**TINY, patch=[16, 16, 16], augment="heavy", deterministic=True)  # exact on GPUs too
    train(prepared, tmp_path / "full", TrainConfig(epochs=3, **cfg), progress=False)
    train(prepared, tmp_path / "part", TrainConfig(epochs=2, **cfg), progress=False)
    resumed = train(prepared, tmp_path / "part", TrainConfig(epochs=3, **cfg), resume=True, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_resume_mends_a_damaged_best_checkpoint_or_says_its_weights_are_lost(prepared, tmp_path, capsys):
    """A resumed run that reports success leaves a best.pt that loads: rewritten from last.pt where
    the best epoch is the last one saved; else said lost, and best.pt is the best epoch from then on."""
    from tumorseg.checkpoint import save_checkpoint

    train(prepared, tmp_path / "run", TrainConfig(epochs=1, **TINY), progress=False)
    (tmp_path / "run/best.pt").write_bytes((tmp_path / "run/best.pt").read_bytes()[:1000])
    train(prepared, tmp_path / "run", TrainConfig(epochs=2, **TINY), resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run/best.pt")["epoch"] == load_checkpoint(tmp_path / "run/last.pt")["best_epoch"]
    assert "weights are lost" not in capsys.readouterr().err
    last = load_checkpoint(tmp_path / "run/last.pt")
    save_checkpoint(tmp_path / "run/last.pt", {**last, "best_epoch": 1, "best_metric": 2.0})  # best: an earlier epoch
    (tmp_path / "run/best.pt").write_bytes(b"")
    train(prepared, tmp_path / "run", TrainConfig(epochs=3, **TINY), resume=True, progress=False)
    assert ("best.pt did not hold epoch 1, the best so far (damaged or removed): its weights are lost; best.pt holds "
            "epoch 2, the last saved") in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run/best.pt")["epoch"] in (2, 3)
    assert load_checkpoint(tmp_path / "run/best.pt")["epoch"] == load_checkpoint(tmp_path / "run/last.pt")["best_epoch"]
    (tmp_path / "run/best.pt").unlink()  # and no epoch left to train: best.pt is still there afterwards
    train(prepared, tmp_path / "run", TrainConfig(epochs=3, **TINY), resume=True, progress=False)  # all 3 done
    assert load_checkpoint(tmp_path / "run/best.pt")["epoch"] == load_checkpoint(tmp_path / "run/last.pt")["best_epoch"]


def test_a_kill_between_best_and_last_goes_on_from_best(prepared, tmp_path, monkeypatch, capsys):
    """`save_epoch` writes best.pt, then metrics.csv and last.pt: killed between them, best.pt holds
    the next epoch whole and the run goes on from it. Repeating the epoch instead had taken best.pt
    for damaged ("its weights are lost") and marked a worse epoch best where no epoch followed."""
    run_files = importlib.import_module("tumorseg.training.run_files")
    scores = iter([0.5, 0.1, 0.9])  # epoch 2 worse than 1, epoch 3 the best
    monkeypatch.setattr(train_module, "mean_dice", lambda dice: next(scores))
    train(prepared, tmp_path / "full", TrainConfig(epochs=3, **TINY), progress=False)

    class Killed(BaseException):
        pass

    real = run_files.save_checkpoint

    def killed_after_best(path, state):
        real(path, state)
        if path.name == "best.pt" and state["epoch"] == 3:
            raise Killed

    scores = iter([0.5, 0.1, 0.9])
    monkeypatch.setattr(run_files, "save_checkpoint", killed_after_best)
    with pytest.raises(Killed):
        train(prepared, tmp_path / "cut", TrainConfig(epochs=3, **TINY), progress=False)
    assert load_checkpoint(tmp_path / "cut/last.pt")["epoch"] == 2 and load_checkpoint(tmp_path / "cut/best.pt")["epoch"] == 3
    monkeypatch.setattr(run_files, "save_checkpoint", real)
    resumed = train(prepared, tmp_path / "cut", TrainConfig(epochs=3, **TINY), resume=True, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3] and resumed.best_epoch == 3
    assert "weights are lost" not in capsys.readouterr().err
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert load_checkpoint(tmp_path / "cut/last.pt")["epoch"] == 3
    rows = [line.split(",") for line in (tmp_path / "cut/metrics.csv").read_text().splitlines()]
    assert [r[rows[0].index("best")] for r in rows[1:]] == ["0", "0", "1"]


def test_resume_on_other_prepared_data_is_refused(prepared, tmp_path):
    """--resume goes on with the run's own data: another prepared folder (other cases, other
    settings) would carry on its curves and best epoch on other data."""
    import json
    import shutil

    train(prepared, tmp_path / "run", TrainConfig(epochs=1, **TINY), progress=False)
    moved = shutil.copytree(prepared, tmp_path / "moved")  # the same data elsewhere: fine
    assert len(train(moved, tmp_path / "run", TrainConfig(epochs=2, **TINY), resume=True, progress=False).history) == 2
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["split"]["train"], manifest["split"]["val"] = manifest["split"]["val"], manifest["split"]["train"]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TumorsegError, match=r"--resume goes on with the data the run trained on; this prepared folder "
                                            r"differs in its train/validation cases: give that folder, or start a new run"):
        train(moved, tmp_path / "run", TrainConfig(epochs=3, **TINY), resume=True, progress=False)
    manifest["split"]["train"], manifest["split"]["val"] = manifest["split"]["val"], manifest["split"]["train"]
    manifest["settings"]["norm"] = "zscore"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TumorsegError, match=r"differs in norm: give that folder"):
        train(moved, tmp_path / "run", TrainConfig(epochs=3, **TINY), resume=True, progress=False)


def test_checkpoint_is_self_describing_and_safe(prepared, tmp_path):
    train(prepared, tmp_path / "run", TrainConfig(epochs=1, target="regions", **TINY), progress=False)
    state = torch.load(tmp_path / "run/best.pt", weights_only=True)  # no code can run on load
    assert state["prepare"] == {"channels": ["t2", "t1ce", "flair"], "norm": "minmax", "crop_size": [32, 32, 32],
                                "crop_mode": "fixed", "spacing": [1.0, 1.0, 1.0], "cavity": None}
    assert state["layout"] == "brats2020" and state["labels"]["name"] == "brats2020" and state["labels"]["enhancing"] == 4
    assert state["target"] == "regions" and state["patch"] == [32, 32, 32]
    assert state["label_map"] == {0: 0, 1: 1, 2: 2, 3: 4} and state["regions"] == ["WT", "TC", "ET"]
    net = build_network(**state["network"])
    net.load_state_dict(state["model"])
    assert net(torch.zeros(1, 3, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_ctrl_c_leaves_a_usable_last_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    real = interrupt_training(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(prepared, tmp_path / "run", TrainConfig(epochs=3, **TINY), progress=False)
    assert load_checkpoint(tmp_path / "run/last.pt")["epoch"] == 1
    assert "holds epoch 1; continue with resume=True" in capsys.readouterr().err  # from Python: the argument, not the flag
    monkeypatch.setattr(train_module, "train_epoch", real)
    assert len(train(prepared, tmp_path / "run", TrainConfig(epochs=2, **TINY), resume=True, progress=False).history) == 2


def test_resume_with_more_epochs_continues_the_schedule_on_its_new_curve(prepared, tmp_path):
    cfg = dict(**{k: v for k, v in TINY.items() if k != "lr"}, lr=1e-2, schedule="poly")
    train(prepared, tmp_path / "run", TrainConfig(epochs=2, **cfg), progress=False)  # ends at learning rate 0
    resumed = train(prepared, tmp_path / "run", TrainConfig(epochs=4, **cfg), resume=True, progress=False)
    rates = [row["lr"] for row in resumed.history]
    assert rates[2] == pytest.approx(1e-2 * (1 - 2 / 4) ** 0.9) and rates[3] == pytest.approx(1e-2 * (1 - 3 / 4) ** 0.9)
    assert len(train(prepared, tmp_path / "run", TrainConfig(epochs=4, **cfg), resume=True, progress=False).history) == 4
    with pytest.raises(TumorsegError, match="already holds epoch 4: give --epochs above 4"):
        train(prepared, tmp_path / "run", TrainConfig(epochs=3, **cfg), resume=True, progress=False)
    for change in ({"lr": 0.1}, {"optimizer": "sgd"}, {"weight_decay": 0.1}, {"schedule": "cosine"}):  # state holds the old
        with pytest.raises(TumorsegError, match=f"continues the run as it trained, not with {next(iter(change))} "):
            train(prepared, tmp_path / "run", TrainConfig(epochs=6, **{**cfg, **change}), resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run/last.pt")["config"]["lr"] == 1e-2  # nothing rewritten
    assert "lr: 0.01" in (tmp_path / "run/config.yaml").read_text()


def test_ctrl_c_before_any_epoch_is_saved_says_there_is_nothing_to_resume(prepared, tmp_path, monkeypatch, capsys):
    interrupt_training(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train(prepared, tmp_path / "run", TrainConfig(epochs=3, **TINY), progress=False)
    assert "nothing to resume; start the run again" in capsys.readouterr().err
    assert not (tmp_path / "run/last.pt").exists()


@pytest.mark.parametrize("bad", [{"patch": [0, 32, 32]}, {"workers": -1}, {"steps_per_epoch": -3},
                                 {"max_minutes": -1.0}, {"val_every": 0}, {"weight_decay": -0.1},
                                 {"seed": 2**64}, {"seed": -1}])
def test_impossible_settings_are_one_line_before_training(bad):
    with pytest.raises(TumorsegError, match="must be"):
        TrainConfig(**{**TINY, **bad})


def test_bad_inputs_are_one_line_errors(prepared, tmp_path):
    with pytest.raises(TumorsegError, match="not a prepared folder"):
        train(tmp_path, tmp_path / "run", TrainConfig(**TINY))
    train(prepared, tmp_path / "run", TrainConfig(epochs=1, **TINY), progress=False)
    with pytest.raises(TumorsegError, match="already holds a run"):
        train(prepared, tmp_path / "run", TrainConfig(epochs=1, **TINY))
    best = (tmp_path / "run/best.pt").read_bytes()
    (tmp_path / "run/last.pt").write_bytes(b"damaged")  # --resume fails: deleting last.pt must not look like the way on
    with pytest.raises(TumorsegError, match=r"not a readable tumorseg checkpoint .*; the run cannot go on, but .*best\.pt "
                                            r"is untouched: predict with it, or train into another folder$"):
        train(prepared, tmp_path / "run", TrainConfig(epochs=2, **TINY), resume=True)
    (tmp_path / "run/last.pt").unlink()
    with pytest.raises(TumorsegError, match=r"already holds a trained model \(best\.pt; without its last\.pt the run "
                                            r"cannot be resumed\): train into another folder$"):
        train(prepared, tmp_path / "run", TrainConfig(epochs=1, **TINY))
    assert (tmp_path / "run/best.pt").read_bytes() == best
    train(prepared, tmp_path / "run1", TrainConfig(epochs=1, **TINY), progress=False)
    with pytest.raises(TumorsegError, match="checkpoint of another network.*give its --model unet3d --filters 4,8,16 "):
        train(prepared, tmp_path / "run1", TrainConfig(epochs=2, **{**TINY, "filters": [4, 8]}), resume=True)
    with pytest.raises(TumorsegError, match="patch"):
        train(prepared, tmp_path / "r2", TrainConfig(patch=[10, 10, 10], **TINY))
    with pytest.raises(TumorsegError, match=r"class_weights for target 'regions' must be 3 non-negative values"):
        train(prepared, tmp_path / "r4", resolve_config(None, {"target": "regions", **TINY}, recipe="seed"))
    (tmp_path / "bad.toml").write_text("epochs = 2\nlearning_rate = 1\n")
    with pytest.raises(TumorsegError, match="unknown key.*learning_rate"):
        resolve_config(tmp_path / "bad.toml")
    (tmp_path / "latin1.yaml").write_bytes("# réglages\nepochs: 2\n".encode("latin-1"))  # or Notepad's UTF-16
    with pytest.raises(TumorsegError, match=r"latin1\.yaml: cannot read config \(not UTF-8 text: save it as UTF-8\)$"):
        resolve_config(tmp_path / "latin1.yaml")
    (tmp_path / "bom.yaml").write_bytes("\ufeffepochs: 2\n".encode("utf-8"))  # Notepad's UTF-8 begins with a mark
    assert resolve_config(tmp_path / "bom.yaml").epochs == 2
    if not torch.cuda.is_available():
        with pytest.raises(TumorsegError, match="no CUDA GPU"):
            train(prepared, tmp_path / "r3", TrainConfig(device="cuda", **TINY))


def test_last_checkpoint_is_read_only_under_the_run_lock(prepared, tmp_path):
    """A second run into a folder another run holds is refused by the lock, not by reading the
    last.pt the first may be rewriting."""
    from tumorseg.lock import folder_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"half-written")
    with folder_lock(run, "train"):
        for resume in (True, False):
            with pytest.raises(TumorsegError, match="is in use by tumorseg train"):
                train(prepared, run, TrainConfig(epochs=1, **TINY), resume=resume, progress=False)
    with pytest.raises(TumorsegError, match="checkpoint not found"):  # a mistyped folder: nothing created
        train(prepared, tmp_path / "typo", TrainConfig(epochs=1, **TINY), resume=True, progress=False)
    assert not (tmp_path / "typo").exists()


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("model: unet\nepochs: 7\nlr: 0.01\n")
    cfg = resolve_config(tmp_path / "c.yaml", {"epochs": 3, "lr": None})
    assert (cfg.model, cfg.epochs, cfg.lr) == ("unet", 3, 0.01)


def test_cli_train_and_resume(prepared, tmp_path, capsys):
    args = ["train", str(prepared), str(tmp_path / "run"), "--filters", "4,8,16", "--epochs", "1", "--model", "unet"]
    assert main(args) == 0
    assert main(["train", str(prepared), str(tmp_path / "run"), "--resume", "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "run/last.pt")["epoch"] == 2  # settings came from the run's config.yaml
    assert main(["train", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "not a prepared folder" in capsys.readouterr().err


def test_a_resume_with_a_config_file_or_dict_changes_only_what_it_names(prepared, tmp_path):
    """`--resume --config more.yaml` and `train(..., {"epochs": 3}, resume=True)` had started from the
    defaults instead of the run's settings: another patch, seed and steps, and TTA off in the model."""
    run = ["--filters", "4,8,16", "--epochs", "1", "--patch", "16,16,16", "--seed", "3", "--tta", "--steps-per-epoch", "2"]
    assert main(["train", str(prepared), str(tmp_path / "cli"), *run]) == 0
    shutil.copytree(tmp_path / "cli", tmp_path / "api")
    (tmp_path / "more.yaml").write_text("epochs: 2\n")
    assert main(["train", str(prepared), str(tmp_path / "cli"), "--config", str(tmp_path / "more.yaml"), "--resume"]) == 0
    train(prepared, tmp_path / "api", {"epochs": 2}, resume=True, progress=False)
    for name in ("cli", "api"):
        config = load_checkpoint(tmp_path / name / "last.pt")["config"]
        assert {k: config[k] for k in ("epochs", "patch", "seed", "tta", "steps_per_epoch", "filters")} == {
            "epochs": 2, "patch": [16, 16, 16], "seed": 3, "tta": True, "steps_per_epoch": 2, "filters": [4, 8, 16]}, name


def test_ddp_two_cpu_processes(prepared, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tumorseg.cli", "train", str(prepared), str(tmp_path / "ddp"),
           "--filters", "4,8,16", "--epochs", "2", "--batch-size", "1", "--device", "cpu", "--postprocess"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x2" in proc.stderr  # both ranks joined one process group
    state = load_checkpoint(tmp_path / "ddp/last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped
    row = state["history"][-1]  # tuned on the validation outputs gathered from both ranks
    assert state["inference"]["postprocess_largest_tumour"] is row["largest_tumour"]
    assert state["inference"]["postprocess_et_threshold"] == row["et_threshold"]
    assert state["inference"]["postprocess_min_component"] == [row["min_wt"], row["min_tc"], row["min_et"]]
    assert len(state["inference"]["postprocess_statistics"]) == len(split_ids(prepared, "val"))  # both ranks' cases


def test_postprocess_threshold_tuned_on_validation_and_stored(prepared, tmp_path):
    train(prepared, tmp_path / "run", TrainConfig(epochs=1, postprocess=True, **TINY), progress=False)
    state = load_checkpoint(tmp_path / "run/last.pt")
    threshold = state["inference"]["postprocess_et_threshold"]
    assert "et_threshold" in state["history"][-1] and threshold == state["history"][-1]["et_threshold"]
    assert state["inference"]["postprocess_largest_tumour"] is state["history"][-1]["largest_tumour"]
    assert threshold is None or threshold in postprocess_module.ET_THRESHOLDS
    row = state["history"][-1]
    minimum = state["inference"]["postprocess_min_component"]
    assert minimum == [row["min_wt"], row["min_tc"], row["min_et"]] and 0.0 <= row["lesion_dice"] <= 1.0
    assert all(v == 0 or v in postprocess_module.COMPONENT_SIZES for v in minimum)
    # what the choice was made on travels with it, and makes it again (an ensemble pools these)
    stats = postprocess_module.statistics_from_state(state["inference"]["postprocess_statistics"])
    assert len(stats) == len(split_ids(prepared, "val"))
    again = postprocess_module.choose_default(stats)
    assert (again["et_threshold"], again["min_component"]) == (threshold, minimum)
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0].split(",")
    assert {"min_wt", "min_tc", "min_et", "lesion_dice"} <= set(header)


def test_folds_deal_every_case_into_exactly_one_validation_set():
    ids = [f"c{i:02d}" for i in range(23)]
    parts = [fold_split(ids, 5, k, seed=42) for k in range(5)]
    vals = [p["val"] for p in parts]
    assert sorted(v for val in vals for v in val) == ids and {len(v) for v in vals} == {4, 5}
    assert all(sorted(p["train"] + p["val"]) == ids and not set(p["train"]) & set(p["val"]) for p in parts)
    assert fold_split(list(reversed(ids)), 5, 3, seed=42) == parts[3]  # the ids' order does not matter
    assert fold_split(ids, 5, 3, seed=7) != parts[3]


def test_cross_validation_folds_train_apart_and_predict_as_their_ensemble(prepared, tmp_path, capsys):
    config = dict(epochs=1, postprocess=True, folds=2, **TINY)
    cases = sorted(split_ids(prepared, "train") + split_ids(prepared, "val"))
    for k in range(2):
        result = train(prepared, tmp_path / "cv", TrainConfig(fold=k, **config))
        assert result.run_dir == tmp_path / "cv" / f"fold_{k}"
        assert (tmp_path / "cv/cross_validation.json").exists() == (k == 1)  # once every fold is trained
    err = capsys.readouterr().err
    assert f"fold 1 of 2 ({tmp_path / 'cv' / 'fold_1'}): training unet3d on 3 cases, validating on 2" in err
    summary = json.loads((tmp_path / "cv/cross_validation.json").read_text())
    best = [load_checkpoint(tmp_path / f"cv/fold_{k}/best.pt") for k in range(2)]
    dice = [next(r["dice_WT"] for r in b["history"] if r["epoch"] == b["best_epoch"]) for b in best]
    assert summary["cases"] == 5 and summary["dice"]["WT"] == pytest.approx((3 * dice[0] + 2 * dice[1]) / 5)
    assert f"cross-validation of 2 folds: 5 cases, each validated by the fold that did not train on it: Dice WT " \
           f"{summary['dice']['WT']:.3f}" in err
    assert 0.0 <= summary["lesion_dice"] <= 1.0 and set(summary["postprocessing"]) == {
        "largest_tumour", "et_threshold", "min_component"}
    seed = load_manifest(prepared)["settings"]["seed"]  # the prepared folder's split seed deals the folds
    for k in range(2):
        state = load_checkpoint(tmp_path / f"cv/fold_{k}/best.pt")
        fold = fold_split(cases, 2, k, seed)
        assert state["data_split"] == split_digest(fold["train"], fold["val"])
        assert state["config"]["fold"] == k and len(state["inference"]["postprocess_statistics"]) == len(fold["val"])
    ensemble = Predictor.from_checkpoints(tmp_path / "cv", device="cpu")
    assert ensemble.members == 2  # post-processing chosen on every prepared case, each validated by one fold
    assert ensemble.postprocess_source == f"chosen on the members' {len(cases)} validation cases"
    # resumed by the run folder and its fold, or by the fold's folder; another cross-validation is refused
    train(prepared, tmp_path / "cv", TrainConfig(fold=0, **{**config, "epochs": 2}), resume=True, progress=False)
    train(prepared, tmp_path / "cv/fold_0", TrainConfig(fold=0, **{**config, "epochs": 3}), resume=True, progress=False)
    assert load_checkpoint(tmp_path / "cv/fold_0/last.pt")["epoch"] == 3 and not (tmp_path / "cv/fold_0/fold_0").exists()
    # resumed without --postprocess: its statistics are not an earlier epoch's, left over
    train(prepared, tmp_path / "cv/fold_0", TrainConfig(fold=0, **{**config, "epochs": 4, "postprocess": False}),
          resume=True, progress=False)
    assert load_checkpoint(tmp_path / "cv/fold_0/last.pt")["inference"]["postprocess_statistics"] is None
    with pytest.raises(TumorsegError, match="trained as fold 0 of 2; resume it with --fold 0 --folds 2"):
        train(prepared, tmp_path / "cv", TrainConfig(fold=0, **{**config, "folds": 3, "epochs": 5}), resume=True,
              progress=False)
    with pytest.raises(TumorsegError, match="resume it with --fold 0 --folds 2"):
        train(prepared, tmp_path / "cv/fold_0", TrainConfig(**{**config, "epochs": 5}), resume=True, progress=False)
    # the folder of folds is one cross-validation: a fold trained as another's, or missing, is named
    for k in range(2):  # the cases and the seed that dealt them: folds of another deal overlap, so never one
        assert load_checkpoint(tmp_path / f"cv/fold_{k}/best.pt")["data_cases"] == cases_digest(cases, seed)
    assert cases_digest(cases, seed + 1) != cases_digest(cases, seed)
    (tmp_path / "cv/fold_1").rename(tmp_path / "cv/moved")
    with pytest.raises(TumorsegError, match=r"trained as 2 folds, 1 found \(fold_1 missing: train --fold 1 --folds 2\)"):
        Predictor.from_checkpoints(tmp_path / "cv", device="cpu")
    (tmp_path / "cv/moved").rename(tmp_path / "cv/fold_2")
    with pytest.raises(TumorsegError, match=r"fold_2/best.pt: trained as fold 1, not fold_2"):
        Predictor.from_checkpoints(tmp_path / "cv", device="cpu")
    with pytest.raises(TumorsegError, match="5 kept case\\(s\\) cannot make 6 folds"):
        train(prepared, tmp_path / "six", TrainConfig(fold=0, **{**config, "folds": 6}), progress=False)
    with pytest.raises(TumorsegError, match="fold must be in 0..folds-1"):
        TrainConfig(fold=2, folds=2)


def test_cli_trains_and_resumes_a_fold(prepared, tmp_path, capsys):
    args = ["train", str(prepared), str(tmp_path / "cv"), "--filters", "4,8,16", "--epochs", "1", "--fold", "1",
            "--folds", "3"]
    assert main(args) == 0
    assert f"checkpoints in {tmp_path / 'cv' / 'fold_1'}" in capsys.readouterr().out
    assert main(["train", str(prepared), str(tmp_path / "cv"), "--fold", "1", "--resume", "--epochs", "2"]) == 0
    state = load_checkpoint(tmp_path / "cv/fold_1/last.pt")  # its folds and filters came from the fold's config.yaml
    assert state["epoch"] == 2 and state["config"]["folds"] == 3 and list(state["network"]["filters"]) == [4, 8, 16]
    assert main(["train", str(prepared), str(tmp_path / "cv/fold_1"), "--resume", "--folds", "3", "--epochs", "3"]) == 0
    assert load_checkpoint(tmp_path / "cv/fold_1/last.pt")["epoch"] == 3  # the fold's folder names its fold
    assert main(["train", str(prepared), str(tmp_path / "other"), "--folds", "3"]) == 2
    assert "--folds sets the folds of a cross-validation; give the fold to train with --fold K (0..2)" in \
        capsys.readouterr().err
    refusals = {  # each names what is wrong, before any work
        ("cv/fold_1", "--fold", "0", "--folds", "3", "--resume"): f"{tmp_path / 'cv' / 'fold_1'}: the folder of fold 1, "
        f"not of fold 0: give the cross-validation's folder ({tmp_path / 'cv'}) with --fold 0",
        ("cv", "--fold", "1", "--resume", "--epochs", "4", "--target", "regions"):
            "--resume continues the run as it trained, not with target labels -> regions",
        ("cv", "--fold", "1", "--resume", "--epochs", "4", "--recipe", "seed"): "--recipe seed is not the run's settings "
            "(filters [4, 8, 16] in the run, [16, 32, 64, 128, 256] in the recipe; class_weights None in the run, "
            "[0.25, 0.25, 0.25, 0.25] in the recipe): --resume goes on with the run's",
    }
    for args, message in refusals.items():
        assert main(["train", str(prepared), str(tmp_path / args[0]), *args[1:]]) == 2
        assert message in capsys.readouterr().err
    same = ["train", str(prepared), str(tmp_path / "seeded"), "--recipe", "seed", "--filters", "4,8,16", "--epochs", "1"]
    assert main(same) == 0 and main([*same[:-1], "2", "--resume"]) == 0  # the command it started with, resumed
    assert load_checkpoint(tmp_path / "seeded/last.pt")["epoch"] == 2
    (tmp_path / "fold.yaml").write_text("fold: 2\nfilters: [4, 8, 16]\nepochs: 1\n")  # the fold from a config file
    assert main(["train", str(prepared), str(tmp_path / "cv"), "--config", str(tmp_path / "fold.yaml"), "--folds", "3"]) == 0
    assert load_checkpoint(tmp_path / "cv/fold_2/last.pt")["config"]["fold"] == 2


def test_wall_clock_budget_stops_and_decays_the_learning_rate(prepared, tmp_path, capsys):
    config = TrainConfig(epochs=50, max_minutes=1e-4, schedule="poly", val_every=10, **TINY)
    result = train(prepared, tmp_path / "run", config, progress=False)
    assert len(result.history) == 1 and result.history[0]["dice_mean"] is not None  # the last epoch is validated
    assert "budget is spent" in capsys.readouterr().err
    state = load_checkpoint(tmp_path / "run/last.pt")
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(0.0)  # poly reached its end with the budget
    again = train(prepared, tmp_path / "run", config, resume=True, progress=False)  # done: no epoch at rate 0
    assert len(again.history) == 1 and "budget is already spent" in capsys.readouterr().err


def test_a_validation_that_spends_the_budget_ends_the_run(prepared, tmp_path, monkeypatch):
    """Without it, the next epoch would train at the poly schedule's rate of 0 for nothing."""
    import time

    slow = train_module.validate

    def validate(*args, **kwargs):
        time.sleep(1.5)  # past the 1.2 s budget, which the epoch's training left unspent
        return slow(*args, **kwargs)

    monkeypatch.setattr(train_module, "validate", validate)
    config = TrainConfig(epochs=5, max_minutes=0.02, schedule="poly", **TINY)
    result = train(prepared, tmp_path / "run", config, progress=False)
    assert len(result.history) == 1 and result.history[0]["lr"] > 0


def test_settings_built_in_python_take_their_types(prepared, tmp_path):
    config = TrainConfig(tta="no", postprocess="false", epochs="2", lr="3e-3", filters="4,8,16")
    assert (config.tta, config.postprocess, config.epochs, config.lr, config.filters) == (False, False, 2, 3e-3, [4, 8, 16])
    with pytest.raises(TumorsegError, match=r"^TrainConfig: epochs must be an integer \(got 2.5\)$"):
        TrainConfig(epochs=2.5)
    (tmp_path / "c.TOML").write_text("epochs = 3\n")  # the suffix in any case
    assert resolve_config(tmp_path / "c.TOML").epochs == 3
    (tmp_path / "c.json").write_text('{"epochs": "4", "patch": [32, 32, 32]}')
    assert (resolve_config(tmp_path / "c.json").epochs, resolve_config(tmp_path / "c.json").patch) == (4, [32, 32, 32])
    result = train(prepared, tmp_path / "run", {"epochs": 1, **TINY}, progress=False)  # a dict as TrainConfig
    assert len(result.history) == 1


def test_loss_guard_skips_broken_losses_and_stops_a_diverging_run():
    from tumorseg.training.distributed import DistContext
    from tumorseg.training.engine import LossGuard

    ctx, guard = DistContext(0, 1, 0, torch.device("cpu")), LossGuard(limit=3)
    losses = [1.0, float("nan"), float("inf"), 0.5, float("nan"), float("-inf")]
    assert [guard.allows(v, ctx, 0) for v in losses] == [True, False, False, True, False, False]
    assert guard.skipped == 4 and guard.in_a_row == 2  # a finite loss resets the run of bad ones
    with pytest.raises(TumorsegError, match="NaN or infinite in 3 steps in a row"):
        guard.allows(float("nan"), ctx, 7)


@pytest.mark.parametrize("damage", [b"", b"\x93NUMPY"])
def test_a_damaged_array_is_one_line_naming_it_and_how_to_redo_it(prepared, tmp_path, damage):
    import json
    import shutil

    copy = tmp_path / "prep"
    shutil.copytree(prepared, copy)
    case_id = json.loads((copy / "manifest.json").read_text())["split"]["train"][0]
    (copy / "masks" / f"{case_id}.npy").write_bytes(damage)
    with pytest.raises(TumorsegError, match=rf"masks/{case_id}.npy: cannot read .npy \(.+\); run the same "
                                            r"`tumorseg prepare` again: it redoes damaged arrays; no epoch was saved$"):
        train(copy, tmp_path / "run", TrainConfig(epochs=1, workers=0, **TINY), progress=False)


@pytest.mark.parametrize("damage", ["list", "no settings", "no split", "crop", "channels"])
def test_a_damaged_manifest_is_one_line_naming_it(prepared, tmp_path, damage):
    import json
    import shutil

    copy = tmp_path / "prep"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if damage == "list":
        manifest = [manifest]
    elif damage in ("no settings", "no split"):
        del manifest[damage.split()[1]]
    elif damage == "crop":
        manifest["settings"]["crop_size"] = "abc"
    else:
        manifest["settings"]["channels"] = ["t2", "pd"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TumorsegError, match=r"manifest.json: (damaged manifest|not a tumorseg manifest)"):
        train(copy, tmp_path / "run", TrainConfig(epochs=1, **TINY), progress=False)


def test_a_training_epoch_writes_its_progress_at_the_bars_pace(monkeypatch, capsys):
    """In a log file (bars update once a minute there: `bars.progress_bar`) the running loss must not
    force a progress line every step."""
    class Loader(list):
        sampler = type("Sampler", (), {"set_epoch": lambda self, epoch: None})()

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(bars, "in_log_file", lambda: True)
    torch.manual_seed(0)
    loader = Loader({"image": torch.randn(1, 1, 8, 8, 8), "label": torch.randint(0, 4, (1, 1, 8, 8, 8))}
                    for _ in range(6))
    model = torch.nn.Conv3d(1, 3, 1)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    engine.train_epoch(model, loader, build_loss("regions"), torch.optim.SGD(model.parameters(), lr=1e-3), scaler, ctx, 0)
    assert capsys.readouterr().err.count("loss=") <= 1  # at most the last state, not one per step


@pytest.mark.parametrize("workers", [0, 2])
def test_a_prepared_mask_outside_the_training_classes_is_one_line_naming_it(prepared, tmp_path, capsys, workers):
    """A hand-edited or damaged mask (a 9) fails in the loader, in this process or a worker, as one
    line naming the array, not as a one-hot traceback deep in the loss."""
    import shutil

    import numpy as np

    copy = tmp_path / "prep"
    shutil.copytree(prepared, copy)
    case = load_manifest(copy)["split"]["train"][0]
    mask = np.load(copy / "masks" / f"{case}.npy")
    mask[0, 0, 0] = 9
    np.save(copy / "masks" / f"{case}.npy", mask)
    args = ["train", str(copy), str(tmp_path / "run"), "--epochs", "1", "--filters", "4,8,16", "--workers", str(workers)]
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert f"masks/{case}.npy: labels 0, " in last and "9 outside the training classes 0..3; delete it and run" in last
    assert "Traceback" not in err and last.endswith("no epoch was saved")


def test_a_fold_beyond_the_default_count_resumes_by_its_fold_alone(tmp_path):
    """`--fold 5 --resume` takes the fold count from the run's config.yaml (6), not the default 5."""
    for i in range(6):
        write_case(tmp_path / "raw", f"c{i}", seed=i)
    prepare(tmp_path / "raw", tmp_path / "prep", PrepareConfig(crop_size=(32, 32, 32)), workers=1, progress=False)
    start = ["train", str(tmp_path / "prep"), str(tmp_path / "cv"), "--filters", "4,8,16", "--epochs", "1"]
    assert main([*start, "--fold", "5", "--folds", "6"]) == 0
    assert main(["train", str(tmp_path / "prep"), str(tmp_path / "cv"), "--fold", "5", "--resume", "--epochs", "2"]) == 0
    assert main(["train", str(tmp_path / "prep"), str(tmp_path / "cv/fold_5"), "--fold", "5", "--resume",
                 "--epochs", "3"]) == 0
    assert load_checkpoint(tmp_path / "cv/fold_5/last.pt")["epoch"] == 3


@pytest.mark.parametrize("patch, message", [
    ([48, 32, 32], r"patch \[48, 32, 32\] is larger than the prepared size \[32, 32, 32\]"),
    ([24, 16, 16], r"patch \[24, 16, 16\] must be divisible by 16 for unet3d with these filters"),
    ([16, 16, 16], r"patch \[16, 16, 16\] leaves a single voxel at unet3d's deepest level: make one side at least 32"),
])
def test_a_patch_the_network_cannot_take_is_one_line_before_any_work(prepared, tmp_path, patch, message):
    """A 1-voxel bottleneck passed the divisibility check, then instance norm failed at step 1 with a traceback."""
    with pytest.raises(TumorsegError, match=message):
        train(prepared, tmp_path / "run", TrainConfig(epochs=1, patch=patch, filters=[4, 8, 16, 32, 64]), progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    train_module._check_patch(TrainConfig(patch=[32, 16, 16], filters=[4, 8, 16, 32, 64]), [32, 32, 32])  # 2 voxels: fine
    train_module._check_patch(TrainConfig(model="segresnet", patch=[8, 8, 8]), [32, 32, 32])  # group norm: one will do
    build_network("segresnet", 4, 4).train()(torch.zeros(2, 4, 8, 8, 8))  # ... as it trains


def test_the_callers_random_generators_are_left_as_they_were(prepared, tmp_path):
    """Training seeds every generator: a notebook's draws after `train` must not be the same whatever its seed."""
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    def seeded(seed):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    seeded(1)
    expected = draws()
    seeded(1)
    result = train(prepared, tmp_path / "run", TrainConfig(epochs=1, **TINY), progress=False)
    assert draws() == expected
    seeded(2)
    expected = draws()
    seeded(2)
    Predictor.from_checkpoint(result.best_checkpoint, device="cpu")  # its network's initial weights drew none
    assert draws() == expected


def test_settings_given_as_a_file_a_dict_or_nothing_else(prepared, tmp_path):
    (tmp_path / "cfg.yaml").write_text("epochs: 1\nfilters: [4, 8, 16]\nbatch_size: 2\n")
    result = train(prepared, tmp_path / "run", str(tmp_path / "cfg.yaml"), progress=False)
    assert len(result.history) == 1 and result.best_checkpoint == tmp_path / "run/best.pt"
    assert list(load_checkpoint(result.best_checkpoint)["network"]["filters"]) == [4, 8, 16]
    with pytest.raises(TumorsegError, match=r"^train: config must be a TrainConfig, a dict or a settings file, not list$"):
        train(prepared, tmp_path / "run2", [1, 2], progress=False)


def test_a_killed_loader_worker_is_one_line(prepared, tmp_path, monkeypatch):
    """The out-of-memory killer taking a loader worker: torch's RuntimeError becomes the usual line."""
    def killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(train_module, "train_epoch", killed)
    with pytest.raises(TumorsegError, match=r"^DataLoader worker \(pid 4242\) is killed by signal: Killed \(out of "
                                            r"memory\?\): lower --workers; no epoch was saved$"):
        train(prepared, tmp_path / "run", TrainConfig(epochs=1, **TINY), progress=False)


def test_the_cuda_seed_a_caller_left_waiting_is_left_again(monkeypatch):
    """CUDA not started: `torch.manual_seed` leaves its seed for CUDA's first use; training's own
    seeding must not take its place (checked with the CUDA calls stood in for, on any machine)."""
    from tumorseg.training.rng import callers_rng_kept

    seeded = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    torch.manual_seed(7)
    with callers_rng_kept():
        torch.manual_seed(0)
    assert seeded == [7, 0, 7] and torch.initial_seed() == 7  # the caller's, the block's, the caller's again
