"""Training curves: loss and validation Dice per epoch, from the rows of metrics.csv."""

from __future__ import annotations

from pathlib import Path

from ..labels import REGIONS
from .canvas import figure_grid, save_png


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Write a two-panel PNG: train/val loss, and WT/TC/ET/mean validation Dice."""
    epochs = [row["epoch"] for row in history]
    fig, ((ax_loss, ax_dice),) = figure_grid(1, 2, (11, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    val = [(row["epoch"], row["val_loss"]) for row in history if row.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    for key in [f"dice_{r}" for r in REGIONS] + ["dice_mean"]:
        points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        if points:
            ax_dice.plot(*zip(*points), label=key[5:], linestyle="--" if key == "dice_mean" else "-")
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    if ax_dice.lines:  # nothing validated yet (val_every > epochs so far)
        ax_dice.legend()
    fig.tight_layout()
    save_png(fig, path, 100)
