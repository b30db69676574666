"""Ensembles: several checkpoints (cross-validation folds, seeds, networks) predicting as one."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tumorseg.checkpoint import checkpoint_files, load_checkpoint, save_checkpoint
from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.evaluation.lesionwise import lesion_table
from tumorseg.inference import Predictor, predict, predict_case
from tumorseg.inference.ensemble import EnsembleNetwork
from tumorseg.inference.onnx_model import _plain
from tumorseg.inference.postprocess import (case_statistics, choose_default, statistics_from_state,
                                            statistics_state)
from tumorseg.inference.window import probabilities
from tumorseg.labels import model_from_header
from tumorseg.layouts import discover_cases
from tumorseg.networks import build_network

from factory import checkpoint_state, write_case


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_case(root, "c0")
    write_case(root, "c1", shape=(36, 44, 30), seed=1)
    return root


def _folds(root, states):
    for k, state in enumerate(states):
        save_checkpoint(root / f"fold_{k}" / "best.pt", state)
    return root


def _noisy_statistics(seed: int, cases: int = 3) -> list[dict]:
    """`case_statistics` of cases whose predictions carry specks of every region around a true lesion."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(cases):
        gt = np.zeros((24, 24, 24), np.uint8)
        gt[6:16, 6:16, 6:16] = 2
        gt[8:14, 8:14, 8:14] = 1
        gt[9:12, 9:12, 9:12] = 3
        pred = gt.copy()
        for _ in range(12):
            x, y, z = rng.integers(0, 22, 3)
            pred[x:x + rng.integers(1, 3), y:y + 2, z:z + 2] = rng.integers(1, 4)
        stats.append(case_statistics(pred, gt))
    return stats


@pytest.mark.parametrize("target", ["labels", "regions"])
def test_ensemble_network_averages_the_members_probabilities(target):
    torch.manual_seed(0)
    members = [torch.nn.Conv3d(3, 3 if target == "regions" else 4, 3, padding=1) for _ in range(3)]
    x = torch.randn(2, 3, 8, 8, 8)
    act = (lambda t: torch.sigmoid(t)) if target == "regions" else (lambda t: torch.softmax(t, dim=1))
    expected = torch.stack([act(m(x)) for m in members]).mean(0)
    with torch.no_grad():
        assert torch.allclose(act(EnsembleNetwork(members, target)(x)), expected, atol=1e-6)
        # one window per case: the sliding window's output is the ensemble's probabilities exactly
        window = probabilities(EnsembleNetwork(members, target), x, (8, 8, 8), target)
    assert torch.allclose(window, expected, atol=1e-5)


@pytest.mark.parametrize("target", ["labels", "regions"])
def test_one_member_ensemble_predicts_as_the_member_through_blended_windows(raw, target):
    predictor = Predictor.from_checkpoint(checkpoint_state(target=target, patch=(16, 16, 16)), device="cpu", amp="off")
    alone = Predictor.ensemble([predictor])
    case = discover_cases(raw / "c1")[0]
    a, b = predict_case(predictor, case, probabilities=True), predict_case(alone, case, probabilities=True)
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-4  # blending log-softmax, not logits: softmax cancels
    assert np.array_equal(a.labels, b.labels)


def test_a_folder_of_folds_predicts_with_their_ensemble(raw, tmp_path):
    states = [checkpoint_state(seed=k) for k in range(3)]
    run = _folds(tmp_path / "cv", states)
    assert checkpoint_files(run) == [run / f"fold_{k}/best.pt" for k in range(3)]
    ensemble = Predictor.from_checkpoints(run, device="cpu")
    assert ensemble.members == 3 and "ensemble of 3 models" in ensemble.settings_line()
    members = [Predictor.from_checkpoint(run / f"fold_{k}", device="cpu") for k in range(3)]
    case = discover_cases(raw / "c0")[0]
    mean = np.mean([predict_case(m, case, probabilities=True).probabilities for m in members], axis=0)
    pred = predict_case(ensemble, case, probabilities=True)
    assert pred.probabilities.shape == mean.shape and np.abs(pred.probabilities - mean).max() < 0.05
    # the same models in another order, named one by one: the same fingerprint
    again = Predictor.from_checkpoints([run / "fold_2", run / "fold_0/best.pt", run / "fold_1"], device="cpu")
    assert again.made_by() == ensemble.made_by() != members[0].made_by()
    result = predict(run, raw, tmp_path / "pred", device="cpu", progress=False)
    assert result.predicted == ["c0", "c1"] and not result.failed
    import nibabel as nib

    assert model_from_header(nib.load(tmp_path / "pred/c0.nii.gz").header) == ensemble.made_by()
    # a fold's predictions are another model's: the folder is refused, not mixed
    with pytest.raises(TumorsegError, match="another model"):
        predict(run / "fold_0", raw, tmp_path / "pred", device="cpu", progress=False)


def test_models_that_cannot_be_one_ensemble_are_refused_in_one_line(tmp_path):
    run = _folds(tmp_path / "cv", [checkpoint_state(), checkpoint_state(seed=1)])
    save_checkpoint(tmp_path / "other.pt", checkpoint_state(norm="zscore"))
    with pytest.raises(TumorsegError, match=r"other.pt: norm zscore, but .*fold_0/best.pt: minmax"):
        Predictor.from_checkpoints([run, tmp_path / "other.pt"], device="cpu")
    with pytest.raises(TumorsegError, match="given twice"):
        Predictor.from_checkpoints([run, run / "fold_1"], device="cpu")
    (run / "fold_2").mkdir()  # a fold still training: the folder is not the whole cross-validation
    with pytest.raises(TumorsegError, match="fold_2 of its 3 folds have no best.pt yet"):
        Predictor.from_checkpoints(run, device="cpu")
    with pytest.raises(TumorsegError, match="3 cross-validation folds; give one fold's folder"):
        load_checkpoint(run)


def test_ensemble_of_different_networks_and_patches(raw):
    small = Predictor.from_checkpoint(checkpoint_state(filters=(4, 8, 16, 32), patch=(16, 16, 16)), device="cpu")
    other = Predictor.from_checkpoint(checkpoint_state("unet", patch=(32, 32, 20)), device="cpu", tta=True)
    assert (small.divisor, other.divisor) == (8, 4)
    both = Predictor.ensemble([small, other])  # the largest patch, rounded up to both networks' divisor
    assert both.patch == (32, 32, 24) and both.divisor == 8 and both.network is None and not both.tta
    pred = predict_case(both, discover_cases(raw / "c1")[0])
    assert pred.labels.shape == (36, 44, 30)


def test_statistics_survive_checkpoints_and_exported_metadata():
    stats = _noisy_statistics(0)
    stored = statistics_state(stats)
    for back in (statistics_from_state(stored), statistics_from_state(json.loads(json.dumps(_plain(stored))))):
        for a, b in zip(stats, back):
            assert a["dice"] == b["dice"] and a["et_cleaned"] == b["et_cleaned"]
            for ra, rb in zip(a["components"], b["components"]):
                keep = np.arange(ra["table"].sizes.size) % 2 == 0
                assert ra["table"].dice(keep) == rb["table"].dice(keep)
                assert np.array_equal(ra["parent"], rb["parent"])
    assert choose_default(statistics_from_state(stored)) == choose_default(stats)
    damaged = statistics_state(stats)
    damaged[0]["components"][1]["pairs"][0, 1] = 10_000  # a component index past the table
    with pytest.raises(ValueError, match="damaged"):
        statistics_from_state(damaged)
    with pytest.raises(ValueError, match="damaged"):
        statistics_from_state([{"dice": [1, 1, 1]}])


def test_ensemble_post_processing_is_chosen_on_all_members_validation_cases(tmp_path):
    a, b = _noisy_statistics(1), _noisy_statistics(2)
    own_a, own_b = choose_default(a), choose_default(b)
    pooled = choose_default(a + b)
    members = []
    for stats, own in ((a, own_a), (b, own_b)):
        members.append(Predictor.from_checkpoint(checkpoint_state(
            postprocess_largest_tumour=own["largest_tumour"], postprocess_et_threshold=own["et_threshold"],
            postprocess_min_component=own["min_component"], postprocess_statistics=statistics_state(stats)), device="cpu"))
    both = Predictor.ensemble(members)
    assert (both.largest_tumour, both.et_threshold, list(both.min_component)) == (
        pooled["largest_tumour"], pooled["et_threshold"], pooled["min_component"])
    assert both.postprocess_source == "chosen on the members' 6 validation cases" and len(both.statistics) == 6
    assert any(both.min_component)  # the specks are worth removing: the step is on
    # without statistics: the members' own where they agree, else none, said so
    bare = [Predictor.from_checkpoint(checkpoint_state(postprocess_min_component=[0, 20, 5]), device="cpu")] * 2
    assert Predictor.ensemble(bare).min_component == (0, 20, 5)
    other = Predictor.from_checkpoint(checkpoint_state(postprocess_min_component=[0, 50, 5]), device="cpu")
    mixed = Predictor.ensemble([bare[0], other])
    assert mixed.min_component == (0, 0, 0) and mixed.postprocess_source.startswith("none: the members chose differently")
    assert "post-processing: none (none: the members chose different" in mixed.settings_line()


def test_lesion_tables_of_an_empty_region_round_trip():
    table = lesion_table(np.zeros((4, 4, 4), np.int32), np.zeros((4, 4, 4), bool), (1, 1, 1), 1, 10.0)
    stats = [{"dice": [1.0] * 3, "dice_cleaned": [1.0] * 3, "et": [0, 1.0, 1.0], "et_cleaned": [0, 1.0, 1.0],
              "components": [{"table": table, "parent": np.zeros(0, np.int64)}] * 3}]
    back = statistics_from_state(json.loads(json.dumps(_plain(statistics_state(stats)))))
    assert back[0]["components"][0]["table"].pairs.shape == (0, 3) and back[0]["components"][0]["table"].dice() == 1.0


def test_cli_predicts_with_several_models(raw, tmp_path, capsys):
    for k in range(2):
        save_checkpoint(tmp_path / f"m{k}.pt", checkpoint_state(seed=k))
    assert main(["predict", str(tmp_path / "m0.pt"), str(tmp_path / "m1.pt"), str(raw / "c0"), str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    assert (tmp_path / "out/c0.nii.gz").is_file()
    assert "ensemble of 2 models" in capsys.readouterr().err


def test_exported_model_and_checkpoints_make_one_mixed_ensemble(raw, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tumorseg.inference.onnx_model import export_onnx

    save_checkpoint(tmp_path / "a.pt", checkpoint_state(seed=0))
    save_checkpoint(tmp_path / "b.pt", checkpoint_state("unet-lite", filters=(4, 8, 16), seed=1))
    export_onnx(tmp_path / "a.pt", tmp_path / "a.onnx")
    # `auto` runs the UNet3D checkpoint in ONNX Runtime: the other checkpoint joins it in PyTorch
    both = Predictor.from_checkpoints([tmp_path / "a.onnx", tmp_path / "b.pt"], device="cpu", amp="off")
    assert both.engine == "mixed" and both.members == 2 and not both.may_compile()
    case = discover_cases(raw / "c0")[0]
    reference = Predictor.ensemble([Predictor.from_checkpoint(tmp_path / f"{n}.pt", device="cpu", amp="off",
                                                              engine="torch")
                                    for n in "ab"])
    a, b = predict_case(both, case, probabilities=True), predict_case(reference, case, probabilities=True)
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-4
    # `auto` runs UNet3D checkpoints in ONNX Runtime on a float32 CPU, other networks in PyTorch: one ensemble
    auto = Predictor.from_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], device="cpu", amp="off")
    assert auto.engine == "mixed" and auto.pytorch_model is None
    c = predict_case(auto, case, probabilities=True)
    assert np.abs(c.probabilities - b.probabilities).max() < 1e-4
    # an export is the model it was exported from: not a second member
    with pytest.raises(TumorsegError, match=r"a.onnx: the same model as .*a.pt"):
        Predictor.from_checkpoints([tmp_path / "a.pt", tmp_path / "a.onnx"], device="cpu")
    assert main(["predict", str(tmp_path / "a.onnx"), str(tmp_path / "b.pt"), str(raw / "c0"), str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    assert "PyTorch and ONNX Runtime" in capsys.readouterr().err


def test_same_model_twice_and_other_class_counts_are_refused(tmp_path):
    save_checkpoint(tmp_path / "a.pt", checkpoint_state())
    save_checkpoint(tmp_path / "copy.pt", checkpoint_state())  # the same bytes under another name
    with pytest.raises(TumorsegError, match=r"copy.pt: the same model as .*a.pt; an ensemble takes each model once"):
        Predictor.from_checkpoints([tmp_path / "a.pt", tmp_path / "copy.pt"], device="cpu")
    five = checkpoint_state(seed=1)
    five["network"]["out_channels"] = 5  # e.g. a run that kept the cavity as a class of its own
    five["model"] = build_network(**five["network"]).state_dict()
    save_checkpoint(tmp_path / "five.pt", five)
    with pytest.raises(TumorsegError, match=r"five.pt: out_channels 5, but .*a.pt: 4"):
        Predictor.from_checkpoints([tmp_path / "a.pt", tmp_path / "five.pt"], device="cpu")


def test_nested_ensembles_weigh_every_network_once(raw):
    members = [Predictor.from_checkpoint(checkpoint_state(seed=k), device="cpu") for k in range(3)]
    nested = Predictor.ensemble([Predictor.ensemble(members[:2]), members[2]])
    flat = Predictor.ensemble(members)
    assert nested.members == 3 and len(nested.model.members) == 3
    case = discover_cases(raw / "c0")[0]
    a, b = predict_case(nested, case, probabilities=True), predict_case(flat, case, probabilities=True)
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-6


def test_compiled_ensemble_is_one_network_with_the_ensembles_window_batch(tmp_path):
    from tumorseg.devices import window_batch
    from tumorseg.inference.compiled import CompiledNetwork

    # the ensemble's window (32, 32, 24) is larger than either member's patch: fewer windows per call
    save_checkpoint(tmp_path / "m0.pt", checkpoint_state(filters=(4, 8, 16, 32), patch=(16, 16, 16)))
    save_checkpoint(tmp_path / "m1.pt", checkpoint_state(seed=1, patch=(32, 32, 20)))
    models = [tmp_path / "m0.pt", tmp_path / "m1.pt"]
    compiled = Predictor.from_checkpoints(models, device="cpu", engine="compile")
    assert compiled.engine == "compile" and isinstance(compiled.model, CompiledNetwork)
    assert isinstance(compiled.model.model, EnsembleNetwork) and len(compiled.model.model.members) == 2
    cpu = torch.device("cpu")
    assert compiled.patch == (32, 32, 24) and window_batch(cpu, (32, 32, 24)) < window_batch(cpu, (32, 32, 20))
    assert compiled.sw_batch_size == compiled.model.batch == window_batch(cpu, (32, 32, 24))
    plain = Predictor.from_checkpoints(models, device="cpu", engine="torch")
    assert plain.engine == "torch" and plain.sw_batch_size == window_batch(cpu, (32, 32, 24))


def test_auto_compiles_an_ensemble_only_where_the_passes_left_repay_every_member(monkeypatch):
    from tumorseg.inference.compiled import COMPILE_SECONDS, COMPILED_SAVES, CompiledNetwork
    from tumorseg.inference.predict import _compile_if_it_pays

    members = [Predictor.from_checkpoint(checkpoint_state(seed=k), device="cpu") for k in range(3)]
    three = Predictor.ensemble(members)
    # compiling itself is `test_compiled`'s: here only the decision (a CompiledNetwork compiles at its first call)
    monkeypatch.setattr(Predictor, "compiled", lambda self: replace(self, engine="compile", model=CompiledNetwork(self.model)))
    seconds = 2 * COMPILE_SECONDS / (10 * COMPILED_SAVES)  # 10 passes left save twice one network's compiling
    assert _compile_if_it_pays(members[0], seconds, 10, None).engine == "compile"
    assert _compile_if_it_pays(three, seconds, 10, None) is three  # not three networks' compiling
    assert _compile_if_it_pays(three, 2 * seconds, 10, None).engine == "compile"


def test_damaged_or_missing_statistics_are_named_not_a_traceback():
    good = Predictor.from_checkpoint(checkpoint_state(postprocess_statistics=statistics_state(_noisy_statistics(3))),
                                     device="cpu")
    for stored, why in (("garbage", "damaged validation statistics"), ({"dice": 1}, "damaged validation statistics"),
                        ([{"dice": [float("nan")] * 3}], "damaged validation statistics"),
                        (None, "stores no validation statistics; train with --postprocess")):
        other = Predictor.from_checkpoint(checkpoint_state(seed=1, postprocess_min_component=[0, 50, 5],
                                                           postprocess_statistics=stored), device="cpu")
        both = Predictor.ensemble([good, other], ["good.pt", "other.pt"])
        assert both.statistics is None and both.min_component == (0, 0, 0)
        assert f"(other.pt {why}" in both.postprocess_source
    same = Predictor.ensemble([other, Predictor.from_checkpoint(checkpoint_state(
        seed=2, postprocess_min_component=[0, 50, 5]), device="cpu")], ["x.pt", "y.pt"])
    assert same.min_component == (0, 50, 5) and same.postprocess_source.startswith("the members' own: not chosen")


def test_nested_ensembles_hold_each_model_once_and_fingerprint_as_flat(tmp_path):
    for k in range(3):
        save_checkpoint(tmp_path / f"m{k}.pt", checkpoint_state(seed=k))
    a, b, c = (Predictor.from_checkpoint(tmp_path / f"m{k}.pt", device="cpu") for k in range(3))
    inner = Predictor.ensemble([a, b], ["m0.pt", "m1.pt"])
    with pytest.raises(TumorsegError, match="inner: holds the same model as m0.pt"):
        Predictor.ensemble([a, inner], ["m0.pt", "inner"])
    assert Predictor.ensemble([inner, c]).made_by() == Predictor.ensemble([c, b, a]).made_by()
    # a network built in Python (classes unknown) does not hide two others' different class counts
    five = checkpoint_state(seed=3)
    five["network"]["out_channels"] = 5
    five["model"] = build_network(**five["network"]).state_dict()
    unknown = replace(a, out_channels=None, model_digest=None)
    with pytest.raises(TumorsegError, match="five: out_channels 5, but m1.pt: 4"):
        Predictor.ensemble([unknown, b, Predictor.from_checkpoint(five, device="cpu")], ["python", "m1.pt", "five"])


def test_folds_of_other_cases_are_refused_though_the_first_records_none(tmp_path):
    for k, cases in enumerate((None, "AAA", "BBB")):
        save_checkpoint(tmp_path / f"cv/fold_{k}/best.pt", {**checkpoint_state(seed=k), "data_cases": cases,
                                                            "config": {"fold": k, "folds": 3}})
    with pytest.raises(TumorsegError, match=r"fold_2/best.pt: trained on other cases than .*fold_1/best.pt"):
        checkpoint_files(tmp_path / "cv")
    save_checkpoint(tmp_path / "cv/fold_2/best.pt", {**checkpoint_state(seed=2), "data_cases": "AAA",
                                                     "config": {"fold": 2, "folds": 3}})
    assert len(checkpoint_files(tmp_path / "cv")) == 3


def test_no_postprocess_names_no_source(raw, tmp_path, capsys):
    for k in range(2):
        save_checkpoint(tmp_path / f"m{k}.pt", checkpoint_state(
            seed=k, postprocess_statistics=statistics_state(_noisy_statistics(k))))
    both = Predictor.from_checkpoints([tmp_path / "m0.pt", tmp_path / "m1.pt"], device="cpu")
    assert both.postprocess_source.startswith("chosen on")
    predict([tmp_path / "m0.pt", tmp_path / "m1.pt"], raw / "c0", tmp_path / "out", device="cpu", postprocess=False)
    assert "post-processing: none\n" in capsys.readouterr().err
