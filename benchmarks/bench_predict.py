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
default is `unet,segresnet`, TTA off, default widths and 8,16,32,64; `--all` runs every
network with and without TTA. On CUDA the default is every network, TTA both.

Input: one synthetic full-size case (`tumorseg.synth`, seed 0), or a real case with `--data`.

    python benchmarks/bench_predict.py [--device auto|cpu|cuda] [--networks unet,segresnet]
        [--filters default --filters 8,16,32,64] [--tta both|on|off] [--all] [--data CASE_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, pick_device, write_results

RESULTS = Path(__file__).parent / "results" / "bench_predict.json"
CPU_NETWORKS = ("unet", "segresnet")
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


def make_predictor(name: str, filters: tuple[int, ...] | None, device: str, args: argparse.Namespace):
    """An untrained `Predictor` set up like one loaded from a "labels" checkpoint."""
    import torch

    from tumorseg.devices import amp_dtype
    from tumorseg.inference.predict import Predictor
    from tumorseg.labels import NUM_CLASSES
    from tumorseg.networks import build_network, required_divisor

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_network(name, in_channels=len(CHANNELS), out_channels=NUM_CLASSES, filters=filters)
    amp = amp_dtype("auto", dev)
    return Predictor(model=model.to(dev).eval(), device=dev, channels=CHANNELS, norm="minmax",
                     patch=(args.patch,) * 3, target="labels", divisor=required_divisor(name, filters),
                     tta=args.tta == "on", overlap=args.overlap, amp_dtype=amp, sw_batch_size=args.sw_batch)


def instrument(predictor, sync) -> dict:
    """Count network forwards and time each stage of `predict_case` from inside it.

    Wraps `load_input` (load, resample, scale), `tta_probabilities` (the network, all TTA flips
    batched) and `postprocess`; the rest of `predict_case` (labels, uncrop, resampling back) is
    "other". Returns a dict that fills as cases run, one entry per case and stage.
    """
    import importlib

    # the module, not the `predict` function that `tumorseg.inference` exports under that name
    predict_module = importlib.import_module("tumorseg.inference.predict")
    stats: dict = {"forwards": 0, "box": None, "load_s": [], "network_s": [], "postprocess_s": []}

    def timed(name: str, inner):
        def wrapper(*a, **kw):
            sync()
            start = time.perf_counter()
            out = inner(*a, **kw)
            sync()
            stats[f"{name}_s"].append(time.perf_counter() - start)
            if name == "load":
                stats["box"] = list(out.image.shape[1:])
            return out

        return wrapper

    for name, attr in (("load", "load_input"), ("network", "tta_probabilities"), ("postprocess", "postprocess")):
        setattr(predict_module, attr, timed(name, getattr(predict_module, attr)))

    def count(*_):
        stats["forwards"] += 1

    predictor.model.register_forward_pre_hook(count)
    return stats


def time_config(name: str, filters: tuple[int, ...] | None, case_dir: Path, device: str,
                args: argparse.Namespace) -> dict:
    """Predict one case `--warmup` + `--repeat` times with one configuration; seconds, memory."""
    import torch

    from tumorseg.inference.predict import predict_case
    from tumorseg.io import save_nifti
    from tumorseg.layouts import discover_cases
    from tumorseg.networks import DEFAULT_FILTERS

    build_start = time.perf_counter()
    case = discover_cases(case_dir)[0]
    predictor = make_predictor(name, filters, device, args)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    stats = instrument(predictor, sync)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    totals, predicts, saves = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        for i in range(args.warmup + args.repeat):
            if i == args.warmup:
                stats.update(forwards=0, load_s=[], network_s=[], postprocess_s=[])
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            pred = predict_case(predictor, case)
            sync()
            mid = time.perf_counter()
            save_nifti(Path(tmp) / f"{case.case_id}.nii.gz", pred.labels, pred.affine, pred.header)
            end = time.perf_counter()
            if i >= args.warmup:
                totals.append(end - start)
                predicts.append(mid - start)
                saves.append(end - mid)
    best = totals.index(min(totals))
    out = {
        "network": name,
        "filters": list(filters or DEFAULT_FILTERS[name]),
        "tta": args.tta == "on",
        "params_m": round(sum(p.numel() for p in predictor.model.parameters()) / 1e6, 3),
        "box": stats["box"],
        "forwards_per_case": stats["forwards"] // args.repeat,
        "s_total": round(totals[best], 3),
        "s_predict_case": round(predicts[best], 3),
        "s_load": round(stats["load_s"][best], 3),
        "s_network": round(stats["network_s"][best], 3),
        "s_postprocess": round(stats["postprocess_s"][best], 3),
        "s_other": round(predicts[best] - stats["load_s"][best] - stats["network_s"][best]
                         - stats["postprocess_s"][best], 3),
        "s_save": round(saves[best], 3),
        "s_total_runs": [round(t, 3) for t in totals],
        "wall_s_all": round(time.perf_counter() - build_start, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "rss_before_predict_gib": round(rss_before, 3),
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def run_child(name: str, filters: str, tta: str, case_dir: Path, device: str, args: argparse.Namespace) -> dict:
    """`time_config` in a fresh interpreter, so its peak memory is its own."""
    cmd = [sys.executable, __file__, "--child", name, "--filters", filters, "--tta", tta, "--data", str(case_dir),
           "--device", device, "--patch", str(args.patch), "--overlap", str(args.overlap), "--sw-batch", str(args.sw_batch),
           "--warmup", str(args.warmup), "--repeat", str(args.repeat)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"network": name, "filters": filters, "tta": tta == "on", "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def machine(device: str) -> dict:
    """Where the numbers come from: CPUs, load, library versions, device name, threads."""
    import monai
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "monai": monai.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "cpu_name": cpu_name(),
    }
    if device == "cuda":
        info["cuda"] = torch.version.cuda
        info["bf16_autocast"] = torch.cuda.is_bf16_supported()
    return info


def print_table(res: dict) -> None:
    """One row per configuration: box, forwards, seconds (total, inference, save), peak memory."""
    cuda = res["device"] == "cuda"
    m = res["machine"]
    print(f"\n{res['data']}: patch {res['patch']}^3, overlap {res['overlap']}, {res['device']} "
          f"({m['device_name']}), {m['torch_threads']} threads, load average {m['load_average']} "
          f"-> {m['load_average_after']}")
    mem = "peak GiB (cuda)" if cuda else "peak RSS GiB"
    print(f"{'network':<11}{'filters':<21}{'tta':<5}{'box':<13}{'fwd':>5}{'total s':>9}{'load':>7}{'network':>9}"
          f"{'post':>7}{'other':>7}{'save':>7}{mem:>16}")
    for r in res["results"]:
        filters = ",".join(map(str, r["filters"])) if isinstance(r["filters"], list) else r["filters"]
        tta = "on" if r["tta"] else "off"
        if "error" in r:
            print(f"{r['network']:<11}{filters:<21}{tta:<5}error: {r['error']}")
            continue
        box = "x".join(map(str, r["box"]))
        peak = r["peak_cuda_gib"] if cuda else r["peak_rss_gib"]
        print(f"{r['network']:<11}{filters:<21}{tta:<5}{box:<13}{r['forwards_per_case']:>5}{r['s_total']:>9.2f}"
              f"{r['s_load']:>7.2f}{r['s_network']:>9.2f}{r['s_postprocess']:>7.2f}{r['s_other']:>7.2f}"
              f"{r['s_save']:>7.2f}{peak:>16.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--networks", help="comma-separated subset of the registry "
                        f"(default: all on CUDA or with --all, {','.join(CPU_NETWORKS)} on CPU)")
    parser.add_argument("--filters", action="append", help="widths, e.g. 8,16,32,64, or 'default'; repeat for "
                        f"several (default: 'default' on CUDA or with --all, also {CPU_FILTERS[1]} on CPU)")
    parser.add_argument("--tta", choices=("both", "on", "off"), help="flip TTA (default: both on CUDA or with "
                        "--all, off on CPU)")
    parser.add_argument("--all", action="store_true", help="on CPU too: every network, TTA both (slow)")
    parser.add_argument("--data", type=Path, help="a real BraTS case folder (default: one synthetic case)")
    parser.add_argument("--patch", type=int, default=128, help="sliding-window cube side (default 128)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--sw-batch", type=int, default=1, help="sliding windows per network call (default 1)")
    parser.add_argument("--warmup", type=int, help="untimed cases first (default 1 on CUDA, 0 on CPU)")
    parser.add_argument("--repeat", type=int, help="timed cases, fastest kept (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: time one configuration, print JSON
    return parser.parse_args()


def configurations(args: argparse.Namespace, device: str) -> list[tuple[str, str, str]]:
    """(network, filters, tta) to run, defaults depending on the device; checked up front."""
    from tumorseg.networks import NETWORKS, required_divisor

    full = device == "cuda" or args.all
    names = args.networks.split(",") if args.networks else list(NETWORKS if full else CPU_NETWORKS)
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise SystemExit(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(NETWORKS)}")
    settings = args.filters or (["default"] if full else list(CPU_FILTERS))
    tta = args.tta or ("both" if full else "off")
    flips = ["off", "on"] if tta == "both" else [tta]
    for name in names:
        for setting in settings:
            if args.patch % required_divisor(name, parse_filters(setting)):
                raise SystemExit(f"--patch {args.patch} is not divisible by what {name} with filters "
                                 f"{setting} needs ({required_divisor(name, parse_filters(setting))})")
    return [(n, s, t) for n in names for s in settings for t in flips]


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not 0.0 <= args.overlap < 1.0:
        raise SystemExit(f"--overlap must be in [0, 1), got {args.overlap}")
    device = pick_device(args.device)
    args.warmup = args.warmup if args.warmup is not None else (1 if device == "cuda" else 0)
    args.repeat = max(1, args.repeat or (3 if device == "cuda" else 1))
    if args.child:
        filters = parse_filters(args.filters[0])
        print(json.dumps(time_config(args.child, filters, args.data, device, args)))
        return
    configs = configurations(args, device)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench_predict_data_") as tmp:
        if args.data is None:
            from tumorseg.synth import synthesize

            case_dir = synthesize(Path(tmp), 1, seed=0, progress=False)[0]
        else:
            from tumorseg.layouts import discover_cases

            case_dir = discover_cases(args.data)[0].folder  # errors name the folder
        res = {"data": str(args.data) if args.data else "synthetic 240x240x155 .nii.gz, seed 0",
               "patch": args.patch, "overlap": args.overlap, "sw_batch": args.sw_batch, "device": device, "warmup": args.warmup,
               "repeat": args.repeat, "target": "labels (4 classes)", "channels": list(CHANNELS),
               "autocast": "auto (bf16 where native, else fp16)" if device == "cuda" else None, "machine": machine(device), "results": []}
        res["machine"]["load_average"] = load_before
        for name, filters, tta in configs:
            res["results"].append(run_child(name, filters, tta, case_dir, device, args))
            print(json.dumps(res["results"][-1]), flush=True)
    res["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
