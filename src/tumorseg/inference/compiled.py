"""The network compiled by `torch.compile` (Inductor) for prediction, and when that pays.

Inductor with weight freezing (`torch._inductor.config.freezing`, inference only: the weights
become constants, so convolutions run on oneDNN's pre-packed weights and the normalisation,
activation and precision casts between them fuse into few kernels) ran our UNet3D's 128^3
window in 0.58 s against 0.99 s uncompiled in bf16 and 0.97 against 1.93 s in float32 on this
project's 2-core CPU, with the same labels (README, "Measured"). Compiling costs 7-18 s once per
process here (the less, the more of the kernels Inductor's on-disk cache holds), so `predict
--engine auto` runs the first sliding-window pass over the first case uncompiled (in PyTorch or ONNX
Runtime) and compiles for the passes left (the case's other TTA flips, the other cases) only where,
at that pass's pace, they win the cost back (`compile_pays`): never for a handful of windows or a
small network. A failed compilation (no C++ compiler, a platform Inductor does not
support) costs a one-line note, and the run goes on uncompiled.
"""

from __future__ import annotations

import torch
from torch import nn

from ..log import say

# Networks whose cases compiled took at most 0.64x of their time uncompiled at their default
# widths, in bf16 and in float32 (`bench_predict.py --engines torch,compile`, 128^3 windows, two
# runs, README "Measured"): our UNet3D (0.56-0.64x bf16, 0.44-0.49x float32) and DynUNet (0.60-0.61x,
# 0.57-0.58x). MONAI's SegResNet, UNet and unet-lite gained 0-29 % at theirs, too little for the compiling.
COMPILE_FASTER: frozenset[str] = frozenset({"unet3d", "dynunet"})
COMPILE_SECONDS = 25.0  # a budget: compiling UNet3D or DynUNet took 7-14 s here with Inductor's cache warm, 17.5 s cold
COMPILED_SAVES = 0.4  # of the time in PyTorch, for those networks (0.36-0.56 of a case's measured)
COMPILED_SAVES_ONNX = 0.25  # of UNet3D's time in ONNX Runtime, float32 (0.28 measured)


def compiles_faster(network: str | None, device: torch.device, fixed_window: bool) -> bool:
    """Whether `predict --engine auto` considers compiling: on the CPU (the GPU's gain is not
    measured here), for a network in `COMPILE_FASTER`, with windows of one size (each new window
    shape compiles again)."""
    return device.type == "cpu" and network in COMPILE_FASTER and fixed_window


def compile_pays(seconds: float, repeats_left: int, saves: float = COMPILED_SAVES) -> bool:
    """Whether the work left, `repeats_left` times a piece that took `seconds` uncompiled, each
    saving that fraction of it, saves more than compiling costs."""
    return repeats_left * seconds * saves > COMPILE_SECONDS


class CompiledNetwork(nn.Module):
    """`model` run through `torch.compile` with frozen weights, uncompiled from the first failure on.

    Each input shape (and memory layout) compiles once, at its first call: call it once on a batch
    of `batch` zero windows to pay that before the first case (`Predictor.warm_up`). Inputs are made
    contiguous (the sliding window passes views into the volume, whose strides differ), and a batch
    smaller than `batch` (the last windows of a pass) is padded to it, so one compiled graph serves
    a run.
    """

    def __init__(self, model: nn.Module, batch: int = 1) -> None:
        super().__init__()
        self.model = model
        self.batch = batch
        self.failure: str | None = None
        self._forward = None  # the compiled `model.forward`: a function, so not a second copy in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failure is not None:
            return self.model(x)
        # `torch.compile(..., options={"freezing": True})` compiled without freezing here (0.88 s
        # against 0.58 s a seed window), so Inductor's setting is patched while a call may compile;
        # only the network's thread compiles in `predict`.
        from torch._inductor import config

        n = x.shape[0]
        padded = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))]) if n < self.batch else x.contiguous()
        try:
            if self._forward is None:
                self._forward = torch.compile(self.model.forward, dynamic=False)
            with config.patch(freezing=True):
                return self._forward(padded)[:n]
        except torch.cuda.OutOfMemoryError:
            raise  # the caller's retry, not a compiler problem
        except Exception as exc:  # noqa: BLE001 - the compiler's failure, unless the network fails too
            out = self.model(x)  # raises the network's own error where the input is at fault
            cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # Dynamo wraps the backend's error
            self.failure = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
            say(f"note: torch.compile failed ({self.failure}); predicting uncompiled")
            return out
