"""Figures for people: training curves, and slices with segmentation overlays."""

from .curves import plot_curves
from .slices import save_case_plot

__all__ = ["plot_curves", "save_case_plot"]
