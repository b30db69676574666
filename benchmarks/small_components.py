"""Does removing small components (tuned per region on lesion-wise Dice) help on held-out real cases?

Predicts labelled cases that the checkpoint did not train on, with its post-processing off, then
scores leave-one-out: for each case, every post-processing step is tuned on the other cases
(as training tunes them on validation: `postprocess.choose_postprocessing`, training's candidate
sizes) once without and once with the small-component step, applied to this case and scored with
the BraTS 2020 Dice and the BraTS 2023+ lesion-wise Dice and HD95 (the challenge from the case id,
else GLI). Prints the means side by side and writes everything as JSON.

    python benchmarks/small_components.py CHECKPOINT CASES [CASES ...] --work /tmp/sc [--tta]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from common import add_out_arg, device_label, results_path, write_results

from tumorseg.evaluation.lesionwise import case_challenge, lesionwise_metrics
from tumorseg.evaluation.metrics import region_dice_from_labels
from tumorseg.inference import predict
from tumorseg.inference.postprocess import (COMPONENT_SIZES, ET_THRESHOLDS, case_statistics, choose_postprocessing,
                                            postprocess)
from tumorseg.labels import REGIONS, convention_from_header, regions_from_labels
from tumorseg.layouts import discover_cases

RESULTS = results_path("small_components")


def load_pairs(checkpoint: Path, folders: list[Path], work: Path, tta: bool) -> list[dict]:
    """Each labelled case with its prediction (post-processing off) in training labels."""
    pairs = []
    for i, folder in enumerate(folders):
        out = work / f"pred{i}"
        predict(checkpoint, folder, out, tta=tta, postprocess=False, progress=True)
        for case in discover_cases(folder):
            if case.seg is None:
                continue
            gt_img, pred_img = nib.load(case.seg), nib.load(out / f"{case.case_id}.nii.gz")
            pred_conv = convention_from_header(pred_img.header) or case.labels
            pairs.append({
                "case_id": case.case_id,
                "gt": case.labels.to_training(np.asarray(gt_img.dataobj)),
                "pred": pred_conv.to_training(np.asarray(pred_img.dataobj)),
                "spacing": tuple(float(v) for v in gt_img.header.get_zooms()[:3]),
                "challenge": case_challenge(case.case_id),
            })
    return pairs


def score(pred: np.ndarray, pair: dict) -> dict:
    dice = region_dice_from_labels(pred, pair["gt"])
    lesion = lesionwise_metrics(regions_from_labels(pred), regions_from_labels(pair["gt"]), pair["spacing"],
                                pair["challenge"])
    return {r: {"dice": dice[r], **lesion[r]} for r in REGIONS}


def leave_one_out(pairs: list[dict]) -> list[dict]:
    stats = [case_statistics(p["pred"], p["gt"], p["spacing"], p["challenge"]) for p in pairs]
    rows = []
    for i, pair in enumerate(pairs):
        others = stats[:i] + stats[i + 1:]
        row = {"case_id": pair["case_id"]}
        for name, sizes in (("without", ()), ("with", COMPONENT_SIZES)):
            tuned = choose_postprocessing(others, ET_THRESHOLDS, sizes)
            out = postprocess(pair["pred"], tuned["largest_tumour"], tuned["et_threshold"], tuned["min_component"])
            row[name] = {"settings": {k: tuned[k] for k in ("largest_tumour", "et_threshold", "min_component")},
                         "scores": score(out, pair)}
        rows.append(row)
    return rows


def means(rows: list[dict], name: str) -> dict:
    return {r: {m: float(np.mean([row[name]["scores"][r][m] for row in rows]))
                for m in ("dice", "lesion_dice", "lesion_hd95")} for r in REGIONS}


def print_table(res: dict) -> None:
    print(f"leave-one-out over {len(res['cases'])} held-out cases ({res['device']})")
    print("| step | " + " | ".join(f"{r} Dice | {r} lesion Dice | {r} lesion HD95" for r in REGIONS) + " |")
    print("|---" * (1 + 3 * len(REGIONS)) + "|")
    for name in ("without", "with"):
        m = res["means"][name]
        print(f"| {name} small-component step | " + " | ".join(
            f"{m[r]['dice']:.4f} | {m[r]['lesion_dice']:.4f} | {m[r]['lesion_hd95']:.1f}" for r in REGIONS) + " |")
    print("sizes chosen per fold (WT, TC, ET voxels):", [row["with"]["settings"]["min_component"] for row in res["cases"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("cases", type=Path, nargs="+", help="folders of labelled cases the checkpoint did not train on")
    parser.add_argument("--work", type=Path, required=True, help="where the predictions go (a re-run reuses them)")
    parser.add_argument("--tta", action="store_true", help="predict with the 8 flips")
    add_out_arg(parser, RESULTS)
    args = parser.parse_args()
    pairs = load_pairs(args.checkpoint, args.cases, args.work, args.tta)
    if len(pairs) < 2:
        raise SystemExit("need at least 2 labelled cases (each is tuned on the others)")
    rows = leave_one_out(pairs)
    res = {"checkpoint": str(args.checkpoint), "tta": args.tta, "device": device_label(), "cases": rows,
           "means": {name: means(rows, name) for name in ("without", "with")}}
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
