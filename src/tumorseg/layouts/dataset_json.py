"""MSD and nnU-Net datasets: `dataset.json`'s channels and labels, `imagesTr/`, `labelsTr/`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import TumorsegError
from ..io import nifti_files, write_text
from ..labels import MODALITIES, LabelConvention, canonical_modality, convention_from_names, convention_from_regions
from .case import Case, file_stem


DATASET_JSON = "dataset.json"
IMAGE_DIRS: tuple[str, ...] = ("imagesTr", "imagesTs")
LABEL_DIRS: dict[str, str] = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")  # Task01's "FLAIR", "T1w", "t1gd", "T2w"
NNUNET_CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")  # nnU-Net's BraTS conversions
_NNUNET_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _read_dataset_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TumorsegError(f"{path}: unreadable dataset.json ({exc})") from None
    if not isinstance(meta, dict):
        raise TumorsegError(f"{path}: dataset.json holds {json.dumps(meta)[:40]}, not an object of keys "
                            "(channel_names, labels, ...)")
    return meta


def dataset_labels(meta: dict, layout: str, path: Path) -> LabelConvention:
    """The label convention a dataset.json describes (MSD value -> name, nnU-Net name -> value or regions)."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise TumorsegError(f"{path}: no 'labels' in dataset.json")
    try:
        if any(isinstance(v, list) for v in labels.values()):  # region form; a one-label region may be a number
            regions = {k: v if isinstance(v, list) else [v] for k, v in labels.items()
                       if k.lower() not in ("background", "ignore") and v != 0}
            return convention_from_regions(regions, layout)
        if all(str(k).isdigit() for k in labels):  # MSD and nnU-Net v1: {"1": "edema", ...}
            return convention_from_names({str(v): int(k) for k, v in labels.items()}, layout)
        return convention_from_names({k: int(v) for k, v in labels.items()}, layout)
    except TumorsegError as exc:
        raise TumorsegError(f"{path}: {exc}") from None
    except (TypeError, ValueError):  # a label value that is no integer
        raise TumorsegError(f"{path}: 'labels' must map names to integer values (or lists of them)") from None


BESIDE = "the dataset.json beside it"  # why a prediction was read in `folder_labels`' convention


def folder_labels(folder: str | os.PathLike) -> LabelConvention | None:
    """The label convention a dataset.json in a folder of predictions names, or None: nnU-Net's
    predict copies its dataset.json beside the files it writes (MSD numbers, or the region form),
    and other tools' files carry no tag of their own."""
    path = Path(folder) / DATASET_JSON
    try:
        return dataset_labels(_read_dataset_json(path), "nnunet", path) if path.is_file() else None
    except TumorsegError:  # another tool's dataset.json (a MONAI datalist, another task's labels): names none
        return None


def dataset_channels(meta: dict, path: Path) -> dict[int, str]:
    """Channel index -> canonical modality from dataset.json ("channel_names" or MSD's "modality")."""
    names = meta.get("channel_names") or meta.get("modality")
    if not isinstance(names, dict) or not names:
        raise TumorsegError(f"{path}: no 'channel_names' or 'modality' in dataset.json")
    out = {}
    for index, name in names.items():
        modality = canonical_modality(str(name))
        if modality is None:
            raise TumorsegError(f"{path}: channel {index} '{name}' is not an MRI modality tumorseg knows ({', '.join(MODALITIES)})")
        if not str(index).isdigit():
            raise TumorsegError(f"{path}: channel key '{index}' is not a channel number")
        out[int(index)] = modality
    return out


def dataset_cases(root: Path, subdirs: tuple[str, ...]) -> list[Case]:
    """Cases of an MSD or nnU-Net dataset in `root` (holding dataset.json) from `subdirs`."""
    meta_path = root / DATASET_JSON
    meta = _read_dataset_json(meta_path)
    channels = dataset_channels(meta, meta_path)
    cases: list[Case] = []
    for sub in subdirs:
        folder = root / sub
        files = nifti_files(folder)
        label_dir = root / LABEL_DIRS.get(sub, "")
        if sub.startswith("labels"):  # ground truth only (evaluate)
            layout = "nnunet" if "channel_names" in meta else "msd"
            conv = dataset_labels(meta, layout, meta_path)
            cases += [Case(file_stem(f), folder, seg=f, layout=layout, labels=conv) for f in files]
            continue
        split = [_NNUNET_RE.match(file_stem(f)) for f in files]
        # nnU-Net v2 says so ("channel_names"); v1 shares MSD's keys but splits channels into files.
        layout = "nnunet" if "channel_names" in meta or (files and all(split)) else "msd"
        conv = dataset_labels(meta, layout, meta_path)
        if layout == "nnunet":
            grouped: dict[str, dict[str, Path]] = {}
            for f, m in zip(files, split):
                if m is None:
                    raise TumorsegError(f"{f}: not an nnU-Net image name <case>_<4-digit channel>.nii.gz")
                channel = int(m["channel"])
                if channel not in channels:
                    raise TumorsegError(f"{f}: channel {channel} is not in {meta_path}'s channel names")
                grouped.setdefault(m["case"], {})[channels[channel]] = f
            found = [(cid, imgs, {}) for cid, imgs in grouped.items()]
        else:
            order = [channels[i] for i in sorted(channels)]
            found = [(file_stem(f), {m: f for m in order}, {m: i for i, m in enumerate(order)}) for f in files]
        segs = {file_stem(p): p for p in nifti_files(label_dir)} if label_dir.is_dir() else {}
        cases += [Case(cid, folder, imgs, segs.get(cid), None, layout, conv, index) for cid, imgs, index in found]
    return cases


def write_dataset_json(root: Path, layout: str, num_training: int = 0) -> None:
    """The dataset.json MSD Task01 ships, or the one nnU-Net's BraTS conversion writes (region form)."""
    if layout == "msd":
        meta = {"name": "BRATS", "tensorImageSize": "4D",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
                "numTraining": num_training}
    elif layout == "nnunet":
        meta = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
                "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
                "regions_class_order": [1, 2, 3], "numTraining": num_training, "file_ending": ".nii.gz"}
    else:
        raise TumorsegError(f"layout '{layout}' has no dataset.json")
    write_text(root / DATASET_JSON, json.dumps(meta, indent=2) + "\n")
