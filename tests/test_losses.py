"""Tests for tumorseg.training.losses on hand-made inputs."""

import pytest
import torch
import torch.nn.functional as F

from tumorseg.networks import UNet3D
from tumorseg.training.losses import build_loss, deep_supervision_weights, label_to_regions


def _labels(seed: int = 0, size: int = 8) -> torch.Tensor:
    """Random label map (2, 1, size, size, size) with every class 0..3 present."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (2, 1, size, size, size), generator=g)


def _logits(labels: torch.Tensor, channels: int = 4, scale: float = 20.0) -> torch.Tensor:
    """Large logits for the given labels: (B, channels, ...)."""
    onehot = F.one_hot(labels[:, 0].long(), channels).movedim(-1, 1).float()
    return scale * (2 * onehot - 1)


def test_label_to_regions_hand_made():
    labels = torch.tensor([0, 1, 2, 3]).view(1, 1, 4, 1, 1)
    regions = label_to_regions(labels)
    assert regions.dtype == torch.float32 and regions.shape == (1, 3, 4, 1, 1)
    #                        WT            TC            ET
    expected = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]).float()
    assert torch.equal(regions[0, :, :, 0, 0], expected)


@pytest.mark.parametrize("target", ["labels", "regions"])
def test_perfect_logits_near_zero_wrong_logits_larger(target):
    loss = build_loss(target)
    labels = _labels()
    if target == "labels":
        perfect, wrong = _logits(labels), _logits((labels + 1) % 4)
    else:
        perfect = 20.0 * (2 * label_to_regions(labels) - 1)
        wrong = -perfect
    assert loss(perfect, labels).item() < 1e-4
    assert loss(wrong, labels).item() > 0.2


def test_label_loss_matches_hand_computation():
    """Softmax Dice (batch) + softmax focal (gamma 2), both weighted per class."""
    torch.manual_seed(0)
    labels, logits = _labels(), torch.randn(2, 4, 8, 8, 8)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p = logits.softmax(dim=1)
    t = F.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    dims = (0, 2, 3, 4)
    dice = 1 - (2 * (p * t).sum(dims) + 1e-5) / (p.sum(dims) + t.sum(dims) + 1e-5)
    focal = -((1 - p) ** 2) * t * p.log() * weights.view(1, 4, 1, 1, 1)
    expected = (dice * weights).mean() + focal.mean()
    got = build_loss("labels", class_weights=weights.tolist())(logits, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_class_weights_change_the_value():
    labels = _labels()
    wrong3 = torch.where(labels == 3, 0, labels)  # class 3 predicted as background
    logits = _logits(wrong3)
    base = build_loss("labels", [0.25] * 4)(logits, labels)
    doubled = build_loss("labels", [0.5] * 4)(logits, labels)
    assert doubled.item() == pytest.approx(2 * base.item(), rel=1e-5)
    assert build_loss("labels", [0, 1, 1, 0])(logits, labels).item() < 1e-4  # right classes only
    assert build_loss("labels", [0, 0, 0, 1])(logits, labels).item() > 0.5  # the wrong class
    assert build_loss()(logits, labels).item() == pytest.approx(base.item())  # seed default


def test_deep_supervision_weighted_sum():
    torch.manual_seed(0)
    labels = _labels()
    for target, channels in (("labels", 4), ("regions", 3)):
        loss = build_loss(target)
        heads = torch.randn(2, 3, channels, 8, 8, 8)
        per_head = [loss(heads[:, s], labels).item() for s in range(3)]
        expected = (1 * per_head[0] + 0.5 * per_head[1] + 0.25 * per_head[2]) / 1.75
        assert loss(heads, labels).item() == pytest.approx(expected, rel=1e-5)
    assert deep_supervision_weights(2).tolist() == pytest.approx([2 / 3, 1 / 3])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="'dice'"):
        build_loss("dice")
    with pytest.raises(ValueError, match="4 non-negative"):
        build_loss("labels", [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="3 non-negative"):
        build_loss("regions", [1.0, -1.0, 1.0])
    loss = build_loss("labels")
    with pytest.raises(ValueError, match="labels must be"):
        loss(torch.zeros(1, 4, 8, 8, 8), torch.zeros(1, 1, 8, 8, 4))
    with pytest.raises(ValueError, match="logits must be"):
        loss(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8))


@pytest.mark.parametrize("target, channels", [("labels", 4), ("regions", 3)])
def test_few_steps_reduce_loss(target, channels):
    torch.manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    radius = (grid - 8).norm(dim=0)
    labels = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    labels[0, 0][radius < 6] = 2  # oedema shell around a core with an enhancing centre
    labels[0, 0][radius < 4] = 1
    labels[0, 0][radius < 2] = 3
    noise = torch.randn(1, 1, 16, 16, 16) * 0.1
    image = torch.cat([labels.float() / 3, (labels > 0).float(), noise], dim=1)
    net = UNet3D(3, channels, filters=(4, 8), dropout=0.0)
    loss_fn = build_loss(target)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(net(image), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
