"""What a checkpoint must hold for prediction and export, checked before any case is touched, and
the network it stores: one line naming the file for a checkpoint another program wrote or edited."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import TumorsegError
from ..labels import RAW_LABELS
from ..networks import build_network
from .postprocess import NO_COMPONENT_STEP

REQUIRED_KEYS: tuple[str, ...] = ("network", "model", "prepare", "patch", "target")


def check_state(state: dict[str, Any], where: str, weights: bool = True) -> None:
    """One line naming `where` when a checkpoint lacks what prediction needs (`weights`: the model too)."""
    missing = [k for k in REQUIRED_KEYS if k not in state and (weights or k != "model")]
    if missing:
        raise TumorsegError(f"{where}: checkpoint lacks {', '.join(missing)}")
    damaged = [name for name, ok in _settings_checks(state) if not ok]
    if damaged:  # edited by hand, or another program's: one line, not a traceback deep in the network's code
        raise TumorsegError(f"{where}: damaged checkpoint settings ({', '.join(damaged)}); not as tumorseg train writes them")
    _check_label_map(state, where)


def _settings_checks(state: dict[str, Any]) -> list[tuple[str, bool]]:
    """(setting, whether it has the form prediction reads) for each setting it reads."""
    def ints(value: Any, n: int | None = None, least: int = 1) -> bool:
        return (isinstance(value, (list, tuple)) and (n is None or len(value) == n) and len(value) > 0
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value))

    net, prep = state["network"], state["prepare"]
    minimum = state["inference"].get("postprocess_min_component") if isinstance(state.get("inference"), dict) else None
    net_ok = isinstance(net, dict) and isinstance(net.get("name"), str)
    prep_ok = isinstance(prep, dict)
    return [
        ("network", net_ok),
        ("network.filters", not net_ok or net.get("filters") is None or ints(net["filters"])),
        ("prepare", prep_ok),
        ("prepare.channels", not prep_ok or (isinstance(prep.get("channels"), (list, tuple)) and len(prep["channels"]) > 0
                                             and all(isinstance(c, str) for c in prep["channels"]))),
        ("prepare.norm", not prep_ok or isinstance(prep.get("norm"), str)),
        ("prepare.spacing", not prep_ok or prep.get("spacing") is None or (
            isinstance(prep["spacing"], (list, tuple)) and len(prep["spacing"]) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in prep["spacing"]))),
        ("patch", ints(state["patch"], 3)),
        ("target", state["target"] in ("labels", "regions")),
        ("inference.postprocess_min_component", minimum is None or ints(minimum, len(NO_COMPONENT_STEP), least=0)),
    ]


def network_from_state(state: dict[str, Any], where: str) -> nn.Module:
    """The checkpoint's network with its weights (eval mode, on the CPU)."""
    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights, replaced below, draw from the caller's generator
            model = build_network(**state["network"])
    except (TypeError, ValueError, KeyError) as exc:
        raise TumorsegError(f"{where}: damaged checkpoint settings (network: {type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise TumorsegError(f"{where}: weights do not fit the stored network ({reason})") from None
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:  # a diverged run's: every case would come out as background without a word
        raise TumorsegError(f"{where}: weights hold NaN or infinite values ({', '.join(broken[:3])}"
                            f"{', ...' if len(broken) > 3 else ''}); not a model to predict with")
    return model.eval()


def _check_label_map(state: dict[str, Any], where: str) -> None:
    """Training classes 1, 2, 3 must mean necrosis, oedema, enhancing tumour (BraTS 2020's
    1, 2, 4), as `labels` converts them; refuse a checkpoint that disagrees."""
    label_map = state.get("label_map")
    if label_map is None:
        return
    expected = {i: RAW_LABELS[i] for i in range(len(RAW_LABELS))}
    if {int(k): int(v) for k, v in label_map.items() if int(k) in expected} != expected:
        raise TumorsegError(f"{where}: label map {label_map} differs from BraTS's {expected}")


