"""Training settings: one dataclass, filled from defaults, a YAML/TOML file, then CLI flags."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..devices import AMP_MODES, DEVICES
from ..errors import TumorsegError
from ..settings import SEED_LIMIT, typed_settings

TARGETS = ("labels", "regions")
SCHEDULES = ("none", "cosine", "poly")


@dataclass
class TrainConfig:
    """Everything `tumorseg train` needs besides the two folders.

    Defaults follow the seed (3D U-Net 16-256, Dice + focal over 4 classes, Adam 1e-4,
    batch 2). `patch` None trains on whole prepared crops; smaller patches are sampled with
    `fg_ratio` of them centred on tumour. `steps_per_epoch` sets the batches per epoch (0: one
    pass over the cases). `max_minutes` stops training after the epoch that exceeds this
    wall-clock budget (0: no budget); the last epoch is validated and saved. `amp` "auto"
    is bf16 on GPUs that have it natively, fp16 on older GPUs, float32 on the CPU
    (`devices.amp_dtype`). `deterministic` makes GPU training bitwise repeatable (and a resumed
    run bitwise equal to an uninterrupted one, as on the CPU) at some speed. `fold` (None: the
    prepared folder's own train/val split) trains fold `fold` of a seeded `folds`-fold
    cross-validation over all its kept cases, into the run folder's `fold_<fold>`.
    """

    model: str = "unet3d"
    filters: list[int] | None = None
    dropout: float | None = None
    deep_supervision: bool = False
    target: str = "labels"
    class_weights: list[float] | None = None
    epochs: int = 100
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "none"
    patch: list[int] | None = None
    fg_ratio: float = 0.33
    augment: str = "light"
    steps_per_epoch: int = 0
    max_minutes: float = 0.0
    val_every: int = 1
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    deterministic: bool = False
    tta: bool = False
    postprocess: bool = False
    fold: int | None = None
    folds: int = 5

    def __post_init__(self) -> None:
        from ..data import AUGMENTATIONS
        from ..networks import NETWORKS

        # Built in Python too (the API): "no" would be a true tta, 2.5 epochs a crash mid-training.
        for key, value in typed_settings(type(self), vars(self), "TrainConfig").items():
            setattr(self, key, value)

        checks = [
            (self.model in NETWORKS, f"unknown model '{self.model}' (choose from {', '.join(NETWORKS)})"),
            (self.target in TARGETS, f"unknown target '{self.target}' (choose from {', '.join(TARGETS)})"),
            (self.schedule in SCHEDULES, f"unknown schedule '{self.schedule}' (choose from {', '.join(SCHEDULES)})"),
            (self.augment in AUGMENTATIONS, f"unknown augment '{self.augment}' (choose from {', '.join(AUGMENTATIONS)})"),
            (self.amp in AMP_MODES, f"unknown amp '{self.amp}' (choose from {', '.join(AMP_MODES)})"),
            (self.device in DEVICES, f"unknown device '{self.device}' (choose from {', '.join(DEVICES)})"),
            (self.optimizer in ("adam", "adamw", "sgd"), f"unknown optimizer '{self.optimizer}' (adam, adamw, sgd)"),
            (self.epochs >= 1 and self.batch_size >= 1, f"epochs and batch size must be >= 1 (got {self.epochs}, {self.batch_size})"),
            (self.lr > 0, f"learning rate must be > 0 (got {self.lr})"),
            (0 <= self.seed < SEED_LIMIT, f"seed must be in [0, 2**32) (got {self.seed})"),
            (0.0 <= self.fg_ratio <= 1.0, f"fg_ratio must be in [0, 1] (got {self.fg_ratio})"),
            (self.patch is None or (len(self.patch) == 3 and min(self.patch) >= 1),
             f"patch must be 3 integers >= 1 (got {self.patch})"),
            (self.workers >= 0 and self.steps_per_epoch >= 0 and self.val_every >= 1,
             f"workers and steps per epoch must be >= 0 and val_every >= 1 "
             f"(got {self.workers}, {self.steps_per_epoch}, {self.val_every})"),
            (self.folds >= 2 and (self.fold is None or 0 <= self.fold < self.folds),
             f"fold must be in 0..folds-1 and folds >= 2 (got fold {self.fold} of {self.folds})"),
            (self.max_minutes >= 0 and self.weight_decay >= 0,
             f"max_minutes and weight decay must be >= 0 (got {self.max_minutes}, {self.weight_decay})"),
        ]
        for ok, message in checks:
            if not ok:
                raise TumorsegError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TumorsegError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = typed_settings(cls, values, source)
        try:
            return cls(**values)
        except TypeError as exc:
            raise TumorsegError(f"{source}: {exc}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml), TOML (.toml) or JSON file, as a plain dict."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # Notepad may begin it with a byte-order mark
    except OSError as exc:
        raise TumorsegError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise TumorsegError(f"{path}: cannot read config (not UTF-8 text: save it as UTF-8)") from None
    try:
        suffix = path.suffix.lower()
        if suffix == ".toml":
            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as exc:  # each parser has its own error type
        reason = " ".join(str(exc).split())  # YAML's errors run over several lines
        raise TumorsegError(f"{path}: cannot parse config ({type(exc).__name__}: {reason})") from None
    if not isinstance(values, dict):
        raise TumorsegError(f"{path}: config must be a mapping of settings")
    return values


def resolve_config(
    file: str | Path | None = None, overrides: dict[str, Any] | None = None, recipe: str | None = None
) -> TrainConfig:
    """Defaults <- recipe's train settings <- config file <- explicit overrides (CLI flags given)."""
    from ..recipes import load_recipe

    base = load_recipe(recipe)["train"] if recipe else {}
    values: dict[str, Any] = read_config_file(file) if file else {}
    source = str(file) if file else f"recipe '{recipe}'" if recipe else "config"
    merged = {**base, **values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return TrainConfig.from_dict(merged, source)


def resumed_config(run_file: Path, given: dict[str, Any] | str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A resumed run's settings: its own (`run_file`, the config.yaml it wrote) <- those `given` (a
    file or dict names only what changes, as flags do) <- explicit overrides (CLI flags given).
    Whether a change may be made on resuming is `run_files.resumed_state`'s to say."""
    changed = read_config_file(given) if isinstance(given, (str, Path)) else dict(given or {})
    values = {**read_config_file(run_file), **changed, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return TrainConfig.from_dict(values, str(given) if isinstance(given, (str, Path)) else str(run_file))

