"""Networks by name: our UNet3D, three MONAI networks and a lighter MONAI UNet, behind the same few arguments.

Adding a network is one entry in `_BUILDERS` (and its default widths in `DEFAULT_FILTERS`).
Every network maps `(B, in_channels, D, H, W)` to logits `(B, out_channels, D, H, W)` in
eval mode, with D, H, W divisible by `required_divisor(name, filters)`.

The arguments are plain types, so a checkpoint stores `network_spec(...)` and rebuilds the
network with `build_network(**spec)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import TumorsegError
from .unet3d import UNet3D

# Widths per level, top to bottom; the number of levels is len(filters).
DEFAULT_FILTERS: dict[str, tuple[int, ...]] = {
    "unet3d": (16, 32, 64, 128, 256),  # the seed's Keras U-Net
    "unet": (16, 32, 64, 128, 256),
    "unet-lite": (8, 32, 64, 128, 256),  # a thin first level: the half-size logits need little there
    "segresnet": (16, 32, 64, 128),  # MONAI's BraTS tutorial: init_filters 16, 4 levels
    "dynunet": (32, 64, 128, 256, 320),  # nnU-Net widths, capped at 320
}


def _unet3d(spec: dict[str, Any]) -> nn.Module:
    return UNet3D(spec["in_channels"], spec["out_channels"], spec["filters"], spec["dropout"])


def _unet(spec: dict[str, Any]) -> nn.Module:
    """MONAI's UNet ("unet"), or `UNetLite` ("unet-lite": logits at half resolution, upsampled)."""
    from monai.networks.nets import UNet

    from .unet_lite import UNetLite

    network = UNetLite if spec["name"] == "unet-lite" else UNet
    filters = spec["filters"]
    return network(
        spatial_dims=3,
        in_channels=spec["in_channels"],
        out_channels=spec["out_channels"],
        channels=filters,
        strides=(2,) * (len(filters) - 1),
        num_res_units=2,
        norm="instance",
        dropout=spec["dropout"] or 0.0,
    )


def _segresnet(spec: dict[str, Any]) -> nn.Module:
    """Widths double per level from filters[0]; blocks per level 1, 2, ..., 2, 4."""
    from monai.networks.nets import SegResNet

    levels = len(spec["filters"])
    init_filters = spec["filters"][0]
    return SegResNet(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=spec["in_channels"],
        out_channels=spec["out_channels"],
        dropout_prob=spec["dropout"],
        norm=("GROUP", {"num_groups": math.gcd(8, init_filters)}),
        blocks_down=(1,) + (2,) * (levels - 2) + (4,),
        blocks_up=(1,) * (levels - 1),
    )


def _dynunet(spec: dict[str, Any]) -> nn.Module:
    """nnU-Net-like: 3x3x3 kernels, stride 2 below the top level.

    Deep supervision heads sit on every decoder level but the lowest.
    """
    from monai.networks.nets import DynUNet

    levels = len(spec["filters"])
    strides = (1,) + (2,) * (levels - 1)
    return DynUNet(
        spatial_dims=3,
        in_channels=spec["in_channels"],
        out_channels=spec["out_channels"],
        kernel_size=(3,) * levels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=spec["filters"],
        dropout=spec["dropout"],
        deep_supervision=spec["deep_supervision"],
        deep_supr_num=max(1, levels - 2),
    )


_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "unet3d": _unet3d,
    "unet": _unet,
    "unet-lite": _unet,
    "segresnet": _segresnet,
    "dynunet": _dynunet,
}
NETWORKS: tuple[str, ...] = tuple(_BUILDERS)
DEEP_SUPERVISION: tuple[str, ...] = ("dynunet",)


def network_spec(
    name: str,
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] | None = None,
    dropout: float | None = None,
    deep_supervision: bool = False,
) -> dict[str, Any]:
    """Check the arguments and return them as a plain dict with defaults filled in.

    The dict is what a checkpoint stores; `build_network(**spec)` rebuilds the network.

    Raises:
        TumorsegError: unknown name, bad widths or dropout, or deep supervision asked of a
            network without it.
    """
    if name not in _BUILDERS:
        raise TumorsegError(f"unknown network {name!r}; known networks: {', '.join(NETWORKS)}")
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if int(value) != value or value < 1:
            raise TumorsegError(f"{arg} must be a positive integer, got {value!r}")
    filters = DEFAULT_FILTERS[name] if filters is None else tuple(filters)
    if len(filters) < 2 or not all(int(f) == f and f > 0 for f in filters):
        raise TumorsegError(f"filters must be at least 2 positive integers, got {filters!r}")
    if name == "dynunet" and len(filters) < 3:  # MONAI's DynUNet needs 3 levels, with or without heads
        raise TumorsegError(f"dynunet needs at least 3 levels, got filters {filters!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise TumorsegError(f"dropout must be in [0, 1), got {dropout!r}")
    if deep_supervision and name not in DEEP_SUPERVISION:
        raise TumorsegError(
            f"network {name!r} has no deep supervision; "
            f"networks with it: {', '.join(DEEP_SUPERVISION)}"
        )
    return {
        "name": name,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "filters": tuple(int(f) for f in filters),
        "dropout": None if dropout is None else float(dropout),
        "deep_supervision": bool(deep_supervision),
    }


def build_network(
    name: str,
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] | None = None,
    dropout: float | None = None,
    deep_supervision: bool = False,
) -> nn.Module:
    """Build a network by name; `build_network(**network_spec(...))` rebuilds a stored one.

    Args:
        name: one of `NETWORKS`: "unet3d" (ours), "unet" (MONAI UNet, strided, residual
            units), "unet-lite" (that UNet with its logits at half size, upsampled: `UNetLite`),
            "segresnet" (MONAI SegResNet), "dynunet" (MONAI DynUNet, nnU-Net-like).
        in_channels: input channels (modalities).
        out_channels: output channels: 4 classes or 3 regions.
        filters: widths per level, top to bottom (None: `DEFAULT_FILTERS[name]`). SegResNet
            uses filters[0] as its first width (it doubles per level) and len(filters) levels.
        dropout: dropout probability (None: each network's default; the seed's per-level
            schedule for "unet3d", none for the others).
        deep_supervision: "dynunet" only. In training mode the network then returns
            `(B, S, C, D, H, W)`: S heads, full resolution first, the lower ones upsampled to
            full size (MONAI stacks them); in eval mode it returns `(B, C, D, H, W)`.

    Returns:
        The network; input `(B, in_channels, D, H, W)`, D, H, W divisible by
        `required_divisor(name, filters)`; output logits `(B, out_channels, D, H, W)`.
    """
    spec = network_spec(name, in_channels, out_channels, filters, dropout, deep_supervision)
    return _BUILDERS[name](spec)


def required_divisor(name: str, filters: Sequence[int] | None = None) -> int:
    """What D, H and W of the input must be divisible by (patch sizes, padding at inference)."""
    if name not in _BUILDERS:
        raise TumorsegError(f"unknown network {name!r}; known networks: {', '.join(NETWORKS)}")
    levels = len(DEFAULT_FILTERS[name] if filters is None else filters)
    return 2 ** (levels - 1)


GROUP_NORMALISED: frozenset[str] = frozenset({"segresnet"})  # the others normalise each channel over space


def deepest_voxels_needed(name: str) -> int:
    """The fewest voxels a training patch may leave at the network's deepest level: instance
    normalisation in training mode needs two (one is torch's error at the first step); group
    normalisation (SegResNet) takes one."""
    return 1 if name in GROUP_NORMALISED else 2
