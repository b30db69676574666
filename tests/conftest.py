"""Shared fixtures: the real BraTS samples (skipped when absent) and tiny synthetic cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tumorseg.synth import synthesize

SYNTH_SHAPE = (48, 48, 40)
SYNTH_CASES = 6


@pytest.fixture(scope="session", autouse=True)
def subprocess_temporaries(tmp_path_factory):
    """The commands the tests start write their temporaries (torchrun's log folders, one per run)
    below pytest's own folder, which pytest prunes, rather than leave them in the system's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder of real BraTS case folders (`../shared/data/brats`); skips when absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats"
    if not path.is_dir():
        pytest.skip("real BraTS samples not available")
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Folder holding 6 synthetic cases of shape (48, 48, 40), seed 0."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, SYNTH_CASES, shape=SYNTH_SHAPE, seed=0, progress=False)
    return root
