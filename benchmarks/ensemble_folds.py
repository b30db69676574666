"""Does the ensemble of a cross-validation's folds beat its folds alone on held-out real cases?

Holds out a seeded set of test cases (as `real_learning.py`), prepares the others with a recipe's
settings, trains each of K folds over them (`train --fold K --folds K`, the recipe's
post-processing chosen on each fold's validation cases) for the same budget, then predicts the
held-out cases with every fold alone and with their ensemble (the folder of folds, its
post-processing chosen on all folds' validation cases), each without and with its
post-processing, and scores them with the BraTS 2020 metrics and the 2023+ lesion-wise Dice,
with the seconds per case of each `predict` call and the cross-validation's own summary.
Prints a table side by side and writes everything as JSON; a re-run goes on where it stopped.

    python benchmarks/ensemble_folds.py --data ../shared/data/brats --work /tmp/ens --folds 3 --minutes 12
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from common import add_out_arg, add_real_data_args, device_label, results_path, write_results
from real_learning import hold_out

from tumorseg.checkpoint import load_checkpoint
from tumorseg.evaluation import evaluate
from tumorseg.inference import predict
from tumorseg.labels import REGIONS
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.recipes import load_recipe
from tumorseg.training import crossval, resolve_config, train

METRICS = ("dice", "hd95", "lesion_dice")


def train_folds(recipe: str, train_dir: Path, work: Path, folds: int, minutes: float, config_file: Path | None = None,
                crop: int | None = None) -> list[dict]:
    """Every fold trained for `minutes` (resumed where a run stopped short of its budget); `config_file`
    and `crop` override the recipe's training and crop settings."""
    crop_size = {"crop_size": [crop] * 3} if crop else {}
    prep_cfg = PrepareConfig.from_dict({**PrepareConfig().to_dict(), **load_recipe(recipe)["prepare"], **crop_size})
    prepare(train_dir, work / "prepared", prep_cfg)
    rows = []
    for fold in range(folds):
        config = resolve_config(config_file, {"max_minutes": minutes, "fold": fold, "folds": folds, "postprocess": True},
                                recipe=recipe)
        last = work / "cv" / f"fold_{fold}" / "last.pt"
        history = load_checkpoint(last)["history"] if last.exists() else []
        if not history or sum(row["seconds"] for row in history) <= 60 * minutes:
            history = train(work / "prepared", work / "cv", config, resume=last.exists()).history
        best = load_checkpoint(last.with_name("best.pt"))
        rows.append({"fold": fold, "epochs": len(history), "best_epoch": best["best_epoch"],
                     "train_minutes": round(sum(row["seconds"] for row in history) / 60, 1),
                     "validation_cases": len(best["inference"]["postprocess_statistics"] or [])})
    return rows


def predict_and_score(name: str, model: Path, test_dir: Path, work: Path, tta: bool | None,
                      postprocess: bool = True) -> dict:
    out = work / f"pred_{name}{'' if postprocess else '_raw'}"
    t0 = time.perf_counter()
    result = predict(model, test_dir, out, tta=tta, force=True, postprocess=postprocess)
    seconds = time.perf_counter() - t0
    scores = evaluate(out, test_dir, out_csv=out / "metrics.csv")
    metrics = scores.summary["metrics"]
    return {"model": name + ("" if postprocess else ", no post-processing"),
            "seconds_per_case": round(seconds / max(len(result.predicted), 1), 2),
            "means": {r: {m: metrics[r][m]["mean"] for m in METRICS} for r in REGIONS}}


def print_table(res: dict) -> None:
    print(f"{len(res['test_cases'])} held-out cases, {res['recipe']} {res['folds']} folds x {res['minutes']:g} min, "
          f"TTA {({True: 'on', False: 'off'}).get(res['tta'], 'as recorded')} ({res['machine']})")
    print("| model | s/case | " + " | ".join(f"{r} Dice" for r in REGIONS) + " | "
          + " | ".join(f"{r} HD95" for r in REGIONS) + " | " + " | ".join(f"{r} lesion Dice" for r in REGIONS) + " |")
    print("|---" * (2 + 3 * len(REGIONS)) + "|")
    for row in res["results"]:
        m = row["means"]
        print(f"| {row['model']} | {row['seconds_per_case']} | "
              + " | ".join(f"{m[r]['dice']:.4f}" for r in REGIONS) + " | "
              + " | ".join(f"{m[r]['hd95']:.1f}" for r in REGIONS) + " | "
              + " | ".join(f"{m[r]['lesion_dice']:.4f}" for r in REGIONS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_real_data_args(parser, Path("/tmp/tumorseg_ensemble"), val_fraction=0.0)
    parser.add_argument("--recipe", default="brats-cpu")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=12.0, help="training budget per fold")
    parser.add_argument("--test-cases", type=int, default=6)
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="predict with the 8 flips (default: as each checkpoint records)")
    parser.add_argument("--config", type=Path, help="training settings over the recipe's (a tiny network in tests)")
    parser.add_argument("--crop", type=int, help="prepared crop side instead of the recipe's")
    add_out_arg(parser, results_path("ensemble_folds"))
    args = parser.parse_args()
    train_dir, test_dir, test_ids = hold_out(args.data, args.work, args.test_cases, args.seed)
    print(f"held-out test cases: {', '.join(test_ids)}")
    folds = train_folds(args.recipe, train_dir, args.work, args.folds, args.minutes, args.config, args.crop)
    models = [(f"fold {k}", args.work / "cv" / f"fold_{k}") for k in range(args.folds)]
    models.append((f"ensemble of {args.folds}", args.work / "cv"))
    # the networks alone, then with the post-processing each checkpoint (or the ensemble) chose
    results = [predict_and_score(name, model, test_dir, args.work, args.tta, postprocess)
               for postprocess in (False, True) for name, model in models]
    summary = args.work / "cv" / crossval.SUMMARY
    res = {"machine": device_label(), "platform": platform.platform(), "recipe": args.recipe, "folds": args.folds,
           "minutes": args.minutes, "tta": args.tta, "test_cases": test_ids, "training": folds, "results": results,
           "cross_validation": json.loads(summary.read_text()) if summary.is_file() else None}
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
