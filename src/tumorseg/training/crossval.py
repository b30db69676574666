"""A cross-validation's result once all its folds are trained (`train --fold K`): every prepared case
scored once, by the fold that did not train on it, as nnU-Net summarises its five folds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..errors import TumorsegError
from ..inference.postprocess import choose_default, statistics_from_state
from ..io import write_text
from ..labels import REGIONS

SUMMARY = "cross_validation.json"


def summarize(cv_dir: Path, sizes: list[int]) -> dict[str, Any] | None:
    """The out-of-fold Dice of the `len(sizes)`-fold cross-validation in `cv_dir` (fold k validated
    `sizes[k]` cases): each fold's best epoch, their case-weighted mean per region and, where every
    fold stores its validation statistics, the post-processing their ensemble chooses on them and its
    lesion-wise Dice. None until every fold of this cross-validation has a `best.pt`; TumorsegError
    where a fold's folder holds another cross-validation's fold (other settings, fold count or cases)."""
    folds, rows, stats, cases, first = len(sizes), [], [], None, None
    for k in range(folds):
        try:
            state = load_checkpoint(cv_dir / f"fold_{k}" / "best.pt")
        except TumorsegError:  # not trained yet (or damaged: its own run says so)
            return None
        inputs = _inputs(state)
        first = first or inputs
        differ = [f"{key} {inputs[key]}, but fold_0: {first[key]}" for key in inputs if inputs[key] != first[key]]
        if differ:  # their ensemble cannot run, and their scores are not one model's
            raise TumorsegError(f"fold_{k}: {'; '.join(differ)}; retrain it with fold 0's settings")
        config = state.get("config") or {}
        best = next((row for row in state.get("history", []) if row.get("epoch") == state.get("best_epoch")
                     and "dice_mean" in row), None)
        its_cases = state.get("data_cases")  # None: trained before it was recorded, not compared
        cases = cases or its_cases
        if config.get("folds") != folds:  # a stale summary must not vouch for folds of two cross-validations
            raise TumorsegError(f"fold_{k}: a fold of a {config.get('folds')}-fold cross-validation, not of "
                                f"{folds}; retrain it with --folds {folds}")
        if its_cases not in (None, cases):
            raise TumorsegError(f"fold_{k}: trained on other cases than the other folds (another prepared folder "
                                "or split seed); retrain it on theirs")
        if config.get("fold") != k or best is None:
            return None  # not this fold's run, or a fold never validated
        rows.append({"fold": k, "cases": sizes[k], "best_epoch": best["epoch"],
                     **{f"dice_{r}": best[f"dice_{r}"] for r in REGIONS}})
        stored = (state.get("inference") or {}).get("postprocess_statistics")
        stats = stats + statistics_from_state(stored) if stats is not None and stored is not None else None
    n = sum(sizes)
    summary: dict[str, Any] = {
        "folds": folds, "cases": n, "per_fold": rows,
        "dice": {r: sum(row["cases"] * row[f"dice_{r}"] for row in rows) / n for r in REGIONS},
    }
    if stats:
        tuned = choose_default(stats)
        summary["postprocessing"] = {k: tuned[k] for k in ("largest_tumour", "et_threshold", "min_component")}
        summary["lesion_dice"] = tuned["lesion_dice"]
    return summary


def _inputs(state: dict) -> dict[str, Any]:
    """What a fold's network reads and predicts: the same in every fold of one cross-validation."""
    prepare = state.get("prepare") or {}
    return {"target": state.get("target"), "out_channels": (state.get("network") or {}).get("out_channels"),
            **{key: prepare.get(key) for key in ("channels", "norm", "spacing")}}


def report(cv_dir: Path, sizes: list[int]) -> str | None:
    """Write `cv_dir/cross_validation.json` once every fold is trained, and say it in one line (None before)."""
    try:
        summary = summarize(cv_dir, sizes)
    except ValueError:  # damaged validation statistics in a fold's checkpoint
        return None
    except TumorsegError as exc:  # folds that do not make one model: said, and no summary
        (cv_dir / SUMMARY).unlink(missing_ok=True)
        return f"warning: the folds in {cv_dir} are not one cross-validation, not summed: {exc}"
    if summary is None:
        return None
    write_text(cv_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    dice = " / ".join(f"{r} {summary['dice'][r]:.3f}" for r in REGIONS)
    lesion = f", lesion-wise {summary['lesion_dice']:.3f} after the ensemble's post-processing" if "lesion_dice" in summary else ""
    return (f"cross-validation of {summary['folds']} folds: {summary['cases']} cases, each validated by the fold that "
            f"did not train on it: Dice {dice}{lesion} ({cv_dir / SUMMARY}); predict with the folds' ensemble: "
            f"tumorseg predict {cv_dir} CASES OUT")
