"""Throughput of `tumorseg prepare` against the seed's serial preprocessing loop.

What is measured, all in one run on the same files (page cache warmed first):

- seed: a faithful serial re-implementation of the seed's loop. For each case and each of
  T2, T1CE, FLAIR: `nib.load(path).get_fdata()` (float64), min-max scaling over the whole
  volume, stack channels last, crop [56:184, 56:184, 13:141]; the segmentation loaded the
  same way, 4 -> 3, cropped; kept when `1 - count(0) / total > 0.01`; `np.save` of both.
- ours, workers=1: `tumorseg.prepare.prepare(...)` in one process (the algorithmic gain).
- ours, workers=N: the same with N worker processes (algorithmic + parallel gain).

Each is timed end to end (wall clock, `--repeat` times, fastest kept) and reported as cases
per second. Our arrays (channels-first float32, uint8 masks) are then compared with the
seed's (channels-last float64, transposed and cast to float32): they must be identical for
every kept case. A per-stage breakdown (load, scale, crop, segmentation, save) of both
pipelines is timed serially on the first cases.

Data: `--cases` synthetic full-size (240x240x155) cases made with `tumorseg.synth`
(`.nii.gz`, or `.nii` like the Kaggle download with `--nii`), or real cases with `--data`.

    python benchmarks/bench_prepare.py [--cases 8] [--workers N] [--data DIR] [--nii]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import add_out_arg, load_average, results_path, timed, write_results

from tumorseg.io import save_npy

from tumorseg.layouts import Case, discover_cases
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.prepare.case import load_channels, load_segmentation, preprocess, to_network_grid
from tumorseg.prepare.config import default_workers
from tumorseg.prepare.crop import crop

SEED_CHANNELS = ("t2", "t1ce", "flair")
SEED_CROP = (slice(56, 184), slice(56, 184), slice(13, 141))
STAGES = ("load", "scale", "stack_crop", "seg", "save")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def seed_case(case: Case, out_dir: Path, stages: dict[str, float]) -> bool:
    """The seed's loop body for one case; adds seconds per stage to `stages`; True if kept."""
    volumes = []
    for modality in SEED_CHANNELS:
        t0 = time.perf_counter()
        x = nib.load(str(case.image(modality))).get_fdata()
        t1 = time.perf_counter()
        x = (x - x.min()) / (x.max() - x.min())  # the seed's MinMaxScaler, per volume
        volumes.append(x)
        stages["load"] += t1 - t0
        stages["scale"] += time.perf_counter() - t1
    t = time.perf_counter()
    image = np.stack(volumes, axis=3)[SEED_CROP]
    t2 = time.perf_counter()
    mask = nib.load(str(case.seg)).get_fdata().astype(np.uint8)
    mask[mask == 4] = 3
    mask = mask[SEED_CROP]
    _, counts = np.unique(mask, return_counts=True)
    keep = (1 - counts[0] / counts.sum()) > 0.01
    t3 = time.perf_counter()
    if keep:
        np.save(out_dir / "images" / f"{case.case_id}.npy", image)
        np.save(out_dir / "masks" / f"{case.case_id}.npy", mask)
    stages["stack_crop"] += t2 - t
    stages["seg"] += t3 - t2
    stages["save"] += time.perf_counter() - t3
    return bool(keep)


def run_seed(cases: list[Case], out_dir: Path) -> tuple[list[str], dict[str, float]]:
    """The seed's loop over all cases: the kept case ids (sorted) and seconds per stage."""
    for kind in ("images", "masks"):
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    stages = dict.fromkeys(STAGES, 0.0)
    kept = [c.case_id for c in cases if seed_case(c, out_dir, stages)]
    return sorted(kept), stages


def run_ours(data_dir: Path, out_dir: Path, workers: int) -> tuple[list[str], None]:
    """`prepare` over all cases with `workers` processes (into an empty folder): kept case ids."""
    shutil.rmtree(out_dir, ignore_errors=True)
    result = prepare(data_dir, out_dir, PrepareConfig(), workers=workers, force=True, progress=False)
    if result.failed:
        raise SystemExit(f"prepare failed: {result.failed}")
    return sorted(result.kept), None


def ours_stages(cases: list[Case], out_dir: Path) -> dict[str, float]:
    """Seconds per stage of our per-case worker, run serially over `cases`."""
    config = PrepareConfig()
    stages = dict.fromkeys(STAGES, 0.0)
    for case in cases:
        t0 = time.perf_counter()
        data, src, net = to_network_grid(load_channels(case, config.channels), config.spacing)
        t1 = time.perf_counter()
        image, box, _ = preprocess(data, config)  # brain mask, scaling and crop together
        t2 = time.perf_counter()
        mask = crop(load_segmentation(case, src, net, config.cavity), box)
        t3 = time.perf_counter()
        save_npy(out_dir / "images" / f"{case.case_id}.npy", np.ascontiguousarray(image))
        save_npy(out_dir / "masks" / f"{case.case_id}.npy", np.ascontiguousarray(mask))
        stages["load"] += t1 - t0
        stages["scale"] += t2 - t1
        stages["seg"] += t3 - t2
        stages["save"] += time.perf_counter() - t3
    return stages


def compare(seed_dir: Path, ours_dir: Path, kept: list[str]) -> dict:
    """Whether our arrays equal the seed's for every kept case, and the largest difference."""
    identical, max_diff, masks_identical = True, 0.0, True
    for cid in kept:
        seed_img = np.load(seed_dir / "images" / f"{cid}.npy").transpose(3, 0, 1, 2).astype(np.float32)
        ours_img = np.load(ours_dir / "images" / f"{cid}.npy")
        same_shape = seed_img.shape == ours_img.shape and ours_img.dtype == np.float32
        identical &= same_shape and np.array_equal(seed_img, ours_img)
        if same_shape:
            max_diff = max(max_diff, float(np.abs(seed_img - ours_img).max()))
        seed_mask = np.load(seed_dir / "masks" / f"{cid}.npy")
        ours_mask = np.load(ours_dir / "masks" / f"{cid}.npy")
        masks_identical &= ours_mask.dtype == np.uint8 and np.array_equal(seed_mask, ours_mask)
    return {"identical": bool(identical and masks_identical), "images_identical": bool(identical),
            "masks_identical": bool(masks_identical), "max_abs_diff": max_diff, "compared_cases": len(kept)}


def make_data(root: Path, cases: int, nii: bool) -> Path:
    """Synthetic full-size cases under `root/synth`, gzip-decompressed to `.nii` if `nii`."""
    from tumorseg.synth import synthesize

    data = root / "synth"
    synthesize(data, cases, seed=0, progress=False)
    if nii:
        for path in sorted(data.rglob("*.nii.gz")):
            with gzip.open(path, "rb") as src, open(path.with_suffix(""), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            path.unlink()
    return data


def warm_cache(cases: list[Case]) -> int:
    """Read every input file once so no variant pays for cold disk reads; returns bytes."""
    total = 0
    for case in cases:
        for path in [*case.images.values(), case.seg]:
            if path is not None:
                total += len(path.read_bytes())
    return total


def machine() -> dict:
    """CPU count, load average and versions, to read the numbers against."""
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": default_workers(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "nibabel": nib.__version__,
        "platform": platform.platform(),
    }


def timed_cpu(fn, *args) -> tuple[object, float, float]:
    """`fn(*args)`, its wall-clock seconds and the CPU seconds it used (workers included)."""
    cpu = cpu_seconds()
    result, wall = timed(lambda: fn(*args))
    return result, wall, cpu_seconds() - cpu


def measure(data_dir: Path, work: Path, workers: int, repeat: int) -> dict:
    """Time the seed loop and ours (1 and `workers` processes), fastest of `repeat` each."""
    cases = discover_cases(data_dir)
    warm_cache(cases)
    variants = {"seed": (run_seed, cases, work / "seed"), "ours_1": (run_ours, data_dir, work / "ours_1", 1),
                "ours_n": (run_ours, data_dir, work / "ours_n", workers)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    kept: dict[str, list[str]] = {}
    for _ in range(repeat):  # interleaved so background load hits every variant alike
        shutil.rmtree(work / "seed", ignore_errors=True)
        for key, (fn, *args) in variants.items():
            result, wall, used = timed_cpu(fn, *args)
            if key == "seed" and (not times["seed"] or wall < min(times["seed"])):
                seed_stages = result[1]  # the breakdown of the fastest seed run
            kept[key] = result[0]
            times[key].append(wall)
            cpu[key].append(used)
    n, best = len(cases), {k: min(v) for k, v in times.items()}
    stage_cases = cases[: min(3, n)]
    ours_stage = ours_stages(stage_cases, work / "stages")
    return {
        "cases": n,
        "workers": workers,
        "repeat": repeat,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "cases_per_s": {k: round(n / v, 3) for k, v in best.items()},
        "cpu_seconds_per_case": {k: round(min(v) / n, 3) for k, v in cpu.items()},
        "speedup": {k: round(best["seed"] / best[k], 2) for k in ("ours_1", "ours_n")},
        "kept": {"seed": len(kept["seed"]), "ours": len(kept["ours_n"]),
                 "same_cases": kept["seed"] == kept["ours_1"] == kept["ours_n"]},
        "comparison": {k: compare(work / "seed", work / k, kept["seed"]) for k in ("ours_1", "ours_n")},
        "stage_seconds_per_case": {
            "seed": {k: round(v / n, 3) for k, v in seed_stages.items()},
            "ours": {k: round(v / len(stage_cases), 3) for k, v in ours_stage.items()},
        },
    }


def print_table(res: dict) -> None:
    """Cases per second, speedup and CPU per case of each variant; equality; stage times."""
    n, best = res["cases"], res["cases_per_s"]
    print(f"\n{n} cases, {res['workers']} workers, load average {res['machine']['load_average']}")
    print(f"{'variant':<22}{'cases/s':>9}{'s/case':>9}{'speedup':>9}{'cpu s/case':>12}")
    rows = [("seed loop (serial)", "seed", 1.0), ("ours, 1 worker", "ours_1", res["speedup"]["ours_1"]),
            (f"ours, {res['workers']} workers", "ours_n", res["speedup"]["ours_n"])]
    for label, key, speed in rows:
        cpu = res["cpu_seconds_per_case"][key]
        print(f"{label:<22}{best[key]:>9.3f}{1 / best[key]:>9.3f}{speed:>8.2f}x{cpu:>12.3f}")
    for key, cmp in res["comparison"].items():
        print(f"{key} vs seed: identical {str(cmp['identical']).lower()} over {cmp['compared_cases']} kept cases "
              f"(max abs diff {cmp['max_abs_diff']:.3g})")
    print(f"same kept cases: {res['kept']['same_cases']} ({res['kept']['seed']} of {n})")
    print("seconds per case by stage (ours: scale includes brain mask and crop):")
    for who, stages in res["stage_seconds_per_case"].items():
        print(f"  {who:<5} " + "  ".join(f"{k} {v:.3f}" for k, v in stages.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8, help="synthetic cases to make (default 8)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="worker processes for ours")
    parser.add_argument("--data", type=Path, help="benchmark these real BraTS cases instead")
    parser.add_argument("--nii", action="store_true", help="synthetic cases as uncompressed .nii (Kaggle)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant, fastest kept (default 3)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    add_out_arg(parser, results_path("bench_prepare"))
    args = parser.parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_prepare_", dir=args.workdir) as tmp:
        work = Path(tmp)
        data = args.data if args.data is not None else make_data(work, args.cases, args.nii)
        res = measure(data, work, args.workers, max(1, args.repeat))
    kind = ".nii" if args.nii else ".nii.gz"
    res["data"] = str(args.data) if args.data else f"synthetic 240x240x155 {kind}, seed 0"
    res["machine"] = machine()
    res["load_average_before"] = load_before
    identical = all(c["identical"] for c in res["comparison"].values()) and res["kept"]["same_cases"]
    res["identical"] = identical
    res["target"] = {"speedup_ours_n_at_least": 3.0, "met": res["speedup"]["ours_n"] >= 3.0 and identical}
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
