"""Per-volume intensity scaling: min-max (the seed) and z-score inside the brain (nnU-Net).

Statistics come from the whole volume so the values do not depend on the crop, and the
arithmetic is float64 then cast to float32, which keeps results identical to the seed's
float64 MinMaxScaler pipeline.
"""

from __future__ import annotations

import numpy as np

from ..errors import TumorsegError

NORMS: tuple[str, ...] = ("minmax", "zscore")


def scale(volume: np.ndarray, method: str, brain: np.ndarray, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """Scale one modality with statistics of the full volume; return `region` of it as float32.

    The result is a new C-contiguous array.

    Args:
        volume: one modality, any numeric dtype, shape (X, Y, Z).
        method: "minmax" (to [0, 1] over the whole volume) or "zscore" (mean 0, std 1 over
            brain voxels, background kept at exactly 0).
        brain: boolean brain mask of `volume`'s shape (used by "zscore").
        region: slices selecting the part to return (the crop); None for all of it.
    """
    region = region if region is not None else (slice(None),) * volume.ndim
    # In place on one C-ordered float64 copy of the region: the same IEEE operations as
    # `(part - lo) / (hi - lo)`, without more temporaries. NIfTI volumes load Fortran-ordered;
    # copyto into a C-ordered array transposes ~4x faster than astype(order="C") does later.
    part = np.empty(volume[region].shape, dtype=np.float64)
    np.copyto(part, volume[region], casting="unsafe")
    if method == "minmax":
        lo, hi = float(volume.min()), float(volume.max())
        if hi > lo:
            part -= lo
            part /= hi - lo
        else:
            part[...] = 0.0
    elif method == "zscore":
        values = volume[brain]
        if values.size == 0:
            return np.zeros(part.shape, np.float32)
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        part -= mean
        part /= max(std, 1e-8)
        part[~brain[region]] = 0.0
    else:
        raise TumorsegError(f"unknown normalisation '{method}' (choose from {', '.join(NORMS)})")
    return part.astype(np.float32)  # C order, so the stacked image saves without a copy
