"""Seconds and peak memory per full 240x240x155 case of `tumorseg predict`, per network.

What is measured, per configuration (network x filter setting x flip TTA on/off): the whole
per-case path of `tumorseg predict` on one case, exactly as `inference.predict` runs it:
`predict_case` (load the scans, scale over the brain, crop to the inference box, sliding-
window inference with Gaussian blending (overlap `--overlap`, window `--patch`^3), labels,
uncrop, BraTS labels) followed by `io.save_nifti` of the labels. Reported in seconds:

- total: `predict_case` + writing the NIfTI (what a user waits for per case);
- load: reading the scans, resampling to the network's grid, scaling, cropping (`load_input`);
- network: sliding windows over all TTA flips, batched (`window.tta_probabilities`);
- post: the checkpoint's post-processing; other: labels, uncrop, resampling back;
- save: writing the `.nii.gz`.
(All timed from inside `predict_case` by wrapping its stages: the same run, not a second one.)

The model is an untrained network built like a checkpoint's (4 classes, "labels" target,
channels t2, t1ce, flair, min-max scaling) inside a `Predictor`: weights do not change speed.
The number of network calls (each a batch of windows and TTA flips) and the inference box are recorded too.

Each configuration runs in its own subprocess, so peak memory is its own: on CPU the peak
resident set size (`ru_maxrss`, scans and model included), on CUDA
`torch.cuda.max_memory_allocated` over the timed runs (bf16 autocast as the Predictor uses,
`torch.cuda.synchronize` around timings, `--warmup` untimed cases first).

CPU is slow (a default-width 128^3 forward takes seconds, times 8 with TTA), so on CPU the
default is `unet,unet-lite,segresnet`, TTA off, default widths and 8,16,32,64; `--all` runs every
network with and without TTA. On CUDA the default is every network, TTA both.

`--engines torch,compile` runs each configuration also through `torch.compile` (Inductor, frozen
weights: `inference.compiled`), side by side, its compiling timed apart ("compile" column).

Input: one synthetic full-size case (`tumorseg.synth`, seed 0), or a real case with `--data`.
The network works at `--spacing` (default 1 mm, as the recipes' checkpoints record it), so a case
stored on another grid is resampled to it and its probabilities back ("load" and "other").

    python benchmarks/bench_predict.py [--device auto|cpu|cuda] [--networks unet,unet-lite,segresnet]
        [--filters default --filters 8,16,32,64] [--tta both|on|off] [--engines torch,compile] [--all]
        [--data CASE_DIR] [--spacing 1,1,1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (add_device_arg, add_out_arg, add_threads_arg, apply_threads, check_networks, clear_stages,
                    device_sync, instrument, load_average, machine, peak_cuda_gib, peak_rss_gib, pick_device,
                    predict_and_save, results_path, run_child, stage_seconds, threads_flag, timed, write_results)

RESULTS = results_path("bench_predict")
CPU_NETWORKS = ("unet", "unet-lite", "segresnet")
CPU_FILTERS = ("default", "8,16,32,64")
CHANNELS = ("t2", "t1ce", "flair")


def parse_filters(text: str) -> tuple[int, ...] | None:
    """"default" -> None (the registry's widths); "8,16,32,64" -> (8, 16, 32, 64)."""
    if text == "default":
        return None
    try:
        filters = tuple(int(f) for f in text.split(","))
    except ValueError:
        raise SystemExit(f"--filters {text!r}: expected 'default' or comma-separated integers") from None
    if len(filters) < 2 or min(filters) < 1:
        raise SystemExit(f"--filters {text!r}: expected at least 2 positive widths")
    return filters


def parse_spacing(text: str) -> tuple[float, float, float] | None:
    """"1,1,1" -> (1.0, 1.0, 1.0); "scan" -> None (the network runs on each scan's own grid)."""
    if text == "scan":
        return None
    try:
        spacing = tuple(float(v) for v in text.split(","))
    except ValueError:
        spacing = ()
    if len(spacing) != 3 or min(spacing) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three positive numbers (mm) or 'scan'")
    return spacing


def spacing_text(spacing: tuple[float, float, float] | None) -> str:
    return "scan" if spacing is None else ",".join(map(str, spacing))


def make_predictor(name: str, filters: tuple[int, ...] | None, device: str, args: argparse.Namespace):
    """An untrained `Predictor` set up like one loaded from a "labels" checkpoint (PyTorch)."""
    import torch

    from tumorseg.devices import amp_dtype
    from tumorseg.inference import Predictor
    from tumorseg.labels import NUM_CLASSES
    from tumorseg.networks import build_network, required_divisor

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_network(name, in_channels=len(CHANNELS), out_channels=NUM_CLASSES, filters=filters)
    amp = amp_dtype(args.amp, dev, predicting=True)
    return Predictor(model=model.to(dev).eval(), device=dev, channels=CHANNELS, norm="minmax",
                     patch=(args.patch,) * 3, target="labels", divisor=required_divisor(name, filters),
                     tta=args.tta == "on", overlap=args.overlap, amp_dtype=amp, sw_batch_size=args.sw_batch,
                     spacing=args.spacing, network=name)


def time_config(name: str, filters: tuple[int, ...] | None, engine: str, case_dir: Path, device: str,
                args: argparse.Namespace) -> dict:
    """Predict one case `--warmup` + `--repeat` times with one configuration; seconds, memory.
    Engine "compile": the network through `torch.compile`, compiled (and timed) before the cases."""
    import torch

    from tumorseg.devices import precision_name
    from tumorseg.layouts import discover_cases
    from tumorseg.networks import DEFAULT_FILTERS

    build_start = time.perf_counter()
    case = discover_cases(case_dir)[0]
    predictor = make_predictor(name, filters, device, args)
    sync = device_sync(device)
    compile_s = None
    if engine == "compile":
        predictor, compile_s = timed(predictor.compiled, sync)  # compiles in a warm-up call
    else:
        predictor.warm_up()  # the first call's one-off costs kept out of the case, as for the compiled rows
    stats = instrument(predictor, sync)
    rss_before = peak_rss_gib()
    predicts, saves = [], []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        for i in range(args.warmup + args.repeat):
            if i == args.warmup:
                clear_stages(stats)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            _, predict_s, save_s = predict_and_save(predictor, case, Path(tmp) / f"{case.case_id}.nii.gz", sync)
            if i >= args.warmup:
                predicts.append(predict_s)
                saves.append(save_s)
    totals = [p + s for p, s in zip(predicts, saves)]
    best = totals.index(min(totals))
    out = {
        "network": name,
        "filters": list(filters or DEFAULT_FILTERS[name]),
        "engine": engine,
        "s_compile": None if compile_s is None else round(compile_s, 2),
        "compile_failure": getattr(predictor.model, "failure", None),
        "tta": args.tta == "on",
        "precision": precision_name(predictor.amp_dtype),
        "params_m": round(sum(p.numel() for p in predictor.model.parameters()) / 1e6, 3),
        "box": stats["box"],
        "forwards_per_case": stats["forwards"] // args.repeat,
        "s_total": round(totals[best], 3),
        "s_predict_case": round(predicts[best], 3),
        **stage_seconds(stats, best, predicts[best], saves[best]),
        "s_total_runs": [round(t, 3) for t in totals],
        "wall_s_all": round(time.perf_counter() - build_start, 2),
        "peak_rss_gib": peak_rss_gib(),
        "rss_before_predict_gib": rss_before,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        out["peak_cuda_gib"] = peak_cuda_gib()
    return out


def run_child_config(name: str, filters: str, tta: str, engine: str, case_dir: Path, device: str,
                     args: argparse.Namespace) -> dict:
    """`time_config` in a fresh interpreter, so its peak memory (and its compiling) is its own."""
    cmd = ["--child", name, "--filters", filters, "--tta", tta, "--engines", engine, "--data", str(case_dir),
           "--device", device, "--spacing", spacing_text(args.spacing), "--patch", str(args.patch),
           "--overlap", str(args.overlap), "--sw-batch", str(args.sw_batch), "--amp", args.amp,
           "--warmup", str(args.warmup), "--repeat", str(args.repeat), *threads_flag(args.threads)]
    return run_child(__file__, cmd, network=name, filters=filters, tta=tta == "on", engine=engine)


def print_table(res: dict) -> None:
    """One row per configuration: box, forwards, seconds (total, inference, save), peak memory."""
    cuda = res["device"] == "cuda"
    m = res["machine"]
    print(f"\n{res['data']}: network spacing {spacing_text(res['spacing'])}, patch {res['patch']}^3, "
          f"overlap {res['overlap']}, amp {res['amp']}, {res['device']} "
          f"({m['device_name']}), {m['torch_threads']} threads, load average {m['load_average']} "
          f"-> {m['load_average_after']}")
    mem = "peak GiB (cuda)" if cuda else "peak RSS GiB"
    print(f"{'network':<11}{'filters':<21}{'tta':<5}{'engine':<8}{'prec':<9}{'box':<13}{'fwd':>5}{'total s':>9}"
          f"{'load':>7}{'network':>9}{'post':>7}{'other':>7}{'save':>7}{'compile':>9}{mem:>16}")
    for r in res["results"]:
        filters = ",".join(map(str, r["filters"])) if isinstance(r["filters"], list) else r["filters"]
        tta = "on" if r["tta"] else "off"
        if "error" in r:
            print(f"{r['network']:<11}{filters:<21}{tta:<5}{r['engine']:<8}error: {r['error']}")
            continue
        box = "x".join(map(str, r["box"]))
        peak = r["peak_cuda_gib"] if cuda else r["peak_rss_gib"]
        compile_s = "-" if r["s_compile"] is None else f"{r['s_compile']:.1f}" + ("!" if r["compile_failure"] else "")
        print(f"{r['network']:<11}{filters:<21}{tta:<5}{r['engine']:<8}{r['precision']:<9}{box:<13}"
              f"{r['forwards_per_case']:>5}{r['s_total']:>9.2f}{r['s_load']:>7.2f}{r['s_network']:>9.2f}"
              f"{r['s_postprocess']:>7.2f}{r['s_other']:>7.2f}{r['s_save']:>7.2f}{compile_s:>9}{peak:>16.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arg(parser)
    parser.add_argument("--networks", help="comma-separated subset of the registry "
                        f"(default: all on CUDA or with --all, {','.join(CPU_NETWORKS)} on CPU)")
    parser.add_argument("--filters", action="append", help="widths, e.g. 8,16,32,64, or 'default'; repeat for "
                        f"several (default: 'default' on CUDA or with --all, also {CPU_FILTERS[1]} on CPU)")
    parser.add_argument("--tta", choices=("both", "on", "off"), help="flip TTA (default: both on CUDA or with "
                        "--all, off on CPU)")
    parser.add_argument("--engines", default="torch", help="comma-separated: torch (PyTorch), compile (PyTorch "
                        "through torch.compile, its compiling timed apart: 'compile' column, '!' where it failed "
                        "and ran uncompiled); default torch")
    parser.add_argument("--all", action="store_true", help="on CPU too: every network, TTA both (slow)")
    parser.add_argument("--data", type=Path, help="a real BraTS case folder (default: one synthetic case)")
    parser.add_argument("--patch", type=int, default=128, help="sliding-window cube side (default 128)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--sw-batch", type=int, help="sliding windows per network call (default: predict's for "
                        "the patch, devices.window_batch)")
    parser.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                        help="precision as predict's --amp (default auto)")
    parser.add_argument("--spacing", type=parse_spacing, default=(1.0, 1.0, 1.0),
                        help="the network's voxel size in mm, as a checkpoint records it (default 1,1,1: BraTS "
                        "recipes; scans on other grids are resampled to it and back), or 'scan': the scan's own")
    parser.add_argument("--warmup", type=int, help="untimed cases first (default 1 on CUDA, 0 on CPU)")
    parser.add_argument("--repeat", type=int, help="timed cases, fastest kept (default 3 on CUDA, 1 on CPU)")
    add_threads_arg(parser)
    add_out_arg(parser, RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: time one configuration, print JSON
    return parser.parse_args()


def configurations(args: argparse.Namespace, device: str) -> list[tuple[str, str, str, str]]:
    """(network, filters, tta, engine) to run, defaults depending on the device; checked up front."""
    from tumorseg.networks import NETWORKS, required_divisor

    full = device == "cuda" or args.all
    names = args.networks.split(",") if args.networks else list(NETWORKS if full else CPU_NETWORKS)
    check_networks(names)
    settings = args.filters or (["default"] if full else list(CPU_FILTERS))
    tta = args.tta or ("both" if full else "off")
    flips = ["off", "on"] if tta == "both" else [tta]
    for name in names:
        for setting in settings:
            if args.patch % required_divisor(name, parse_filters(setting)):
                raise SystemExit(f"--patch {args.patch} is not divisible by what {name} with filters "
                                 f"{setting} needs ({required_divisor(name, parse_filters(setting))})")
    engines = args.engines.split(",")
    if not set(engines) <= {"torch", "compile"}:
        raise SystemExit(f"--engines {args.engines!r}: torch and/or compile")
    return [(n, s, t, e) for n in names for s in settings for t in flips for e in engines]


def main() -> None:
    args = parse_args()
    apply_threads(args.threads)
    if not 0.0 <= args.overlap < 1.0:
        raise SystemExit(f"--overlap must be in [0, 1), got {args.overlap}")
    device = pick_device(args.device)
    args.warmup = args.warmup if args.warmup is not None else (1 if device == "cuda" else 0)
    args.repeat = max(1, args.repeat or (3 if device == "cuda" else 1))
    if args.sw_batch is None:
        import torch

        from tumorseg.devices import window_batch

        args.sw_batch = window_batch(torch.device(device), (args.patch,) * 3)
    if args.child:
        filters = parse_filters(args.filters[0])
        print(json.dumps(time_config(args.child, filters, args.engines, args.data, device, args)))
        return
    configs = configurations(args, device)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_predict_data_") as tmp:
        if args.data is None:
            from tumorseg.synth import synthesize

            case_dir = synthesize(Path(tmp), 1, seed=0, progress=False)[0]
        else:
            from tumorseg.layouts import discover_cases

            case_dir = discover_cases(args.data)[0].folder  # errors name the folder
        res = {"data": str(args.data) if args.data else "synthetic 240x240x155 .nii.gz, seed 0",
               "spacing": args.spacing, "patch": args.patch, "overlap": args.overlap, "amp": args.amp,
               "sw_batch": args.sw_batch, "device": device, "warmup": args.warmup,
               "repeat": args.repeat, "target": "labels (4 classes)", "channels": list(CHANNELS),
               "machine": machine(device, versions=("monai",)), "results": []}
        res["machine"]["load_average"] = load_before
        for name, filters, tta, engine in configs:
            res["results"].append(run_child_config(name, filters, tta, engine, case_dir, device, args))
    res["machine"]["load_average_after"] = load_average()
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
