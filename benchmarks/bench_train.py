"""Training-step speed and peak memory of every network in the registry.

What is measured, per network (default widths from `DEFAULT_FILTERS`), on random inputs of
shape `(batch, 3, size, size, size)` with random label maps `(batch, 1, size, size, size)`
(values 0..3): one training step through `training.engine.forward_backward`, as `train_epoch` takes it (cuDNN
autotuning on, as training's default; forward under autocast as `--amp` resolves for training:
bf16 or fp16 on GPUs, float32 on the CPU unless `--amp bf16` on a CPU with native bf16; the
"labels" loss (Dice + focal over 4 classes) on float32 logits, backward, fp16's gradient scaler,
optimizer step: Adam lr 1e-4 for every network). One warm-up step, then `--steps` timed steps
(default 3 on CPU, 20 on CUDA); reported as seconds per step (mean and min) and samples per
second, with the optimizer's name and settings.

Each network runs in its own subprocess, so peak memory is that network's alone: on CPU the
peak resident set size (`ru_maxrss`), on CUDA `torch.cuda.max_memory_allocated` (timing with
`torch.cuda.synchronize`).

    python benchmarks/bench_train.py [--size 128] [--device auto|cpu|cuda] [--networks unet3d,unet]

With `--recipe R` it times the recipe's own network (model, widths, channels, target, deep
supervision) at its patch and batch size instead, stepping the recipe's optimizer as training
builds it (`tumorseg.training.train.build_optimizer` on the recipe's settings: AdamW with the
recipe's learning rate and weight decay for brats-cpu, SGD for brats-gpu, Adam for seed), and
beside it the training data loader with that recipe's sampling and augmentation per worker
count (`bench_loader.measure`, over `--prepared` or synthetic cases): a GPU stays busy only
where the loader delivers at least the step's samples per second (issue 12 asks for twice as
many).

    python benchmarks/bench_train.py --recipe brats-gpu --prepared prep_gpu --workers 2,4,8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_loader import loader_data, measure_workers, prepared_folder
from common import (add_device_arg, add_loader_args, add_out_arg, add_threads_arg, apply_threads, check_networks,
                    device_sync, load_average, machine, peak_cuda_gib, peak_rss_gib, pick_device, results_path,
                    run_child, threads_flag, timed, write_results)

RESULTS = results_path("bench_train")
DEFAULT_OPTIMIZER = "Adam lr 1e-4 (the same for every network: step cost, not a recipe's optimizer)"


def network_setup(name: str, recipe: str | None) -> tuple[dict, str]:
    """The network spec and loss target: the recipe's, else `name` with default widths, 3 channels, labels."""
    from tumorseg.networks import network_spec

    if recipe is None:
        return network_spec(name, 3, 4), "labels"
    from tumorseg.recipes import load_recipe

    r = load_recipe(recipe)
    train, target = r["train"], r["train"].get("target", "labels")
    spec = network_spec(train["model"], len(r["prepare"]["channels"]), 3 if target == "regions" else 4,
                        train.get("filters"), deep_supervision=train.get("deep_supervision", False))
    return spec, target


def make_optimizer(params, recipe: str | None):
    """The optimizer the step takes: `recipe`'s exactly as `tumorseg train --recipe` builds it
    (its train settings through `resolve_config`, then training's own `build_optimizer`), else Adam lr 1e-4."""
    import torch

    if recipe is None:
        return torch.optim.Adam(params, lr=1e-4)
    from tumorseg.training import resolve_config
    from tumorseg.training.train import build_optimizer

    return build_optimizer(resolve_config(recipe=recipe), params)


def describe_optimizer(optimizer) -> dict:
    """The optimizer's class name and the settings that shape a step (learning rate, weight decay, momentum)."""
    settings = {k: optimizer.defaults[k] for k in ("lr", "weight_decay", "momentum", "nesterov")
                if k in optimizer.defaults}
    return {"optimizer": type(optimizer).__name__, "optimizer_settings": settings}


def optimizer_fields(recipe: str | None) -> dict:
    """What the JSON records about the optimizer: name, settings and where they come from."""
    import torch

    fields = describe_optimizer(make_optimizer([torch.nn.Parameter(torch.zeros(1))], recipe))
    fields["optimizer_source"] = (f"recipe {recipe}, built by tumorseg.training.train.build_optimizer as training does"
                                  if recipe else DEFAULT_OPTIMIZER)
    return fields


def make_step(name: str, size: int, batch: int, device: str, recipe: str | None = None,
              amp: str = "auto") -> tuple[Callable[[], float], int, object]:
    """A closure running one training step of network `name` (or `recipe`'s), its parameter count and its optimizer."""
    import torch

    from tumorseg.devices import amp_dtype
    from tumorseg.networks import build_network
    from tumorseg.training.engine import forward_backward
    from tumorseg.training.losses import build_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    spec, target = network_setup(name, recipe)
    model = build_network(**spec).to(dev).train()
    loss_fn = build_loss(target).to(dev)
    optimizer = make_optimizer(model.parameters(), recipe)
    image = torch.rand(batch, spec["in_channels"], size, size, size, device=dev)
    labels = torch.randint(0, 4, (batch, 1, size, size, size), device=dev)
    dtype = amp_dtype(amp, dev)  # training's rule: float32 on the CPU unless bf16 is asked for and native
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)  # as training: fp16 only

    def step() -> float:  # training's own step (`engine.train_epoch`), without its loss guard
        loss = forward_backward(model, image, labels, loss_fn, optimizer, scaler, dtype)
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())  # .item() waits for the device, like the training loop

    return step, sum(p.numel() for p in model.parameters()), optimizer


def time_network(name: str, size: int, batch: int, device: str, steps: int, warmup: int,
                 recipe: str | None = None, amp: str = "auto") -> dict:
    """Run `warmup` + `steps` training steps of one network; seconds, throughput, memory."""
    import torch

    from tumorseg.devices import deterministic

    build_start = time.perf_counter()
    step, params, optimizer = make_step(name, size, batch, device, recipe, amp)
    sync = device_sync(device)
    with deterministic(False):  # as training runs by default: cuDNN autotunes for the fixed patch
        for _ in range(warmup):
            step()
        sync()
        times = [timed(step, sync)[1] for _ in range(steps)]
    mean = sum(times) / len(times)
    out = {
        "network": name,
        "params_m": round(params / 1e6, 3),
        "s_per_step": round(mean, 4),
        "s_per_step_min": round(min(times), 4),
        "samples_per_s": round(batch / mean, 3),
        "step_seconds": [round(t, 4) for t in times],
        "wall_s_total": round(time.perf_counter() - build_start, 2),
        "peak_rss_gib": peak_rss_gib(),
        "threads": torch.get_num_threads(),
        **describe_optimizer(optimizer),
    }
    if device == "cuda":
        out["peak_cuda_gib"] = peak_cuda_gib()
    return out


def run_network(name: str, args: argparse.Namespace, device: str, steps: int) -> dict:
    """`time_network` in a fresh interpreter, so its peak memory is its own."""
    cmd = ["--child", name, "--size", str(args.size), "--batch", str(args.batch),
           "--device", device, "--steps", str(steps), "--warmup", str(args.warmup), "--amp", args.amp]
    if args.recipe:
        cmd += ["--recipe", args.recipe]
    return run_child(__file__, [*cmd, *threads_flag(args.threads)], network=name)


def print_table(res: dict) -> None:
    """One row per network: parameters, seconds per step, samples per second, peak memory."""
    cuda = res["device"] == "cuda"
    m = res["machine"]
    print(f"\n{res['size']}^3, batch {res['batch']}, {res['device']} ({m['device_name']}), {res['autocast']}, "
          f"{m['torch_threads']} threads, load average {m['load_average']}, {res['optimizer']} "
          f"{res['optimizer_settings']}")
    mem = "peak GiB (cuda)" if cuda else "peak RSS GiB"
    print(f"{'network':<11}{'params M':>9}{'s/step':>9}{'min s':>8}{'samples/s':>11}{mem:>17}")
    for r in res["results"]:
        if "error" in r:
            print(f"{r['network']:<11}  error: {r['error']}")
            continue
        peak = r["peak_cuda_gib"] if cuda else r["peak_rss_gib"]
        print(f"{r['network']:<11}{r['params_m']:>9.2f}{r['s_per_step']:>9.3f}{r['s_per_step_min']:>8.3f}"
              f"{r['samples_per_s']:>11.3f}{peak:>17.2f}")
    if res.get("loader"):
        step = next((r["samples_per_s"] for r in res["results"] if "error" not in r), None)
        print(f"\nloader ({res['recipe']} sampling and augmentation, {res['loader_data']}) beside the step:")
        print(f"{'workers':>8}{'samples/s':>11}{'x step rate':>13}")
        for r in res["loader"]:
            ratio = f"{r['samples_per_s'] / step:>13.2f}" if step else f"{'-':>13}"
            print(f"{r['workers']:>8}{r['samples_per_s']:>11.2f}{ratio}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="cube side of the input (default 128)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    add_device_arg(parser)
    parser.add_argument("--networks", help="comma-separated subset of the registry (default: all)")
    parser.add_argument("--steps", type=int, help="timed steps (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                        help="precision as train's --amp (default auto: bf16 or fp16 on GPUs, float32 on the CPU)")
    add_threads_arg(parser)
    add_out_arg(parser, RESULTS)
    parser.add_argument("--recipe", help="time this recipe's network at its patch and batch with its optimizer, "
                        "and its loader beside it")
    add_loader_args(parser, prefix="with --recipe: ")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: time one network, print JSON
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    apply_threads(args.threads)
    if args.child:
        print(json.dumps(time_network(args.child, args.size, args.batch, args.device, args.steps, args.warmup,
                                      args.recipe, args.amp)))
        return
    import torch

    from tumorseg.devices import amp_dtype, precision_name
    from tumorseg.networks import NETWORKS, required_divisor

    names = args.networks.split(",") if args.networks else list(NETWORKS)
    if args.recipe:
        from tumorseg.recipes import load_recipe

        recipe = load_recipe(args.recipe)
        train = recipe["train"]
        patch = train.get("patch") or recipe["prepare"]["crop_size"]  # no patch: whole crops
        if len(set(patch)) != 1:
            raise SystemExit(f"--recipe {args.recipe}: patch {patch} is not a cube (this benchmark times cubes)")
        names, args.size, args.batch = [train["model"]], int(patch[0]), int(train.get("batch_size", 2))
    check_networks(names)
    bad = [n for n in names if args.size % required_divisor(n)]
    if bad:
        raise SystemExit(f"--size {args.size} is not divisible by what {', '.join(bad)} need(s)")
    device = pick_device(args.device)
    steps = args.steps or (20 if device == "cuda" else 3)
    res = {"size": args.size, "batch": args.batch, "device": device, "steps": steps, "warmup": args.warmup,
           "loss": f"{network_setup(names[0], args.recipe)[1]} (the training loss of that target)",
           **optimizer_fields(args.recipe),
           "amp": args.amp, "autocast": precision_name(amp_dtype(args.amp, torch.device(device))),
           "machine": machine(device),
           "results": []}
    for name in names:
        res["results"].append(run_network(name, args, device, steps))
    if args.recipe:
        res["recipe"], res["loader_data"] = args.recipe, loader_data(args)
        with tempfile.TemporaryDirectory(prefix="bench_train_loader_") as tmp:
            res["loader"] = measure_workers(prepared_folder(args, Path(tmp)), args)
    res["machine"]["load_average_after"] = load_average()
    write_results(args.out, res, print_table)


if __name__ == "__main__":
    main()
