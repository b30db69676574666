"""Training-data throughput: samples per second the loader delivers, per number of workers.

A GPU stays busy only if the loader delivers at least as many samples per second as the network
trains on (issue 12 asks for twice the step rate on a GPU machine). Measured exactly as training
reads data: `PreparedDataset` over memory-mapped arrays, the recipe's patch sampling and
augmentation (`data.train_transform`), `data.make_loader` with `--workers` processes. Compare
the numbers with `bench_train.py`'s samples per second for the same recipe on the same machine.

Input: a prepared folder (`--prepared`, e.g. real cases prepared with `--recipe brats-gpu`), or
synthetic cases prepared here with the recipe's settings.

    python benchmarks/bench_loader.py [--recipe brats-gpu] [--prepared DIR] [--workers 0,1,2] [--batches 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import add_loader_args, add_out_arg, cpu_name, load_average, results_path, write_results

RESULTS = results_path("bench_loader")


def prepared_folder(args: argparse.Namespace, tmp: Path) -> Path:
    """`--prepared`, or synthetic cases prepared with the recipe's settings."""
    if args.prepared:
        return args.prepared
    from tumorseg.prepare import PrepareConfig, prepare
    from tumorseg.recipes import load_recipe
    from tumorseg.synth import synthesize

    synthesize(tmp / "raw", args.cases, seed=0, progress=False)
    config = PrepareConfig.from_dict({**PrepareConfig().to_dict(), **load_recipe(args.recipe)["prepare"]})
    prepare(tmp / "raw", tmp / "prep", config, progress=False)
    return tmp / "prep"


def measure(prepared: Path, args: argparse.Namespace, workers: int) -> dict:
    """Samples per second over `--batches` batches after one warm-up batch."""
    from tumorseg.data import PreparedDataset, make_loader, split_ids, train_transform
    from tumorseg.prepare import load_manifest
    from tumorseg.recipes import load_recipe

    train = load_recipe(args.recipe)["train"]
    crop = load_manifest(prepared)["settings"]["crop_size"]
    transform = train_transform(train.get("patch"), crop, train.get("augment", "light"), train.get("fg_ratio", 0.33))
    ids = split_ids(prepared, "train") + split_ids(prepared, "val")
    loader = make_loader(PreparedDataset(prepared, ids, transform), train.get("batch_size", 2), True, 0, workers)
    batches, seen, start = 0, 0, None
    while batches <= args.batches:
        loader.sampler.set_epoch(batches)
        for batch in loader:
            if start is None:  # the first batch pays for starting the workers
                start = time.perf_counter()
            else:
                seen += batch["image"].shape[0]
            batches += 1
            if batches > args.batches:
                break
    seconds = time.perf_counter() - start
    return {"workers": workers, "samples": seen, "seconds": round(seconds, 2), "samples_per_s": round(seen / seconds, 2),
            "patch": train.get("patch"), "augment": train.get("augment")}


def measure_workers(prepared: Path, args: argparse.Namespace) -> list[dict]:
    """`measure` for each worker count in `--workers` (comma-separated)."""
    return [measure(prepared, args, int(w)) for w in args.workers.split(",")]


def loader_data(args: argparse.Namespace) -> str:
    """What the loader read, for the results: `--prepared`, else how many synthetic cases."""
    return str(args.prepared or f"{args.cases} synthetic cases")


def print_table(res: dict) -> None:
    print(f"\n{res['recipe']} loader on {res['data']} ({res['cpu']}, {res['cpu_count']} CPUs, "
          f"load {res['load_average']})")
    print(f"{'workers':>8}{'samples/s':>11}{'samples':>9}{'seconds':>9}")
    for r in res["results"]:
        print(f"{r['workers']:>8}{r['samples_per_s']:>11.2f}{r['samples']:>9}{r['seconds']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="brats-gpu", help="recipe whose patch and augmentation to use")
    add_loader_args(parser)
    add_out_arg(parser, RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        prepared = prepared_folder(args, Path(tmp))
        load = load_average()
        results = measure_workers(prepared, args)
    res = {"recipe": args.recipe, "data": loader_data(args), "cpu": cpu_name(),
           "cpu_count": os.cpu_count(), "load_average": load, "results": results}
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
