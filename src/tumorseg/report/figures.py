"""The report's PNGs of one case, drawn exactly as `tumorseg show` draws (same helpers, colours,
legend and orientation): the three views, the RANO diameters on their slice, the uncertainty
map, and a thumbnail for the index."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..plots.canvas import figure_grid, save_png
from ..plots.case_images import CaseImages
from ..plots.slices import (
    VIEW_AXIS,
    draw_views,
    label_overlay,
    to_lps,
    display_window,
    choose_slices,
    display_slice,
    lps_transform,
    mark_sides,
    slice_title,
)
from .measure import Diameters, Measures

LONGEST_COLOUR, PERPENDICULAR_COLOUR = "cyan", "magenta"
UNCERTAINTY_CMAP = "magma"
PANEL_INCHES, THUMB_INCHES, DPI = 4.0, 1.5, 100
THUMB_PIXELS = round(THUMB_INCHES * DPI)
FIGURES: dict[str, str] = {  # kind -> file name suffix
    "views": "views.png",
    "diameters": "diameters.png",
    "uncertainty": "uncertainty.png",
    "thumbnail": "thumb.png",
}


@dataclass(frozen=True)
class Scene:
    """A case turned to LPS voxel order once, for every figure: images (C, X, Y, Z), labels and
    whole-tumour mask `wt` (X, Y, Z), the views' slices, and the stored -> LPS axis map (new axis,
    flip) per axis."""

    data: CaseImages
    images: np.ndarray
    truth: np.ndarray | None
    labels: np.ndarray
    wt: np.ndarray
    spacing: tuple[float, float, float]
    slices: dict[str, int]
    transform: np.ndarray

    @property
    def base(self) -> int:
        """The channel overlays are drawn on: FLAIR, else the last one (as `tumorseg show`)."""
        names = self.data.names
        return names.index("flair") if "flair" in names else len(names) - 1

    @cached_property
    def window(self) -> tuple[float, float]:
        """Grey levels of the base channel (percentiles of the whole volume: computed once)."""
        return display_window(self.images[self.base])


def blank_case(case_id: str, source: Path, labels: np.ndarray, affine: np.ndarray, conv) -> CaseImages:
    """A case without images (no --images): a black channel under the labels."""
    from nibabel.affines import voxel_sizes

    spacing = tuple(float(v) for v in voxel_sizes(affine))
    return CaseImages(case_id, ("no images",), np.zeros((1, *labels.shape), np.float32), None,
                      source, affine, spacing, labels=conv)


def make_scene(data: CaseImages, labels: np.ndarray, brain: np.ndarray, wt: np.ndarray) -> Scene:
    """Reorient once; views pass through the predicted tumour (else the truth's, else the brain's middle).

    `brain` (the images' non-zero voxels) and `wt` (the labels' whole tumour) are the case's masks
    in stored order, computed once by the caller; here only reoriented (views, no copies).
    """
    from nibabel.orientations import apply_orientation

    images, truth, lps, spacing = to_lps(data, labels)
    transform = lps_transform(data.affine)
    reference = lps if lps.any() or truth is None else truth
    slices = choose_slices(reference, apply_orientation(brain, transform))
    return Scene(data, images, truth, lps, apply_orientation(wt, transform), spacing, slices, transform)


def figure_paths(folder: Path, stem: str) -> dict[str, Path]:
    """Kind -> `folder/<stem>_<kind>.png`: every figure the report may write for case `stem`."""
    return {kind: folder / f"{stem}_{name}" for kind, name in FIGURES.items()}


def save_figures(scene: Scene, measures: Measures, uncertainty: np.ndarray | None, folder: Path,
                 stem: str) -> dict[str, Path]:
    """Write the case's PNGs as `folder/<stem>_<kind>.png`; returns kind -> path."""
    out = figure_paths(folder, stem)
    draw_views(scene.data, scene.images, scene.truth, scene.labels, scene.spacing, scene.slices, out["views"])
    measured = {"largest enhancing lesion": measures.enhancing, "largest whole-tumour lesion": measures.whole}
    _save_diameters(scene, {k: d for k, d in measured.items() if d is not None}, out["diameters"])
    if uncertainty is not None:
        from nibabel.orientations import apply_orientation

        _save_uncertainty(scene, apply_orientation(uncertainty, scene.transform), out["uncertainty"])
    else:
        del out["uncertainty"]
    _save_thumbnail(scene, out["thumbnail"])
    return out


def _lps_point(scene: Scene, voxel: tuple[int, int, int]) -> np.ndarray:
    """A stored voxel index (i, j, k) in the scene's LPS voxel order."""
    shape = scene.data.shape
    out = np.empty(3)
    for axis, (target, flip) in enumerate(scene.transform):
        out[int(target)] = shape[axis] - 1 - voxel[axis] if flip < 0 else voxel[axis]
    return out


def display_xy(point: np.ndarray, view: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(column, row) where an LPS voxel `point` appears in `display_slice(volume, view, ...)`."""
    first, second = (a for a in range(3) if a != VIEW_AXIS[view])
    row = point[second] if view == "axial" else shape[second] - 1 - point[second]
    return float(point[first]), float(row)


def _aspect(scene: Scene, view: str) -> float:
    first, second = (a for a in range(3) if a != VIEW_AXIS[view])
    return scene.spacing[second] / scene.spacing[first]


def _panel(ax, scene: Scene, view: str, index: int, sides: bool = True) -> None:
    """The base channel with the labels overlaid, as one panel of `tumorseg show` (`sides`: the
    patient's sides lettered, too small to read on a thumbnail)."""
    lo, hi = scene.window
    aspect = _aspect(scene, view)
    ax.imshow(display_slice(scene.images[scene.base], view, index), cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
    ax.imshow(label_overlay(display_slice(scene.labels, view, index)), aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if sides:
        mark_sides(ax, view)


def _save_diameters(scene: Scene, measured: dict[str, Diameters], out: Path) -> None:
    n = max(len(measured), 1)
    fig, axes = figure_grid(1, n, (PANEL_INCHES * n, PANEL_INCHES + 0.6), "constrained")
    for ax, (name, d) in zip(axes[0], measured.items()):
        lps_axis = int(scene.transform[d.axis][0])  # the measured slice, in the view that shows it
        view = next(v for v, a in VIEW_AXIS.items() if a == lps_axis)
        index = int(round(_lps_point(scene, d.longest_ends[0])[lps_axis]))  # ends moved from another grid: off-voxel
        _panel(ax, scene, view, index)
        for ends, colour in ((d.longest_ends, LONGEST_COLOUR), (d.perpendicular_ends, PERPENDICULAR_COLOUR)):
            xy = np.array([display_xy(_lps_point(scene, e), view, scene.labels.shape) for e in ends])
            ax.plot(xy[:, 0], xy[:, 1], "-o", color=colour, linewidth=1.5, markersize=3)
        ax.set_title(f"{name}\n{d.longest:.1f} x {d.perpendicular:.1f} mm "
                     f"({slice_title(scene.transform, scene.data.shape, view, index)})", fontsize=10)
    if not measured:
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, "no tumour to measure", ha="center", va="center")
    save_png(fig, out, DPI)


def _save_uncertainty(scene: Scene, uncertainty: np.ndarray, out: Path) -> None:
    top = float(uncertainty.max()) or 1.0
    n = len(scene.slices)
    fig, axes = figure_grid(1, n, (PANEL_INCHES * n, PANEL_INCHES), "constrained")
    for ax, (view, index) in zip(axes[0], scene.slices.items()):
        aspect = _aspect(scene, view)
        shown = ax.imshow(display_slice(uncertainty, view, index), cmap=UNCERTAINTY_CMAP, vmin=0, vmax=top,
                          aspect=aspect)
        tumour = display_slice(scene.wt, view, index)
        if tumour.any():
            ax.contour(tumour.astype(np.float32), levels=[0.5], colors=LONGEST_COLOUR, linewidths=0.8)
        ax.set_title(slice_title(scene.transform, scene.data.shape, view, index), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        mark_sides(ax, view)
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="uncertainty (bits)")
    save_png(fig, out, DPI)


def _save_thumbnail(scene: Scene, out: Path) -> None:
    fig, axes = figure_grid(1, 1, (THUMB_INCHES, THUMB_INCHES))
    fig.subplots_adjust(0, 0, 1, 1)
    ax = axes[0, 0]
    _panel(ax, scene, "axial", scene.slices["axial"], sides=False)
    ax.axis("off")
    save_png(fig, out, DPI)
