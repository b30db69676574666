"""Synthetic BraTS-2020-format cases: brain-like volumes with a nested tumour and its labels.

Each case is written like the real training set, `BraTS20_Training_NNN/
BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii.gz`, with the real scans' geometry (1 mm,
affine diag(-1, -1, 1), origin (0, shape[1] - 1, 0), qform/sform code 1), int16 images whose
skull-stripped background is exactly 0, and a uint8 segmentation with labels 0, 1, 2, 4.

Content: an irregular ellipsoidal brain with smooth white/grey matter and ventricles, a
multiplicative bias field and noise; a tumour of one to three deformed lobes whose necrotic
core (1) sits inside an enhancing rim (4) inside oedema (2), with the real contrasts (rim
bright and core dark on T1CE, oedema bright on T2/FLAIR, tumour dark on T1). About one case
in five has no enhancing tumour and one in six a small tumour (< 1 % of the 128^3 crop), as
in real data. A case depends only on (seed, case number), so files are byte-identical
across runs and independent of how many cases are made at once.

Speed comes from building smooth fields on a grid 4x coarser than the output and
interpolating up only inside the brain's bounding box; the tumour lives in its own small box.
"""

from .cases import brats_affine, case_id, make_case, synthesize
from .grid import CROP_HI, CROP_LO, REF_SHAPE
from .tumour import case_flags

__all__ = [
    "CROP_HI",
    "CROP_LO",
    "REF_SHAPE",
    "brats_affine",
    "case_flags",
    "case_id",
    "make_case",
    "synthesize",
]
