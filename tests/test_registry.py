"""Tests for tumorseg.networks.registry: every network by name, specs, deep supervision."""

import pytest
import torch

from tumorseg.errors import TumorsegError
from tumorseg.networks import NETWORKS, build_network, network_spec, required_divisor

TINY = (4, 8, 16)  # widths small enough for CPU tests


def test_names():
    assert set(NETWORKS) == {"unet3d", "unet", "unet-lite", "segresnet", "dynunet"}


@pytest.mark.parametrize("name", NETWORKS)
def test_builds_and_gives_logits(name):
    torch.manual_seed(0)
    net = build_network(name, 3, 4, filters=TINY, dropout=0.1).eval()
    size = 4 * required_divisor(name, TINY)
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size, size))
    assert out.shape == (2, 4, size, size, size)


@pytest.mark.parametrize("name", NETWORKS)
def test_rebuild_from_spec(name):
    spec = network_spec(name, 3, 4, filters=TINY)
    assert spec["filters"] == TINY and spec["name"] == name
    a = build_network(**spec).state_dict()
    b = build_network(**dict(spec, filters=list(spec["filters"]))).state_dict()  # as from JSON
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_spec_fills_defaults():
    spec = network_spec("unet3d", 3, 4)
    assert spec == {
        "name": "unet3d",
        "in_channels": 3,
        "out_channels": 4,
        "filters": (16, 32, 64, 128, 256),
        "dropout": None,
        "deep_supervision": False,
    }
    assert required_divisor("unet3d") == 16
    assert required_divisor("segresnet") == 8
    assert required_divisor("dynunet", (4, 8, 16)) == 4


def test_unknown_name_lists_known():
    known = "unet3d, unet, unet-lite, segresnet, dynunet"
    with pytest.raises(TumorsegError, match=f"unknown network 'vnet'.*{known}"):
        build_network("vnet", 3, 4)
    with pytest.raises(TumorsegError, match="vnet"):
        required_divisor("vnet")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filters": (8,)},
        {"dropout": 1.0},
        {"in_channels": 0},
        {"name": "unet3d", "deep_supervision": True},
    ],
)
def test_bad_spec_raises(kwargs):
    args = {"name": "dynunet", "in_channels": 3, "out_channels": 4, "filters": (4, 8, 16), **kwargs}
    with pytest.raises(TumorsegError):
        network_spec(**args)


def test_dynunet_deep_supervision_shapes():
    net = build_network("dynunet", 3, 4, filters=(4, 8, 16, 32), deep_supervision=True)
    x = torch.randn(2, 3, 16, 16, 16)
    out = net.train()(x)
    assert out.shape == (2, 3, 4, 16, 16, 16)  # 4 levels: full resolution + 2 heads
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 4, 16, 16, 16)


def test_dynunet_needs_three_levels():
    with pytest.raises(TumorsegError, match="at least 3 levels"):
        network_spec("dynunet", 3, 4, filters=(8, 16))


def test_unet_lite_upsamples_half_resolution_logits():
    """unet-lite's logits are its half-resolution 1x1x1 logits, trilinearly upsampled: no layer at full size."""
    torch.manual_seed(0)
    net = build_network("unet-lite", 4, 3, filters=TINY).eval()
    coarse = []
    head = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels == 3]
    assert len(head) == 1
    head[0].register_forward_hook(lambda module, args, out: coarse.append(out))
    with torch.no_grad():
        out = net(torch.randn(1, 4, 16, 16, 16))
    assert coarse[0].shape == (1, 3, 8, 8, 8) and out.shape == (1, 3, 16, 16, 16)
    expected = torch.nn.functional.interpolate(coarse[0], scale_factor=2, mode="trilinear", align_corners=False)
    torch.testing.assert_close(out, expected)
    full = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d) and m.out_channels == 3]
    assert not full  # MONAI's UNet ends in a transposed convolution to the outputs at full size
