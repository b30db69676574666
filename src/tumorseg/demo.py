"""`tumorseg demo`: the whole pipeline in one command, on synthetic data or a real download.

synth (or --data) -> prepare -> train -> predict held-out cases into NIfTI in their original
space -> evaluate with the BraTS metrics -> plots. Sized for a CPU: small network, reduced
synthetic resolution, a few minutes of training. Re-running continues where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import TumorsegError


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    cases: int = 24  # synthetic training + validation cases
    test_cases: int = 4  # synthetic held-out cases, never seen in training
    shape: tuple[int, int, int] = (96, 96, 62)  # 0.4x the BraTS resolution: the brain fits the crop
    crop: tuple[int, int, int] = (64, 72, 64)  # centred on the brain and holding all of it (y up to 69)
    min_tumour: float = 0.002  # at 0.4x resolution the seed's 1 % drops 7 of the 24 cases
    filters: tuple[int, ...] = (8, 16, 32, 64)
    epochs: int = 40
    lr: float = 2e-3
    batch_size: int = 2
    real_patch: tuple[int, int, int] = (64, 64, 64)  # --data: patches from the 128^3 crops
    seed: int = 0


def _step(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", file=sys.stderr, flush=True)


def _synthetic_data(work: Path, s: DemoSettings) -> tuple[Path, Path]:
    from .synth import synthesize

    train_dir, test_dir = work / "data" / "train", work / "data" / "test"
    for folder, n, start in ((train_dir, s.cases, 1), (test_dir, s.test_cases, s.cases + 1)):
        if len(list(folder.glob("BraTS20_Training_*"))) != n:
            synthesize(folder, n, shape=s.shape, seed=s.seed, start_index=start)
    return train_dir, test_dir


def _held_out_links(data: Path, prepared: Path, work: Path) -> Path:
    """A folder of links to the validation cases of a real download (the user's files stay untouched)."""
    from .layouts import discover_cases
    from .prepare import load_manifest

    val = set(load_manifest(prepared)["split"]["val"])
    folder = work / "held_out"
    folder.mkdir(parents=True, exist_ok=True)
    for case in discover_cases(data):
        link = folder / case.case_id
        if case.case_id in val and not link.exists():
            link.symlink_to(case.folder.resolve(), target_is_directory=True)
    if not val:
        raise TumorsegError(f"{data}: no validation cases to hold out (need at least 2 usable cases)")
    return folder


def run_demo(work_dir: str | Path = "demo_out", data: str | Path | None = None, settings: DemoSettings | None = None):
    """Run the pipeline into `work_dir`; returns the evaluation result of the held-out cases."""
    from .evaluation import evaluate
    from .inference import predict
    from .prepare import PrepareConfig, prepare
    from .training import TrainConfig, train

    s, work = settings or DemoSettings(), Path(work_dir)
    if data is None:
        _step(1, f"synthesising {s.cases} + {s.test_cases} held-out BraTS-format cases at {s.shape}")
        raw, test = _synthetic_data(work, s)
        prep_cfg, patch = PrepareConfig(crop_size=s.crop, crop_mode="brain", min_tumour=s.min_tumour), None
    else:
        _step(1, f"using the BraTS data in {data}")
        raw, prep_cfg, patch = Path(data), PrepareConfig(), list(s.real_patch)
    _step(2, f"preparing -> {work / 'prepared'}")
    prepared = prepare(raw, work / "prepared", prep_cfg)
    if prepared.failed:
        print(f"  {len(prepared.failed)} case(s) failed and are left out", file=sys.stderr)
    test = test if data is None else _held_out_links(raw, work / "prepared", work)
    run = work / "run"
    _step(3, f"training a small 3D U-Net for {s.epochs} epochs on the CPU -> {run}")
    config = TrainConfig(model="unet3d", filters=list(s.filters), epochs=s.epochs, lr=s.lr, batch_size=s.batch_size,
                         schedule="cosine", patch=patch, seed=s.seed, postprocess=True)
    train(work / "prepared", run, config, resume=(run / "last.pt").exists())
    _step(4, f"predicting held-out cases {test} -> {work / 'predictions'} (NIfTI + PNG)")
    predicted = predict(run / "best.pt", test, work / "predictions", plots=True)
    _step(5, "evaluating with the BraTS region metrics")
    result = evaluate(predicted.out_dir, test, out_csv=work / "predictions" / "metrics.csv")
    print(result.report())
    print(f"\ndemo finished: predictions, plots and metrics in {work / 'predictions'}; "
          f"training curves in {run / 'curves.png'}")
    return result
