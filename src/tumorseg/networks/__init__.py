"""Segmentation networks: our 3D U-Net and MONAI networks, built by name."""

from .registry import (
    DEFAULT_FILTERS,
    NETWORKS,
    build_network,
    deepest_voxels_needed,
    network_spec,
    required_divisor,
)
from .unet3d import UNet3D

__all__ = [
    "DEFAULT_FILTERS",
    "NETWORKS",
    "UNet3D",
    "build_network",
    "deepest_voxels_needed",
    "network_spec",
    "required_divisor",
]
