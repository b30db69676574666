"""Deterministic, seeded train/validation split of the kept cases."""

from __future__ import annotations

import numpy as np


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Split case ids into {"train": [...], "val": [...]}, both sorted.

    The same ids, fraction and seed give the same split on any machine; at least one
    validation case whenever val_fraction > 0 and there are two or more cases.
    """
    ids = sorted(case_ids)
    n_val = int(round(val_fraction * len(ids)))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return {"train": sorted(set(ids) - set(val)), "val": val}


def fold_split(case_ids: list[str], folds: int, fold: int, seed: int) -> dict[str, list[str]]:
    """Fold `fold` of a seeded `folds`-fold cross-validation over the cases, both parts sorted.

    Every case is validated in exactly one fold, and fold sizes differ by at most one case (the
    cases shuffled with `seed`, then dealt out in turn, as nnU-Net's shuffled KFold).
    """
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[fold::folds])
    return {"train": sorted(set(ids) - set(val)), "val": val}
