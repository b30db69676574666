"""`tumorseg export`: ONNX round trip, prediction from the exported file, CLI, bad files."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from tumorseg.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from tumorseg.cli import build_parser, main  # noqa: E402
from tumorseg.devices import window_batch  # noqa: E402
from tumorseg.errors import TumorsegError  # noqa: E402
from tumorseg.inference import Predictor, predict, predict_case, probabilities  # noqa: E402
from tumorseg.inference.onnx_model import INSTALL_HINT, OPSET, TRAINING_ONLY, OnnxNetwork, export_onnx, load_onnx  # noqa: E402
from tumorseg.labels import BRATS2020, RAW_LABELS, REGIONS  # noqa: E402
from tumorseg.layouts import discover_cases  # noqa: E402
from tumorseg.networks import NETWORKS, build_network, network_spec  # noqa: E402

from factory import native_cpu_bf16, write_case  # noqa: E402

CHANNELS = ("t2", "t1ce", "flair")


def _state(name="unet3d", target="labels", patch=(32, 32, 32), tta=False, largest=False, et=None) -> dict:
    """A checkpoint state as training writes it (untrained weights), training state included."""
    torch.manual_seed(0)
    spec = network_spec(name, len(CHANNELS), 3 if target == "regions" else 4, (4, 8, 16), deep_supervision=name == "dynunet")
    model = build_network(**spec)
    return {
        "network": spec,
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "scheduler": {"last_epoch": 3},
        "scaler": {},
        "rng": {"torch": torch.get_rng_state()},
        "history": [{"epoch": 1, "train_loss": 0.5}],
        "epoch": 3,
        "best_metric": torch.tensor(0.25),  # a tensor among the settings: becomes a number
        "best_epoch": 2,
        "prepare": {"channels": list(CHANNELS), "norm": "zscore", "crop_size": [32, 32, 32], "crop_mode": "fixed",
                    "spacing": [1.0, 1.0, 1.0], "cavity": None},
        "layout": "brats2020",
        "labels": BRATS2020.to_dict(),
        "patch": list(patch),
        "target": target,
        "label_map": {i: RAW_LABELS[i] for i in range(4)},
        "regions": list(REGIONS),
        "inference": {"tta": tta, "postprocess_largest_tumour": largest, "postprocess_et_threshold": et,
                      "postprocess_min_component": [0, 10, 5]},
        "torch_version": str(torch.__version__),
    }


def _json(value):
    return json.loads(json.dumps(value, default=lambda t: t.tolist()))


def _export(tmp_path, opset=OPSET, **kwargs):
    state = _state(**kwargs)
    save_checkpoint(tmp_path / "m.pt", state)
    return state, export_onnx(tmp_path / "m.pt", tmp_path / "sub" / "m.onnx", opset=opset)


@pytest.mark.parametrize("name", NETWORKS)
def test_round_trip_settings_and_outputs(name, tmp_path):
    target = "regions" if name in ("unet", "unet-lite", "segresnet") else "labels"
    state, path = _export(tmp_path, name=name, target=target, tta=True, largest=True, et=100)
    network, meta = load_onnx(path)
    assert meta.pop("export")["opset"] == OPSET and onnx.load(path).opset_import[0].version == OPSET
    expected = {k: v for k, v in load_checkpoint(tmp_path / "m.pt").items() if k not in TRAINING_ONLY}
    assert set(meta) == set(expected) and meta["best_metric"] == 0.25  # no training state; tensors as numbers
    assert _json(meta) == _json(expected)
    assert meta["network"] == state["network"] and meta["label_map"] == state["label_map"]  # tuples, int keys back
    reference = build_network(**state["network"])
    reference.load_state_dict(state["model"])
    reference.eval()
    for shape in ((1, 3, 32, 24, 16), (2, 3, 16, 20, 28)):  # dynamic batch and spatial axes
        x = torch.randn(shape)
        with torch.no_grad():
            want = reference(x)
        torch.testing.assert_close(network(x), want, atol=1e-4, rtol=0)
    # as the predictor's model: batched sliding windows under inference mode and (CPU) autocast
    image, window = torch.randn(1, 3, 28, 24, 20), dict(roi=(16, 16, 16), target=target, overlap=0.5, sw_batch_size=3)
    with torch.inference_mode():
        got = probabilities(network.eval().to("cpu"), image, amp_dtype=torch.bfloat16, **window)
        want = probabilities(reference, image, **window)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_runs_at_the_lowest_and_highest_opset(name, tmp_path):
    from tumorseg.inference.onnx_model import MAX_OPSET, MIN_OPSET

    for opset in (MIN_OPSET, MAX_OPSET):
        state, path = _export(tmp_path, opset=opset, name=name)
        reference = build_network(**state["network"])
        reference.load_state_dict(state["model"])
        x = torch.randn(1, 3, 32, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(load_onnx(path)[0](x), reference.eval()(x), atol=1e-4, rtol=0)
    for opset in (MIN_OPSET - 1, MAX_OPSET + 1, "x"):  # operators missing below; the exporter stops above
        with pytest.raises(TumorsegError, match=rf"^opset {opset}: export supports {MIN_OPSET}-{MAX_OPSET}$"):
            _export(tmp_path, opset=opset, name=name)


def _read(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine, img.header


def _assert_same_outputs(labels_a, labels_b, probs_a, probs_b, channel_axis):
    """Probabilities within 1e-4; labels identical but where the network is at a tie to float
    precision (the top two probabilities within 1e-4: a rounding difference may flip them)."""
    assert np.abs(probs_a - probs_b).max() < 1e-4
    differ = labels_a != labels_b
    top = np.sort(np.moveaxis(probs_a, channel_axis, -1)[differ], axis=-1)
    assert differ.sum() <= 1e-5 * differ.size and np.all(top[:, -1] - top[:, -2] < 1e-4)


def _assert_same_files(a, b, case_id):
    (la, aff_a, ha), (lb, aff_b, hb) = _read(a / f"{case_id}.nii.gz"), _read(b / f"{case_id}.nii.gz")
    assert np.array_equal(aff_a, aff_b) and ha.binaryblock == hb.binaryblock
    pa, pb = _read(a / f"{case_id}_probabilities.nii.gz")[0], _read(b / f"{case_id}_probabilities.nii.gz")[0]
    _assert_same_outputs(la, lb, pa, pb, -1)


@pytest.mark.real
def test_prediction_from_onnx_equals_checkpoint_on_a_real_case(real_data_dir, tmp_path):
    case_dir = real_data_dir / "Brats18_CBICA_AQT_1"
    if not case_dir.is_dir():
        pytest.skip(f"{case_dir} not available")
    state = _state("unet", patch=(96, 96, 96))  # one window over the brain at 2 mm: seconds on a CPU
    state["prepare"]["spacing"] = [2.0, 2.0, 2.0]  # and the probabilities resampled back to the scan's 1 mm
    save_checkpoint(tmp_path / "m.pt", state)
    export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx")
    case = discover_cases(case_dir)[0]
    pt, ox = (predict_case(Predictor.from_checkpoint(tmp_path / m, device="cpu", engine=e, amp="off"), case,
                           probabilities=True) for m, e in (("m.pt", "torch"), ("m.onnx", "auto")))
    assert ox.convention == pt.convention and np.array_equal(ox.affine, pt.affine)
    _assert_same_outputs(pt.labels, ox.labels, pt.probabilities, ox.probabilities, 0)


def test_cli_export_then_predict_from_the_onnx_file(tmp_path, capsys):
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    save_checkpoint(tmp_path / "m.pt", _state(largest=True, et=20))
    assert build_parser().parse_args(["export", "a.pt", "b.onnx"]).opset == OPSET
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")]) == 0
    assert f"opset {OPSET}" in capsys.readouterr().out
    raw = str(tmp_path / "raw")
    assert main(["predict", str(tmp_path / "m.onnx"), raw, str(tmp_path / "onnx"), "--device", "cpu", "--probabilities"]) == 0
    predictor = Predictor.from_checkpoint(tmp_path / "m.onnx", device="cpu")
    assert isinstance(predictor.model, OnnxNetwork) and predictor.largest_tumour and predictor.et_threshold == 20
    assert predictor.min_component == (0, 10, 5)
    predict(tmp_path / "m.pt", raw, tmp_path / "pt", device="cpu", probabilities=True, progress=False, engine="torch",
            amp="off")  # float32, as ONNX Runtime runs the graph
    _assert_same_files(tmp_path / "pt", tmp_path / "onnx", "c0")
    save_checkpoint(tmp_path / "bad.pt", {**_state(), "prepare": {}})  # settings damaged: no model file is written
    assert main(["export", str(tmp_path / "bad.pt"), str(tmp_path / "bad.onnx")]) == 2
    assert "damaged checkpoint settings (prepare.channels, prepare.norm)" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("name", ["unet3d", "unet"])
def test_in_memory_onnx_engine_equals_pytorch(name, tmp_path):
    """`--engine onnx` (the CPU default where installed) exports in memory: PyTorch's outputs within 1e-4."""
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    state = _state(name, target="regions" if name == "unet" else "labels", tta=True)
    case = discover_cases(tmp_path / "raw")[0]
    pt, ox = (Predictor.from_checkpoint(state, device="cpu", engine=engine, amp="off") for engine in ("torch", "onnx"))
    assert ox.engine == "onnx" and isinstance(ox.model, OnnxNetwork)
    assert pt.engine == "torch" and not isinstance(pt.model, OnnxNetwork)
    a, b = (predict_case(p, case, probabilities=True) for p in (pt, ox))
    _assert_same_outputs(a.labels, b.labels, a.probabilities, b.probabilities, 0)


def test_engine_auto_uses_onnx_runtime_where_faster_and_falls_back(monkeypatch, capsys):
    import tumorseg.inference.onnx_model as onnx_model

    predictor_module = sys.modules["tumorseg.inference.predictor"]
    native_cpu_bf16(monkeypatch, False)  # a float32 CPU: PyTorch's bf16 is no option

    assert Predictor.from_checkpoint(_state(), device="cpu").engine == "onnx"  # unet3d: faster in ONNX Runtime
    for slower in ("unet", "unet-lite"):  # measured slower in ONNX Runtime (README, "Measured")
        assert Predictor.from_checkpoint(_state(slower, target="regions"), device="cpu").engine == "torch"
    monkeypatch.setattr(predictor_module, "onnx_runtime_installed", lambda: False)
    assert Predictor.from_checkpoint(_state(), device="cpu").engine == "torch"
    monkeypatch.undo()
    native_cpu_bf16(monkeypatch, False)

    def broken(*args):
        raise TumorsegError("checkpoint: cannot export at opset 17 (unsupported operator)")

    monkeypatch.setattr(onnx_model, "_onnx_proto", broken)
    assert Predictor.from_checkpoint(_state(), device="cpu").engine == "torch"  # auto: a note, then PyTorch
    assert "cannot export" in capsys.readouterr().err
    with pytest.raises(TumorsegError, match="cannot export"):
        Predictor.from_checkpoint(_state(), device="cpu", engine="onnx")
    with pytest.raises(TumorsegError, match="unknown engine"):
        Predictor.from_checkpoint(_state(), device="cpu", engine="tensorrt")
    monkeypatch.setattr(onnx_model, "_onnx_proto", lambda *a: (_ for _ in ()).throw(TypeError("odd tracer")))
    assert Predictor.from_checkpoint(_state(), device="cpu").engine == "torch"  # any exporter failure falls back
    assert "odd tracer" in capsys.readouterr().err


def test_a_cpu_with_native_bf16_predicts_in_pytorch_bf16_and_onnx_runtime_in_float32(monkeypatch, tmp_path, capsys):
    native_cpu_bf16(monkeypatch, True)
    auto = Predictor.from_checkpoint(_state(), device="cpu")
    assert auto.engine == "torch" and auto.amp_dtype == torch.bfloat16  # PyTorch's bf16 beats ONNX Runtime's float32
    ox = Predictor.from_checkpoint(_state(), device="cpu", engine="onnx")
    assert ox.engine == "onnx" and ox.amp_dtype is None
    assert Predictor.from_checkpoint(_state(), device="cpu", amp="off").engine == "onnx"
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    save_checkpoint(tmp_path / "m.pt", _state())
    for native, extra, line in (
            (True, ["--engine", "onnx", "--amp", "bf16"], "float32, ONNX Runtime (its graph is float32; amp bf16 is PyTorch's)"),
            (True, [], "device cpu (CPU), bf16, PyTorch"),
            (False, ["--amp", "bf16"], "float32 (amp bf16 asked for, but this CPU has no native bf16: no AVX512-BF16 or "
                                       "AMX), ONNX Runtime"),
            (True, ["--amp", "fp16"], "float32 (amp fp16 asked for, but no CUDA GPU is visible")):
        native_cpu_bf16(monkeypatch, native)
        assert main(["predict", str(tmp_path / "m.pt"), str(tmp_path / "raw"), str(tmp_path / "out"), "--device", "cpu",
                     "--force", *extra]) == 0
        assert line in capsys.readouterr().err


def test_onnx_runtime_without_a_working_cuda_provider_never_passes_for_the_gpu(tmp_path, monkeypatch, capsys):
    """Asked for CUDA, ONNX Runtime falls back to the CPU with only a log line (no GPU build, or one
    whose CUDA libraries do not load): an exported model says so and runs on the CPU; `--engine
    onnx` from a checkpoint on a GPU is refused."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has a CUDA provider")
    _, path = _export(tmp_path)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert OnnxNetwork(path, gpu).device == cpu and OnnxNetwork(path, cpu).device == cpu
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert OnnxNetwork(path, gpu).device == cpu  # a GPU build offering CUDA that does not load
    monkeypatch.setattr(sys.modules["tumorseg.inference.predictor"], "resolve_device", lambda *args: gpu)
    predictor = Predictor.from_checkpoint(path, amp="off")
    assert predictor.device == cpu and predictor.sw_batch_size == window_batch(cpu, (32, 32, 32))  # the CPU's
    assert "CUDA provider is not installed or did not load" in capsys.readouterr().err
    with pytest.raises(TumorsegError, match="needs onnxruntime-gpu built for this CUDA"):
        Predictor.from_checkpoint(tmp_path / "m.pt", amp="off", engine="onnx")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # no GPU build at all:
    monkeypatch.setattr(sys.modules["tumorseg.inference.onnx_model"], "_onnx_proto",   # refused before exporting
                        lambda *args: pytest.fail("exported although ONNX Runtime cannot run it on the GPU"))
    with pytest.raises(TumorsegError, match="needs onnxruntime-gpu built for this CUDA"):
        Predictor.from_checkpoint(tmp_path / "m.pt", amp="off", engine="onnx")


def test_exported_file_refuses_the_torch_engine(tmp_path):
    _, path = _export(tmp_path)
    assert "runs only in ONNX Runtime" in _one_line_error(
        lambda: Predictor.from_checkpoint(path, device="cpu", engine="torch"), path)


def _one_line_error(call, path):
    with pytest.raises(TumorsegError) as info:
        call()
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_corrupt_foreign_and_missing_files_are_one_line_errors(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe" * 10)
    assert "not a readable ONNX model" in _one_line_error(lambda: load_onnx(corrupt), corrupt)
    write_case(tmp_path / "raw", "c0", shape=(24, 24, 16))
    assert main(["predict", str(corrupt), str(tmp_path / "raw"), str(tmp_path / "out")]) == 2
    assert str(corrupt) in capsys.readouterr().err

    node = onnx.helper.make_node("Identity", ["image"], ["logits"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "foreign", [value("image", onnx.TensorProto.FLOAT, [1, 3, 4, 4, 4])],
                                   [value("logits", onnx.TensorProto.FLOAT, [1, 3, 4, 4, 4])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)]), foreign)
    assert "not a tumorseg model" in _one_line_error(lambda: Predictor.from_checkpoint(foreign, device="cpu"), foreign)
    _one_line_error(lambda: load_onnx(tmp_path / "absent.onnx"), tmp_path / "absent.onnx")
    _one_line_error(lambda: export_onnx(tmp_path / "absent.pt", tmp_path / "x.onnx"), tmp_path / "absent.pt")
    _one_line_error(lambda: export_onnx(tmp_path / "absent.pt", tmp_path / "x.pt"), tmp_path / "x.pt")


def test_onnx_runtime_is_optional(monkeypatch, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(TumorsegError, match=r"pip install 'tumorseg\[onnx\]'") as info:
        Predictor.from_checkpoint(tmp_path / "m.onnx", device="cpu")
    assert str(info.value) == INSTALL_HINT
    code = "import sys, tumorseg.cli, tumorseg.inference; assert not {'onnx', 'onnxruntime'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
