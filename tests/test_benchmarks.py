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
from tumorseg.devices import native_bf16
from tumorseg.labels import RAW_LABELS
from tumorseg.networks import build_network, network_spec

from factory import write_case

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_predict_paths  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import real_learning  # noqa: E402
import uncertainty_ranking  # noqa: E402


def test_stage_timers_wrap_what_predict_case_calls(monkeypatch):
    """`instrument` patches predict's stages by name: a renamed stage must fail here, not in a benchmark run."""
    module = importlib.import_module("tumorseg.inference.case")
    for attr in ("load_input", "tta_probabilities", "postprocess"):
        monkeypatch.setattr(module, attr, getattr(module, attr))  # restored after the test
    predictor = module.Predictor(torch.nn.Identity(), torch.device("cpu"), ("t1",), "minmax", (16, 16, 16))
    stats = common.instrument(predictor, lambda: None)  # raised AttributeError after a rename once
    module.postprocess(np.zeros((4, 4, 4), np.uint8), False, None)
    predictor.model(torch.zeros(1))
    assert len(stats["postprocess_s"]) == 1 and stats["forwards"] == 1
    stats.update(load_s=[0.5], network_s=[2.0])
    assert common.stage_seconds(stats, 0, 3.0, 0.25) == {
        "s_load": 0.5, "s_network": 2.0, "s_postprocess": round(stats["postprocess_s"][0], 3),
        "s_other": round(0.5 - stats["postprocess_s"][0], 3), "s_save": 0.25}
    common.clear_stages(stats)
    assert stats["forwards"] == 0 and stats["load_s"] == stats["network_s"] == stats["postprocess_s"] == []


@pytest.mark.parametrize("recipe", ["brats-cpu", "brats-gpu", "seed"])
def test_recipe_optimizer_is_trainings(recipe, monkeypatch):
    """`--recipe` steps the optimizer training builds for that recipe, made by training's own function."""
    from tumorseg.recipes import load_recipe

    train_module = importlib.import_module("tumorseg.training.train")  # the module, not the `train` function
    calls = []
    real = train_module.build_optimizer
    monkeypatch.setattr(train_module, "build_optimizer", lambda config, params: calls.append(config) or real(config, params))
    optimizer = bench_train.make_optimizer([torch.nn.Parameter(torch.zeros(2))], recipe)
    settings = load_recipe(recipe)["train"]
    assert len(calls) == 1 and calls[0].optimizer == settings["optimizer"]
    expected = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[settings["optimizer"]]
    assert type(optimizer) is expected
    assert optimizer.defaults["lr"] == settings["lr"]
    assert optimizer.defaults["weight_decay"] == settings.get("weight_decay", 0.0)


def test_brats_cpu_step_uses_adamw_with_the_recipes_weight_decay():
    step, params, optimizer = bench_train.make_step("unet", 32, 1, "cpu", recipe="brats-cpu")
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == 0.001 and optimizer.defaults["weight_decay"] == 1e-5
    weights = optimizer.param_groups[0]["params"]
    assert sum(p.numel() for p in weights) == params  # the network's own parameters
    before = weights[0].detach().clone()
    assert np.isfinite(step())
    assert not torch.equal(before, weights[0])  # the step went through this optimizer
    fields = bench_train.optimizer_fields("brats-cpu")
    assert fields["optimizer"] == "AdamW" and fields["optimizer_settings"] == {"lr": 0.001, "weight_decay": 1e-5}
    assert "brats-cpu" in fields["optimizer_source"]
    # without a recipe: Adam lr 1e-4, as before
    assert bench_train.optimizer_fields(None)["optimizer_settings"] == {"lr": 1e-4, "weight_decay": 0}
    _, _, default = bench_train.make_step("unet", 32, 1, "cpu")
    assert type(default) is torch.optim.Adam and default.defaults["lr"] == 1e-4


def test_bench_train_end_to_end(tmp_path):
    """The parent and its child process on a tiny cube: fields written, optimizer recorded in both."""
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_train.py"), "--networks", "unet", "--size", "32",
                    "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1", "--amp", "bf16", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    res = json.loads(out.read_text())
    assert res["optimizer"] == "Adam" and res["optimizer_settings"] == {"lr": 1e-4, "weight_decay": 0}
    # a step in bf16 where this CPU computes it natively, float32 elsewhere: training's rule
    assert res["amp"] == "bf16" and res["autocast"] == ("bf16" if native_bf16(torch.device("cpu")) else "float32")
    (row,) = res["results"]
    assert "error" not in row, row
    assert row["network"] == "unet" and row["optimizer"] == "Adam" and len(row["step_seconds"]) == 1
    assert row["threads"] == 1 and row["peak_rss_gib"] > 0
    machine = res["machine"]
    assert {"cpu_count", "load_average", "torch", "torch_threads", "python", "platform", "device", "device_name",
            "cpu_name", "load_average_after"} <= set(machine) and machine["device"] == "cpu"


def test_bench_predict_end_to_end_on_another_spacing(tmp_path):
    """A network trained at 1.25 mm on a 1 mm case: the scans go to its grid and the labels come back."""
    write_case(tmp_path / "raw", "Brats18_A_1", shape=(48, 48, 40))
    out = tmp_path / "predict.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_predict.py"), "--data", str(tmp_path / "raw"), "--networks",
                    "unet-lite", "--filters", "4,8,16", "--patch", "32", "--tta", "off", "--spacing", "1.25,1.25,1.25",
                    "--device", "cpu", "--threads", "1", "--amp", "off", "--engines", "torch,compile", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    res = json.loads(out.read_text())
    row, compiled = res["results"]
    assert "error" not in row, row
    assert (row["engine"], row["s_compile"]) == ("torch", None)
    assert compiled["engine"] == "compile" and compiled["s_compile"] > 0 and "compile_failure" in compiled
    assert compiled["box"] == row["box"] and compiled["forwards_per_case"] == row["forwards_per_case"]
    assert res["amp"] == "off" and row["precision"] == "float32" and "cpu_native_bf16" in res["machine"]
    assert res["spacing"] == [1.25, 1.25, 1.25] and row["box"] == [32, 32, 32]  # 48 * 0.8 = 38 voxels: a 32-multiple box
    assert row["s_total"] > 0 and {"s_load", "s_network", "s_other", "s_save"} <= set(row)
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "bench_predict.py"), "--spacing", "1,0,1"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "three positive numbers (mm) or 'scan'" in bad.stderr
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "bench_predict.py"), "--engines", "torch,onnx"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "--engines 'torch,onnx': torch and/or compile" in bad.stderr


def test_run_child_reports_a_failing_child(tmp_path, capsys):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('{not json')\nsys.exit('it broke')\n")
    assert common.run_child(str(script), ["--child", "x"], network="x") == {"network": "x", "error": "exit 1: it broke"}
    script.write_text('print("noise")\nprint(\'{"a": 1}\')\n')
    assert common.run_child(str(script), []) == {"a": 1}
    assert '"error": "exit 1: it broke"' in capsys.readouterr().out  # progress lines


def test_held_out_and_fold_splits(tmp_path):
    """The shared seeded order of labelled cases gives the splits the scripts always made."""
    for i in range(5):
        write_case(tmp_path / "raw", f"c{i}", shape=(16, 16, 12))
    write_case(tmp_path / "raw", "unlabelled", shape=(16, 16, 12), seg=None)
    ids = [f"c{i}" for i in range(5)]
    order = np.random.default_rng(3).permutation(5)
    _, test_dir, test_ids = real_learning.hold_out(tmp_path / "raw", tmp_path / "hold", 2, seed=3)
    assert test_ids == sorted(ids[i] for i in order[:2])
    assert sorted(p.name for p in test_dir.iterdir()) == test_ids and (test_dir / test_ids[0]).is_symlink()
    assert sorted(p.name for p in (tmp_path / "hold" / "train").iterdir()) == sorted(set(ids) - set(test_ids))
    folds = uncertainty_ranking.link_folds(tmp_path / "raw", tmp_path / "folds", 2, seed=3, only=None)
    assert folds == [sorted(ids[j] for j in order[i::2]) for i in range(2)]
    assert sorted(p.name for p in (tmp_path / "folds" / "fold1" / "test").iterdir()) == folds[1]


def test_path_specs():
    assert bench_predict_paths.parse_path("torch:patch:0.5") == ("torch", None, 0.5, "auto")
    assert bench_predict_paths.parse_path("onnx:96:0.25") == ("onnx", 96, 0.25, "auto")
    assert bench_predict_paths.parse_path("torch:patch:0.5:bf16") == ("torch", None, 0.5, "bf16")
    assert bench_predict_paths.parse_path("onnx:box:0")[1] == "box"
    assert bench_predict_paths.parse_path("compile:patch:0.5:bf16") == ("compile", None, 0.5, "bf16")
    for bad in ("onnx:0:0.5", "tensorrt:patch:0.5", "onnx:patch:1.0", "onnx:patch", "torch:patch:0.5:int8",
                "torch:patch:0.5:bf16:x"):
        with pytest.raises(SystemExit):
            bench_predict_paths.parse_path(bad)


def test_predict_paths_end_to_end(tmp_path):
    pytest.importorskip("onnxruntime")
    write_case(tmp_path / "raw", "c0", shape=(40, 44, 32))
    torch.manual_seed(0)
    for name in ("unet3d", "unet-lite"):
        spec = network_spec(name, 3, 4, [4, 8, 16])
        save_checkpoint(tmp_path / f"{name}.pt", {
            "network": spec, "model": build_network(**spec).state_dict(), "patch": [32, 32, 32], "target": "labels",
            "prepare": {"channels": ["t2", "t1ce", "flair"], "norm": "minmax"},
            "label_map": {i: RAW_LABELS[i] for i in range(4)}, "inference": {"tta": False}})
    out = tmp_path / "paths.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_predict_paths.py"), str(tmp_path / "unet3d.pt"),
                    str(tmp_path / "raw"), "--paths", "torch:patch:0.5:off", "onnx:patch:0.5", "torch:patch:0.5:bf16",
                    "--compare", str(tmp_path / "unet-lite.pt"), "--tta", "off", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    results = json.loads(out.read_text())["results"]
    assert [r["network"] for r in results] == ["unet3d"] * 3 + ["unet-lite"] * 3
    other = results[3]["cases"][0]["wt_dice_vs_reference"]  # the other network's labels against the reference's
    assert 0.0 <= other <= 1.0 and results[3]["cases"][0]["box"] == results[0]["cases"][0]["box"]
    results = results[:3]
    assert [r["engine"] for r in results] == ["torch", "onnx", "torch"]
    assert [r["precision"] for r in results[:2]] == ["float32", "float32"]
    assert results[2]["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "float32")
    assert results[1]["wt_dice_vs_reference_min"] > 0.99  # ONNX Runtime: PyTorch's float32 labels
    assert results[0]["cases"][0]["box"] == results[1]["cases"][0]["box"]  # the same inference box and windows
    assert results[0]["cases"][0]["forwards"] >= 1 and "dice_vs_truth" in results[0]["cases"][0]


def test_predict_paths_take_turns_case_by_case(tmp_path, monkeypatch):
    """Paths alternate per case, each case starting with the next path; each path's per-case
    runs merge into one result (cases in order, mean time, largest memory)."""
    for cid in ("c0", "c1", "c2"):
        write_case(tmp_path / "raw", cid, shape=(24, 24, 16))
    calls = []

    def fake_child(script, args, **on_error):
        path, case = args[args.index("--child") + 1], int(args[args.index("--case") + 1])
        calls.append((case, path))
        return {**on_error, "engine": path.split(":")[0], "s_setup": 1.0 + case, "peak_rss_gib": 0.5 + case,
                "cases": [{"case": f"c{case}", "s_total": 2.0 * (case + 1)}]}

    monkeypatch.setattr(bench_predict_paths, "run_child", fake_child)
    monkeypatch.setattr(bench_predict_paths, "agreement", lambda *a: None)
    monkeypatch.setattr(bench_predict_paths, "print_table", lambda res: None)
    out = tmp_path / "paths.json"
    monkeypatch.setattr(sys, "argv", ["bench_predict_paths.py", str(tmp_path / "m.pt"), str(tmp_path / "raw"), "--paths",
                                      "torch:patch:0.5", "onnx:patch:0.5", "--tta", "off", "--cases", "3", "--out", str(out)])
    bench_predict_paths.main()
    paths = ["torch:patch:0.5", "onnx:patch:0.5"]
    assert calls == [(0, paths[0]), (0, paths[1]), (1, paths[1]), (1, paths[0]), (2, paths[0]), (2, paths[1])]
    results = json.loads(out.read_text())["results"]
    assert [r["path"] for r in results] == paths
    assert [c["case"] for c in results[0]["cases"]] == ["c0", "c1", "c2"]
    assert (results[1]["s_per_case_mean"], results[1]["s_setup"], results[1]["peak_rss_gib"]) == (4.0, 2.0, 2.5)
    failed = bench_predict_paths.merge_runs([results[0], {"path": "x", "error": "exit 1: boom"}])
    assert failed["error"] == "exit 1: boom"


def test_predict_paths_compare_checkpoints_in_the_same_turns(tmp_path, monkeypatch):
    """`--compare` runs every path with each other checkpoint too, all of them taking turns per case."""
    write_case(tmp_path / "raw", "c0", shape=(24, 24, 16))
    write_case(tmp_path / "raw", "c1", shape=(24, 24, 16))
    calls = []

    def fake_child(script, args, **on_error):
        calls.append((int(args[args.index("--case") + 1]), Path(args[0]).name, args[args.index("--child") + 1]))
        return {**on_error, "checkpoint": args[0], "engine": "torch", "s_setup": 1.0, "peak_rss_gib": 0.5,
                "cases": [{"case": f"c{calls[-1][0]}", "s_total": 1.0}]}

    monkeypatch.setattr(bench_predict_paths, "run_child", fake_child)
    monkeypatch.setattr(bench_predict_paths, "agreement", lambda *a: None)
    monkeypatch.setattr(bench_predict_paths, "print_table", lambda res: None)
    out = tmp_path / "paths.json"
    monkeypatch.setattr(sys, "argv", ["bench_predict_paths.py", str(tmp_path / "a.pt"), str(tmp_path / "raw"), "--paths",
                                      "torch:patch:0.5", "torch:patch:0.25", "--compare", str(tmp_path / "b.pt"),
                                      "--tta", "off", "--cases", "2", "--out", str(out)])
    bench_predict_paths.main()
    units = [("a.pt", "torch:patch:0.5"), ("a.pt", "torch:patch:0.25"), ("b.pt", "torch:patch:0.5"),
             ("b.pt", "torch:patch:0.25")]
    assert calls == [(0, *u) for u in units] + [(1, *u) for u in units[1:] + units[:1]]
    res = json.loads(out.read_text())
    assert [Path(r["checkpoint"]).name for r in res["results"]] == [u[0] for u in units]
    assert res["compare"] == [str(tmp_path / "b.pt")]


def test_ensemble_folds_end_to_end(tmp_path):
    """Folds trained, each and their ensemble predicting the held-out cases, scored side by side."""
    for i in range(5):
        write_case(tmp_path / "raw", f"c{i}", shape=(40, 40, 32), seed=i)
    (tmp_path / "tiny.yaml").write_text("model: unet\nfilters: [4, 8, 16]\npatch: [16, 16, 16]\nepochs: 1\n"
                                        "steps_per_epoch: 1\nbatch_size: 1\nval_every: 1\ndevice: cpu\n")
    out = tmp_path / "ens.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "ensemble_folds.py"), "--data", str(tmp_path / "raw"),
                           "--work", str(tmp_path / "work"), "--folds", "2", "--test-cases", "1", "--minutes", "5",
                           "--config", str(tmp_path / "tiny.yaml"), "--crop", "32", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    raw = ", no post-processing"
    assert [r["model"] for r in res["results"]] == [f"fold 0{raw}", f"fold 1{raw}", f"ensemble of 2{raw}",
                                                    "fold 0", "fold 1", "ensemble of 2"]
    assert res["cross_validation"]["folds"] == 2 and res["cross_validation"]["cases"] == 4
    assert [f["validation_cases"] for f in res["training"]] == [2, 2]  # the 4 training cases, each validated once
    assert all(0.0 <= r["means"]["WT"]["dice"] <= 1.0 and r["seconds_per_case"] > 0 for r in res["results"])
    assert "| ensemble of 2 |" in proc.stdout
