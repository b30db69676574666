"""Tests for tumorseg.networks.unet3d: shapes, gradients, argument checks."""

import re

import pytest
import torch

from tumorseg.networks.unet3d import UNet3D


@pytest.mark.parametrize(
    "in_ch, out_ch, filters, size",
    [
        (3, 4, (4, 8, 16), 16),
        (4, 3, (4, 8, 16), 16),
        (1, 2, (4, 8), 8),
        (3, 4, (2, 4, 8, 16), 32),
    ],
)
def test_output_shape(in_ch, out_ch, filters, size):
    net = UNet3D(in_ch, out_ch, filters=filters).eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_ch, size, size, size))
    assert out.shape == (2, out_ch, size, size, size)


def test_anisotropic_input_shape():
    net = UNet3D(3, 4, filters=(4, 8, 16)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 8, 16, 12)).shape == (1, 4, 8, 16, 12)


@pytest.mark.parametrize(
    "norm, act", [("instance", "relu"), ("batch", "leakyrelu"), ("none", "relu")]
)
def test_gradients_reach_every_parameter(norm, act):
    torch.manual_seed(0)
    net = UNet3D(3, 4, filters=(4, 8, 16), dropout=0.1, norm=norm, act=act).train()
    net(torch.randn(2, 3, 16, 16, 16)).square().mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_dropout_schedule():
    drops = [m.p for m in UNet3D(1, 2).modules() if isinstance(m, torch.nn.Dropout3d)]
    # encoder 0.1 0.1 0.2 0.2 0.3, decoder from the bottom up 0.2 0.2 0.1 0.1, as in the seed
    assert drops == [0.1, 0.1, 0.2, 0.2, 0.3, 0.2, 0.2, 0.1, 0.1]
    no_dropout = UNet3D(1, 2, (4, 8), dropout=0.0)
    assert not any(isinstance(m, torch.nn.Dropout3d) for m in no_dropout.modules())


@pytest.mark.parametrize(
    "kwargs, quoted",
    [
        ({"in_channels": 0}, "0"),
        ({"out_channels": -1}, "-1"),
        ({"filters": (4,)}, "(4,)"),
        ({"filters": (4, 0, 8)}, "(4, 0, 8)"),
        ({"dropout": 1.5}, "1.5"),
        ({"dropout": (0.1, 0.2)}, "(0.1, 0.2)"),
        ({"norm": "group"}, "group"),
        ({"act": "gelu"}, "gelu"),
    ],
)
def test_bad_arguments_raise(kwargs, quoted):
    args = {"in_channels": 3, "out_channels": 4, "filters": (4, 8, 16), **kwargs}
    with pytest.raises(ValueError, match=re.escape(quoted)):
        UNet3D(**args)


def test_indivisible_size_raises_quoting_shape():
    net = UNet3D(3, 4, filters=(4, 8, 16))
    with pytest.raises(ValueError, match=r"divisible by 4.*\(1, 3, 16, 18, 16\)"):
        net(torch.randn(1, 3, 16, 18, 16))
