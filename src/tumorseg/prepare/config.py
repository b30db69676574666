"""Preparation settings: one dataclass, defaults as the seed."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import TumorsegError
from ..settings import SEED_LIMIT, typed_settings
from ..labels import CAVITY_MODES, MODALITIES, SEED_CHANNELS, parse_channels
from .crop import CROP_MODES
from .scaling import NORMS


@dataclass(frozen=True)
class PrepareConfig:
    """How `tumorseg prepare` turns BraTS cases into training arrays.

    Attributes:
        channels: modalities stacked channels-first, in this order (seed: T2, T1CE, FLAIR).
        norm: "minmax" per volume (seed) or "zscore" over brain voxels.
        crop_size: size of the crop window (seed: 128^3).
        crop_mode: "fixed" window centred in the scan (seed) or "brain" (centred on the brain).
        min_tumour: training cases whose tumour fraction inside the crop is below this are
            dropped (seed: 1 %).
        val_fraction: share of kept cases in the validation split (seed: 0.25).
        seed: seed of the train/val split.
        spacing: voxel size (mm) the network sees, in the canonical (LPS) axis order; None
            takes the data's median spacing when preparing (1 mm for BraTS) and is recorded.
        cavity: the 2024 post-treatment resection cavity (BraTS 2023 label 4): "keep" as its
            own class, "drop" to background; None refuses data that holds one.
    """

    channels: tuple[str, ...] = SEED_CHANNELS
    norm: str = "minmax"
    crop_size: tuple[int, int, int] = (128, 128, 128)
    crop_mode: str = "fixed"
    min_tumour: float = 0.01
    val_fraction: float = 0.25
    seed: int = 42
    spacing: tuple[float, float, float] | None = None
    cavity: str | None = None

    def __post_init__(self) -> None:
        for key, value in typed_settings(type(self), vars(self), "PrepareConfig").items():  # built in Python too
            object.__setattr__(self, key, value)
        # the API and config files take what the CLI does: "all", "t1,flair", aliases ("T1-CE", "t2f")
        text = self.channels if isinstance(self.channels, str) else ",".join(str(c) for c in self.channels)
        object.__setattr__(self, "channels", parse_channels(text))
        bad = [c for c in self.channels if c not in MODALITIES]
        if bad or not self.channels or len(set(self.channels)) != len(self.channels):
            raise TumorsegError(
                f"bad channels {','.join(self.channels)}: choose distinct names from {', '.join(MODALITIES)}"
            )
        if self.norm not in NORMS:
            raise TumorsegError(f"unknown normalisation '{self.norm}' (choose from {', '.join(NORMS)})")
        if self.crop_mode not in CROP_MODES:
            raise TumorsegError(f"unknown crop mode '{self.crop_mode}' (choose from {', '.join(CROP_MODES)})")
        if len(self.crop_size) != 3 or any(int(s) < 1 for s in self.crop_size):
            raise TumorsegError(f"crop size must be three positive integers, got {self.crop_size}")
        if not 0.0 <= self.min_tumour < 1.0:
            raise TumorsegError(f"min tumour fraction must be in [0, 1), got {self.min_tumour}")
        if self.spacing is not None and (len(self.spacing) != 3 or not all(float(s) > 0 for s in self.spacing)):
            raise TumorsegError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if self.cavity is not None and self.cavity not in CAVITY_MODES:
            raise TumorsegError(f"unknown cavity mode '{self.cavity}' (choose from {', '.join(CAVITY_MODES)})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TumorsegError(f"validation fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise TumorsegError(f"seed must be in [0, 2**32), got {self.seed}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["crop_size"] = list(self.crop_size)
        d["spacing"] = [float(s) for s in self.spacing] if self.spacing is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "prepare settings") -> "PrepareConfig":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise TumorsegError(f"unknown prepare setting(s) {', '.join(unknown)}")
        return cls(**typed_settings(cls, d, source))

    def case_settings(self) -> dict:
        """The settings that change a case's arrays (the split does not), for resumability."""
        d = self.to_dict()
        d.pop("val_fraction")
        d.pop("seed")
        return d


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
