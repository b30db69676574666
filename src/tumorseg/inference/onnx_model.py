"""`tumorseg export`: a checkpoint -> one self-describing ONNX model, and that model run by ONNX Runtime.

ONNX Runtime is also `predict`'s default engine on the CPU for the networks it ran faster than
PyTorch on this project's machine (`predictor.ONNX_FASTER`; `runtime_network` exports the
checkpoint's network in memory when prediction starts; README, "Measured").

The exported file holds the network in eval mode (for deep supervision, only the
full-resolution head, as eval mode returns it) with dynamic batch and spatial axes: input
"image" `(B, C, X, Y, Z)` float32, output "logits" `(B, K, X, Y, Z)` float32, X, Y, Z
multiples of the network's divisor. Its `metadata_props` key "tumorseg" holds, as JSON, every
setting of the checkpoint that prediction needs (network, prepare, patch, target, label map,
regions, inference, layout, labels, format, versions): everything but the weights and the
training state. So `tumorseg predict MODEL.onnx CASES OUT` needs the file alone.

Exporter and opset: PyTorch's TorchScript exporter (`dynamo=False`) at ONNX opset 17 (`OPSET`).
It exports our UNet3D, MONAI's UNet (and `unet-lite`), SegResNet and DynUNet with dynamic axes in about a
second and needs no package beyond `onnx`; the `torch.export`-based exporter (PyTorch's default
since 2.9) gives the same outputs but takes 10-15 s per network here and needs `onnxscript`.
PyTorch marks the TorchScript exporter deprecated; its warnings are silenced here and the
tests check the outputs against PyTorch's. Opset 17 is read by every ONNX Runtime since 1.12
(and OpenVINO, TensorRT 8.6) and holds every operator these networks use.

Normalisation over input statistics (instance norm; SegResNet's group norm) is exported as
per-axis means (`_ExportNorm`), not as ONNX's InstanceNormalization: ONNX Runtime sums that
over the whole window in float32, which put a UNet's logits 1e-3 off PyTorch's on a real case
at 96^3 windows; with per-axis means they agree to 1e-5.

`onnx` and `onnxruntime` are the extra `pip install 'tumorseg[onnx]'` (the Makefile installs it):
imported here, inside the functions, so the rest of tumorseg works without them (prediction then
runs in PyTorch).
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..checkpoint import checkpoint_file, read_checkpoint
from ..errors import TumorsegError
from ..io import atomic_path
from ..log import say
from ..networks import network_spec, required_divisor
from .model_state import check_state, network_from_state

MIN_OPSET, MAX_OPSET = 13, 20  # every network exports and runs from 13 (SegResNet); 20: the TorchScript exporter's last
OPSET = 17
METADATA_KEY = "tumorseg"
TRAINING_ONLY: tuple[str, ...] = ("model", "optimizer", "scheduler", "scaler", "rng", "history")
INSTALL_HINT = "install the ONNX extra: pip install 'tumorseg[onnx]'"


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise TumorsegError(INSTALL_HINT) from None


def _plain(value: Any) -> Any:
    """JSON-ready copy: tensors and numpy values become numbers or lists, tuples lists, keys strings."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # a Path or another plain object: its text


def _staged_mean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean over `dims`, one axis at a time: each step sums at most one side of the window."""
    for d in sorted(dims, reverse=True):
        x = x.mean(dim=d, keepdim=True)
    return x


class _ExportNorm(nn.Module):
    """Instance or group normalisation over input statistics, written as per-axis means for export.

    ONNX Runtime's InstanceNormalization (which the exporter also uses for GroupNorm) sums a
    whole window in float32: 5e-5 off at 96^3 on its own, 1e-3 in a UNet's logits on a real
    case, growing with the window. Staged means keep float32 as close to float64 as PyTorch's
    own kernels (1e-5 at 96^3) for 0-25 % more network time in ONNX Runtime (measured at 64^3, 96^3).
    """

    def __init__(self, norm: nn.GroupNorm | nn.InstanceNorm3d) -> None:
        super().__init__()
        self.groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else None
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.unflatten(1, (self.groups, -1)) if self.groups else x  # (B, G, C/G, X, Y, Z) or (B, C, X, Y, Z)
        dims = tuple(range(2, y.ndim))
        centred = y - _staged_mean(y, dims)
        y = centred / torch.sqrt(_staged_mean(centred * centred, dims) + self.eps)
        y = y.flatten(1, 2) if self.groups else y
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _exportable(model: nn.Module) -> nn.Module:
    """`model` with every normalisation over input statistics replaced by `_ExportNorm` (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm) or (isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats):
                setattr(module, name, _ExportNorm(child))
    return model


def _onnx_proto(model: nn.Module, spec: dict[str, Any], opset: int, where: str) -> Any:
    """`model` (left unchanged) traced to an ONNX ModelProto with dynamic batch and spatial axes."""
    onnx = _require("onnx")
    model = _exportable(copy.deepcopy(model).cpu().eval())
    side = 2 * required_divisor(spec["name"], spec.get("filters"))  # small: tracing runs one forward pass
    example = torch.zeros(1, spec["in_channels"], side, side, side)
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    buffer = io.BytesIO()
    # PyTorch >= 2.5 picks the exporter with `dynamo` (default True since 2.9); older ones have only TorchScript's
    torchscript = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and the networks' shape-check trace notes
        try:
            torch.onnx.export(model, (example,), buffer, opset_version=int(opset), input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, **torchscript)
        except (ValueError, RuntimeError) as exc:
            raise TumorsegError(f"{where}: cannot export at opset {opset} ({str(exc).splitlines()[0]})") from None
    return onnx.load_from_string(buffer.getvalue())


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = OPSET) -> Path:
    """Write the checkpoint's network and settings as one ONNX model (see the module docstring).

    Args:
        checkpoint: a tumorseg checkpoint (`best.pt` of a run).
        out: the `.onnx` file to write (atomically; folders are created).
        opset: ONNX opset (default `OPSET`).

    Returns:
        `out` as a Path.

    Raises:
        TumorsegError: `out` not named *.onnx, unreadable checkpoint, weights that do not fit
            its network, an opset the exporter cannot write, or the ONNX extra missing.
    """
    onnx = _require("onnx")
    checkpoint, out = checkpoint_file(checkpoint), Path(out)  # a run folder: its best.pt
    if out.suffix.lower() != ".onnx":
        raise TumorsegError(f"{out}: name the exported model *.onnx (predict knows it by that)")
    if not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= int(opset) <= MAX_OPSET:  # below: operators the networks use are missing; above:
        raise TumorsegError(f"opset {opset}: export supports {MIN_OPSET}-{MAX_OPSET}")  # the exporter dumps its graph
    state, digest = read_checkpoint(checkpoint)
    check_state(state, str(checkpoint))
    proto = _onnx_proto(network_from_state(state, str(checkpoint)), state["network"], opset, str(checkpoint))
    settings = {k: v for k, v in state.items() if k not in TRAINING_ONLY}
    settings["export"] = {"opset": int(opset), "exporter": "torchscript", "tumorseg_version": __version__,
                          "torch_version": str(torch.__version__), "onnx_version": onnx.__version__,
                          # predictions from the export and from the checkpoint carry the same `made_by`
                          "checkpoint_sha256": digest}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(_plain(settings))
    proto.doc_string = f"tumorseg {state['network']['name']} exported from {checkpoint.name}"
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise TumorsegError(f"{checkpoint}: the exported model fails ONNX's checker ({str(exc).splitlines()[0]})") from None
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return out


def runtime_network(model: nn.Module, spec: dict[str, Any], device: torch.device, where: str,
                    required: bool = False) -> tuple[nn.Module, str]:
    """`model` exported in memory and run by ONNX Runtime: `(OnnxNetwork, "onnx")`.

    Not `required` (the "auto" engine): where the export or the runtime fails, a one-line note
    and `(model, "torch")`, so prediction goes on in PyTorch.
    """
    refusal = ("--engine onnx on a GPU needs onnxruntime-gpu built for this CUDA (ONNX Runtime would run on the "
               "CPU); use --engine auto or torch")
    try:
        if device.type == "cuda" and "CUDAExecutionProvider" not in _require("onnxruntime").get_available_providers():
            raise TumorsegError(refusal)  # before exporting the network for nothing
        network = OnnxNetwork(_onnx_proto(model, spec, OPSET, where).SerializeToString(), device, where)
        if network.device.type != device.type:  # a CUDA provider whose CUDA libraries did not load
            raise TumorsegError(refusal)
        return network, "onnx"
    except Exception as exc:  # auto: any failure of the exporter or the runtime leaves PyTorch's path
        if required:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        say(f"note: {reason}; predicting with PyTorch")
        return model, "torch"


class OnnxNetwork(nn.Module):
    """An exported model run by ONNX Runtime, called like the PyTorch network it came from.

    `(B, C, X, Y, Z)` -> logits `(B, K, X, Y, Z)` float32 on the input's device. Input of any
    dtype (autocast's bf16 or fp16 included) is given to the runtime as float32. It has no
    parameters, so `.eval()`, `.to(device)` and `torch.no_grad()` change nothing; the runtime
    uses CUDA when its GPU build is installed and `device` is not the CPU, else as many CPU
    threads as PyTorch would (`torch.get_num_threads()`); the `device` attribute says which it got.

    Args:
        model: the `.onnx` file (read by `load_onnx`, which also checks it), or the model's bytes.
        device: where the caller's tensors live; None: CUDA when the runtime has it.
        name: how errors name the model (default: the file).
    """

    def __init__(self, model: str | Path | bytes, device: torch.device | None = None, name: str | None = None) -> None:
        super().__init__()
        ort = _require("onnxruntime")
        self.name = name or str(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as PyTorch: OMP_NUM_THREADS, torchrun, set_num_threads
        # idle runtime threads sleep instead of spinning: between calls the sliding window blends in PyTorch
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and (device is None or device.type == "cuda"):
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": (device.index or 0) if device is not None else 0}))
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=providers)
        except Exception as exc:  # the runtime's own errors: corrupt or unsupported file
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise TumorsegError(f"{self.name}: not a readable ONNX model ({reason})") from None
        # where the runtime computes: asked for CUDA, it falls back to the CPU with only a log line
        # when the CUDA provider's libraries do not load
        cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda", providers[0][1]["device_id"]) if cuda else torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, X, Y, Z)` -> logits `(B, K, X, Y, Z)` float32 on `x.device`."""
        image = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        logits = self.session.run(["logits"], {"image": image})[0]
        return torch.from_numpy(logits).to(x.device)


def load_onnx(path: str | Path, device: torch.device | None = None) -> tuple[OnnxNetwork, dict[str, Any]]:
    """An exported model and its settings, as `load_checkpoint` gives them minus the weights.

    Raises:
        TumorsegError: one line naming the file: missing, unreadable, not exported by tumorseg
            (no "tumorseg" metadata), or the ONNX extra missing.
    """
    path = Path(path)
    if not path.is_file():
        raise TumorsegError(f"{path}: ONNX model not found")
    network = OnnxNetwork(path, device)
    text = network.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        state = json.loads(text) if text else None
        if not isinstance(state, dict) or not isinstance(state.get("network"), dict):
            raise ValueError
        state["network"] = network_spec(**state["network"])  # tuples back, and checked
        if isinstance(state.get("label_map"), dict):
            state["label_map"] = {int(k): v for k, v in state["label_map"].items()}
    except (ValueError, TypeError, TumorsegError):
        raise TumorsegError(f"{path}: not a tumorseg model (no '{METADATA_KEY}' settings; write one with tumorseg export)") from None
    return network, state
