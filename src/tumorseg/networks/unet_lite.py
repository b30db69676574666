"""MONAI's strided UNet with its logits computed at half resolution and upsampled.

In MONAI's UNet the first layer already halves the resolution; only the top decoder layer
works at full resolution, with as few channels as there are outputs (a transposed
convolution to 3 channels, normalisation, a 3 -> 3 convolution). oneDNN runs such layers at
about a fifth of its speed on wide ones: on 2 CPU cores they took half of a 64^3 window's time
for a tenth of its arithmetic. Here that layer is a 1x1x1 convolution to the logits at half
resolution followed by trilinear upsampling, as nnU-Net's deep-supervision heads are.
"""

from __future__ import annotations

from monai.networks.blocks import UpSample
from monai.networks.layers import Conv
from monai.networks.nets import UNet
from torch import nn


class UNetLite(UNet):
    """`monai.networks.nets.UNet` whose top decoder layer is MONAI's non-trainable `UpSample`:
    a 1x1x1 convolution to the logits, then (tri)linear upsampling by the stride.

    Same arguments as MONAI's UNet; the output has the input's spatial size.

    Example:
        >>> import torch
        >>> net = UNetLite(3, in_channels=4, out_channels=3, channels=(8, 16, 32), strides=(2, 2))
        >>> net(torch.zeros(1, 4, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        if not is_top:
            return super()._get_up_layer(in_channels, out_channels, strides, is_top)
        head = Conv[Conv.CONV, self.dimensions](in_channels, out_channels, kernel_size=1)  # always, even if widths match
        return UpSample(self.dimensions, scale_factor=strides, mode="nontrainable", pre_conv=head,
                        interp_mode="linear", align_corners=False)
