"""The cross-validation summary: written once every fold of one cross-validation is trained."""

import json

import pytest

from tumorseg.checkpoint import save_checkpoint
from tumorseg.training import crossval


def _fold(root, k, folds, dice, statistics=None, cases="abc"):
    row = {"epoch": 3, "dice_mean": sum(dice) / 3, **dict(zip(("dice_WT", "dice_TC", "dice_ET"), dice))}
    save_checkpoint(root / f"fold_{k}" / "best.pt", {
        "config": {"fold": k, "folds": folds}, "best_epoch": 3, "history": [{"epoch": 2, "train_loss": 1.0}, row],
        "inference": {"postprocess_statistics": statistics}, "data_cases": cases})


def test_summary_waits_for_every_fold_of_its_own_cross_validation(tmp_path):
    _fold(tmp_path, 0, 2, (0.9, 0.6, 0.3))
    assert crossval.report(tmp_path, [3, 2]) is None and not (tmp_path / crossval.SUMMARY).exists()
    _fold(tmp_path, 1, 2, (0.8, 0.5, 0.2))
    assert crossval.report(tmp_path, [3, 2]).startswith("cross-validation of 2 folds")
    _fold(tmp_path, 1, 3, (0.8, 0.5, 0.2))  # a fold of another (3-fold) cross-validation
    assert crossval.report(tmp_path, [3, 2]) == (f"warning: the folds in {tmp_path} are not one cross-validation, not "
                                                 "summed: fold_1: a fold of a 3-fold cross-validation, not of 2; "
                                                 "retrain it with --folds 2")
    assert not (tmp_path / crossval.SUMMARY).exists()  # the earlier summary is not left to vouch for them
    _fold(tmp_path, 1, 2, (0.8, 0.5, 0.2), cases="other")  # of a 2-fold cross-validation over other cases
    assert crossval.report(tmp_path, [3, 2]).endswith("fold_1: trained on other cases than the other folds (another "
                                                      "prepared folder or split seed); retrain it on theirs")
    _fold(tmp_path, 1, 2, (0.8, 0.5, 0.2))
    line = crossval.report(tmp_path, [3, 2])
    summary = json.loads((tmp_path / crossval.SUMMARY).read_text())
    assert summary["dice"]["WT"] == pytest.approx((3 * 0.9 + 2 * 0.8) / 5) and summary["cases"] == 5
    assert [row["best_epoch"] for row in summary["per_fold"]] == [3, 3]
    assert "postprocessing" not in summary and "lesion-wise" not in line  # trained without --postprocess
    assert line.startswith("cross-validation of 2 folds: 5 cases") and "Dice WT 0.860 / TC 0.560 / ET 0.260" in line


def test_folds_trained_before_the_case_digest_are_summed_with_the_others(tmp_path):
    _fold(tmp_path, 0, 2, (0.9, 0.6, 0.3), cases=None)
    _fold(tmp_path, 1, 2, (0.8, 0.5, 0.2))
    assert crossval.summarize(tmp_path, [3, 2])["cases"] == 5


def test_folds_that_read_or_predict_otherwise_are_not_summed_and_say_why(tmp_path):
    for k in range(2):
        _fold(tmp_path, k, 2, (0.9, 0.6, 0.3))
    assert crossval.report(tmp_path, [3, 2]).startswith("cross-validation of 2 folds")
    state = {"config": {"fold": 1, "folds": 2}, "best_epoch": 3, "data_cases": "abc", "target": "regions",
             "history": [{"epoch": 3, "dice_mean": 0.5, "dice_WT": 0.5, "dice_TC": 0.5, "dice_ET": 0.5}]}
    save_checkpoint(tmp_path / "fold_1" / "best.pt", state)  # retrained with --target regions
    line = crossval.report(tmp_path, [3, 2])
    assert line == (f"warning: the folds in {tmp_path} are not one cross-validation, not summed: fold_1: target "
                    "regions, but fold_0: None; retrain it with fold 0's settings")
    assert not (tmp_path / crossval.SUMMARY).exists()  # the earlier summary is not left to vouch for them
