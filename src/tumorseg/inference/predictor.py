"""A trained model ready to predict: its network (or an ensemble's, or an exported ONNX model),
the device, and everything training decided about the input and the labels (channels, scaling,
spacing, patch, target, label convention, TTA, post-processing), read from a checkpoint and
checked before any case is touched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import checkpoint_file, checkpoint_files, read_checkpoint
from ..devices import amp_dtype, autocast, resolve_device, window_batch
from ..errors import TumorsegError
from ..io import file_digest
from ..labels import MODEL_DIGITS, REGIONS, LabelConvention, convention
from ..log import say
from ..networks import required_divisor
from .compiled import CompiledNetwork, compiles_faster
from .ensemble import EnsembleNetwork, check_members, ensemble_postprocessing, member_digests
from .model_state import check_state, network_from_state
from .postprocess import NO_COMPONENT_STEP
from .window import check_window

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

    def eager(self) -> nn.Module:
        """The PyTorch network without its compiled wrapper (the out-of-memory retry runs it window
        by window)."""
        return _uncompiled(self.model)

    def with_settings(self, tta: bool | None = None, overlap: float | None = None, labels: str | None = None,
                      window: str | Sequence[int] | None = None) -> "Predictor":
        """This predictor with the settings given (None: as they are); a compiled network batches
        the windows a new window size fits."""
        new_window = check_window(window, self.divisor) or self.window
        predictor = replace(self, tta=self.tta if tta is None else bool(tta),
                            overlap=self.overlap if overlap is None else float(overlap),
                            labels=convention(labels) if labels else self.labels, window=new_window,
                            sw_batch_size=window_batch(self.device, new_window) if window else self.sw_batch_size)
        if isinstance(predictor.model, CompiledNetwork) and predictor.model.batch != predictor.sw_batch_size:
            predictor = replace(predictor, model=CompiledNetwork(predictor.model.model, predictor.sw_batch_size))
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
                say(f"note: {checkpoint}: ONNX Runtime's CUDA provider is not installed or did not load "
                    "(onnxruntime-gpu, built for this CUDA); the exported model runs on the CPU")
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
        out_channels = check_members(members, names)
        digests = member_digests(members, names)
        divisor = math.lcm(*(m.divisor for m in members))
        patch = tuple(-(-max(sides) // divisor) * divisor for sides in zip(*(m.patch for m in members)))
        post = ensemble_postprocessing(members, names)
        digest = (hashlib.sha256(("ensemble:" + ",".join(sorted(set(digests)))).encode()).hexdigest()
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
            out_channels=out_channels,
            member_digests=tuple(digests),
        )


def _networks(model: nn.Module) -> list[nn.Module]:
    """The networks a predictor's model averages: an ensemble's members (so a nested ensemble weighs
    each network once, not each group), the network itself uncompiled, or the model as it is."""
    model = _uncompiled(model)
    return list(model.members) if isinstance(model, EnsembleNetwork) else [model]


def _uncompiled(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, CompiledNetwork) else model


def onnx_runtime_installed() -> bool:
    """ONNX Runtime and the exporter's `onnx` package are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
