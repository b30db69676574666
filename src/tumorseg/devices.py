"""Where the network runs and in which precision: the rules training, prediction and export share.

- Device: "auto" takes the GPU when one is visible, else the CPU; "cuda" without a GPU is a
  user error. The choice is printed, so a run that silently fell back to the CPU is visible.
- Mixed precision ("amp"): bf16 only where the GPU computes it natively (Ampere and newer:
  A100, H100, RTX 30xx+), fp16 with a gradient scaler on older GPUs (T4, V100, P100: Colab
  and Kaggle). `torch.cuda.is_bf16_supported()` counts emulation in recent PyTorch, which
  would hand a T4 a slow, emulated bf16, so we ask for native support. On a CPU that computes
  bf16 natively (AVX512-BF16 or AMX: Intel Xeon since Cooper Lake, AMD since Zen 4) "auto" is
  bf16 for prediction, about twice as fast for our 3D convolutions with the labels kept (README,
  "Measured"), and float32 for training unless "bf16" is asked for; other CPUs run float32;
  fp16 is GPU-only. A request that fell back says so in one line.
- Determinism: CUDA's 3D convolutions are nondeterministic by default, so "exact resume" holds
  bit for bit on the CPU only, unless a run asks for deterministic algorithms (slower on GPUs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .errors import TumorsegError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
AMP_MODES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")
GPU_SW_BATCH = 4  # sliding windows per network call on a GPU: fills it without risking memory at 128^3
# On the CPU too: PyTorch's per-call cost dominates small windows. Measured on 2 cores, MONAI's
# UNet 16-256 on 64^3 windows: 1.42 s for one window, 2.50 s for eight (README, "Measured"). Batches stay
# within eight 64^3 windows' voxels, so a 128^3 window (the seed's) still goes alone.
CPU_WINDOW_VOXELS = 8 * 64**3


def window_batch(device: torch.device, roi: Sequence[int]) -> int:
    """Sliding windows per network call, batched on every device (see above)."""
    if device.type == "cuda":
        return GPU_SW_BATCH
    return max(1, CPU_WINDOW_VOXELS // int(np.prod(roi)))


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """"auto" picks CUDA when present; asking for CUDA where there is none is a user error."""
    if preference not in DEVICES:
        raise TumorsegError(f"unknown device '{preference}' (choose from {', '.join(DEVICES)})")
    if preference == "cuda" and not torch.cuda.is_available():
        raise TumorsegError("--device cuda asked for, but no CUDA GPU is available (use --device cpu or auto)")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        # torchrun's processes each see every GPU; launchers that give each process its own
        # (SLURM's --gpus-per-task) show one, as cuda:0, whatever the local rank
        visible = torch.cuda.device_count()
        if visible == 1:
            return torch.device("cuda", 0)
        if local_rank >= visible:  # two ranks on one GPU: NCCL refuses, prediction would share it
            raise TumorsegError(f"LOCAL_RANK {local_rank}, but {visible} GPUs are visible: run at most {visible} "
                                "processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """True where the device computes bf16 in hardware (not emulated)."""
    if device.type == "cpu":  # PyTorch's own CPU probes (private, hence the getattr for other versions)
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # PyTorch < 2.4 had no emulation in this check
        return torch.cuda.is_bf16_supported()


def amp_dtype(mode: str, device: torch.device, predicting: bool = False) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device`; None means float32 (amp off, or not on this device).

    On a CPU with native bf16, "auto" is bf16 when `predicting` (measured to keep the labels at
    about half the time, README "Measured"); training there stays float32 unless bf16 is asked for.
    """
    if mode not in AMP_MODES:
        raise TumorsegError(f"unknown amp '{mode}' (choose from {', '.join(AMP_MODES)})")
    if mode == "off":
        return None
    if device.type != "cuda":
        wanted = mode == "bf16" or (mode == "auto" and predicting)
        return torch.bfloat16 if wanted and native_bf16(device) else None
    if mode == "fp16" or (mode == "auto" and not native_bf16(device)):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` (`amp_dtype`) on `device`; off, so float32, for None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def precision_name(dtype: torch.dtype | None) -> str:
    """"bf16", "fp16", or "float32" for None (`amp_dtype`'s answers)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "float32")


def describe(device: torch.device, mode: str, dtype: torch.dtype | None) -> str:
    """One line for the console: the device, the precision, and why when a request fell back."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    line = f"device {device} ({name}), {precision_name(dtype)}"
    if mode == "fp16" and device.type != "cuda":
        line += " (amp fp16 asked for, but no CUDA GPU is visible: running on the CPU in float32)"
    elif mode == "bf16" and dtype is None:
        line += " (amp bf16 asked for, but this CPU has no native bf16: no AVX512-BF16 or AMX)"
    return line


@contextlib.contextmanager
def deterministic(enabled: bool, fixed_shapes: bool = True) -> Iterator[None]:
    """Deterministic algorithms (bitwise repeatable on GPUs, slower) or cuDNN autotuning.

    Without determinism, `cudnn.benchmark` picks the fastest convolution algorithms for the
    fixed patch size once (a standard speed-up for fixed-size inputs). Global flags are restored
    on exit, so a library caller's own settings survive.
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
            # warn_only: CUDA has no deterministic 3D max-pool or trilinear-upsampling backward; those
            # warn (and stay nondeterministic) instead of stopping the run with a traceback
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        else:
            torch.backends.cudnn.benchmark = fixed_shapes
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[4])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
