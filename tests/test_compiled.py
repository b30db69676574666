"""Prediction through `torch.compile`: same outputs, the fallback, and when `predict --engine auto` compiles."""

import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from tumorseg.checkpoint import save_checkpoint
from tumorseg.cli import build_parser, main
from tumorseg.errors import TumorsegError
from tumorseg.inference import Predictor, predict, predict_case
from tumorseg.inference import compiled as compiled_module
from tumorseg.io import load_nifti
from tumorseg.inference.compiled import (COMPILE_SECONDS, COMPILED_SAVES, COMPILED_SAVES_ONNX, CompiledNetwork,
                                        compile_pays, compiles_faster)
from tumorseg.layouts import discover_cases
from tumorseg.networks import build_network

from factory import native_cpu_bf16, write_case
from test_predict import _state

CPU = torch.device("cpu")
PREDICT = sys.modules["tumorseg.inference.predict"]
PREDICTOR = sys.modules["tumorseg.inference.predictor"]


def test_compiled_prediction_equals_pytorch(tmp_path, capsys):
    """A real compilation (skipped where this machine cannot compile): a small UNet3D, float32, a
    whole case with TTA, its windows views into the volume and the last batch short: one graph."""
    from torch._dynamo.utils import counters

    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    case = discover_cases(tmp_path / "raw")[0]
    state = _state(tta=True)
    eager, fast = (Predictor.from_checkpoint(state, device="cpu", engine=e, amp="off") for e in ("torch", "compile"))
    assert fast.engine == "compile" and isinstance(fast.model, CompiledNetwork) and fast.network == "unet3d"
    fast = replace(fast, sw_batch_size=3, model=CompiledNetwork(fast.model.model, 3))  # 8 windows a pass: 3 + 3 + 2
    graphs = counters["stats"]["unique_graphs"]
    fast.warm_up()
    if fast.model.failure:
        pytest.skip(f"torch.compile does not work here: {fast.model.failure}")
    a, b = (predict_case(p, case, probabilities=True) for p in (eager, fast))
    assert fast.model.failure is None  # compiled, not fallen back
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the warm-up's graph served every call
    np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-4)
    assert np.array_equal(a.labels, b.labels)
    assert "torch.compile failed" not in capsys.readouterr().err


def _failing_compile(calls):
    def compile_(model, **options):
        def run(x):
            calls.append(x.shape)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return run
    return compile_


def test_a_compiler_that_cannot_start_is_one_note_then_pytorch(monkeypatch, capsys):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on Python 3.12+")

    monkeypatch.setattr(compiled_module.torch, "compile", unsupported)
    net = build_network("unet3d", 3, 4, (4, 8)).eval()
    wrapped = CompiledNetwork(net)  # compiles at its first call, not here
    x = torch.rand(1, 3, 16, 16, 16)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), net(x))
    assert wrapped.failure == "RuntimeError: Dynamo is not supported on Python 3.12+"
    assert "note: torch.compile failed" in capsys.readouterr().err


def test_short_batches_are_padded_to_one_compiled_shape(monkeypatch):
    shapes = []

    def fake_compile(forward, **options):
        def run(x):
            shapes.append((tuple(x.shape), x.is_contiguous()))
            return forward(x)
        return run

    monkeypatch.setattr(compiled_module.torch, "compile", fake_compile)
    net = build_network("unet3d", 3, 4, (4, 8)).eval()
    wrapped = CompiledNetwork(net, batch=4)
    volume = torch.rand(4, 3, 16, 16, 32)
    with torch.inference_mode():
        for n in (4, 3, 1):
            x = volume[:n, :, :, :, :16]  # a view, as the sliding window gives
            assert torch.allclose(wrapped(x), net(x), atol=1e-4)  # another batch size: oneDNN's sums differ by 1e-5
    assert shapes == [((4, 3, 16, 16, 16), True)] * 3


def test_a_failed_compilation_is_one_note_then_pytorch(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compiled_module.torch, "compile", _failing_compile(calls))
    net = build_network("unet3d", 3, 4, (4, 8)).eval()
    wrapped = CompiledNetwork(net)
    x = torch.rand(1, 3, 16, 16, 16)
    with torch.inference_mode():
        expected = net(x)
        assert torch.equal(wrapped(x), expected) and torch.equal(wrapped(x), expected)
    assert len(calls) == 1  # not tried again
    assert wrapped.failure == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    err = capsys.readouterr().err
    assert err.count("note: torch.compile failed") == 1 and "predicting uncompiled" in err and "more detail" not in err


def test_the_networks_own_error_is_not_a_compiler_failure(monkeypatch):
    monkeypatch.setattr(compiled_module.torch, "compile", _failing_compile([]))
    wrapped = CompiledNetwork(build_network("unet3d", 3, 4, (4, 8)).eval())
    with pytest.raises(ValueError, match="divisible by"):
        wrapped(torch.rand(1, 3, 15, 16, 16))  # the input is at fault: its error, as without compiling
    assert wrapped.failure is None


def test_which_predictions_may_compile():
    cuda = torch.device("cuda")
    assert compiles_faster("unet3d", CPU, True) and compiles_faster("dynunet", CPU, True)
    for slight in ("unet", "unet-lite", "segresnet"):  # measured too little faster compiled
        assert not compiles_faster(slight, CPU, True)
    assert not compiles_faster("unet3d", cuda, True)  # not measured on a GPU
    assert not compiles_faster("unet3d", CPU, False)  # windows of several sizes: a compilation each
    assert not compiles_faster(None, CPU, True)  # a bare module of unknown network
    predictor = Predictor(nn.Identity(), CPU, ("t2",), "minmax", (32, 32, 32), divisor=8, network="unet3d")
    assert predictor.may_compile()
    assert replace(predictor, window=(32, 32, 16)).may_compile()  # never above the box: one size
    assert not replace(predictor, window=(64, 64, 64)).may_compile()  # clipped to each case's box
    assert not replace(predictor, window="box").may_compile()
    assert not replace(predictor, engine="compile").may_compile()
    assert not replace(predictor, engine="onnx").may_compile()  # an exported file: no PyTorch network to compile
    assert replace(predictor, engine="onnx", pytorch_model=nn.Identity()).may_compile()  # exported in memory


def test_compiling_pays_when_the_cases_left_save_more_than_it_costs():
    per_case = COMPILE_SECONDS / COMPILED_SAVES  # a case that saves exactly the compiling
    assert compile_pays(per_case, 2) and not compile_pays(per_case, 1)
    assert not compile_pays(0.5, 100)  # a small network: never
    assert not compile_pays(1000.0, 0)  # nothing left
    assert compile_pays(COMPILE_SECONDS / 0.25 + 1, 1, 0.25) and not compile_pays(COMPILE_SECONDS / 0.25 - 1, 1, 0.25)


class _Spy(nn.Module):
    """Stands in for `CompiledNetwork` (no compiling in this test): counts the calls it serves."""
    calls = 0
    failure = None

    def __init__(self, model, batch=1):
        super().__init__()
        self.model = model

    def forward(self, x):
        type(self).calls += 1
        return self.model(x)


@pytest.mark.parametrize("pays", [True, False])
@pytest.mark.parametrize("native", [True, False])
def test_predict_auto_compiles_after_the_first_pass_where_it_pays(pays, native, tmp_path, monkeypatch, capsys):
    """On a bf16 CPU the first case runs in PyTorch, on a float32 CPU in ONNX Runtime (where installed);
    compiled, the cases left (one sliding-window pass each, no TTA) run PyTorch's network through
    `CompiledNetwork`."""
    for cid in ("c0", "c1", "c2"):
        write_case(tmp_path / "raw", cid, shape=(40, 44, 32))
    save_checkpoint(tmp_path / "m.pt", _state())
    native_cpu_bf16(monkeypatch, native)
    first = "onnx" if not native and PREDICTOR.onnx_runtime_installed() else "torch"
    seen = []
    monkeypatch.setattr(PREDICT, "compile_pays", lambda seconds, left, saves: seen.append((seconds > 0, left, saves)) or pays)
    monkeypatch.setattr(PREDICTOR, "CompiledNetwork", _Spy)  # where `Predictor.compiled` makes it
    monkeypatch.setattr(_Spy, "calls", 0)
    result = predict(tmp_path / "m.pt", tmp_path / "raw", tmp_path / "out", device="cpu")
    assert len(result.predicted) == 3 and not result.failed
    assert seen == [(True, 2, COMPILED_SAVES_ONNX if first == "onnx" else COMPILED_SAVES)]  # once, after the first case
    err = capsys.readouterr().err
    assert f"(CPU), {'bf16' if native else 'float32'}, {'ONNX Runtime' if first == 'onnx' else 'PyTorch'}" in err
    assert ("2 passes to go: compiling the network" in err) == pays
    assert (_Spy.calls > 1) == pays  # the warm-up and the two cases' windows
    for engine in ("torch", "compile"):  # an engine asked for is kept
        seen.clear()
        predict(tmp_path / "m.pt", tmp_path / "raw", tmp_path / f"out_{engine}", device="cpu", engine=engine,
                progress=False)
        assert not seen
    given = Predictor.from_checkpoint(tmp_path / "m.pt", device="cpu", engine="torch")
    predict(given, tmp_path / "raw", tmp_path / "out_given", progress=False)  # a Predictor is used as it is
    assert not seen


def test_predict_auto_compiles_within_a_case_for_its_tta_flips(tmp_path, monkeypatch, capsys):
    """One case with TTA is 4 passes of 2 flips: decided after the first, the 3 left run compiled,
    with the labels of the uncompiled run (`_Spy` runs the same network)."""
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    save_checkpoint(tmp_path / "m.pt", _state())
    native_cpu_bf16(monkeypatch, True)
    seen = []
    monkeypatch.setattr(PREDICT, "compile_pays", lambda seconds, left, saves: seen.append(left) or True)
    monkeypatch.setattr(PREDICTOR, "CompiledNetwork", _Spy)  # where `Predictor.compiled` makes it
    monkeypatch.setattr(_Spy, "calls", 0)
    predict(tmp_path / "m.pt", tmp_path / "raw", tmp_path / "out", device="cpu", tta=True)
    assert seen == [3] and _Spy.calls > 1
    assert "3 passes to go: compiling the network" in capsys.readouterr().err
    predict(tmp_path / "m.pt", tmp_path / "raw", tmp_path / "torch", device="cpu", tta=True, engine="torch",
            progress=False)
    compiled, eager = (load_nifti(tmp_path / d / "c0.nii.gz").data for d in ("out", "torch"))
    assert np.array_equal(compiled, eager)


def test_out_of_gpu_memory_retries_with_the_uncompiled_network_one_window_at_a_time(tmp_path, monkeypatch, capsys):
    def out_of_memory(forward, **options):
        def run(x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run

    monkeypatch.setattr(compiled_module.torch, "compile", out_of_memory)
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    case = discover_cases(tmp_path / "raw")[0]
    eager = Predictor.from_checkpoint(_state(), device="cpu", engine="torch", amp="off")
    batches = []
    eager.model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    fast = replace(eager, model=CompiledNetwork(eager.model, 4), engine="compile", sw_batch_size=4)
    retried = predict_case(fast, case)
    assert "retrying with the windows one at a time" in capsys.readouterr().err
    assert batches and set(batches) == {1} and fast.model.failure is None  # not padded back to 4; not a compiler failure
    assert np.array_equal(retried.labels, predict_case(eager, case).labels)


def test_engine_compile_from_the_cli_and_refused_for_an_exported_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(PREDICTOR, "CompiledNetwork", _Spy)  # where `Predictor.compiled` makes it
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    save_checkpoint(tmp_path / "m.pt", _state())
    assert build_parser().parse_args(["predict", "m.pt", "in", "out", "--engine", "compile"]).engine == "compile"
    assert main(["predict", str(tmp_path / "m.pt"), str(tmp_path / "raw"), str(tmp_path / "out"), "--device", "cpu",
                 "--engine", "compile", "--amp", "off"]) == 0
    assert "float32, PyTorch compiled (torch.compile)" in capsys.readouterr().err
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(TumorsegError, match="runs only in ONNX Runtime"):
        Predictor.from_checkpoint(tmp_path / "m.onnx", device="cpu", engine="compile")


def test_the_backends_own_error_names_the_failure(monkeypatch):
    class BackendCompilerFailed(RuntimeError):
        pass

    def failing(forward, **options):
        def run(x):
            exc = BackendCompilerFailed("backend='inductor' raised:")
            exc.inner_exception = OSError("No working C++ compiler found in PATH")
            raise exc
        return run

    monkeypatch.setattr(compiled_module.torch, "compile", failing)
    wrapped = CompiledNetwork(build_network("unet3d", 3, 4, (4, 8)).eval())
    with torch.inference_mode():
        wrapped(torch.rand(1, 3, 16, 16, 16))
    assert wrapped.failure == "OSError: No working C++ compiler found in PATH"


def test_a_failed_compilation_after_onnx_runtime_keeps_onnx_runtime(monkeypatch):
    pytest.importorskip("onnxruntime")
    native_cpu_bf16(monkeypatch, False)
    predictor = Predictor.from_checkpoint(_state(), device="cpu")
    assert predictor.engine == "onnx" and predictor.may_compile()
    monkeypatch.setattr(compiled_module.torch, "compile", _failing_compile([]))
    assert PREDICT._compile_if_it_pays(predictor, 100.0, 10, None) is predictor  # not eager float32 PyTorch, slower
    with pytest.raises(TumorsegError, match="an exported model has no PyTorch network"):
        replace(predictor, pytorch_model=None).compiled()


def test_the_compiled_network_pads_to_the_predictors_window_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compiled_module.torch, "compile", lambda forward, **options: forward)  # no compiling here
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    fast = Predictor.from_checkpoint(_state(), device="cpu", engine="compile")
    assert fast.model.batch == fast.sw_batch_size > 1
    assert Predictor.from_checkpoint(_state(), device="cpu", engine="torch").compiled().model.batch == fast.sw_batch_size
    assert fast.compiled() is fast  # not wrapped twice

    def batch_seen(predictor, *args, **kwargs):
        raise TumorsegError(f"batch {predictor.model.batch} of {predictor.sw_batch_size}")

    monkeypatch.setattr(PREDICT, "predict_case", batch_seen)
    result = predict(fast, tmp_path / "raw", tmp_path / "out", window=(16, 16, 16), progress=False)
    (message,) = result.failed.values()
    assert message == f"batch {fast.sw_batch_size * 8} of {fast.sw_batch_size * 8}"  # re-wrapped for the new window
    save_checkpoint(tmp_path / "m.pt", _state())
    predict(tmp_path / "m.pt", tmp_path / "raw", tmp_path / "big", engine="compile", window=(64, 64, 64), progress=False)
    assert "the network compiles again for each new size" in capsys.readouterr().err
