"""Plain-words warnings for results that need a human look before anyone reads their numbers."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .measure import Measures

SCATTERED_MIN_VOXELS = 10  # components smaller than this are specks, not lesions
SCATTERED_MAX_LESIONS = 3  # more separate lesions than this is unusual for a glioma


def case_warnings(wt: np.ndarray, measures: Measures, brain: np.ndarray | None = None) -> list[str]:
    """Warnings for one case's whole-tumour mask (X, Y, Z); `brain` is the non-zero region of its
    images (None: not known, not checked)."""
    if not wt.any():
        return ["empty prediction: no tumour was labelled"]
    out = []
    big = sum(size >= SCATTERED_MIN_VOXELS for size in measures.component_sizes)
    if big > SCATTERED_MAX_LESIONS:
        out.append(f"many scattered components: {big} separate whole-tumour lesions of "
                   f"{SCATTERED_MIN_VOXELS} voxels or more (a glioma is usually one); check for false positives")
    on_faces = int(wt.sum() - wt[1:-1, 1:-1, 1:-1].sum())
    if on_faces:
        out.append(f"tumour touches the edge of the scan ({on_faces} voxels on its outer faces): "
                   "it may continue outside the image")
    if brain is not None:
        border = brain & ~ndimage.binary_erosion(brain)
        outside = int(np.count_nonzero(wt & ~brain))
        touching = int(np.count_nonzero(wt & border))
        if touching or outside:
            out.append(f"tumour touches the edge of the brain mask ({touching} voxels on its border, "
                       f"{outside} outside it): check for labels on the skull or background")
    return out
