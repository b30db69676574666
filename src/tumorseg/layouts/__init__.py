"""Dataset layouts: which files make a case, and what their modalities and labels mean.

Detected automatically (a folder, its sub-folders to a few levels, or one case folder):

| layout      | files                                                                  | labels      |
|-------------|------------------------------------------------------------------------|-------------|
| `brats2020` | `<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]` (2018-2020, Kaggle)     | `brats2020` |
| `brats2021` | `BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz`         | `brats2020` |
| `brats2023` | `BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz`  | `brats2023` |
| `msd`       | `imagesTr/BRATS_NNN.nii.gz` (4D), `labelsTr/`, `imagesTs/`, `dataset.json` | `msd`   |
| `nnunet`    | `imagesTr/<case>_0000.nii.gz` ..., `labelsTr/<case>.nii.gz`, `dataset.json` | from `dataset.json` |
| `bids`      | `sub-X/[ses-Y/]anat/sub-X[_ses-Y]_{T1w,ce-<agent>_T1w,T2w,FLAIR}.nii.gz`, `derivatives/*/.../*_desc-tumor_dseg.nii.gz` | `brats2020` |
| `plain`     | `<case>/{t1,t1ce,t2,flair}.nii[.gz]` by any alias (`T1.nii.gz`, `CT1`, `T1Gd`, `FLAIR`, `fla`), `seg` / `segmentation` / `label` | `brats2020` |

Modalities are found by meaning through `labels.MODALITY_ALIASES` (t1n = T1w = t1, ...), so
a network trained on one layout predicts cases of any other. BraTS 2020 case 355's
segmentation (`W39_1998.09.19_Segm.nii`) is found as the single other NIfTI in its folder whose
name holds "seg".
A folder of several BraTS-named cases' files side by side is one case per name.
`plain` is how scans leave a clinic or a preprocessing tool (HD-GLIO, BraTS Toolkit): one folder
per case, files named by modality alone; other files there (brain masks, ADC) are ignored. UCSF-PDGM's
`<case>_tumor_segmentation` is its segmentation (beside `_brain_segmentation`, which is not);
UPENN-GBM's cases take theirs from `images_segm/<case>_segm` beside their folders.
A table (`cases.csv` / `.tsv`, given in place of a folder) names each case's files itself, for
scans no layout names (`3_AX_FLAIR.nii.gz`): a case id column and one column per modality (any
alias above) and optionally `seg`, paths relative to the table (`list_cases`).
`write_case` writes every layout (for `tumorseg synth --layout` and for tests).
"""

from .case import LAYOUTS, UNNAMED_CONVENTION, Case, files_digest, load_images
from .dataset_json import BESIDE, DATASET_JSON, dataset_labels, folder_labels, write_dataset_json
from .discover import NAMING_HINT, dataset_layout, discover_cases
from .series import propose_case_list, write_case_list
from .table import is_case_list, list_cases
from .write import layout_case_id, layout_labels, write_case

__all__ = [
    "BESIDE", "DATASET_JSON", "LAYOUTS", "NAMING_HINT", "UNNAMED_CONVENTION", "Case", "dataset_labels", "dataset_layout",
    "discover_cases", "files_digest", "folder_labels", "is_case_list", "layout_case_id", "layout_labels", "list_cases", "load_images",
    "propose_case_list", "write_case", "write_case_list", "write_dataset_json",
]
