"""The GPU path kept honest on a CPU-only machine: devices, mixed precision, resume, DDP tuning.

Autocast runs on the CPU in bfloat16 and float16 (with the gradient scaler enabled) through the
same code a GPU runs; the `meta` device stands in for "not the CPU" to catch tensors left behind.
"""

import importlib
import inspect
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tumorseg import devices
from tumorseg.checkpoint import load_checkpoint, save_checkpoint
from tumorseg.errors import TumorsegError
from tumorseg.data import PreparedDataset, eval_transform, make_loader, train_transform
from tumorseg.inference import Predictor, case_statistics, choose_postprocessing, predict_case, tune_postprocessing
from tumorseg.layouts import discover_cases
from tumorseg.networks import NETWORKS, build_network, network_spec, required_divisor
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.training import TrainConfig, build_loss, train
from tumorseg.training.distributed import DistContext
from tumorseg.training.engine import train_epoch, validate

from factory import native_cpu_bf16, write_case

train_module = importlib.import_module("tumorseg.training.train")
CPU = torch.device("cpu")
CTX = DistContext(rank=0, world_size=1, local_rank=0, device=CPU)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    for i in range(3):
        write_case(root / "raw", f"c{i}", shape=(40, 40, 32), seed=i)
    cfg = PrepareConfig(channels=("t1", "t1ce", "t2", "flair"), crop_size=(32, 32, 32), val_fraction=0.34)
    prepare(root / "raw", root / "prep", cfg, workers=1, progress=False)
    return root


@pytest.mark.parametrize("target", ["labels", "regions"])
@pytest.mark.parametrize("weights", [None, "given"])
@pytest.mark.parametrize("heads", [0, 3])
def test_every_loss_follows_its_module_to_another_device(target, weights, heads):
    channels = 4 if target == "labels" else 3
    loss = build_loss(target, [0.1 * (i + 1) for i in range(channels)] if weights else None).to("meta")
    tensors = [t for m in loss.modules() for t in (*m.buffers(recurse=False), *m.parameters(recurse=False),
                                                    *(v for v in vars(m).values() if isinstance(v, torch.Tensor)))]
    assert all(t.device.type == "meta" for t in tensors)  # nothing left behind on the CPU
    if target == "regions" and not weights:  # MONAI's Dice checks class weights' values (.item()): not on meta
        shape = (2, heads, channels, 8, 8, 8) if heads else (2, channels, 8, 8, 8)
        logits = torch.randn(shape, device="meta")
        labels = torch.zeros((2, 1, 8, 8, 8), dtype=torch.long, device="meta")
        assert loss(logits, labels).device.type == "meta"  # a tensor made on the CPU inside would raise here


class FakeCuda:
    """What `torch.cuda` answers on a GPU with or without native bf16 (T4 vs A100)."""

    def __init__(self, native: bool):
        self.native = native

    def __call__(self, including_emulation: bool = True) -> bool:
        return self.native or including_emulation


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_takes_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", FakeCuda(native))
    gpu = torch.device("cuda", 0)
    assert devices.amp_dtype("auto", gpu) == expected
    assert devices.amp_dtype("bf16", gpu) == torch.bfloat16 and devices.amp_dtype("fp16", gpu) == torch.float16
    assert devices.amp_dtype("off", gpu) is None and devices.amp_dtype("auto", CPU) is None
    assert "fp16 asked for, but no CUDA GPU is visible" in devices.describe(CPU, "fp16", None)
    assert devices.describe(CPU, "auto", None) == "device cpu (CPU), float32"


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_only_where_the_cpu_computes_it(monkeypatch, native):
    native_cpu_bf16(monkeypatch, native)
    assert devices.native_bf16(CPU) is native
    assert devices.amp_dtype("bf16", CPU) == (torch.bfloat16 if native else None)
    assert devices.amp_dtype("fp16", CPU) is None and devices.amp_dtype("off", CPU) is None
    # auto: bf16 for prediction where native (measured to keep the labels); training stays float32
    assert devices.amp_dtype("auto", CPU, predicting=True) == devices.amp_dtype("bf16", CPU)
    assert devices.amp_dtype("auto", CPU) is None and devices.amp_dtype("off", CPU, predicting=True) is None
    line = devices.describe(CPU, "bf16", devices.amp_dtype("bf16", CPU))
    assert (line == "device cpu (CPU), bf16") if native else ("this CPU has no native bf16: no AVX512-BF16 or AMX" in line)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # another PyTorch without the probe: float32
    assert devices.amp_dtype("bf16", CPU) is None


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_run_asking_for_bf16_trains_in_it_where_native(prepared, tmp_path, capsys, monkeypatch, native):
    native_cpu_bf16(monkeypatch, native)
    real, seen = train_module.train_epoch, []

    def spy(*args, **kwargs):
        seen.append(inspect.signature(real).bind(*args, **kwargs).arguments["amp_dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", spy)
    config = TrainConfig(epochs=1, filters=[4, 8, 16], amp="bf16", seed=0)
    train(prepared / "prep", tmp_path / "run", config, progress=False)
    assert seen == [torch.bfloat16 if native else None]
    err = capsys.readouterr().err
    assert ("device cpu (CPU), bf16," if native else "float32 (amp bf16 asked for, but this CPU has no native bf16") in err


def _tiny_spec(name: str) -> dict:
    return network_spec(name, 4, 3, [4, 8, 16], deep_supervision=name == "dynunet")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_trains_validates_tunes_and_predicts_under_autocast(prepared, name, dtype):
    """The CUDA code path (autocast, fp16 scaler, sliding windows, TTA) run on the CPU."""
    torch.manual_seed(0)
    spec = _tiny_spec(name)
    model = build_network(**spec)
    loss_fn = build_loss("regions").to(CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    patch = [16, 16, 16]
    prep = prepared / "prep"
    data = PreparedDataset(prep, ["c0", "c1"], train_transform(patch, [32, 32, 32], "light", 0.5))
    loader = make_loader(data, 2, True, 0, 0, 0, 1)
    loss = train_epoch(model, loader, loss_fn, optimizer, scaler, CTX, 0, steps=1, amp_dtype=dtype, progress=False)
    assert np.isfinite(loss)
    if dtype == torch.float16:
        assert scaler.get_scale() > 0 and scaler.state_dict()
    stats: list = []
    val_loss, dice = validate(model, PreparedDataset(prep, ["c2"], eval_transform()), loss_fn, CTX, [32, 32, 32],
                              "regions", dtype, False, stats)
    assert np.isfinite(val_loss) and set(dice) == {"WT", "TC", "ET"}
    assert set(choose_postprocessing(stats, (10, 100), (5, 50))) == {"largest_tumour", "et_threshold", "min_component",
                                                                     "lesion_dice"}
    predictor = Predictor(model.eval(), CPU, ("t1", "t1ce", "t2", "flair"), "minmax", (32, 32, 32), "regions",
                          required_divisor(name, spec["filters"]), tta=True, overlap=0.25, amp_dtype=dtype,
                          sw_batch_size=2)
    pred = predict_case(predictor, discover_cases(prepared / "raw" / "c0")[0])
    assert pred.labels.shape == (40, 40, 32) and set(np.unique(pred.labels)) <= {0, 1, 2, 4}


def test_postprocessing_tuning_needs_only_per_case_numbers():
    """Under DDP only `case_statistics` travel between ranks, and they decide the same."""
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for _ in range(4):
        gt = np.zeros((24, 24, 24), np.uint8)
        gt[6:16, 6:16, 6:16] = 2
        gt[8:12, 8:12, 8:12] = 3
        pred = gt.copy()
        pred[20:23, 20:23, 20:23] = 2  # an island the largest-tumour step removes
        pred[rng.integers(0, 24, 30), rng.integers(0, 24, 30), rng.integers(0, 24, 30)] = 3
        gts.append(gt)
        preds.append(pred)
    stats = [case_statistics(p, g) for p, g in zip(preds, gts)]
    gathered = pickle.loads(pickle.dumps(stats))  # as `all_gather_object` sends them between ranks
    chosen = choose_postprocessing(gathered, (5, 50, 500), (2, 20))
    assert chosen == tune_postprocessing(preds, gts, (5, 50, 500), (2, 20)) and chosen["largest_tumour"]
    assert len(repr(stats[0])) < 3000  # a few numbers per case and predicted component, not 24^3 voxels


def _run(prepared, run_dir, monkeypatch, amp, epochs, resume=False):
    """Train on the CPU as if on a GPU with `amp` (None: float32), through the real `train`."""
    monkeypatch.setattr(train_module, "resolve_amp", lambda mode, device: amp)
    config = TrainConfig(epochs=epochs, filters=[4, 8, 16], batch_size=2, patch=[16, 16, 16], seed=0)
    return train(prepared / "prep", run_dir, config, resume=resume, progress=False)


@pytest.mark.parametrize("first, second", [(None, torch.float16), (torch.bfloat16, torch.float16), (torch.float16, None)])
def test_resume_across_amp_settings(prepared, tmp_path, monkeypatch, first, second):
    _run(prepared, tmp_path / "run", monkeypatch, first, 1)
    saved = load_checkpoint(tmp_path / "run/last.pt")["scaler"]
    assert bool(saved) == (first == torch.float16)
    result = _run(prepared, tmp_path / "run", monkeypatch, second, 2, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_resume_with_fewer_gpus_than_saved(prepared, tmp_path, monkeypatch):
    """A run saved with 8 CUDA generator states (older checkpoints) resumes where none is visible."""
    _run(prepared, tmp_path / "run", monkeypatch, None, 1)
    state = load_checkpoint(tmp_path / "run/last.pt")
    assert "cuda" not in state["rng"]  # nothing device-count dependent is stored any more
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    save_checkpoint(tmp_path / "run/last.pt", {k: v for k, v in state.items() if k != "format"})
    assert len(_run(prepared, tmp_path / "run", monkeypatch, None, 2, resume=True).history) == 2


def test_deterministic_mode_is_scoped(monkeypatch):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # the environment a caller's settings live in too
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    with devices.deterministic(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with devices.deterministic(False):
        assert torch.backends.cudnn.benchmark  # fixed-size patches: let cuDNN pick its fastest kernels
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def _floor(spec: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def test_declared_version_floors_hold_what_the_code_uses():
    """Python >= 3.11 for `tomllib`; torch >= 2.3 for `torch.amp.GradScaler(device)`."""
    text = (ROOT / "pyproject.toml").read_text()
    python = _floor(re.search(r'requires-python\s*=\s*"([^"]+)"', text).group(1))
    torch_floor = _floor(re.search(r'"(torch>=[^"]+)"', text).group(1))
    sources = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    if re.search(r"^\s*import tomllib", sources, re.M):
        assert python >= (3, 11)
    if "torch.amp.GradScaler(" in sources:
        assert torch_floor >= (2, 3)
    assert sys.version_info[:2] >= python[:2]
    assert tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= torch_floor[:2]


def test_windows_are_batched_within_a_memory_budget():
    assert devices.window_batch(CPU, (64, 64, 64)) == 8 and devices.window_batch(CPU, (128, 128, 128)) == 1
    assert devices.window_batch(CPU, (96, 96, 96)) == 2 and devices.window_batch(torch.device("cuda", 0), (128,) * 3) == 4


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 3, 3), (1, 3, 0), (2, 3, None)])
def test_each_rank_takes_a_gpu_of_its_own(monkeypatch, visible, local_rank, expected):
    """torchrun's processes see every GPU (rank r takes cuda:r); launchers that give each process its
    own (SLURM's --gpus-per-task=1) show it as cuda:0 whatever the rank; more ranks than GPUs is
    one line (two ranks on one GPU: NCCL refuses)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if expected is None:
        with pytest.raises(TumorsegError, match="LOCAL_RANK 3, but 2 GPUs are visible: run at most 2 processes"):
            devices.resolve_device("auto", local_rank)
    else:
        assert devices.resolve_device("auto", local_rank) == torch.device("cuda", expected)
