"""`tumorseg predict`: a checkpoint and cases of any layout -> segmentations in the scans' space.

Each case is preprocessed exactly as `prepare` did for training (the checkpoint records the
channels, normalisation and spacing): its modalities on one grid, reoriented to the canonical
orientation and resampled to the training spacing (`geometry`; BraTS scans pass untouched),
then over the whole brain rather than the training crop: the brain's bounding box, padded to
at least the patch size and to a multiple of the network's divisor, goes through
sliding-window inference (optionally with flip TTA). Probabilities (not labels) go back into
the scan's exact grid, and the labels are written in the input layout's label convention
(or `labels`) with the scan's affine and header, so they open aligned with it in any viewer.
The header's description records the convention for `evaluate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from collections.abc import Callable, Collection, Sequence
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import checkpoint_file, checkpoint_files, read_checkpoint
from ..devices import amp_dtype, autocast, describe, resolve_device, window_batch
from ..errors import TumorsegError
from ..geometry import Grid, resample_box
from ..io import file_digest, file_sample_digest, nifti_whole, save_nifti, sweep_stale_temps
from ..labels import (CLASS_ABBREVIATIONS, MODEL_DIGITS, RAW_LABELS, REGIONS, SCANS_DIGITS, LabelConvention,
                      convention, model_from_header, prediction_description, scans_from_header, tumorseg_prediction)
from ..layouts import Case, discover_cases
from ..lock import LOCK_NAME, folder_lock
from ..networks import build_network, required_divisor
from ..prepare.case import (check_brain_size, check_headers, check_intensities, load_channels, scaled_window,
                            to_network_grid)
from ..prepare.crop import Box, bounding_box, brain_mask, uncrop
from .compiled import COMPILED_SAVES, COMPILED_SAVES_ONNX, CompiledNetwork, compile_pays, compiles_faster
from .ensemble import EnsembleNetwork, ensemble_postprocessing
from .postprocess import NO_COMPONENT_STEP, postprocess
from .window import flip_dims, passes, to_labels, tta_probabilities

REQUIRED_KEYS: tuple[str, ...] = ("network", "model", "prepare", "patch", "target")
ENGINES: tuple[str, ...] = ("auto", "torch", "compile", "onnx")
# Networks ONNX Runtime ran faster than PyTorch on the CPU (bench_predict_paths, README "Measured"): our
# UNet3D 1.4x per case at 128^3. MONAI's UNet was 7-25 % slower there (PyTorch batches its windows well),
# unet-lite 30-60 % slower.
ONNX_FASTER: frozenset[str] = frozenset({"unet3d"})


@dataclass
class Predictor:
    """A network ready for inference and the settings it was trained with.

    Build it with `Predictor.from_checkpoint`; tests may construct one around any module
    that maps `(B, len(channels), X, Y, Z)` to logits `(B, K, X, Y, Z)`.

    Attributes:
        model: the network, in eval mode on `device`.
        device: where inference runs.
        channels: modalities in input-channel order (from prepare's settings).
        norm: intensity scaling, "minmax" or "zscore" (from prepare's settings).
        patch: the training patch: the default window; the inference box is at least this.
        target: "labels" (softmax over 4 classes) or "regions" (sigmoid WT, TC, ET).
        divisor: every padded input side is a multiple of this.
        tta: average over the 8 flip combinations.
        largest_tumour: keep only the largest connected whole-tumour component.
        et_threshold: relabel predicted ET as necrosis when it has fewer voxels (None: off).
        min_component: per region (WT, TC, ET), remove 26-connected components of fewer voxels
            (0: off; `postprocess.remove_small_components`).
        overlap: sliding-window overlap in [0, 1).
        amp_dtype: autocast dtype (`devices.amp_dtype`: native bf16 on GPUs and CPUs, fp16 on older GPUs),
            None for float32.
        sw_batch_size: sliding windows per network call (`devices.window_batch`).
        spacing: voxel size (mm, canonical axes) the network was trained at; None: the scan's.
        labels: label convention of the written files; None: each input layout's own.
        window: sliding-window size (multiples of `divisor`); None: `patch`. Windows larger than
            the brain's box shrink to it ("box": one window over the whole box).
        engine: what runs `model`: "torch", "compile" (PyTorch through `torch.compile`: `compiled`),
            "onnx" (ONNX Runtime; `Predictor.from_checkpoint`), or "mixed" (an ensemble whose networks
            run partly in ONNX Runtime, partly in PyTorch).
        network: the network's registry name (`networks.NETWORKS`), where known.
        pytorch_model: the PyTorch network behind `model` where ONNX Runtime runs it exported in
            memory (engine "onnx" from a checkpoint): what `compiled` compiles; None otherwise.
        model_digest: SHA-256 of the checkpoint or exported file it was loaded from (None: built
            in Python): with the settings that decide the labels, `made_by`.
        statistics: the validation statistics its post-processing was chosen on, as checkpoints store
            them (`postprocess.statistics_state`), where known: an ensemble chooses on all its members'.
        out_channels: the network's output channels (classes or regions), where known.
        member_digests: an ensemble's networks' `model_digest`s, one per network (nested ensembles
            flattened); empty for one network.
        postprocess_source: where an ensemble's post-processing comes from, in words (None: the checkpoint's).
    """

    model: nn.Module
    device: torch.device
    channels: tuple[str, ...]
    norm: str
    patch: tuple[int, int, int]
    target: str = "labels"
    divisor: int = 1
    tta: bool = False
    largest_tumour: bool = False
    et_threshold: int | None = None
    min_component: tuple[int, int, int] = NO_COMPONENT_STEP
    overlap: float = 0.5
    amp_dtype: torch.dtype | None = None
    sw_batch_size: int = 1
    spacing: tuple[float, float, float] | None = None
    labels: LabelConvention | None = None
    window: str | tuple[int, int, int] | None = None
    engine: str = "torch"
    network: str | None = None
    pytorch_model: nn.Module | None = None
    model_digest: str | None = None
    statistics: list | None = None
    postprocess_source: str | None = None
    out_channels: int | None = None
    member_digests: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise TumorsegError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.target not in ("labels", "regions"):
            raise TumorsegError(f"unknown target '{self.target}' (choose from labels, regions)")
        if len(self.patch) != 3 or any(p < 1 for p in self.patch):
            raise TumorsegError(f"patch must be three positive integers, got {self.patch}")
        self.window = check_window(self.window, self.divisor)

    @property
    def members(self) -> int:
        """Networks averaged (`Predictor.ensemble`); 1 for one network."""
        return len(self.member_digests) or 1

    def roi(self, box_shape: Sequence[int]) -> tuple[int, ...]:
        """The sliding window for an inference box: `window` (else `patch`), at most the box."""
        return tuple(min(int(w), int(s)) for w, s in zip(self.window or self.patch, box_shape))

    def made_by(self) -> str | None:
        """A fingerprint of the model file and of the settings that decide the labels (TTA, overlap,
        window, post-processing), recorded in each prediction's header so that `predict` never
        mixes another model's files into a folder; None where the model file is not known."""
        if self.model_digest is None:
            return None
        window = None if self.window == self.patch else self.window  # the training patch, given or not
        settings = (self.model_digest, self.tta, self.overlap, window, self.largest_tumour, self.et_threshold)
        if any(self.min_component):  # absent when off: files of models from before this step keep their fingerprint
            settings += (tuple(self.min_component), "largest kept")  # files from before it kept no region's largest
        return hashlib.sha256(repr(settings).encode()).hexdigest()[:MODEL_DIGITS]

    def settings_line(self) -> str:
        """TTA and the post-processing steps, in words, for the run's first lines."""
        steps = ["largest tumour only"] if self.largest_tumour else []
        if self.et_threshold:
            steps.append(f"ET under {self.et_threshold} voxels as necrosis")
        small = [f"{r} {v}" for r, v in zip(REGIONS, self.min_component) if v]
        if small:
            steps.append(f"components under {' / '.join(small)} voxels removed but each region's largest")
        voxels = f" (training voxels, {'x'.join(f'{v:g}' for v in self.spacing)} mm)" if self.spacing and (
            self.et_threshold or small) else ""
        source = f" ({self.postprocess_source})" if self.postprocess_source else ""
        return (f"{f'ensemble of {self.members} models; ' if self.members > 1 else ''}"
                f"{'8-flip TTA' if self.tta else 'no TTA'}; post-processing: "
                + ("; ".join(steps) + voxels if steps else "none") + source)

    def fixed_window(self) -> bool:
        """Every case's windows have one size: at most the training patch (the box is at least that)."""
        return self.window is None or all(w <= p for w, p in zip(self.window, self.patch))

    def may_compile(self) -> bool:
        """Whether compiling could speed this predictor up (`compiled.compiles_faster`): a PyTorch
        network (run as it is or by ONNX Runtime) on the CPU, one it ran much faster compiled,
        windows of one size."""
        pytorch = self.engine == "torch" or (self.engine == "onnx" and self.pytorch_model is not None)
        return pytorch and compiles_faster(self.network, self.device, self.fixed_window())

    def compiled(self) -> "Predictor":
        """This predictor with its PyTorch network compiled (`compiled.CompiledNetwork`), warmed up."""
        if self.engine == "compile":
            return self
        if self.engine == "mixed" or (self.engine == "onnx" and self.pytorch_model is None):
            raise TumorsegError("an exported model has no PyTorch network to compile (predict the checkpoint)")
        model = self.pytorch_model if self.engine == "onnx" else self.model
        predictor = replace(self, model=CompiledNetwork(model, self.sw_batch_size).eval(), engine="compile",
                            pytorch_model=None)
        predictor.warm_up()
        return predictor

    def warm_up(self) -> None:
        """One network call on a batch of zero windows: the first call's one-off costs (compiling,
        ONNX Runtime's session start, PyTorch's first kernels) paid before the first case."""
        shape = (self.sw_batch_size, len(self.channels), *self.roi(self.patch))
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            self.model(torch.zeros(shape, device=self.device))

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | dict[str, Any],
        device: str = "auto",
        tta: bool | None = None,
        overlap: float = 0.5,
        labels: str | None = None,
        amp: str = "auto",
        engine: str = "auto",
        window: str | Sequence[int] | None = None,
    ) -> "Predictor":
        """Load a checkpoint file (or an already loaded state dict) once, for many cases.

        A `.onnx` file written by `tumorseg export` runs in ONNX Runtime with the settings it
        carries (needs ONNX Runtime). `tta` None uses the checkpoint's choice (`inference.tta`); the post-processing
        (`inference.postprocess_*`) always comes from the checkpoint. `amp`: "auto" (bf16 where the
        GPU or CPU computes it natively, fp16 on older GPUs, else float32), "bf16", "fp16" or "off".
        `engine`: "torch", "compile" (PyTorch through `torch.compile`; it compiles at the first call of
        each window shape, `warm_up` pays that before the first case), "onnx" (the network exported
        in memory and run by ONNX Runtime in float32, within 1e-4 of PyTorch's float32), or "auto":
        ONNX Runtime where the CPU predicts in float32 and it is installed, for the networks it runs
        faster (`ONNX_FASTER`), else PyTorch (`predict` may compile either after its first
        sliding-window pass: `compiled.compile_pays`). `window`: sliding-window size (None: the
        training patch; "box": one window over the brain's box).
        """
        if engine not in ENGINES:
            raise TumorsegError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
        where = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "checkpoint"
        path = checkpoint_file(checkpoint) if isinstance(checkpoint, (str, Path)) else None
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU per rank
        model, engine_used, pytorch_model = None, "torch", None
        if path is not None and path.suffix.lower() == ".onnx":
            if engine in ("torch", "compile"):
                raise TumorsegError(f"{checkpoint}: an exported model runs only in ONNX Runtime (--engine auto or onnx)")
            from .onnx_model import load_onnx  # onnxruntime only for exported models (`tumorseg export`)

            model, state = load_onnx(path, dev)
            engine_used = "onnx"  # the digest of the checkpoint it records it came from: both fingerprint alike
            try:
                digest = (state.get("export") or {}).get("checkpoint_sha256") or file_digest(path)
            except OSError as exc:  # gone or unreadable since ONNX Runtime read it
                raise TumorsegError(f"{path}: cannot read it ({exc.strerror})") from None
            if dev.type == "cuda" and model.device.type != "cuda":
                print(f"note: {checkpoint}: ONNX Runtime's CUDA provider is not installed or did not load "
                      "(onnxruntime-gpu, built for this CUDA); the exported model runs on the CPU", file=sys.stderr)
                dev = model.device
        else:
            state, digest = read_checkpoint(path) if path is not None else (checkpoint, None)
        check_state(state, where, weights=model is None)
        spec = state["network"]
        divisor = required_divisor(spec["name"], spec.get("filters"))
        window = check_window(window, divisor)
        dtype = amp_dtype(amp, dev, predicting=True)
        sw_batch = window_batch(dev, window or state["patch"])  # an upper bound: `roi` clips the window
        if model is None:
            model = network_from_state(state, where)
            # ONNX Runtime runs the float32 graph: faster than PyTorch's float32 for ONNX_FASTER
            # networks, slower than PyTorch's native bf16 (README, "Measured")
            onnx_faster = spec["name"] in ONNX_FASTER and dev.type == "cpu" and dtype is None
            if engine == "compile":
                model, engine_used = CompiledNetwork(model, sw_batch), "compile"
            elif engine == "onnx" or (engine == "auto" and onnx_faster and onnx_runtime_installed()):
                from .onnx_model import runtime_network

                runtime, engine_used = runtime_network(model, spec, dev, where, required=engine == "onnx")
                if engine_used == "onnx":  # the PyTorch network stays at hand, for compiling
                    model, pytorch_model = runtime, model.to(dev).eval()
        inference = state.get("inference") or {}
        threshold = inference.get("postprocess_et_threshold")
        minimum = inference.get("postprocess_min_component")  # checked by `check_state`
        spacing = state["prepare"].get("spacing")
        return cls(
            model=model.to(dev).eval(),
            device=dev,
            channels=tuple(state["prepare"]["channels"]),
            norm=state["prepare"]["norm"],
            patch=tuple(int(p) for p in state["patch"]),
            target=state["target"],
            divisor=divisor,
            tta=bool(inference.get("tta", False)) if tta is None else bool(tta),
            largest_tumour=bool(inference.get("postprocess_largest_tumour", False)),
            et_threshold=threshold if isinstance(threshold, int) and not isinstance(threshold, bool) else None,
            min_component=tuple(minimum) if minimum else NO_COMPONENT_STEP,
            overlap=float(overlap),
            amp_dtype=None if engine_used == "onnx" else dtype,
            sw_batch_size=sw_batch,
            spacing=tuple(float(v) for v in spacing) if spacing else None,
            labels=convention(labels) if labels else None,
            window=window,
            engine=engine_used,
            network=spec["name"],
            pytorch_model=pytorch_model,
            model_digest=digest,
            statistics=inference.get("postprocess_statistics"),
            out_channels=spec.get("out_channels"),
        )

    @classmethod
    def from_checkpoints(cls, checkpoints: str | Path | Sequence[str | Path], **settings: Any) -> "Predictor":
        """`from_checkpoint` for one model, or the `ensemble` of several: checkpoint files, run
        folders (their `best.pt`), folders of cross-validation folds (every fold's `best.pt`:
        `checkpoint.checkpoint_files`), exported models, in any mix. `settings`: `from_checkpoint`'s
        keyword arguments, for every member."""
        given = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        files = [f for c in given for f in checkpoint_files(c)]
        if not files:
            raise TumorsegError("predict: no model given")
        twice = sorted({str(f) for f in files if sum(g.resolve() == f.resolve() for g in files) > 1})
        if twice:  # a fold given alone and in its cross-validation folder would count double
            raise TumorsegError(f"{twice[0]}: given twice; an ensemble takes each model once")
        engine = settings.pop("engine", "auto")
        if len(files) == 1:
            return cls.from_checkpoint(files[0], engine=engine, **settings)
        # the ensemble compiles as one network (one graph, one batch of windows), not member by member;
        # `auto` chooses per network, so an ensemble may run some in ONNX Runtime and some in PyTorch
        members = [cls.from_checkpoint(f, engine="torch" if engine == "compile" and f.suffix.lower() != ".onnx"
                                       else engine, **settings) for f in files]
        joint = cls.ensemble(members, [str(f) for f in files])
        if engine == "compile" and joint.engine == "torch":
            joint = replace(joint, model=CompiledNetwork(joint.model, joint.sw_batch_size).eval(), engine="compile")
        return joint

    @classmethod
    def ensemble(cls, members: Sequence["Predictor"], names: Sequence[str] | None = None) -> "Predictor":
        """One predictor averaging the members' probabilities (`ensemble.EnsembleNetwork`).

        Members must read the same channels, scaled alike at the same spacing, and predict the
        same target on the same device; their networks, patches and settings may differ. The
        window is the largest patch (rounded to every network's divisor); TTA runs where every
        member records it; the post-processing is `ensemble.ensemble_postprocessing`'s.
        """
        names = list(names) if names is not None else [f"member {i + 1}" for i in range(len(members))]
        if not members:
            raise TumorsegError("an ensemble needs at least one model")
        first = members[0]
        runs = [m for m in members if m.engine != "onnx"] or members  # an exported model may fall back to the CPU
        for member, name in zip(members[1:], names[1:]):
            for what in ("channels", "norm", "spacing", "target"):
                if getattr(member, what) != getattr(first, what):
                    raise TumorsegError(f"{name}: {what} {getattr(member, what)}, but {names[0]}: "
                                        f"{getattr(first, what)}; an ensemble's models share their input and output")
            if member.engine != "onnx" and member.device != runs[0].device:
                raise TumorsegError(f"{name}: on {member.device}, but {runs[0].device}: an ensemble runs on one device")
        known = [(m.out_channels, name) for m, name in zip(members, names) if m.out_channels is not None]
        for channels, name in known[1:]:  # None: not known (a network built in Python)
            if channels != known[0][0]:
                raise TumorsegError(f"{name}: out_channels {channels}, but {known[0][1]}: {known[0][0]}; an "
                                    "ensemble's models share their input and output")
        seen: dict[str, str] = {}  # digest -> the member holding it
        digests: list[str | None] = []  # one per network, nested ensembles flattened
        for member, name in zip(members, names):  # a checkpoint and its export, or a copy: one model counted twice
            for d in member.member_digests or (member.model_digest,):
                if d in seen:
                    raise TumorsegError(f"{name}: {'holds ' if member.members > 1 else ''}the same model as {seen[d]}; "
                                        "an ensemble takes each model once")
                if d is not None:
                    seen[d] = name
                digests.append(d)
        divisor = math.lcm(*(m.divisor for m in members))
        patch = tuple(-(-max(sides) // divisor) * divisor for sides in zip(*(m.patch for m in members)))
        post = ensemble_postprocessing(members, names)
        digest = (hashlib.sha256(("ensemble:" + ",".join(sorted(seen))).encode()).hexdigest()
                  if None not in digests else None)
        engines = {"torch" if m.engine == "compile" else m.engine for m in members}  # compiled: `compiled` again
        engine = engines.pop() if len(engines) == 1 else "mixed"
        pytorch = [m.pytorch_model for m in members]
        window = check_window(first.window, divisor)
        return cls(
            model=EnsembleNetwork([n for m in members for n in _networks(m.model)], first.target).eval(),
            device=runs[0].device,
            channels=first.channels,
            norm=first.norm,
            patch=patch,
            target=first.target,
            divisor=divisor,
            tta=all(m.tta for m in members),
            largest_tumour=post.largest_tumour,
            et_threshold=post.et_threshold,
            min_component=post.min_component,
            overlap=first.overlap,
            amp_dtype=next((m.amp_dtype for m in runs if m.amp_dtype is not None), None),
            sw_batch_size=window_batch(runs[0].device, window or patch),
            spacing=first.spacing,
            labels=first.labels,
            window=window,
            engine=engine,
            network=first.network if len({m.network for m in members}) == 1 else None,
            pytorch_model=(EnsembleNetwork([n for p in pytorch for n in _networks(p)], first.target).eval()
                           if engine == "onnx" and all(p is not None for p in pytorch) else None),
            model_digest=digest,
            statistics=post.statistics,
            postprocess_source=post.source,
            out_channels=known[0][0] if known else None,
            member_digests=tuple(digests),
        )


def _networks(model: nn.Module) -> list[nn.Module]:
    """The networks a predictor's model averages: an ensemble's members (so a nested ensemble weighs
    each network once, not each group), the network itself uncompiled, or the model as it is."""
    model = model.model if isinstance(model, CompiledNetwork) else model
    return list(model.members) if isinstance(model, EnsembleNetwork) else [model]


BOX_SIDE = 4096  # a window side beyond any brain's box: `roi` clips it to the box, one window over it


def check_window(window: str | int | Sequence[int] | None, divisor: int) -> tuple[int, int, int] | None:
    """`window` (one size for all three axes, or three, or "box": one window over the brain's
    whole box) as three ints, or one line saying why it cannot be a sliding window for this network."""
    if window is None:
        return None
    if isinstance(window, str):
        if window != "box":
            raise TumorsegError(f"window must be three positive multiples of {divisor} or 'box', got '{window}'")
        return (BOX_SIDE,) * 3
    window = (window,) * 3 if np.ndim(window) == 0 else tuple(window)
    if len(window) != 3 or any(int(w) < 1 or (int(w) % divisor and int(w) != BOX_SIDE) for w in window):
        raise TumorsegError(f"window must be three positive multiples of {divisor} (the network's downsampling), "
                            f"got {tuple(window)}")
    return tuple(int(w) for w in window)


def onnx_runtime_installed() -> bool:
    """ONNX Runtime and the exporter's `onnx` package are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


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
        model = build_network(**state["network"])
    except (TypeError, ValueError, KeyError) as exc:
        raise TumorsegError(f"{where}: damaged checkpoint settings (network: {type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise TumorsegError(f"{where}: weights do not fit the stored network ({reason})") from None
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


class CasePrediction(NamedTuple):
    """One case predicted in its original grid.

    labels: raw labels of `convention`, uint8 (X, Y, Z).
    probabilities: float32 (K, X, Y, Z) network probabilities (before postprocessing), or None.
    affine, header: those of the case's reference scan (the grid of every output).
    convention: the label convention of `labels`.
    uncertainty: float32 (X, Y, Z) flip disagreement in bits (`window.flip_uncertainty`), or None.
    channels: what each of the K probability channels is (`probability_channels`).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    affine: np.ndarray
    header: Any
    convention: LabelConvention
    uncertainty: np.ndarray | None = None
    channels: tuple[str, ...] = ()


def probability_channels(target: str, k: int) -> tuple[str, ...]:
    """The meaning of each probability channel: the regions WT, TC, ET (sigmoid, overlapping) or
    the training classes BG, NCR, ED, ET (softmax; a fifth, RC the resection cavity, when a run keeps it)."""
    return REGIONS if target == "regions" else tuple(CLASS_ABBREVIATIONS[:k])


@dataclass
class PredictResult:
    """What a predict run did: cases predicted and their files written, cases skipped (outputs
    existed), cases failed."""

    out_dir: Path
    predicted: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def inference_box(brain: np.ndarray, patch: tuple[int, ...], divisor: int) -> Box:
    """The brain's bounding box grown (about its centre) to >= `patch` and a multiple of `divisor`.

    The box may reach outside the image; `crop` zero-pads there. An empty brain (all-zero
    scans) uses the whole image.
    """
    bbox = bounding_box(brain) or tuple((0, n) for n in brain.shape)
    box = []
    for (a, b), p in zip(bbox, patch):
        size = max(b - a, int(p))
        size = -(-size // divisor) * divisor
        start = a - (size - (b - a)) // 2
        box.append((start, start + size))
    return tuple(box)


def network_input(
    data: list[np.ndarray], predictor: Predictor, brain: np.ndarray | None = None
) -> tuple[np.ndarray, Box]:
    """Scaled, stacked channels `(C, *box size)` float32 over the inference box, and the box.

    `data` are the channels on the network's grid, `brain` their `crop.brain_mask` (None: computed
    here). Scaling uses each full volume's statistics, exactly as `prepare` does for training.
    """
    brain = brain_mask(data) if brain is None else brain
    box = inference_box(brain, predictor.patch, predictor.divisor)
    return scaled_window(data, predictor.norm, brain, box), box


def _outside_box(target: str, channels: int) -> list[float]:
    """Each probability channel's value outside the inference box: certain background."""
    return [1.0 if target == "labels" and k == 0 else 0.0 for k in range(channels)]


def _full_probabilities(probs: np.ndarray, box: Box, shape: tuple[int, ...], target: str) -> np.ndarray:
    """Box probabilities (K, ...) -> the image grid; background is certain outside the box."""
    return np.stack([uncrop(p, box, shape, fill=f) for p, f in zip(probs, _outside_box(target, len(probs)))])


class CaseInput(NamedTuple):
    """A case read and preprocessed, ready for the network (`load_input`)."""

    image: np.ndarray  # (C, *box size) float32 on the network's grid
    box: Box
    src: Grid  # the scan's grid: outputs are written on it
    net: Grid  # the network's grid
    affine: np.ndarray
    header: Any


def load_input(predictor: Predictor, case: Case) -> CaseInput:
    """Read a case's scans and preprocess them as training did (no network work: runs in a
    reader thread while the network works on the previous case)."""
    vols = load_channels(case, predictor.channels)
    warnings = check_intensities(case, predictor.channels, vols) + check_headers(case, predictor.channels)
    data, src, net = to_network_grid(vols, predictor.spacing)
    brain = brain_mask(data)
    for warning in warnings + check_brain_size(case, brain, net):
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    image, box = network_input(data, predictor, brain)
    return CaseInput(image, box, src, net, vols[0].affine, vols[0].header)


class _StitchedOnCpu(nn.Module):
    """`model` on its device for windows cut from and stitched into a volume on the CPU: MONAI's
    `sw_device` / `device` split, for a case whose stitched outputs do not fit in GPU memory."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.device, self.amp_dtype = model, device, amp_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return self.model(x.to(self.device)).float().cpu()


def _runtime_line(predictor: Predictor, amp: str) -> str:
    """Device, precision and engine; why a requested precision is not the one running."""
    if predictor.engine == "mixed":
        return (f"{describe(predictor.device, amp, predictor.amp_dtype)}, PyTorch and ONNX Runtime "
                "(networks of the ensemble)")
    if predictor.engine != "onnx":
        runtime = "PyTorch" if predictor.engine == "torch" else "PyTorch compiled (torch.compile)"
        return f"{describe(predictor.device, amp, predictor.amp_dtype)}, {runtime}"
    if amp_dtype(amp, predictor.device, predicting=True) is None:
        return f"{describe(predictor.device, amp, None)}, ONNX Runtime"
    return f"{describe(predictor.device, 'off', None)}, ONNX Runtime (its graph is float32; amp {amp} is PyTorch's)"


def predict_case(
    predictor: Predictor, case: Case, probabilities: bool = False, inp: CaseInput | None = None,
    uncertainty: bool = False, after_pass: Callable[[float, int], nn.Module | None] | None = None,
) -> CasePrediction:
    """Segment one case in its original grid (see `CasePrediction`); `inp` if already loaded.

    `uncertainty` (needs the flips of TTA) adds the voxel-wise flip disagreement. `after_pass`:
    `window.tta_probabilities`'s hook between sliding-window passes.
    Raises TumorsegError naming the case and file for a missing, unreadable or mismatched scan.
    """
    if uncertainty and not predictor.tta:
        raise TumorsegError("uncertainty comes from the TTA flips: predict with --tta")
    image, box, src, net, affine, header = inp or load_input(predictor, case)
    x, roi = torch.from_numpy(image)[None], predictor.roi(image.shape[1:])
    with torch.inference_mode():
        try:
            probs, disagreement = tta_probabilities(
                predictor.model, x.to(predictor.device), roi, predictor.target, predictor.overlap,
                predictor.tta, predictor.amp_dtype, predictor.sw_batch_size, uncertainty, after_pass,
            )
            out_of_memory = False
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # retried below: inside `except` the traceback keeps the failed pass's tensors
        if out_of_memory:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tqdm.write(f"note: {case.case_id}: out of GPU memory; retrying with the windows one at a time and stitched "
                       "on the CPU (slower)", file=sys.stderr)
            eager = predictor.model.model if isinstance(predictor.model, CompiledNetwork) else predictor.model
            model = _StitchedOnCpu(eager, predictor.device, predictor.amp_dtype)  # one window at a time: no padding
            probs, disagreement = tta_probabilities(model, x, roi, predictor.target, predictor.overlap,
                                                    predictor.tta, uncertainty=uncertainty)
    probs = probs[0]
    same = net.same_as(src)
    if disagreement is not None:  # (1, *box) on the network's grid -> the scan's grid
        flips = disagreement.cpu().numpy()
        disagreement = uncrop(flips[0], box, src.shape) if same else resample_box(flips, box, net, src, [0.0])[0]
    et_threshold, minimum = predictor.et_threshold, predictor.min_component
    if same:  # the scan's own grid (BraTS): labels in the box (on the device), then uncropped
        labels = uncrop(to_labels(probs, predictor.target), box, src.shape)
        full = _full_probabilities(probs.cpu().numpy(), box, src.shape, predictor.target) if probabilities else None
    else:  # probabilities, not labels, go back to the scan's grid (exact when only reoriented)
        full = resample_box(probs.cpu().numpy(), box, net, src, _outside_box(predictor.target, probs.shape[0]))
        labels = to_labels(full, predictor.target)
        full = full if probabilities else None
        ratio = np.prod(net.spacing) / np.prod(src.spacing)  # sizes tuned in training voxels: the same volumes here
        et_threshold, *minimum = (max(1, round(v * ratio)) if v else v for v in (et_threshold, *minimum))
    labels = postprocess(labels, predictor.largest_tumour, et_threshold, minimum)
    conv = predictor.labels or case.labels
    return CasePrediction(conv.from_training(labels), full, affine, header, conv, disagreement,
                          probability_channels(predictor.target, probs.shape[0]))


def output_paths(
    out_dir: Path, case_id: str, probabilities: bool = False, plots: bool = False, uncertainty: bool = False
) -> list[Path]:
    """The files `predict` writes for one case: labels, then probabilities, uncertainty, plot if asked."""
    paths = [out_dir / f"{case_id}.nii.gz"]
    if probabilities:
        paths.append(out_dir / f"{case_id}_probabilities.nii.gz")
    if uncertainty:
        paths.append(out_dir / f"{case_id}_uncertainty.nii.gz")
    if plots:
        paths.append(out_dir / f"{case_id}.png")
    return paths


def scans_digest(case: Case, channels: Sequence[str]) -> str | None:
    """A fingerprint of the scans a case's labels come from (`io.file_sample_digest` of each channel's
    file, in order), recorded in the label file: a re-run skips a finished case only while its
    scans are the same files (a corrected case list, a scan exported again: predicted again).
    None where a scan cannot be read (the case's own error says why)."""
    digest = hashlib.sha256()
    try:
        for m in channels:
            digest.update(f"{m}:{case.channel_index.get(m)}:{file_sample_digest(case.image(m))};".encode())
    except (TumorsegError, OSError):
        return None
    return digest.hexdigest()[:SCANS_DIGITS]


def _write(pred: CasePrediction, case: Case, paths: list[Path], probabilities: bool, plots: bool,
           made_by: str | None, scans: str | None = None) -> list[Path]:
    """Write one case's outputs (in a writer thread while the network works on the next case).

    An earlier prediction's probabilities, uncertainty and plot go first: they record no model, so
    left beside new labels (a `--force` run, another model, a run killed before its extras) they
    would pass for this prediction's.
    """
    for extra in output_paths(paths[0].parent, case.case_id, True, True, True)[1:]:
        extra.unlink(missing_ok=True)
    description = prediction_description(pred.convention, made_by, scans)
    save_nifti(paths[0], pred.labels, pred.affine, pred.header, description=description)
    if probabilities:
        probs = np.ascontiguousarray(np.moveaxis(pred.probabilities, 0, -1), dtype=np.float32)  # (X, Y, Z, K)
        save_nifti(paths[1], probs, pred.affine, pred.header,
                   description=f"tumorseg probabilities: {','.join(pred.channels)}")
    if pred.uncertainty is not None:
        save_nifti(paths[1 + probabilities], pred.uncertainty, pred.affine, pred.header,
                   description="tumorseg flip mutual information (bits)")
    if plots:
        from ..plots.slices import save_case_plot  # matplotlib only when asked for

        save_case_plot(case, paths[0], paths[-1])
    return paths


def _compile_if_it_pays(predictor: Predictor, seconds: float, passes_left: int, bar: tqdm | None) -> Predictor:
    """`predict --engine auto` after its first sliding-window pass: the predictor compiled where, at
    that pass's pace (`seconds`, in PyTorch or ONNX Runtime), the passes left win back the compiling
    (`compiled.compile_pays`); else as it is."""
    # an ensemble compiles each of its networks: its pass must pay for all of them
    if not compile_pays(seconds / predictor.members, passes_left,
                        COMPILED_SAVES_ONNX if predictor.engine == "onnx" else COMPILED_SAVES):
        return predictor
    if bar is not None:
        bar.write(f"predict: {seconds:.0f} s per sliding-window pass, {passes_left} passes to go: compiling the "
                  "network (torch.compile)", file=sys.stderr)
    fast = predictor.compiled()
    return predictor if fast.model.failure else fast  # failed: the path that ran the first pass, not eager PyTorch


def _made_by_others(out_dir: Path, made_by: str | None,
                    redone: set[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """Cases (not `redone`) whose label file in `out_dir` records another `Predictor.made_by`
    (another model or other settings), those tumorseg wrote before it recorded one (unknown), and
    the scans' fingerprint (`scans_digest`) each of this model's files records. Other tools' files
    are not judged."""
    if made_by is None or not out_dir.is_dir():
        return [], [], {}
    import nibabel as nib

    from ..evaluation.evaluate import find_predictions  # `<case>.nii[.gz]` label maps, as evaluate reads them

    try:
        files = find_predictions(out_dir)[0]
    except TumorsegError:  # none there yet
        return [], [], {}
    other, unknown, scans = [], [], {}
    for case_id, path in sorted(files.items()):
        if case_id in redone:
            continue
        try:
            header = nib.load(path).header
        except Exception:  # noqa: BLE001 - not readable as NIfTI: not judged here (evaluate names it)
            continue
        model = model_from_header(header)
        if model is not None and model != made_by:
            other.append(case_id)
        elif model is None and tumorseg_prediction(header):
            unknown.append(case_id)
        elif model is not None and (recorded := scans_from_header(header)) is not None:
            scans[case_id] = recorded
    return other, unknown, scans


def _check_one_model(out_dir: Path, other: list[str], run_ids: set[str], redo_others: bool) -> None:
    """A folder of predictions is one model's: another's files that this run would keep (skipped,
    or of cases outside it) refuse it in one line."""
    outside = set(other) - run_ids
    if outside or (other and not redo_others):
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        fix = ("predict into another folder" if outside else
               "--force redoes them with this one, or predict into another folder")
        raise TumorsegError(f"{out_dir}: {len(other)} prediction(s) there come from another model or other settings "
                            f"({shown}); {fix}")


def _rank_world() -> tuple[int, int]:
    """This process's RANK and the WORLD_SIZE under `torchrun`; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(cases: list[Case]) -> list[Case]:
    """This process's share under `torchrun` (RANK of WORLD_SIZE): every case exactly once over
    the ranks, whatever each rank finds already done; all of them otherwise."""
    rank, world = _rank_world()
    return cases[rank::world]


@contextlib.contextmanager
def _claim(out_dir: Path, outputs: list[str]) -> Iterator[None]:
    """Lock the output folder and sweep the temporaries killed runs left there.

    Under torchrun the ranks share the folder by design, so each rank r holds its own lock,
    `.tumorseg.lock.rank<r>` (rank 0 the plain one, so a plain `predict` into the folder meets
    the job): a second job is refused rank by rank. A rank sweeps only the temporaries of its
    own `outputs`: the other ranks' are live, and from other hosts their pids mean nothing here.
    """
    rank, world = _rank_world()
    with folder_lock(out_dir, "predict", LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank}"):
        sweep_stale_temps(out_dir, outputs if world > 1 else None)
        yield


def _failure(case: Case, exc: BaseException) -> str:
    if isinstance(exc, TumorsegError):
        return str(exc)
    return f"{case.case_id}: {type(exc).__name__}: {exc}"  # a resource problem (GPU memory) or a bug: still name it


def predict(
    checkpoint: str | Path | Sequence[str | Path] | Predictor,
    input_dir: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    tta: bool | None = None,
    postprocess: bool = True,
    probabilities: bool = False,
    force: bool = False,
    plots: bool = False,
    overlap: float | None = None,
    progress: bool = True,
    labels: str | None = None,
    amp: str = "auto",
    uncertainty: bool = False,
    report: bool = False,
    engine: str = "auto",
    window: str | Sequence[int] | None = None,
    cases: Collection[str] | None = None,
    redo_others: bool = False,
) -> PredictResult:
    """Segment every BraTS case under `input_dir` into `out_dir/<case_id>.nii.gz`.

    Args:
        checkpoint: a tumorseg checkpoint (`best.pt` of a run; a folder of cross-validation folds:
            their ensemble), several (their ensemble: `Predictor.from_checkpoints`), or a loaded
            `Predictor` (used as it is, except that `overlap`, `tta`, `labels`, `window` when given
            replace its own).
        input_dir: one case folder, a folder of them, or a dataset: any layout `layouts`
            knows; segmentations are not needed.
        out_dir: where predictions go (created if needed).
        device: "auto", "cpu" or "cuda".
        tta: flip test-time augmentation; None uses the checkpoint's setting.
        postprocess: apply the checkpoint's post-processing (False: the network's raw labels).
        probabilities: also write `<case_id>_probabilities.nii.gz`, float32 (X, Y, Z, K).
        force: predict cases whose outputs already exist (otherwise they are skipped).
        plots: also write `<case_id>.png`, slices with the prediction overlaid.
        overlap: sliding-window overlap in [0, 1); None: a Predictor's own, else 0.5.
        progress: show a progress bar.
        labels: label convention of the written files (a name of `labels.CONVENTIONS`: "brats2020",
            "brats2023", "msd", "peds2024");
            None writes each case in its input layout's own convention.
        amp: mixed precision, "auto" (bf16 where the GPU or CPU computes it natively, fp16 on
            older GPUs, else float32), "bf16", "fp16" or "off".
        uncertainty: also write `<case_id>_uncertainty.nii.gz`, float32: the mutual information
            between prediction and flip over the TTA flips, in bits (needs TTA).
        report: afterwards, write the `tumorseg report` of the predictions to `out_dir/report`.
        engine: "auto" (ONNX Runtime where the CPU predicts in float32, for the networks it runs
            faster, where installed; else PyTorch; either compiled after the first sliding-window
            pass where, at its pace, the passes left (TTA flips, cases) win the compiling back:
            `compiled.compile_pays`), "torch", "compile" or "onnx".
        window: sliding-window size (three sides, multiples of the network's divisor; None: the
            training patch); a side larger than the brain's box means one window across it, and
            "box" one window over the whole box.
        cases: only the cases of these ids (None: all under `input_dir`).
        redo_others: predict again this run's cases whose files another model (or other settings)
            made, instead of refusing the run (the demo's own folder, after more training).

    A folder holds one model's predictions (`Predictor.made_by`, in each label file's header): a
    run that would keep files another model made is refused in one line. A failing case is
    reported in one line and recorded in the result; the others go on. Under `torchrun` (one
    process per GPU, any number of nodes) each rank predicts its share of the cases (`shard`);
    outputs are written atomically, so a re-run skips what is done.
    """
    switches = {"tta": tta, "postprocess": postprocess, "probabilities": probabilities, "force": force, "plots": plots,
                "uncertainty": uncertainty, "report": report}
    wrong = [f"{k}={v!r}" for k, v in switches.items() if v is not None and not isinstance(v, (bool, np.bool_))]
    if wrong:  # bool("no") is True: a notebook's tta="no" would silently run the 8 flips
        raise TumorsegError(f"predict: {', '.join(wrong)}: give True or False")
    launcher = _launcher()
    out_dir = Path(out_dir)
    found = discover_cases(input_dir, only=cases)
    if isinstance(checkpoint, Predictor):
        new_window = check_window(window, checkpoint.divisor) or checkpoint.window
        predictor = replace(checkpoint, tta=checkpoint.tta if tta is None else bool(tta),
                            overlap=checkpoint.overlap if overlap is None else float(overlap),
                            labels=convention(labels) if labels else checkpoint.labels, window=new_window,
                            sw_batch_size=window_batch(checkpoint.device, new_window) if window else checkpoint.sw_batch_size)
        if isinstance(predictor.model, CompiledNetwork) and predictor.model.batch != predictor.sw_batch_size:
            predictor = replace(predictor, model=CompiledNetwork(predictor.model.model, predictor.sw_batch_size))
    else:
        predictor = Predictor.from_checkpoints(checkpoint, device=device, tta=tta, labels=labels, amp=amp,
                                               engine=engine, overlap=0.5 if overlap is None else overlap, window=window)
        if progress:
            print(f"predict: {_runtime_line(predictor, amp)}", file=sys.stderr)
        if predictor.engine == "compile" and predictor.fixed_window():
            predictor.warm_up()  # compiles before the first case
        elif predictor.engine == "compile":
            print("note: windows larger than the training patch differ from case to case; the network compiles "
                  "again for each new size", file=sys.stderr)
    if not postprocess:
        predictor = replace(predictor, largest_tumour=False, et_threshold=None, min_component=NO_COMPONENT_STEP,
                            postprocess_source=None, statistics=None)
    if progress and _rank_world()[0] == 0:
        print(f"predict: {predictor.settings_line()}", file=sys.stderr)
    if uncertainty and not predictor.tta:
        raise TumorsegError("--uncertainty comes from the TTA flips: add --tta (or use a checkpoint trained with --tta)")
    mine = shard(found)
    planned = {case.case_id: output_paths(out_dir, case.case_id, probabilities, plots, uncertainty) for case in mine}
    made_by = predictor.made_by()
    with _claim(out_dir, [p.name for paths in planned.values() for p in paths]):
        run_ids = {c.case_id for c in found}
        other, unknown, recorded = _made_by_others(out_dir, made_by, run_ids if force else set())
        _check_one_model(out_dir, other, run_ids, redo_others)
        if unknown and _rank_world()[0] == 0:
            print(f"note: {out_dir}: {len(unknown)} prediction(s) there record no model (tumorseg wrote them before "
                  "it recorded one): kept as they are; --force redoes them", file=sys.stderr)
        result = PredictResult(out_dir=out_dir)
        todo = []
        damaged, changed = [], []
        for case in mine:
            done = not force and case.case_id not in other and all(p.exists() for p in planned[case.case_id])
            if done and not all(nifti_whole(p) for p in planned[case.case_id] if p.suffix == ".gz"):
                done = False  # emptied or cut short since it was written (a full disk, a copy): redone
                damaged.append(case.case_id)
            elif done and case.case_id in recorded and recorded[case.case_id] != scans_digest(case, predictor.channels):
                done = False  # other scans under the case's name: labels of the old ones would pass for theirs
                changed.append(case.case_id)
            if done:
                result.skipped.append(case.case_id)
            else:
                todo.append(case)
        for cases_of, why in ((damaged, "with a damaged prediction file"),
                              (changed, "whose scans changed since they were predicted")):
            if cases_of:
                print(f"note: {out_dir}: {len(cases_of)} case(s) {why}, predicted again: "
                      f"{', '.join(cases_of[:3])}{', ...' if len(cases_of) > 3 else ''}", file=sys.stderr)
        bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not progress)
        # Reading the next case and writing the previous one overlap with the network's work.
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            loading = reader.submit(load_input, predictor, todo[0]) if todo else None
            writes = []
            # until a pass over a case has shown the pace; a Predictor given is used as it is
            timing = engine == "auto" and not isinstance(checkpoint, Predictor) and predictor.may_compile()
            per_case = passes(len(flip_dims(predictor.tta)))

            def paced(seconds: float, passes_left: int) -> nn.Module | None:
                nonlocal predictor, timing
                if not timing:  # the first pass decided
                    return None
                timing = False
                left = passes_left + per_case * (len(todo) - i - 1)  # this case's, then the other cases'
                predictor = _compile_if_it_pays(predictor, seconds, left, bar if progress else None)
                return predictor.model if predictor.engine == "compile" else None

            for i, case in enumerate(todo):
                current, loading = loading, reader.submit(load_input, predictor, todo[i + 1]) if i + 1 < len(todo) else None
                try:
                    pred = predict_case(predictor, case, probabilities, current.result(), uncertainty,
                                        paced if timing else None)
                    writes.append((case, writer.submit(_write, pred, case, planned[case.case_id], probabilities, plots,
                                                       made_by, scans_digest(case, predictor.channels))))
                except Exception as exc:  # noqa: BLE001 - one line naming the case, the others go on
                    result.failed[case.case_id] = _failure(case, exc)
                    bar.write(f"error: {result.failed[case.case_id]}", file=sys.stderr)
                bar.update(1)
            for case, future in writes:
                try:
                    result.written.extend(future.result())
                    result.predicted.append(case.case_id)
                except Exception as exc:  # noqa: BLE001
                    result.failed[case.case_id] = _failure(case, exc)
                    bar.write(f"error: {result.failed[case.case_id]}", file=sys.stderr)
        bar.close()
    # Under torchrun every rank waits for all (an early exit would make torchrun stop the others),
    # and the report, of all the cases, is rank 0's alone.
    _meet("predicted", launcher)
    if report and _rank_world()[0] == 0:
        from ..evaluation.evaluate import find_predictions
        from ..report import report as write_report  # matplotlib only when asked for

        if find_predictions(out_dir)[0]:  # every case failed: their lines say why, no empty report
            result.report = write_report(out_dir, images=input_dir, out=out_dir / "report", progress=progress).index
    _meet("reported", launcher)
    return result


def _meet(step: str, launcher: int | None, timeout: timedelta = timedelta(days=1)) -> None:
    """Under torchrun, wait until every rank has reached `step` (nothing otherwise).

    Prediction makes no process group: the ranks meet on torchrun's own key-value store (or rank
    0's, where torchrun shares none), with a key of their own per meeting (no group to set up, tear
    down or share with a caller's NCCL). A rank whose launcher (`launcher`, its parent's pid when it
    started) is gone stops waiting in one line instead of holding its memory for the day others may take."""
    rank, world = _rank_world()
    if world == 1:
        return
    import torch.distributed as dist

    deadline = time.monotonic() + timeout.total_seconds()
    try:
        _check_launcher(launcher, step)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it; else rank 0
        host = rank == 0 and not agent
        address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        if address not in _STORES:  # one per process: rank 0's, made anew, could not take the same port back
            _STORES[address] = dist.TCPStore(*address, world, is_master=host,
                                             timeout=STORE_CONNECT if agent else timeout)  # rank 0 may come late
        store = _STORES[address]
        key = f"tumorseg/predict/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_MEETINGS)}/{step}"
        if store.add(key, 1) == world:
            store.set(f"{key}/all", "1")
        _poll(lambda: store.check([f"{key}/all"]), launcher, step, deadline, timeout)
        store.add(f"{key}/seen", 1)
        if host:  # its store goes with it: every rank must have seen the meeting first
            _poll(lambda: store.add(f"{key}/seen", 0) >= world, launcher, step, deadline, timeout)
    except (KeyError, ValueError, RuntimeError) as exc:
        _check_launcher(launcher, step)  # a killed launcher took its store along: say that, not this
        raise TumorsegError(f"RANK and WORLD_SIZE are set but the ranks cannot meet ({type(exc).__name__}: {exc}): "
                            "start several processes with torchrun") from None


def _poll(done: Callable[[], bool], launcher: int | None, step: str, deadline: float, timeout: timedelta) -> None:
    """Until `done()`, looking at the launcher between looks (a timed-out store wait logs a warning each time)."""
    while not done():
        _check_launcher(launcher, step)
        if time.monotonic() > deadline:
            raise TumorsegError(f"not every rank reached '{step}' within {timeout}")
        time.sleep(MEETING_POLL)


_MEETINGS = itertools.count()
_STORES: dict[tuple[str, int], Any] = {}
STORE_CONNECT = timedelta(minutes=5)  # to torchrun's agent's store, up before any rank starts
MEETING_POLL = 0.05  # s between looks: the last rank to arrive leaves at once and may exit (torchrun then
# stops the others), so the ranks waiting for it must not sleep through their last lines


def _launcher() -> int | None:
    """torchrun's agent (this process's parent) where torchrun started it: `_meet` stops waiting when
    it is gone. None for ranks started otherwise (by hand, by a shell that may exit): no launcher to watch."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


def _check_launcher(launcher: int | None, step: str) -> None:
    if launcher is not None and os.getppid() != launcher:
        raise TumorsegError(f"the torchrun launcher (pid {launcher}) is gone; this rank stopped after "
                            f"'{step}': its cases are written, run the same command again for the others")
