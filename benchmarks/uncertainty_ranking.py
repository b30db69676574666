"""Does the per-case uncertainty score rank the worst segmentations first? (issue 13)

K-fold cross-validation on real cases: each fold trains a recipe on the other folds for a
wall-clock budget, predicts its own cases with TTA, `--uncertainty` and `--report`, and scores
them with the BraTS metrics, so every case gets an out-of-fold prediction. Then the Spearman
rank correlation between each case's uncertainty score (the report's: mean flip mutual
information inside the predicted whole tumour) and its Dice; a useful score correlates
negatively (more uncertain, lower Dice). Folds run one after the other, or in parallel as
separate processes with `--fold` (then e.g. OMP_NUM_THREADS=1 each on a small machine).

    python benchmarks/uncertainty_ranking.py --data ../shared/data/brats --work /tmp/unc --folds 2 --minutes 40
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from common import (add_out_arg, add_real_data_args, device_label, link_case, results_path, shuffled_labelled_cases,
                    write_results)
from real_learning import run_recipe
from scipy.stats import spearmanr

from tumorseg.checkpoint import load_checkpoint
from tumorseg.io import write_text


def link_folds(data: Path, work: Path, k: int, seed: int, only: int | None) -> list[list[str]]:
    """Split the labelled cases into k seeded folds; link the training and test cases of fold
    `only` (None: all). `work/folds.json` records the split: a different one is refused, so a
    re-run never mixes one split's training cases into another's test cases."""
    cases = shuffled_labelled_cases(data, seed)
    folds = [sorted(c.case_id for c in cases[i::k]) for i in range(k)]
    record = work / "folds.json"
    if record.exists() and json.loads(record.read_text()) != folds:
        raise SystemExit(f"{work} holds another split ({record}); use a new --work")
    work.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps(folds))
    for i, test_ids in enumerate(folds):
        for case in cases if only in (None, i) else []:
            link_case(case, work / f"fold{i}" / ("test" if case.case_id in test_ids else "train") / case.case_id)
    return folds


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def per_case(work: Path, recipe: str, k: int) -> list[dict]:
    """Out-of-fold Dice (metrics.csv) and uncertainty score (the report's volumes.csv) per case."""
    rows = []
    for i in range(k):
        preds = work / f"fold{i}" / recipe / "predictions"
        metrics, volumes = read_csv(preds / "metrics.csv"), read_csv(preds / "report" / "volumes.csv")
        for cid, m in metrics.items():
            if m["status"] == "truth_error":  # no Dice: its ground truth could not be used
                continue
            score = volumes.get(cid, {}).get("uncertainty", "")
            rows.append({"case": cid, "fold": i, "uncertainty": float(score) if score else None,
                         **{f"dice_{r}": float(m[f"{r}_dice"]) for r in ("WT", "TC", "ET")}})
    return rows


def correlations(rows: list[dict]) -> dict[str, dict]:
    """Spearman's rho of score against Dice per region, over the cases with a score (a case with
    no predicted tumour has none; how many is recorded)."""
    scored = [r for r in rows if r["uncertainty"] is not None]
    out = {}
    for region in ("WT", "TC", "ET"):
        rho, p = spearmanr([r["uncertainty"] for r in scored], [r[f"dice_{region}"] for r in scored])
        out[region] = {"spearman": round(float(rho), 3), "p": round(float(p), 4), "cases": len(scored),
                       "without_score": len(rows) - len(scored)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_real_data_args(parser, Path("/tmp/tumorseg_uncertainty"), val_fraction=0.2)
    parser.add_argument("--recipe", default="brats-cpu")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--fold", type=int, help="run only this fold (then run again without it to collect)")
    parser.add_argument("--minutes", type=float, default=40.0, help="training budget per fold")
    add_out_arg(parser, results_path("uncertainty_ranking"))
    args = parser.parse_args()
    folds = link_folds(args.data, args.work, args.folds, args.seed, args.fold)
    for i in [args.fold] if args.fold is not None else range(args.folds):
        fold = args.work / f"fold{i}"
        run_recipe(args.recipe, fold / "train", fold / "test", fold, args.minutes, args.val_fraction,
                   tta=True, uncertainty=True, report=True)
    if args.fold is not None:
        return
    rows = per_case(args.work, args.recipe, args.folds)
    machine = device_label()
    networks = [load_checkpoint(args.work / f"fold{i}" / args.recipe / "run" / "best.pt")["network"]
                for i in range(args.folds)]
    res = {"machine": machine, "recipe": args.recipe, "networks": networks, "folds": folds,
           "budget_minutes": args.minutes, "cases": rows, "spearman_uncertainty_vs_dice": correlations(rows)}

    def show(r: dict) -> None:
        print(json.dumps(r["spearman_uncertainty_vs_dice"], indent=1))
        for row in sorted(r["cases"], key=lambda x: -(x["uncertainty"] or 0)):
            print(f"{row['case']:28s} uncertainty {row['uncertainty']}  Dice WT {row['dice_WT']:.3f} "
                  f"TC {row['dice_TC']:.3f} ET {row['dice_ET']:.3f}")

    write_results(args.out, res, show)


if __name__ == "__main__":
    main()
