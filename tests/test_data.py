import numpy as np
import pytest
import torch

from tumorseg.data import PreparedDataset, eval_transform, make_loader, split_ids, train_transform
from tumorseg.errors import TumorsegError
from tumorseg.prepare import PrepareConfig, prepare

from factory import write_case


PREPARE = PrepareConfig(crop_size=(32, 32, 24), val_fraction=0.4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(5):
        write_case(root / "raw", f"c{i}", seed=i)
    prepare(root / "raw", root / "prep", PREPARE, workers=1, progress=False)
    return root / "prep"


def test_dataset_reads_prepared_split(prepared):
    train, val = split_ids(prepared, "train"), split_ids(prepared, "val")
    assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)
    ds = PreparedDataset(prepared, train)
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32, 24) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (1, 32, 32, 24) and sample["case_id"] == train[0]
    assert np.array_equal(sample["image"].numpy(), np.load(prepared / "images" / f"{train[0]}.npy"))


def test_missing_arrays_and_folder_are_clear_errors(prepared, tmp_path):
    with pytest.raises(TumorsegError, match="not a prepared folder"):
        split_ids(tmp_path, "train")
    broken = tmp_path / "copy"
    import shutil

    shutil.copytree(prepared, broken)
    (broken / "masks" / f"{split_ids(prepared, 'val')[0]}.npy").unlink()
    with pytest.raises(TumorsegError, match="missing"):
        split_ids(broken, "val")


def test_mismatched_arrays_name_their_file(prepared, tmp_path):
    import shutil

    broken = tmp_path / "copy"
    shutil.copytree(prepared, broken)
    case = split_ids(prepared, "train")[0]
    np.save(broken / "masks" / f"{case}.npy", np.zeros((32, 32, 20), np.uint8))  # a mask of another crop
    with pytest.raises(TumorsegError, match=rf"masks/{case}.npy: mask of shape \(32, 32, 20\) does not match"):
        PreparedDataset(broken, [case])[0]
    with pytest.raises(TumorsegError, match=rf"images/{case}.npy: image array of shape \(3, 32, 32, 24\), expected \(4,"):
        PreparedDataset(prepared, [case], channels=4)[0]
    assert PreparedDataset(prepared, [case], channels=3)[0]["image"].shape[0] == 3


@pytest.mark.parametrize("dtype, bad", [(np.uint8, 9), (np.int16, -1), (np.float32, 1.5), (np.float32, np.nan)])
def test_masks_outside_the_training_classes_name_their_file(prepared, tmp_path, dtype, bad):
    import shutil

    broken = tmp_path / "copy"
    shutil.copytree(prepared, broken)
    case = split_ids(prepared, "train")[0]
    mask = np.load(prepared / "masks" / f"{case}.npy").astype(dtype)
    assert PreparedDataset(broken, [case], classes=4)[0]["label"].dtype == torch.uint8  # as prepared: fine
    np.save(broken / "masks" / f"{case}.npy", mask)
    assert np.array_equal(PreparedDataset(broken, [case], classes=4)[0]["label"][0].numpy(), mask)  # any whole dtype
    mask[0, 0, 0] = bad
    np.save(broken / "masks" / f"{case}.npy", mask)
    with pytest.raises(TumorsegError, match=rf"masks/{case}.npy: labels .* outside the training classes 0..3"):
        PreparedDataset(broken, [case], classes=4)[0]
    if not np.isnan(bad):  # no classes given: not checked
        PreparedDataset(broken, [case])[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_image_holding_nan_names_its_file(prepared, tmp_path, bad):
    """A damaged image array (a NaN voxel) had trained on, validating to a loss of NaN and Dice 0."""
    import shutil

    broken = tmp_path / "copy"
    shutil.copytree(prepared, broken)
    case = split_ids(prepared, "val")[0]
    image = np.load(prepared / "images" / f"{case}.npy")
    image[0, 3, 3, 3] = bad
    np.save(broken / "images" / f"{case}.npy", image)
    with pytest.raises(TumorsegError, match=rf"images/{case}.npy: 1 NaN or infinite value\(s\); delete it and run the same "):
        PreparedDataset(broken, [case])[0]
    (broken / "images" / f"{case}.npy").unlink()  # as the line says: prepare makes it again
    prepare(prepared.parent / "raw", broken, PREPARE, workers=1, progress=False)
    assert np.array_equal(PreparedDataset(broken, [case])[0]["image"].numpy(), np.load(prepared / "images" / f"{case}.npy"))


def test_patches_and_augmentation_shapes(prepared):
    ds = PreparedDataset(prepared, split_ids(prepared, "train"), train_transform((16, 16, 16), (32, 32, 24), "heavy"))
    s = ds[1]
    assert s["image"].shape == (3, 16, 16, 16) and s["label"].shape == (1, 16, 16, 16)
    assert set(np.unique(s["label"].numpy())) <= {0, 1, 2, 3}  # nearest-neighbour labels survive rotation
    ev = PreparedDataset(prepared, split_ids(prepared, "val"), eval_transform())[0]
    assert ev["image"].shape == (3, 32, 32, 24)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_foreground_oversampling_rate(prepared, ratio):
    # A patch is centred on tumour with probability fg_ratio; check the centre voxel's label.
    transform = train_transform((8, 8, 8), (32, 32, 24), "none", fg_ratio=ratio)
    transform.set_random_state(0)
    ds = PreparedDataset(prepared, split_ids(prepared, "train")[:1], transform)
    hits = [bool(ds[0]["label"][0, 4, 4, 4] > 0) for _ in range(200)]
    assert abs(np.mean(hits) - ratio) < 0.1


def test_loader_order_depends_only_on_seed_and_epoch(prepared):
    ds = PreparedDataset(prepared, split_ids(prepared, "train"))

    def order(epoch):
        loader = make_loader(ds, batch_size=1, shuffle=True, seed=3)
        loader.sampler.set_epoch(epoch)
        return [b["case_id"][0] for b in loader]

    assert order(0) == order(0) and sorted(order(1)) == sorted(ds.case_ids)
    assert any(order(0) != order(e) for e in range(1, 6))


def test_more_workers_than_cores_is_one_note_not_torchs_warning_each_epoch(prepared):
    """A recipe's 8 workers on a 2-core laptop: torch warned when the loader was made and when its
    first epoch started."""
    import os
    import warnings

    from tumorseg.data import workers_note

    cores = len(os.sched_getaffinity(0))
    assert workers_note(cores) is None
    assert workers_note(cores + 1) == (f"note: {cores + 1} loader workers on {cores} CPU cores, more than can run at "
                                       f"once: --workers {cores} may be as fast")
    ds = PreparedDataset(prepared, split_ids(prepared, "train"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = make_loader(ds, batch_size=1, shuffle=False, seed=0, workers=cores + 1)
        assert len([b["case_id"][0] for b in loader]) == len(ds)


@pytest.mark.parametrize("ending", ["normal", "error"])
def test_loader_workers_end_with_the_process(ending):
    """Workers exit quietly on SIGTERM (a job-wide `scancel` is the training process's to handle),
    so the SIGTERM multiprocessing sends them at exit still ends them: an iterator alive when the
    program ends must not hold it for ever."""
    import subprocess
    import sys

    code = ("import torch\nfrom tumorseg.data import make_loader\n"
            "class Numbers(torch.utils.data.Dataset):\n"
            "    def __len__(self):\n        return 8\n"
            "    def __getitem__(self, i):\n        return torch.tensor(i)\n"
            "it = iter(make_loader(Numbers(), 1, False, 0, workers=2))\nnext(it)\nprint('main done', flush=True)\n"
            + ("raise SystemExit(3)\n" if ending == "error" else ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout == "main done\n" and proc.returncode == (3 if ending == "error" else 0), proc.stderr[-2000:]
