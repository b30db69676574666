"""One checkpoint, several prediction paths side by side: seconds per case, memory, agreement.

A path is `engine:window:overlap[:amp]`: engine `torch`, `compile` (PyTorch through `torch.compile`)
or `onnx` (ONNX Runtime, the network exported in memory), window `patch` (the training patch), a cube side, or `box` (one window
over the brain's whole box), the sliding-window overlap, and predict's `--amp` (default auto:
bf16 on a CPU with native bf16; `off`: float32). The first path is the reference (by default
PyTorch in float32, training patch, overlap 0.5: the path before issue 12). Every path predicts the same real
cases without and with TTA (`--tta on|off|both`), each case in its own subprocess (peak RSS its
own; the set-up, which for `onnx` includes exporting the network and for `compile` compiling it, timed apart), timed per stage
from inside `predict_case` as `bench_predict.py` does (load, network, post-processing, other,
save). The paths take turns case by case, each case starting with the next path, so a machine
whose speed drifts during the run (a shared or virtual CPU: here the same batch of windows
varies by 50 % from run to run) slows every path alike instead of whichever ran last. Then, per case, whole-tumour Dice between each path's labels and
the reference's (issue 12 asks >= 0.995), and with ground truth the BraTS Dice of WT, TC, ET.
`--compare OTHER.pt ...` runs every path for other checkpoints too, in the same turns (another
network for the same recipe: its time beside this one's, its labels against the reference's).

    python benchmarks/bench_predict_paths.py runs/cpu/best.pt ../shared/data/brats --cases 4 \\
        --paths torch:patch:0.5:off onnx:patch:0.5 torch:patch:0.5:bf16 onnx:box:0 [--compare runs/other/best.pt]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from common import (add_device_arg, add_out_arg, device_sync, instrument, load_average, machine,
                    peak_rss_gib, pick_device, predict_and_save, results_path, run_child, stage_seconds, timed,
                    write_results)

RESULTS = results_path("bench_predict_paths")
DEFAULT_PATHS = ("torch:patch:0.5:off", "torch:patch:0.5", "onnx:patch:0.5", "onnx:patch:0.25", "onnx:box:0")


def parse_path(text: str) -> tuple[str, int | str | None, float, str]:
    """"onnx:96:0.25" -> ("onnx", 96, 0.25, "auto"); window "patch" -> None, "box" stays (predict's
    own); a fourth field is the amp mode ("torch:patch:0.5:bf16")."""
    from tumorseg.devices import AMP_MODES
    from tumorseg.inference.predictor import ENGINES

    try:
        engine, window, overlap, *amp = text.split(":")
        size = None if window == "patch" else window if window == "box" else int(window)
        value = float(overlap)
    except ValueError:
        raise SystemExit(f"path {text!r}: expected engine:window:overlap[:amp], e.g. onnx:patch:0.5") from None
    if (engine not in ENGINES or engine == "auto" or not 0.0 <= value < 1.0 or (isinstance(size, int) and size < 1)
            or len(amp) > 1 or (amp and amp[0] not in AMP_MODES)):
        raise SystemExit(f"path {text!r}: engine torch, compile or onnx, a positive window, overlap in [0, 1), "
                         f"amp one of {', '.join(AMP_MODES)}")
    return engine, size, value, amp[0] if amp else "auto"


def run_path(args: argparse.Namespace) -> dict:
    """Child: predict case `--case` with one path; labels to `--labels-dir`, times and memory as JSON."""
    from tumorseg.checkpoint import load_checkpoint
    from tumorseg.devices import precision_name
    from tumorseg.inference import Predictor
    from tumorseg.layouts import discover_cases

    engine, window, overlap, amp = parse_path(args.child)
    case = discover_cases(args.data)[args.case]
    exported = args.checkpoint.suffix.lower() == ".onnx"  # `tumorseg export`'s file: Predictor reads it
    source, setup = timed(lambda: args.checkpoint if exported else load_checkpoint(args.checkpoint))
    predictor, seconds = timed(lambda: Predictor.from_checkpoint(
        source, device=args.device, tta=args.tta == "on", overlap=overlap, engine=engine,
        window=window, amp=amp))
    setup += seconds
    sync = device_sync(predictor.device.type)
    setup += timed(predictor.warm_up, sync)[1]  # the first call's one-off costs: set-up, as in a long run
    stats = instrument(predictor, sync)
    labels = Path(args.labels_dir) / f"{case.case_id}.nii.gz"
    _, predict_s, save_s = predict_and_save(predictor, case, labels, sync,  # described as predict writes it
                                            describe=lambda pred: f"tumorseg {pred.convention.tag()}")
    row = {"case": case.case_id, "box": stats["box"], "forwards": stats["forwards"],
           "s_total": round(predict_s + save_s, 3), **stage_seconds(stats, 0, predict_s, save_s)}
    network = args.checkpoint.name if exported else source["network"]["name"]
    return {"checkpoint": str(args.checkpoint), "network": network, "path": args.child,
            "engine": predictor.engine, "precision": precision_name(predictor.amp_dtype),
            "tta": predictor.tta, "s_setup": round(setup, 2),
            "cases": [row], "peak_rss_gib": peak_rss_gib()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def agreement(results: list[dict], label_dirs: list[Path], data: Path, n_cases: int) -> None:
    """Per case: WT Dice against the reference path's labels, and BraTS Dice against the truth."""
    from tumorseg.io import load_nifti
    from tumorseg.labels import REGIONS, convention_from_header
    from tumorseg.layouts import discover_cases

    if "error" in results[0]:
        return  # no reference labels to compare with
    cases = {c.case_id: c for c in discover_cases(data)[:n_cases]}

    def regions(path: Path) -> np.ndarray:
        vol = load_nifti(path)
        return convention_from_header(vol.header).regions(np.asarray(vol.data))

    for res, folder in zip(results, label_dirs):
        for row in res.get("cases", []):
            mine = regions(folder / f"{row['case']}.nii.gz")
            row["wt_dice_vs_reference"] = round(dice(mine[0], regions(label_dirs[0] / f"{row['case']}.nii.gz")[0]), 4)
            case = cases[row["case"]]
            if case.seg is not None:
                truth = case.labels.regions(np.asarray(load_nifti(case.seg).data))
                row["dice_vs_truth"] = {r: round(dice(mine[i], truth[i]), 4) for i, r in enumerate(REGIONS)}
        rows = res.get("cases", [])
        if rows:
            res["wt_dice_vs_reference_min"] = min(r["wt_dice_vs_reference"] for r in rows)
            res["wt_dice_vs_reference_mean"] = round(float(np.mean([r["wt_dice_vs_reference"] for r in rows])), 4)
            if all("dice_vs_truth" in r for r in rows):
                res["dice_vs_truth_mean"] = {r: round(float(np.mean([x["dice_vs_truth"][r] for x in rows])), 4)
                                             for r in REGIONS}


def print_table(res: dict) -> None:
    m = res["machine"]
    print(f"\n{res['checkpoint']} on {res['cases']} case(s) of {res['data']}, {m['device_name']}, "
          f"{m['torch_threads']} threads, load {m['load_average']} -> {m['load_average_after']}")
    print(f"{'network':<11}{'path':<26}{'tta':<5}{'engine':<9}{'prec':<8}{'s/case':>8}{'net s':>9}{'load':>7}{'other':>7}{'save':>7}"
          f"{'post':>6}{'fwd':>6}{'setup':>7}{'RSS GiB':>9}{'WT vs ref (min)':>17}{'Dice WT/TC/ET vs truth':>25}")
    for r in res["results"]:
        if "error" in r:
            print(f"{r.get('network', '?'):<11}{r['path']:<26}{'on' if r['tta'] else 'off':<5}error: {r['error']}")
            continue
        rows = r["cases"]
        mean = {k: float(np.mean([x[k] for x in rows]))
                for k in ("s_network", "s_load", "s_other", "s_save", "s_postprocess", "forwards")}
        truth = "/".join(f"{v:.3f}" for v in r["dice_vs_truth_mean"].values()) if "dice_vs_truth_mean" in r else "-"
        print(f"{r['network']:<11}{r['path']:<26}{'on' if r['tta'] else 'off':<5}{r['engine']:<9}{r['precision']:<8}"
              f"{r['s_per_case_mean']:>8.2f}"
              f"{mean['s_network']:>9.2f}{mean['s_load']:>7.2f}{mean['s_other']:>7.2f}{mean['s_save']:>7.2f}"
              f"{mean['s_postprocess']:>6.2f}{mean['forwards']:>6.0f}{r['s_setup']:>7.1f}{r['peak_rss_gib']:>9.2f}"
              f"{r.get('wt_dice_vs_reference_min', float('nan')):>17.4f}{truth:>25}")


def merge_runs(runs: list[dict]) -> dict:
    """One path's per-case child results as one: its cases in order, the mean set-up and time per
    case, the largest peak RSS; the first error if a case failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    rows = [row for r in runs for row in r["cases"]]
    return {**runs[0], "s_setup": round(float(np.mean([r["s_setup"] for r in runs])), 2), "cases": rows,
            "s_per_case_mean": round(float(np.mean([r["s_total"] for r in rows])), 3),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a tumorseg checkpoint (best.pt)")
    parser.add_argument("data", type=Path, help="cases of any layout (with segmentations: Dice against the truth)")
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), help="engine:window:overlap; the first "
                        f"is the reference (default {' '.join(DEFAULT_PATHS)})")
    parser.add_argument("--cases", type=int, default=1, help="the first N cases (default 1)")
    parser.add_argument("--tta", choices=("on", "off", "both"), default="both")
    parser.add_argument("--compare", nargs="+", type=Path, default=[], metavar="CHECKPOINT",
                        help="other checkpoints to run every path with, in the same turns")
    add_device_arg(parser, default="cpu")
    add_out_arg(parser, RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one path, JSON on stdout
    parser.add_argument("--labels-dir", help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, default=0, help=argparse.SUPPRESS)  # internal: the case's index
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_path(args)))
        return
    for text in args.paths:
        parse_path(text)
    from tumorseg.errors import TumorsegError
    from tumorseg.layouts import discover_cases

    try:
        n_cases = min(args.cases, len(discover_cases(args.data)))
    except TumorsegError as exc:
        raise SystemExit(str(exc)) from None
    if n_cases < 1:
        raise SystemExit(f"--cases {args.cases}: at least one case")
    device = pick_device(args.device)
    units = [(checkpoint, path) for checkpoint in (args.checkpoint, *args.compare) for path in args.paths]
    res = {"checkpoint": str(args.checkpoint), "compare": [str(c) for c in args.compare], "data": str(args.data),
           "cases": n_cases, "paths": args.paths, "machine": machine(device, versions=("monai",)), "results": []}
    with tempfile.TemporaryDirectory(prefix="bench_paths_") as tmp:
        for tta in (["off", "on"] if args.tta == "both" else [args.tta]):
            dirs = [Path(tmp) / f"{tta}_{i}" for i in range(len(units))]
            runs: list[list[dict]] = [[] for _ in units]
            for k in range(n_cases):
                for j in range(len(units)):
                    i = (k + j) % len(units)
                    checkpoint, path = units[i]
                    dirs[i].mkdir(exist_ok=True)
                    cmd = [str(checkpoint), str(args.data), "--child", path, "--tta", tta, "--case", str(k),
                           "--device", device, "--labels-dir", str(dirs[i])]
                    runs[i].append(run_child(__file__, cmd, checkpoint=str(checkpoint), path=path, tta=tta == "on"))
            results = [merge_runs(r) for r in runs]
            agreement(results, dirs, args.data, n_cases)
            res["results"] += results
    res["machine"]["load_average_after"] = load_average()
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
