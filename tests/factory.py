"""Hand-made BraTS-format cases with exactly known content, for precise tests, and a CPU of a chosen kind."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from tumorseg.labels import MODALITIES, RAW_LABELS
from tumorseg.networks import build_network, network_spec

CHANNELS = ("t2", "t1ce", "flair")  # the seed's


def checkpoint_state(name="unet3d", filters=(4, 8, 16), target="labels", patch=(32, 32, 32), norm="minmax", seed=0,
                     **inference) -> dict:
    """A checkpoint state as training writes it, with untrained weights (drawn with `seed`)."""
    torch.manual_seed(seed)
    spec = network_spec(name, len(CHANNELS), 3 if target == "regions" else 4, list(filters))
    return {
        "network": spec,
        "model": build_network(**spec).state_dict(),
        "prepare": {"channels": list(CHANNELS), "norm": norm, "crop_size": [32, 32, 32], "crop_mode": "fixed"},
        "patch": list(patch),
        "target": target,
        "label_map": {i: RAW_LABELS[i] for i in range(4)},
        "inference": {"tta": False, "postprocess_et_threshold": None, **inference},
    }


AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def write_case(
    root: Path,
    case_id: str,
    shape=(40, 40, 32),
    seg: np.ndarray | None | bool = True,
    ext: str = ".nii.gz",
    modalities=MODALITIES,
    seed: int = 0,
) -> Path:
    """A case folder with a box 'brain' of random int16 values and (by default) a cube tumour.

    Each modality m gets values offset by its index so channel order is visible in outputs.
    """
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    brain = np.zeros(shape, bool)
    brain[4:-4, 4:-4, 3:-3] = True
    for i, m in enumerate(modalities):
        img = np.where(brain, rng.integers(100, 200, shape) + 1000 * (MODALITIES.index(m) + 1), 0).astype(np.int16)
        nib.save(nib.Nifti1Image(img, AFFINE), folder / f"{case_id}_{m}{ext}")
    if seg is True:
        seg = np.zeros(shape, np.uint8)
        c = [s // 2 for s in shape]
        seg[c[0] - 6 : c[0] + 6, c[1] - 6 : c[1] + 6, c[2] - 5 : c[2] + 5] = 2
        seg[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = 4
        seg[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 1
    if seg is not None and seg is not False:
        nib.save(nib.Nifti1Image(np.asarray(seg), AFFINE), folder / f"{case_id}_seg{ext}")
    return folder


def kaggle_copy(src_case: Path, root: Path, number: int, seg_name: str | None = None) -> Path:
    """Lay a real sample case out as the Kaggle BraTS 2020 download has it (uncompressed .nii)."""
    case_id = f"BraTS20_Training_{number:03d}"
    folder = root / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData" / case_id
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(src_case.glob("*.nii.gz")):
        kind = path.name[: -len(".nii.gz")].rsplit("_", 1)[1]
        name = seg_name if kind == "seg" and seg_name else f"{case_id}_{kind}.nii"
        with gzip.open(path, "rb") as fin, open(folder / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return folder.parent


def convert_case(case_dir: Path, root: Path, layout: str, case_id: str | None = None) -> Path:
    """Write a real BraTS 2020-layout case in another dataset layout (names, 4D MSD file, labels)."""
    from tumorseg.labels import to_training_labels
    from tumorseg.layouts import discover_cases, layout_case_id, load_images, write_case, write_dataset_json

    (case,) = discover_cases(case_dir)
    vols = load_images(case, MODALITIES)
    seg = np.asarray(nib.load(case.seg).dataobj) if case.seg else None
    folder = write_case(root, layout, case_id or layout_case_id(layout, 1), {m: v.data for m, v in zip(MODALITIES, vols)},
                        vols[0].affine, None if seg is None else to_training_labels(seg), vols[0].header)
    if layout in ("msd", "nnunet"):
        write_dataset_json(root, layout)
    return folder


def native_cpu_bf16(monkeypatch, native: bool) -> None:
    """Answer PyTorch's CPU probes as a CPU with (AVX512-BF16) or without native bf16."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def interrupt_training(monkeypatch, epoch: int):
    """Ctrl-C in training's epoch `epoch` (0-based); returns the real `train_epoch` to restore."""
    import importlib

    train_module = importlib.import_module("tumorseg.training.train")
    real = train_module.train_epoch

    def interrupted(*args, **kwargs):
        if args[6] == epoch:  # train_epoch's epoch argument
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", interrupted)
    return real
