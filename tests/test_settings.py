from dataclasses import dataclass

import pytest

from tumorseg.errors import TumorsegError
from tumorseg.settings import typed_settings
from tumorseg.training import resolve_config


@dataclass
class Example:
    count: int = 1
    rate: float = 0.1
    flag: bool = False
    name: str = "x"
    sizes: list[int] | None = None
    spacing: tuple[float, float, float] | None = None
    names: tuple[str, ...] = ("a",)


def test_values_from_files_take_their_fields_types():
    got = typed_settings(Example, {"count": "3", "rate": "1e-4", "flag": "yes", "sizes": "64, 64,32",
                                   "spacing": [1, 1, 2.5], "names": ["b", "c"], "other": object}, "f.yaml")
    assert got["count"] == 3 and got["rate"] == 1e-4 and got["flag"] is True
    assert got["sizes"] == [64, 64, 32] and got["spacing"] == (1.0, 1.0, 2.5) and got["names"] == ("b", "c")
    assert "other" in got  # unknown keys are the caller's to refuse
    assert typed_settings(Example, {"count": "12345678901234567891"}, "f")["count"] == 12345678901234567891  # exact
    assert typed_settings(Example, {"count": 4.0, "sizes": None, "names": "all", "flag": 0}, "f") == \
        {"count": 4, "sizes": None, "names": "all", "flag": False}


@pytest.mark.parametrize("key, value, message", [
    ("count", "ten", "count must be an integer (got 'ten')"),
    ("count", 2.5, "count must be an integer"),
    ("count", True, "count must be an integer (got True)"),
    ("rate", "nan", "rate must be a finite number"),
    ("flag", 2, "flag must be true or false (got 2)"),
    ("name", 3, "name must be a string"),
    ("sizes", 64, "sizes must be a list of integers or null (got 64)"),
    ("spacing", [1, 1], "spacing must be a list of 3 finite numbers or null"),
    ("names", [1], "names must be a list of strings"),
])
def test_wrong_values_are_one_line_naming_the_key(key, value, message):
    with pytest.raises(TumorsegError, match=f"^f.yaml: {message}".replace("(", r"\(").replace(")", r"\)")):
        typed_settings(Example, {key: value}, "f.yaml")


def test_yaml_exponent_without_a_dot_is_a_learning_rate(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-4\nepochs: '5'\npatch: 64,64,64\n")  # YAML reads 1e-4 as a string
    cfg = resolve_config(tmp_path / "c.yaml")
    assert (cfg.lr, cfg.epochs, cfg.patch) == (1e-4, 5, [64, 64, 64])
    (tmp_path / "off.yaml").write_text("amp: off\n")  # YAML 1.1: false
    assert resolve_config(tmp_path / "off.yaml").amp == "off"
    (tmp_path / "bad.yaml").write_text("epochs: ten\n")
    with pytest.raises(TumorsegError, match=r"bad.yaml: epochs must be an integer \(got 'ten'\)"):
        resolve_config(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: 5\nlr: [0.1\n  model: unet\n")  # damaged by hand
    with pytest.raises(TumorsegError, match=r"broken.yaml: cannot parse config \(\w+Error: ") as info:
        resolve_config(tmp_path / "broken.yaml")
    assert "\n" not in str(info.value)


def test_numpy_values_from_the_api():
    import numpy as np

    got = typed_settings(Example, {"count": np.int64(3), "rate": np.float32(0.5), "sizes": np.array([64, 64, 32]),
                                   "spacing": np.array([1.0, 1.0, 2.5]), "flag": np.bool_(True)}, "api")
    assert got == {"count": 3, "rate": 0.5, "sizes": [64, 64, 32], "spacing": (1.0, 1.0, 2.5), "flag": True}
    assert all(type(v) in (int, float, bool, list, tuple) for v in got.values())


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_a_seed_numpy_cannot_take_is_one_line(seed):
    from tumorseg.prepare import PrepareConfig
    from tumorseg.training import TrainConfig

    with pytest.raises(TumorsegError, match=r"seed must be in \[0, 2\*\*32\)"):
        PrepareConfig(seed=seed)
    with pytest.raises(TumorsegError, match=r"seed must be in \[0, 2\*\*32\)"):
        TrainConfig(seed=seed)
