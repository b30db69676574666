"""Step 1 of the pipeline: BraTS case folders -> scaled, cropped, relabelled `.npy` arrays."""

from .config import PrepareConfig
from .crop import crop, crop_box, uncrop
from .run import MANIFEST, PrepareResult, load_manifest, prepare

__all__ = ["MANIFEST", "PrepareConfig", "PrepareResult", "crop", "crop_box", "load_manifest", "prepare", "uncrop"]
