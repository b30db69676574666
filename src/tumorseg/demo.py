"""`tumorseg demo`: the whole pipeline in one command, on synthetic data or a real download.

synth (or --data) -> prepare -> train -> predict held-out cases into NIfTI in their original
space -> evaluate with the BraTS metrics -> plots. Sized for a CPU: small network, reduced
synthetic resolution, a few minutes of training. Re-running continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import TumorsegError
from .log import say


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
    real_crop: tuple[int, int, int] = (128, 128, 128)  # --data: the seed's crop
    real_patch: tuple[int, int, int] = (64, 64, 64)  # --data: patches from those crops
    seed: int = 0


STEPS = 6


def _step(number: int, text: str) -> None:
    say(f"[{number}/{STEPS}] {text}")


def _synthetic_data(work: Path, s: DemoSettings) -> tuple[Path, Path]:
    from .synth import synthesize

    train_dir, test_dir = work / "data" / "train", work / "data" / "test"
    parts = [(folder, n, start) for folder, n, start in ((train_dir, s.cases, 1), (test_dir, s.test_cases, s.cases + 1))
             if len(list(folder.glob("BraTS20_Training_*"))) != n]
    what = f"{s.cases} + {s.test_cases} held-out BraTS-format cases at {s.shape}"
    _step(1, f"synthesising {what}" if parts else f"using the {what} in {work / 'data'}")
    for folder, n, start in parts:
        synthesize(folder, n, shape=s.shape, seed=s.seed, start_index=start)
    return train_dir, test_dir


def _held_out(prepared: Path, data: Path) -> list[str]:
    """The validation cases of a real download's split: predicted and scored in place."""
    from .prepare import load_manifest

    val = load_manifest(prepared)["split"]["val"]
    if not val:
        raise TumorsegError(f"{data}: no validation cases to hold out (need at least 2 usable cases)")
    return val


def run_demo(work_dir: str | Path = "demo_out", data: str | Path | None = None, settings: DemoSettings | None = None):
    """The whole pipeline on the CPU into `work_dir`: synthetic cases (or `data`'s real ones) prepared,
    trained on, the held-out cases predicted, evaluated, reported and drawn; `settings`: its sizes
    (`DemoSettings`). Run again on the same folder, it goes on where it stopped. Returns the
    evaluation of the held-out cases (`evaluation.EvaluationResult`)."""
    from .evaluation import evaluate
    from .inference import predict
    from .prepare import PrepareConfig, prepare
    from .report import report
    from .training import TrainConfig, train

    s, work = settings or DemoSettings(), Path(work_dir)
    if data is None:
        raw, test = _synthetic_data(work, s)
        prep_cfg, patch = PrepareConfig(crop_size=s.crop, crop_mode="brain", min_tumour=s.min_tumour), None
    else:
        _step(1, f"using the BraTS data in {data}")
        raw = test = Path(data)
        prep_cfg, patch = PrepareConfig(crop_size=s.real_crop), list(s.real_patch)
    _step(2, f"preparing -> {work / 'prepared'}")
    prepared = prepare(raw, work / "prepared", prep_cfg)
    counts, split = prepared.manifest["counts"], prepared.manifest["split"]
    say(f"  {counts['kept']} kept ({len(split['train'])} train, {len(split['val'])} validation), "
        f"{counts['dropped']} dropped (under {prep_cfg.min_tumour * 100:g}% tumour in the crop)")
    if prepared.failed:
        say(f"  {len(prepared.failed)} case(s) failed and are left out")
    held_out = None if data is None else _held_out(work / "prepared", raw)  # else all of test/
    run = work / "run"
    _step(3, f"training a small 3D U-Net for {s.epochs} epochs on the CPU -> {run}")
    config = TrainConfig(model="unet3d", filters=list(s.filters), epochs=s.epochs, lr=s.lr, batch_size=s.batch_size,
                         schedule="cosine", patch=patch, seed=s.seed, postprocess=True)
    trained = train(work / "prepared", run, config, resume=(run / "last.pt").exists(),
                    resume_with=f"the same demo command again (its folder: {work})")
    if trained.best_epoch:
        say(f"  best.pt: epoch {trained.best_epoch}, validation mean Dice {trained.best_metric:.3f}")
    which = test if held_out is None else f"{len(held_out)} validation cases of {test}"
    _step(4, f"predicting the held-out cases ({which}) -> {work / 'predictions'} (NIfTI + PNG)")
    predicted = predict(run / "best.pt", test, work / "predictions", plots=True, cases=held_out,
                        redo_others=True)  # after more training (--epochs), the new best.pt's
    _step(5, "evaluating with the BraTS region metrics")
    result = evaluate(predicted.out_dir, test, out_csv=work / "predictions" / "metrics.csv", cases=held_out)
    print(result.report())
    _step(6, f"writing the report (volumes, diameters, checks, metrics) -> {work / 'report'}")
    written = report(predicted.out_dir, images=test, gt=test, out=work / "report")
    print(f"\ndemo finished: predictions, plots and metrics in {work / 'predictions'}; the report in "
          f"{written.index}; training curves in {run / 'curves.png'}")
    return result
