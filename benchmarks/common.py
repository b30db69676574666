"""Helpers the benchmark scripts share: device choice, CPU name, writing results."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

from tumorseg.io import write_text


def pick_device(choice: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; "cuda" without a GPU is an error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_results(out: Path, res: dict, print_table: Callable[[dict], None]) -> None:
    """Write the JSON results atomically, print the human table, say where the file went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(res, indent=1))
    print_table(res)
    print(f"wrote {out}")
