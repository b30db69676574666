"""Prepare one case: load, scale, stack, relabel, crop, decide, save.

Runs in a worker process; returns a plain-dict record for the manifest. Arrays are saved
before the record, both atomically, so a record on disk means the case is complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import TumorsegError
from ..geometry import Grid, labels_onto, network_grid, overlap_fraction, reorient, resample, same_voxels
from ..io import Volume, load_labels, orientation_problem, save_npy, write_text
from ..labels import CAVITY_CLASS
from ..layouts import Case, files_digest, load_images
from .config import PrepareConfig
from .crop import Box, background, brain_mask, crop, crop_box, inside
from .scaling import scale


def grid(vol: Volume) -> Grid:
    return Grid(vol.data.shape, vol.affine)


def reference_index(grids: list[Grid]) -> int:
    """The modality whose grid the others are resampled onto: the finest (smallest voxels), so a
    1 mm T1CE is never blurred to a 5 mm FLAIR's grid; on a tie the widest field of view (a scan
    cropped to the brain would crop the others, and the labels written on its grid), then the
    first in channel order."""
    def key(i: int) -> tuple[float, int, int]:
        voxel = round(float(np.prod(grids[i].spacing)), 6)
        return voxel, -int(np.prod(grids[i].shape)), i

    return min(range(len(grids)), key=key)


def load_channels(case: Case, channels: tuple[str, ...]) -> list[Volume]:
    """Load the requested modalities of a case on one grid (the finest of theirs).

    Modalities stored on other grids of the same world space are resampled onto it
    (linear); modalities that do not overlap in world space are an error naming both files.
    """
    vols = load_images(case, channels)
    grids = [grid(v) for v in vols]
    ref = reference_index(grids)
    out = []
    for vol, g in zip(vols, grids):
        if g.same_as(grids[ref]):
            out.append(vol)
            continue
        near = same_voxels(g, grids[ref])
        if near is not None:  # reordered axes, origins rounded apart: exact, no interpolation
            out.append(replace(vol, data=reorient(vol.data, near[0]), affine=vols[ref].affine, header=vols[ref].header))
            continue
        if overlap_fraction(g, grids[ref]) <= 0.0:
            raise TumorsegError(
                f"{case.case_id}: {vol.path.name} and {vols[ref].path.name} do not overlap in world space "
                "(check their affines)"
            )
        data = resample(vol.data, g, grids[ref], order=1)
        out.append(Volume(data=data, affine=vols[ref].affine, header=vols[ref].header, path=vol.path))
    return out


FILES_DIGITS = 16  # hex digits of a case's files digest its record keeps
MAX_UNSEEN = 0.10  # share of the scans' union a modality may be 0 in: the 20 real sample cases, at most 3.5 %
MAX_BRAIN_LITRES = 2.5  # skull-stripped adult brains: 1.2-1.7 L in the real sample cases; a head is 3-5 L


def check_intensities(case: Case, channels: tuple[str, ...], vols: list[Volume]) -> list[str]:
    """Refuse NaN or infinite voxels (min-max scaling would silently turn the volume into zeros);
    return a warning for each constant modality (scaled to zeros; it usually means a broken scan),
    for each whose background is not 0 (`crop.background`: the brain mask then rests on an
    estimate, and an offset background often means a scan that is not skull-stripped), and for each
    that is 0 over much of what the others show (`vols` on one grid): a slab covering part of the
    brain, or a scan not co-registered with the others, which the network would read as empty."""
    warnings, zero_background = [], []
    for modality, vol in zip(channels, vols):
        lo, hi = float(np.min(vol.data)), float(np.max(vol.data))  # NaN and +-inf all show in these two
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(vol.data)))
            raise TumorsegError(f"{case.case_id}: {vol.path} ({modality}) has {bad} NaN or infinite voxel(s)")
        if lo == hi:
            warnings.append(f"{case.case_id}: {vol.path} ({modality}) holds the single value {lo:g}: a broken scan? "
                            "it is scaled to zeros")
        elif (level := background(vol.data)) is not None:
            brain = "not at that level" if level[1] == 0 else f"more than {level[1]:.3g} away from it"
            warnings.append(f"{case.case_id}: {vol.path} ({modality}): the background is not 0 (about {level[0]:.3g} "
                            f"on the volume's faces); the brain is taken as the voxels {brain}. tumorseg expects "
                            "skull-stripped scans with a zero background")
        else:
            zero_background.append((modality, vol))
    return warnings + _unseen(case, zero_background)


def _unseen(case: Case, vols: list[tuple[str, Volume]]) -> list[str]:
    """A warning for each scan that is 0 over more than `MAX_UNSEEN` of what the others show, among
    those of a zero background (where 0 is outside the head: an offset or constant scan has its
    own warning, and would make every other scan look partial)."""
    if len(vols) < 2:
        return []
    nonzero = [vol.data != 0 for _, vol in vols]
    shown = np.logical_or.reduce(nonzero)
    total = max(np.count_nonzero(shown), 1)
    warnings = []
    for (modality, vol), seen in zip(vols, nonzero):
        unseen = np.count_nonzero(shown & ~seen) / total
        if unseen > MAX_UNSEEN:
            warnings.append(f"{case.case_id}: {vol.path} ({modality}) is 0 in {unseen:.0%} of what the other scans show: "
                            "it covers part of the brain, or is not co-registered with them? The network reads it "
                            "as empty there")
    return warnings


def check_headers(case: Case, channels: tuple[str, ...]) -> list[str]:
    """A warning per kind of orientation problem in the modalities' headers, naming them: where
    the header leaves the voxels' placement open, the tool's reading may not be the user's."""
    found: dict[str, list[str]] = {}
    for modality in channels:
        problem = orientation_problem(case.image(modality))
        if problem:
            found.setdefault(problem, []).append(modality)
    return [f"{case.case_id}: the header of {', '.join(names)} {problem}" for problem, names in found.items()]


def check_brain_size(case: Case, brain: np.ndarray, net: Grid) -> list[str]:
    """A warning when the scans' non-background region is larger than any skull-stripped brain: the
    network, trained on brains alone, would see skull, scalp and neck."""
    litres = float(np.count_nonzero(brain)) * float(np.prod(net.spacing)) / 1e6
    if litres <= MAX_BRAIN_LITRES:
        return []
    return [f"{case.case_id}: the scans' non-background region is {litres:.1f} L, more than a skull-stripped brain "
            f"(the 20 real sample cases: 1.2-1.7 L): a whole head? tumorseg expects BraTS-preprocessed scans "
            f"(co-registered and skull-stripped, e.g. by BraTS Toolkit or HD-BET)"]


def to_network_grid(vols: list[Volume], spacing) -> tuple[list[np.ndarray], Grid, Grid]:
    """The channels on the network's grid (canonical orientation, `spacing` in mm or None to keep
    the scan's), with the scan's grid and the network's grid. BraTS scans pass through untouched."""
    src = grid(vols[0])
    net = network_grid(src, spacing)
    if net.same_as(src):
        return [v.data for v in vols], src, net
    return list(resample(np.stack([v.data for v in vols]), src, net, order=1)), src, net  # one grid of coordinates


def load_segmentation(case: Case, src: Grid, net: Grid, cavity: str | None) -> tuple[np.ndarray, str | None]:
    """The case's segmentation, validated in its label convention, as training labels on `net`,
    and a note when it had to be resampled onto the images' grid `src` (`geometry.labels_onto`)."""
    seg = load_labels(case.seg, case.case_id)
    problem = case.labels.problem(seg.data)
    if problem:
        raise TumorsegError(f"{case.case_id}: {case.seg} {problem}")
    try:
        labels = case.labels.to_training(seg.data, cavity)
    except TumorsegError as exc:
        raise TumorsegError(f"{case.case_id}: {case.seg}: {exc}") from None
    try:
        labels, note = labels_onto(labels, grid(seg), src, case.seg.name, "the images")
    except TumorsegError as exc:
        raise TumorsegError(f"{case.case_id}: {exc}") from None
    return resample(labels, src, net, order=0), note and f"{case.case_id}: {note}"


def scaled_window(data: list[np.ndarray], norm: str, brain: np.ndarray, box: Box) -> np.ndarray:
    """Channels scaled with their full volumes' statistics, stacked and cut to `box` (zero-padded
    where it leaves the image): `(C, *box size)` float32. Training and prediction both use this.
    """
    src, _ = inside(box, data[0].shape)
    image = np.stack([scale(d, norm, brain, src) for d in data])
    shifted = tuple((a - s.start, b - s.start) for (a, b), s in zip(box, src))  # crop() only pads now
    return crop(image, shifted)


def preprocess(data: list[np.ndarray], config: PrepareConfig) -> tuple[np.ndarray, Box, np.ndarray]:
    """Scaled, stacked, cropped image (C, *crop_size) float32, its crop box, and the brain mask."""
    brain = brain_mask(data)
    box = crop_box(data[0].shape, config.crop_size, config.crop_mode, brain)
    return scaled_window(data, config.norm, brain, box), box, brain


def prepare_case(case: Case, config: PrepareConfig, out_dir: Path) -> dict:
    """Process one case and write its arrays and record; returns the record."""
    vols = load_channels(case, config.channels)
    warnings = check_intensities(case, config.channels, vols) + check_headers(case, config.channels)
    data, src, net = to_network_grid(vols, config.spacing)
    image, box, brain = preprocess(data, config)
    warnings += check_brain_size(case, brain, net)
    record = {
        "case_id": case.case_id,
        "warnings": warnings,
        "sources": {m: str(case.images[m]) for m in config.channels},
        "segmentation": str(case.seg) if case.seg else None,
        "note": case.seg_note,
        "shape": list(src.shape),
        "affine": np.round(src.affine, 6).tolist(),
        "spacing": list(src.spacing),
        "network_shape": list(net.shape),
        "network_affine": np.round(net.affine, 6).tolist(),
        "crop_box": [list(b) for b in box],
        "settings": config.case_settings(),
        "files_digest": case_files_digest(case, config),  # its files were read without error above
    }
    if case.seg is None:
        record.update(status="unlabelled", reason="no segmentation: prepared for prediction only")
    else:
        labels, note = load_segmentation(case, src, net, config.cavity)
        warnings += [note] if note else []
        mask = crop(labels, box)
        tumour_total = int(np.count_nonzero((labels > 0) & (labels < CAVITY_CLASS)))  # the cavity is not tumour
        tumour_crop = int(np.count_nonzero((mask > 0) & (mask < CAVITY_CLASS)))
        fraction = tumour_crop / mask.size
        record.update(
            tumour_fraction=fraction,
            tumour_inside_crop=round(tumour_crop / tumour_total, 6) if tumour_total else None,
            label_voxels={str(k): int(np.count_nonzero(mask == k)) for k in (1, 2, 3, CAVITY_CLASS) if k < CAVITY_CLASS or config.cavity == "keep"},
        )
        if fraction < config.min_tumour:
            record.update(status="dropped", reason=f"tumour fraction {fraction:.3g} in the crop is below {config.min_tumour}")
        else:
            record.update(status="kept", reason=None)
            # A contiguous copy (2 MB) first: np.save of a strided view iterates in small buffers.
            save_npy(out_dir / "masks" / f"{case.case_id}.npy", np.ascontiguousarray(mask))
    if record["status"] != "kept":  # left over from a run with other settings
        remove_arrays(out_dir, case.case_id, ("images", "masks") if record["status"] == "dropped" else ("masks",))
    if record["status"] != "dropped":
        save_npy(out_dir / "images" / f"{case.case_id}.npy", np.ascontiguousarray(image))
    write_text(record_path(out_dir, case.case_id), json.dumps(record, indent=1))
    return record


def case_files_digest(case: Case, config: PrepareConfig) -> str:
    """What a record keeps of the files a case was prepared from: its channels' scans and its
    segmentation (`layouts.files_digest`), so a re-run redoes a case whose files changed."""
    return files_digest(case, config.channels, seg=True)[:FILES_DIGITS]


def record_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / "records" / f"{case_id}.json"


def remove_arrays(out_dir: Path, case_id: str, kinds: tuple[str, ...] = ("images", "masks")) -> None:
    """A case's arrays of these kinds, gone: a dropped or failed case keeps none (a mask written before
    its image failed to write, on a full disk, would be left alone otherwise)."""
    for kind in kinds:
        (out_dir / kind / f"{case_id}.npy").unlink(missing_ok=True)
