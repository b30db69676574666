"""Plain-words warnings for results that need a human look before anyone reads their numbers."""

from __future__ import annotations

import numpy as np

from .measure import LESION_MIN_VOXELS, Measures

SCATTERED_MAX_LESIONS = 3  # more separate lesions than this is unusual for a glioma
# Tumour outside the images' non-zero region: the 20 sample cases' expert segmentations have 0-3
# such voxels (a tumour reaching the brain's surface touches the mask's border by nature), so only
# more is said.
OUTSIDE_MIN_VOXELS = 20
OUTSIDE_MIN_FRACTION = 0.005


def case_warnings(wt: np.ndarray, measures: Measures, brain: np.ndarray | None = None) -> list[str]:
    """Warnings for one case's whole-tumour mask (X, Y, Z); `brain` is the non-zero region of its
    images (None: not known, not checked)."""
    if not wt.any():
        return ["empty prediction: no tumour was labelled"]
    out = []
    if measures.lesions > SCATTERED_MAX_LESIONS:
        out.append(f"many scattered components: {measures.lesions} separate whole-tumour lesions of "
                   f"{LESION_MIN_VOXELS} voxels or more (a glioma is usually one); check for false positives")
    on_faces = int(wt.sum() - wt[1:-1, 1:-1, 1:-1].sum())
    if on_faces:
        out.append(f"tumour touches the edge of the scan ({on_faces} voxels on its outer faces): "
                   "it may continue outside the image")
    if brain is not None:
        outside = int(np.count_nonzero(wt & ~brain))
        if outside >= max(OUTSIDE_MIN_VOXELS, OUTSIDE_MIN_FRACTION * np.count_nonzero(wt)):
            out.append(f"tumour outside the brain: {outside} voxels where the images are background "
                       "(0): check for labels on the skull or background")
    return out
