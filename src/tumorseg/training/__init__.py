"""Step 4a: prepared arrays -> a trained network (checkpoints, metrics, curves)."""

from ..checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, resolve_config
from .losses import build_loss
from .train import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "build_loss", "load_checkpoint", "resolve_config", "save_checkpoint", "train"]
