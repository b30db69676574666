"""Named training recipes shipped as readable YAML files: `prepare:` and `train:` settings.

`tumorseg prepare --recipe NAME` takes the `prepare:` part, `tumorseg train --recipe NAME`
the `train:` part; config files and flags override single values.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ..errors import TumorsegError

SECTIONS = ("prepare", "train")


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict[str, dict[str, Any]]:
    """The recipe's sections, each checked for unknown keys and bad values."""
    import yaml

    from ..prepare import PrepareConfig
    from ..training.config import TrainConfig

    if name not in recipe_names():
        raise TumorsegError(f"unknown recipe '{name}' (choose from {', '.join(recipe_names())})")
    values = yaml.safe_load(resources.files(__package__).joinpath(f"{name}.yaml").read_text()) or {}
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise TumorsegError(f"recipe '{name}': unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    prepare, train = values.get("prepare", {}), values.get("train", {})
    PrepareConfig.from_dict({**PrepareConfig().to_dict(), **prepare}, source=f"recipe '{name}'")  # validates
    TrainConfig.from_dict(train, source=f"recipe '{name}'")
    return {"prepare": prepare, "train": train}
