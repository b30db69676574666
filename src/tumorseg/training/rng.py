"""RNG state for exact resume, as tensors and plain types (checkpoints stay `weights_only`).

CUDA generators are not stored: every epoch re-seeds all generators from (seed, epoch, rank)
with `torch.manual_seed`, which seeds CUDA too, so their state at an epoch boundary carries
nothing, and a run saved on 8 GPUs resumes on 1.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])  # a "cuda" entry of older checkpoints is ignored (see above)


@contextlib.contextmanager
def callers_rng_kept() -> Iterator[None]:
    """The caller's Python, NumPy and torch generators as they were, whatever the block seeds or draws:
    training seeds them all, and a notebook's own draws after `train` would be the same whatever its
    seed. CUDA's are kept where the caller had started CUDA; else the seed the caller's last
    `torch.manual_seed` left for CUDA's first use is left for it again."""
    python, numpy = random.getstate(), np.random.get_state()
    started = torch.cuda.is_initialized()
    seed = torch.initial_seed()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if started else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
            if not started and torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)
