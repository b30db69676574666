import errno

import pytest
import torch

from tumorseg.checkpoint import load_checkpoint, save_checkpoint
from tumorseg.errors import TumorsegError


def test_round_trip_of_tensors_and_plain_types(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"model": {"w": torch.ones(2)}, "epoch": 3, "patch": [64, 64, 64]})
    state = load_checkpoint(tmp_path / "a.pt")
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2)) and state["format"]


def test_a_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch's zip writer turns a failed write (EFBIG under `ulimit -f`) into its own RuntimeError."""
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    real = torch.save

    def too_large(obj, fh):
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 35136 vs 35056")

    monkeypatch.setattr(torch, "save", too_large)
    with pytest.raises(TumorsegError, match=r"last.pt: cannot write \(larger than the file-size limit\)$"):
        save_checkpoint(tmp_path / "last.pt", {"epoch": 2})
    monkeypatch.setattr(torch, "save", real)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_run_folder_stands_for_its_best_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "run" / "best.pt", {"epoch": 3})
    assert load_checkpoint(tmp_path / "run")["epoch"] == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(TumorsegError, match=r"empty: a folder without best.pt; give a checkpoint file"):
        load_checkpoint(tmp_path / "empty")


def test_another_programs_pickle_is_one_line_without_torchs_warnings(tmp_path, recwarn):
    import pickle

    with open(tmp_path / "model.pt", "wb") as fh:
        pickle.dump({"weights": [1, 2]}, fh, protocol=4)
    with pytest.raises(TumorsegError, match=r"model\.pt: not a readable tumorseg checkpoint"):
        load_checkpoint(tmp_path / "model.pt")
    assert not recwarn.list
