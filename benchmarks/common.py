"""Helpers the benchmark scripts share: arguments, device and machine description, memory and
timing, child processes, predict's stage timers, case discovery, writing results."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tumorseg.io import write_text

RESULTS_DIR = Path(__file__).parent / "results"
STAGES = ("load", "network", "postprocess")  # predict_case's stages that `instrument` times


# --- arguments -------------------------------------------------------------------------------


def results_path(name: str) -> Path:
    """Where a benchmark writes its JSON by default: `benchmarks/results/<name>.json`."""
    return RESULTS_DIR / f"{name}.json"


def add_out_arg(parser: argparse.ArgumentParser, default: Path) -> None:
    parser.add_argument("--out", type=Path, default=default, help=f"JSON results (default {default})")


def add_device_arg(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=default)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def apply_threads(threads: int | None) -> None:
    """`--threads`: torch's CPU threads, where given."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def threads_flag(threads: int | None) -> list[str]:
    """`--threads` to pass on to a child process (nothing where not given)."""
    return ["--threads", str(threads)] if threads else []


def add_loader_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The arguments `bench_loader.prepared_folder` and `bench_loader.measure` read; `prefix`
    starts each help text (e.g. "with --recipe: ")."""
    parser.add_argument("--prepared", type=Path,
                        help=f"{prefix}a prepared folder (default: synthetic cases prepared here)")
    parser.add_argument("--cases", type=int, default=4, help=f"{prefix}synthetic cases when no --prepared (default 4)")
    parser.add_argument("--workers", default="0,1,2", help=f"{prefix}loader worker counts to compare (default 0,1,2)")
    parser.add_argument("--batches", type=int, default=20,
                        help=f"{prefix}timed loader batches per setting (default 20)")


def add_real_data_args(parser: argparse.ArgumentParser, work: Path, val_fraction: float) -> None:
    """Real cases, a work folder, the validation share and the split seed (real_learning, uncertainty_ranking)."""
    parser.add_argument("--data", type=Path, default=Path("../shared/data/brats"))
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--val-fraction", type=float, default=val_fraction)
    parser.add_argument("--seed", type=int, default=0)


def check_networks(names: list[str]) -> None:
    """Stop with the known names if any of `names` is not in the registry."""
    from tumorseg.networks import NETWORKS

    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise SystemExit(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(NETWORKS)}")


# --- device and machine ----------------------------------------------------------------------


def pick_device(choice: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; "cuda" without a GPU is an error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(device: str, versions: tuple[str, ...] = ()) -> dict:
    """Where the numbers come from: CPUs, load, library versions, device name, threads.

    `versions`: further modules whose `__version__` to record beside torch's (e.g. "monai").
    Whether the CPU computes bf16 natively (what `--amp auto` runs there when predicting), and
    on CUDA whether the GPU does.
    """
    import torch

    from tumorseg.devices import native_bf16

    info = {
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "torch": torch.__version__,
        **{name: importlib.import_module(name).__version__ for name in versions},
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "cpu_name": cpu_name(),
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
    }
    if device == "cuda":
        info["cuda"] = torch.version.cuda
        info["cuda_native_bf16"] = native_bf16(torch.device("cuda"))
    return info


def device_label() -> str:
    """One line naming what trains: the GPU's name, else the CPU core count."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"


# --- memory and timing -----------------------------------------------------------------------


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (`ru_maxrss` is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def peak_cuda_gib() -> float:
    """Peak CUDA memory allocated by torch in this process, GiB."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def device_sync(device: str) -> Callable[[], None]:
    """What to call before reading a clock: `torch.cuda.synchronize` on CUDA, nothing elsewhere."""
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def timed(fn: Callable, sync: Callable[[], None] = lambda: None) -> tuple[object, float]:
    """`fn()` and its wall-clock seconds, with `sync` before both clock readings."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


# --- child processes -------------------------------------------------------------------------


def run_child(script: str, args: list[str], **on_error) -> dict:
    """`python script *args` (the script's `--child` mode) in a fresh interpreter, so its peak
    memory is its own: the last JSON line it prints, else `on_error` with "error" (the exit
    status and the last line of stderr). The result is printed as a progress line."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {**on_error, "error": f"exit {proc.returncode}: {tail}"}
    else:
        result = json.loads(lines[-1])
    print(json.dumps(result), flush=True)
    return result


# --- predict's stages ------------------------------------------------------------------------


def instrument(predictor, sync) -> dict:
    """Count network forwards and time each stage of `predict_case` from inside it.

    Wraps `load_input` (load, resample, scale), `tta_probabilities` (the network, all TTA flips
    batched) and `postprocess`; the rest of `predict_case` (labels, uncrop, resampling back) is
    "other". Returns a dict that fills as cases run, one entry per case and stage.
    """
    case_module = importlib.import_module("tumorseg.inference.case")  # where `predict_case` finds them
    stats: dict = {"forwards": 0, "box": None}
    clear_stages(stats)

    def wrap(name: str, inner):
        def wrapper(*a, **kw):
            out, seconds = timed(lambda: inner(*a, **kw), sync)
            stats[f"{name}_s"].append(seconds)
            if name == "load":
                stats["box"] = list(out.image.shape[1:])
            return out

        return wrapper

    for name, attr in zip(STAGES, ("load_input", "tta_probabilities", "postprocess")):
        setattr(case_module, attr, wrap(name, getattr(case_module, attr)))

    def count(*_):
        stats["forwards"] += 1

    predictor.model.register_forward_pre_hook(count)
    return stats


def clear_stages(stats: dict) -> None:
    """Forget the forwards and stage times `instrument` has counted so far."""
    stats.update(forwards=0, **{f"{name}_s": [] for name in STAGES})


def predict_and_save(predictor, case, path: Path, sync,
                     describe: Callable | None = None) -> tuple[object, float, float]:
    """`predict_case` then `io.save_nifti` of its labels to `path`: the prediction, and the
    seconds of each. `describe(prediction)`, where given, is the header description to write."""
    from tumorseg.inference import predict_case
    from tumorseg.io import save_nifti

    pred, predict_s = timed(lambda: predict_case(predictor, case), sync)
    description = describe(pred) if describe else None
    _, save_s = timed(lambda: save_nifti(path, pred.labels, pred.affine, pred.header, description=description))
    return pred, predict_s, save_s


def stage_seconds(stats: dict, index: int, predict_s: float, save_s: float) -> dict:
    """Seconds of one case by stage: load, network, post-processing, other (the rest of
    `predict_case`), save; `index` picks the case among those `instrument` timed."""
    load, network, post = (stats[f"{name}_s"][index] for name in STAGES)
    return {"s_load": round(load, 3), "s_network": round(network, 3), "s_postprocess": round(post, 3),
            "s_other": round(predict_s - load - network - post, 3), "s_save": round(save_s, 3)}


# --- cases -----------------------------------------------------------------------------------


def shuffled_labelled_cases(data: Path, seed: int) -> list:
    """The cases under `data` that have a segmentation, in a seeded random order."""
    import numpy as np

    from tumorseg.layouts import discover_cases

    cases = [c for c in discover_cases(data) if c.seg is not None]
    return [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]


def link_case(case, link: Path) -> None:
    """Link `case`'s folder at `link` (the user's files stay where they are); kept if there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(case.folder.resolve(), target_is_directory=True)


# --- results ---------------------------------------------------------------------------------


def write_results(out: Path, res: dict, print_table: Callable[[dict], None]) -> None:
    """Write the JSON results atomically, print the human table, say where the file went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(res, indent=1))
    print_table(res)
    print(f"wrote {out}")
