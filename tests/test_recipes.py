import pytest

from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.prepare import PrepareConfig
from tumorseg.recipes import load_recipe, recipe_names
from tumorseg.training import TrainConfig, resolve_config
from tumorseg import recipes


@pytest.mark.parametrize("name", ["seed", "brats-cpu", "brats-gpu"])
def test_each_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    PrepareConfig.from_dict({**PrepareConfig().to_dict(), **recipe["prepare"]})
    assert isinstance(TrainConfig.from_dict(recipe["train"]), TrainConfig)


def test_recipe_contents_match_their_description():
    seed, cpu, gpu = (load_recipe(n) for n in ("seed", "brats-cpu", "brats-gpu"))
    assert seed["prepare"]["norm"] == "minmax" and seed["train"]["model"] == "unet3d" and seed["train"]["lr"] == 1e-4
    for r in (cpu, gpu):
        assert r["prepare"] == {**r["prepare"], "norm": "zscore", "crop_mode": "brain", "channels": ["t1", "t1ce", "t2", "flair"]}
        assert r["train"]["target"] == "regions" and r["train"]["tta"] and r["train"]["postprocess"]
    assert gpu["train"]["deep_supervision"] and gpu["train"]["amp"] == "auto" and gpu["train"]["patch"] == [128, 128, 128]
    assert cpu["train"]["max_minutes"] <= 60


def test_overrides_win_over_the_recipe(tmp_path):
    (tmp_path / "c.toml").write_text("epochs = 3\n")
    cfg = resolve_config(tmp_path / "c.toml", {"lr": 0.5}, recipe="brats-cpu")
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.target) == ("unet-lite", 3, 0.5, "regions")


def test_unknown_recipe_and_unknown_key_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(TumorsegError, match="unknown recipe 'fast'.*brats-cpu"):
        load_recipe("fast")
    (tmp_path / "bad.yaml").write_text("train:\n  model: unet\n  speed: 11\n")
    monkeypatch.setattr(recipes, "recipe_names", lambda: ["bad"])
    monkeypatch.setattr(recipes.resources, "files", lambda package: tmp_path)
    with pytest.raises(TumorsegError, match="unknown key.*speed"):
        load_recipe("bad")
    (tmp_path / "bad.yaml").write_text("prepare:\n  norm: zscore\n  resample: 2\n")
    with pytest.raises(TumorsegError, match="unknown prepare setting.*resample"):
        load_recipe("bad")


def test_cli_prepare_with_recipe(tmp_path):
    from factory import write_case
    import json

    write_case(tmp_path / "raw", "c0")
    write_case(tmp_path / "raw", "c1", seed=1)
    assert main(["prepare", str(tmp_path / "raw"), str(tmp_path / "out"), "--recipe", "brats-cpu", "--crop", "32", "--workers", "1"]) == 0
    settings = json.loads((tmp_path / "out/manifest.json").read_text())["settings"]
    assert settings["norm"] == "zscore" and settings["crop_mode"] == "brain" and settings["crop_size"] == [32, 32, 32]
    assert len(settings["channels"]) == 4 and sorted(recipe_names()) == ["brats-cpu", "brats-gpu", "seed"]


@pytest.mark.parametrize("name", ["brats-cpu", "brats-gpu"])
def test_recipe_trains_and_predicts_on_the_cpu_at_tiny_size(name, tmp_path):
    """The recipe's whole code path (its network, loss, augmentation, optimiser, TTA and
    post-processing) on two small cases; only the sizes are overridden."""
    import nibabel as nib
    import numpy as np

    from factory import write_case
    from tumorseg.checkpoint import load_checkpoint

    for i in range(3):
        write_case(tmp_path / "raw", f"c{i}", seed=i)
    assert main(["prepare", str(tmp_path / "raw"), str(tmp_path / "prep"), "--recipe", name, "--crop", "32",
                 "--val-fraction", "0.34", "--workers", "1"]) == 0
    assert main(["train", str(tmp_path / "prep"), str(tmp_path / "run"), "--recipe", name, "--filters", "4,8,16",
                 "--patch", "16,16,16", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1",
                 "--workers", "0", "--device", "cpu"]) == 0
    state = load_checkpoint(tmp_path / "run/best.pt")
    assert state["network"]["name"] == load_recipe(name)["train"]["model"] and state["inference"]["tta"]
    assert main(["predict", str(tmp_path / "run/best.pt"), str(tmp_path / "raw/c0"), str(tmp_path / "pred")]) == 0
    labels = np.asarray(nib.load(tmp_path / "pred/c0.nii.gz").dataobj)
    assert labels.shape == nib.load(next((tmp_path / "raw/c0").glob("*_t1.nii.gz"))).shape
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
