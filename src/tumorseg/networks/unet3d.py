"""Our 3D U-Net: Ronneberger's 2D U-Net extended to 3D, as in the seed's Keras tutorial.

Each level has two 3x3x3 convolutions (each followed by normalisation and activation) with
dropout between them; the encoder max-pools, the decoder upsamples with a transposed
convolution (kernel 2, stride 2) and concatenates the encoder features of the same level.
A 1x1x1 convolution gives the logits (no softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SEED_DROPOUT: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2, 0.3)  # per level, top to bottom
NORMS = ("instance", "batch", "none")
ACTS = ("relu", "leakyrelu")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """conv-norm-act, dropout, conv-norm-act: `(B, in, D, H, W) -> (B, out, D, H, W)`."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, norm: str, act: str) -> None:
        bias = norm == "none"  # a normalisation with affine parameters makes a bias redundant

        def activation() -> nn.Module:
            return nn.LeakyReLU(0.01, inplace=True) if act == "leakyrelu" else nn.ReLU(inplace=True)

        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=bias),
            _norm(norm, out_ch),
            activation(),
            nn.Dropout3d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=bias),
            _norm(norm, out_ch),
            activation(),
        )


class UNet3D(nn.Module):
    """3D U-Net with max-pool down, transposed-convolution up and concatenated skips.

    Args:
        in_channels: number of input channels (MRI modalities), e.g. 3.
        out_channels: number of output channels: 4 classes, or 3 regions WT/TC/ET.
        filters: feature maps per level, top to bottom; `len(filters)` levels in all.
        dropout: dropout between the two convolutions of a level: one float for every
            level, one per level (the decoder reuses its level's value), or None for the
            seed's schedule (0.1, 0.1, 0.2, 0.2, 0.3), cut to the number of levels and
            extended with its last value.
        norm: "instance" (default), "batch" or "none".
        act: "relu" (default, as in the seed) or "leakyrelu".

    Input `(B, in_channels, D, H, W)` with D, H, W divisible by `2 ** (len(filters) - 1)`;
    output logits `(B, out_channels, D, H, W)`.

    Example:
        >>> net = UNet3D(3, 4, filters=(8, 16, 32))
        >>> net(torch.zeros(1, 3, 32, 32, 32)).shape
        torch.Size([1, 4, 32, 32, 32])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filters: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: float | Sequence[float] | None = None,
        norm: str = "instance",
        act: str = "relu",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        filters = tuple(filters)
        if len(filters) < 2 or not all(isinstance(f, int) and f > 0 for f in filters):
            raise ValueError(f"filters must be at least 2 positive integers, got {filters!r}.")
        levels = len(filters)
        if dropout is None:
            drops = (SEED_DROPOUT + SEED_DROPOUT[-1:] * levels)[:levels]
        elif isinstance(dropout, (int, float)):
            drops = (float(dropout),) * levels
        else:
            drops = tuple(float(d) for d in dropout)
            if len(drops) != levels:
                raise ValueError(f"dropout needs one value per level ({levels}), got {dropout!r}.")
        if not all(0.0 <= d < 1.0 for d in drops):
            raise ValueError(f"dropout values must be in [0, 1), got {dropout!r}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}.")

        self.divisor = 2 ** (levels - 1)
        chans = (in_channels,) + filters
        self.down = nn.ModuleList(
            ConvBlock(chans[i], chans[i + 1], drops[i], norm, act) for i in range(levels)
        )
        self.pool = nn.MaxPool3d(2)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(filters[i + 1], filters[i], kernel_size=2, stride=2)
            for i in reversed(range(levels - 1))
        )
        self.up = nn.ModuleList(
            ConvBlock(2 * filters[i], filters[i], drops[i], norm, act)
            for i in reversed(range(levels - 1))
        )
        self.head = nn.Conv3d(filters[0], out_channels, kernel_size=1)
        self._init_weights(act)

    def _init_weights(self, act: str) -> None:
        """He-uniform weights (the seed's `he_uniform`), zero biases."""
        slope = 0.01 if act == "leakyrelu" else 0.0
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_uniform_(m.weight, a=slope, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, in_channels, D, H, W)` -> logits `(B, out_channels, D, H, W)`."""
        if x.ndim != 5 or any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"UNet3D needs input (B, C, D, H, W) with D, H, W divisible by "
                f"{self.divisor}, got shape {tuple(x.shape)}."
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upsample, block in zip(self.upsample, self.up):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)
