"""Learning on real scans: train recipes on real BraTS cases, score held-out cases.

Holds out a fixed, seeded set of test cases that no recipe sees (not for training, not for
model selection), then for each recipe: prepare the rest with the recipe's settings, train
for the same wall-clock budget, predict the held-out cases in their original space with
the checkpoint alone, and evaluate with the BraTS metrics. Prints a markdown table and
writes everything as JSON.

    python benchmarks/real_learning.py --data ../shared/data/brats --work /tmp/real --recipes brats-cpu seed --minutes 55

Works the same on a full Kaggle BraTS 2020 download (`--data BraTS2020_TrainingData`).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from common import (add_out_arg, add_real_data_args, device_label, link_case, results_path, shuffled_labelled_cases,
                    write_results)

from tumorseg.evaluation import evaluate
from tumorseg.inference import predict
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.recipes import load_recipe
from tumorseg.training import resolve_config, train
from tumorseg.checkpoint import load_checkpoint


def hold_out(data: Path, work: Path, n_test: int, seed: int) -> tuple[Path, Path, list[str]]:
    """Link the cases into train/ and test/ folders (the user's files stay where they are)."""
    cases = shuffled_labelled_cases(data, seed)
    test_ids = sorted(c.case_id for c in cases[:n_test])
    for case in cases:
        link_case(case, work / ("test" if case.case_id in test_ids else "train") / case.case_id)
    return work / "train", work / "test", test_ids


def run_recipe(name: str, train_dir: Path, test_dir: Path, work: Path, minutes: float, val_fraction: float,
               **predict_options) -> dict:
    """Prepare, train, predict and evaluate one recipe; a re-run continues where the last one stopped.

    `predict_options` go to `predict` (e.g. uncertainty=True, report=True).
    """
    recipe = load_recipe(name)
    out = work / name
    prep_cfg = PrepareConfig.from_dict({**PrepareConfig().to_dict(), **recipe["prepare"], "val_fraction": val_fraction})
    prepare(train_dir, out / "prepared", prep_cfg)
    config = resolve_config(overrides={"max_minutes": minutes, "device": "auto"}, recipe=name)
    last = out / "run" / "last.pt"
    history = load_checkpoint(last)["history"] if last.exists() else []
    if not history or sum(row["seconds"] for row in history) <= 60 * minutes:  # budget not yet spent
        history = train(out / "prepared", out / "run", config, resume=last.exists()).history
    t0 = time.perf_counter()
    predicted = predict(out / "run" / "best.pt", test_dir, out / "predictions", **predict_options)
    predict_seconds = time.perf_counter() - t0
    scores = evaluate(out / "predictions", test_dir, out_csv=out / "predictions" / "metrics.csv")
    print(scores.report())
    best = load_checkpoint(out / "run" / "best.pt")
    return {
        "recipe": name,
        "train_minutes": round(sum(row["seconds"] for row in history) / 60, 1),
        "predict_seconds_per_case": round(predict_seconds / len(predicted.written), 1) if predicted.written else None,
        "epochs": len(history),
        "best_epoch": best["best_epoch"],
        "best_val_mean_dice": best["best_metric"],
        "inference": best["inference"],  # TTA and post-processing chosen
        "summary": scores.summary,
    }


def table(rows: list[dict], machine: str) -> str:
    lines = ["| recipe | machine | training (min) | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["summary"]["metrics"]
        dice = [f"{m[k]['dice']['mean']:.3f}" for k in ("WT", "TC", "ET")]
        hd = [f"{m[k]['hd95']['mean']:.1f}" for k in ("WT", "TC", "ET")]
        lines.append(f"| {r['recipe']} | {machine} | {r['train_minutes']} | " + " | ".join(dice + hd) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_real_data_args(parser, Path("/tmp/tumorseg_real"), val_fraction=0.15)
    parser.add_argument("--recipes", nargs="+", default=["brats-cpu", "seed"])
    parser.add_argument("--minutes", type=float, default=55.0, help="training budget per recipe")
    parser.add_argument("--test-cases", type=int, default=4)
    add_out_arg(parser, results_path("real_learning"))
    args = parser.parse_args()
    train_dir, test_dir, test_ids = hold_out(args.data, args.work, args.test_cases, args.seed)
    print(f"held-out test cases: {', '.join(test_ids)}")
    machine = device_label()
    rows = [run_recipe(name, train_dir, test_dir, args.work, args.minutes, args.val_fraction) for name in args.recipes]
    res = {"machine": machine, "platform": platform.platform(), "test_cases": test_ids,
           "budget_minutes": args.minutes, "results": rows}
    write_results(args.out, res, lambda r: print(table(r["results"], r["machine"])))


if __name__ == "__main__":
    main()
