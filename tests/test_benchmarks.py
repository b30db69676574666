"""The benchmark scripts still run against the package they measure (they are not imported by it)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tumorseg.checkpoint import save_checkpoint
from tumorseg.labels import RAW_LABELS
from tumorseg.networks import build_network, network_spec

from factory import write_case

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_predict  # noqa: E402
import bench_predict_paths  # noqa: E402


def test_stage_timers_wrap_what_predict_case_calls(monkeypatch):
    """`instrument` patches predict's stages by name: a renamed stage must fail here, not in a benchmark run."""
    module = importlib.import_module("tumorseg.inference.predict")
    for attr in ("load_input", "tta_probabilities", "postprocess"):
        monkeypatch.setattr(module, attr, getattr(module, attr))  # restored after the test
    predictor = module.Predictor(torch.nn.Identity(), torch.device("cpu"), ("t1",), "minmax", (16, 16, 16))
    stats = bench_predict.instrument(predictor, lambda: None)  # raised AttributeError after a rename once
    module.postprocess(np.zeros((4, 4, 4), np.uint8), False, None)
    predictor.model(torch.zeros(1))
    assert len(stats["postprocess_s"]) == 1 and stats["forwards"] == 1


def test_path_specs():
    assert bench_predict_paths.parse_path("torch:patch:0.5") == ("torch", None, 0.5)
    assert bench_predict_paths.parse_path("onnx:96:0.25") == ("onnx", 96, 0.25)
    assert bench_predict_paths.parse_path("onnx:box:0")[1] == bench_predict_paths.BOX
    for bad in ("onnx:0:0.5", "tensorrt:patch:0.5", "onnx:patch:1.0", "onnx:patch"):
        with pytest.raises(SystemExit):
            bench_predict_paths.parse_path(bad)


def test_predict_paths_end_to_end(tmp_path):
    pytest.importorskip("onnxruntime")
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    torch.manual_seed(0)
    spec = network_spec("unet3d", 3, 4, [4, 8, 16])
    save_checkpoint(tmp_path / "m.pt", {
        "network": spec, "model": build_network(**spec).state_dict(), "patch": [32, 32, 32], "target": "labels",
        "prepare": {"channels": ["t2", "t1ce", "flair"], "norm": "minmax"},
        "label_map": {i: RAW_LABELS[i] for i in range(4)}, "inference": {"tta": False}})
    out = tmp_path / "paths.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_predict_paths.py"), str(tmp_path / "m.pt"),
                    str(tmp_path / "raw"), "--paths", "torch:patch:0.5", "onnx:patch:0.5", "torch:box:0",
                    "--tta", "off", "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    results = json.loads(out.read_text())["results"]
    assert [r["engine"] for r in results] == ["torch", "onnx", "torch"]
    assert results[1]["wt_dice_vs_reference_min"] > 0.99  # ONNX Runtime: PyTorch's labels
    assert results[0]["cases"][0]["box"] == results[1]["cases"][0]["box"]  # the same inference box and windows
    assert results[2]["cases"][0]["forwards"] == 1 and "dice_vs_truth" in results[0]["cases"][0]
