import csv
import json

import nibabel as nib
import numpy as np
import pytest

from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.evaluation import FAILED_CASE, evaluate
from tumorseg.evaluation.results import STATS
from tumorseg.labels import BRATS2020, prediction_description

from factory import AFFINE, write_case

SHAPE = (24, 24, 20)


def case_id(n: int) -> str:
    return f"BraTS20_Training_{n:03d}"


def seg_of(gt_dir, n):
    return np.asarray(nib.load(gt_dir / case_id(n) / f"{case_id(n)}_seg.nii.gz").dataobj)


def save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), affine), path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """GT cases 1-4 and 6 with segs, 5 without; predictions: 1 perfect, 2 missing,
    3 wrong shape, 4 with label 3, 6 with a shifted affine, plus an extra 999."""
    root = tmp_path_factory.mktemp("eval")
    gt, pred = root / "gt", root / "pred"
    pred.mkdir()
    for n in (1, 2, 3, 4, 6):
        write_case(gt, case_id(n), shape=SHAPE, seed=n)
    write_case(gt, case_id(5), shape=SHAPE, seg=None)
    save(pred / f"{case_id(1)}.nii.gz", seg_of(gt, 1))
    save(pred / f"{case_id(3)}.nii.gz", seg_of(gt, 3)[:, :, :-1])
    save(pred / f"{case_id(4)}.nii.gz", np.where(seg_of(gt, 4) == 4, 3, seg_of(gt, 4)))
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    save(pred / f"{case_id(6)}.nii", seg_of(gt, 6), shifted)
    save(pred / f"{case_id(999)}.nii.gz", seg_of(gt, 1))
    (pred / "notes.txt").write_text("not a prediction")
    save(pred / f"{case_id(1)}_probabilities.nii.gz", seg_of(gt, 1))  # predict --probabilities output: ignored
    return gt, pred


def test_statuses_lists_and_csv(folders, tmp_path):
    gt, pred = folders
    result = evaluate(pred, gt, out_csv=tmp_path / "out" / "metrics.csv", progress=False)
    statuses = {r.case_id: r.status for r in result.rows}
    expected = {1: "ok", 2: "missing", 3: "error", 4: "error", 6: "error"}
    assert statuses == {case_id(n): status for n, status in expected.items()}
    assert result.missing == [case_id(2)] and result.extra == [case_id(999)]
    assert result.failed == [case_id(n) for n in (2, 3, 4, 6)]
    assert "shape (24, 24, 19)" in result.errors[case_id(3)] and "(24, 24, 20)" in result.errors[case_id(3)]
    assert "label 3" in result.errors[case_id(4)] and "affine" in result.errors[case_id(6)]
    assert all("\n" not in msg for msg in result.errors.values())
    assert len(result.skipped) == 1 and case_id(5) in result.skipped[0]

    with open(tmp_path / "out" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:4] == ["case", "status", "WT_dice", "WT_hd95"] and list(rows[0])[-2:] == ["message", "model"]
    assert [r["case"] for r in rows] == [case_id(n) for n in (1, 2, 3, 4, 6)]
    perfect, missing = rows[0], rows[1]
    for region in ("WT", "TC", "ET"):
        assert float(perfect[f"{region}_dice"]) == 1.0 and float(perfect[f"{region}_hd95"]) == 0.0
        assert float(missing[f"{region}_dice"]) == 0.0 and float(missing[f"{region}_hd95"]) == 373.13
    assert missing["status"] == "missing" and "no prediction" in missing["message"]
    assert perfect["WT_lesion_fp"] == "0" and int(perfect["WT_lesion_tp"]) >= 1 and missing["WT_lesion_tp"] == ""
    assert result.summary["lesions"]["WT"] == {"tp": int(perfect["WT_lesion_tp"]), "fn": 0, "fp": 0}  # ok cases only


def test_lesion_counts_name_false_positives(folders, tmp_path):
    gt, _ = folders
    pred = tmp_path / "pred"
    pred.mkdir()
    speckled = seg_of(gt, 1).copy()
    speckled[0, 0, 0] = speckled[23, 23, 19] = 2  # two specks far from the tumour
    save(pred / f"{case_id(1)}.nii.gz", speckled)
    result = evaluate(pred, gt, progress=False, only_predicted=True)
    (row,) = result.rows
    assert row.metrics["WT"]["lesion_fp"] == 2 and row.metrics["TC"]["lesion_fp"] == 0
    assert f"WT     {row.metrics['WT']['lesion_tp']} found, 0 missed, 2 false positives" in result.table()


def test_model_fingerprints_are_listed_and_several_models_warned(folders, tmp_path):
    """The fingerprint `predict` records per prediction: per case in the CSV, counted in the summary,
    named under the table, and a warning when one table would average several models' scores."""
    gt, _ = folders
    pred = tmp_path / "pred"
    pred.mkdir()
    for n, model in ((1, "0123456789ab"), (3, "0123456789ab"), (4, None)):
        image = nib.Nifti1Image(seg_of(gt, n).astype(np.uint8), AFFINE)
        image.header["descrip"] = prediction_description(BRATS2020, model).encode()
        nib.save(image, pred / f"{case_id(n)}.nii.gz")
    one = evaluate(pred, gt, out_csv=tmp_path / "m.csv", progress=False, only_predicted=True)
    assert one.summary["models"] == {"0123456789ab": 2}
    assert "model: 0123456789ab (the fingerprint predict recorded" in one.report() and "warning" not in one.report()
    with open(tmp_path / "m.csv") as fh:
        assert [row["model"] for row in csv.DictReader(fh)] == ["0123456789ab", "0123456789ab", ""]
    image = nib.Nifti1Image(seg_of(gt, 4).astype(np.uint8), AFFINE)
    image.header["descrip"] = prediction_description(BRATS2020, "fedcba987654").encode()
    nib.save(image, pred / f"{case_id(4)}.nii.gz")
    several = evaluate(pred, gt, progress=False, only_predicted=True)
    assert several.summary["models"] == {"0123456789ab": 2, "fedcba987654": 1}
    assert ("warning: predictions of 2 models or settings scored together (the fingerprint predict records): "
            "0123456789ab (2 cases), fedcba987654 (1 case)") in several.report()


def test_only_the_predicted_cases_when_asked_and_a_hint_when_some_are_missing(folders, tmp_path):
    """A `predict --cases` subset: by default the others are missing and scored as failed (BraTS's
    rule) with a hint; `only_predicted` scores the predicted cases alone."""
    gt, pred = folders
    every = evaluate(pred, gt, progress=False)
    assert "(to score only the cases that have a prediction: --only-predicted)" in every.report()
    subset = evaluate(pred, gt, progress=False, only_predicted=True)
    assert [r.case_id for r in subset.rows] == [case_id(n) for n in (1, 3, 4, 6)] and not subset.missing
    assert "--only-predicted" not in subset.report() and subset.summary["cases"] == 4
    assert "over 4 cases (1 evaluated, 3 failed, each scored Dice 0, HD95 373.13)" in subset.report()
    assert "over 1 cases (1 evaluated, 0 failed)\n" in evaluate(pred, gt, progress=False, cases=[case_id(1)]).report()
    assert main(["evaluate", str(pred), str(gt), "--only-predicted", "--out", str(tmp_path / "m.csv")]) == 1  # errors
    with open(tmp_path / "m.csv") as fh:
        assert [row["status"] for row in csv.DictReader(fh)] == ["ok", "error", "error", "error"]


def test_predictions_of_other_cases_are_one_line_not_a_table_of_failures(folders, tmp_path):
    gt, _ = folders
    other = tmp_path / "other"
    other.mkdir()
    save(other / "BraTS20_Training_777.nii.gz", seg_of(gt, 1))
    with pytest.raises(TumorsegError, match=r"other: none of its predictions \(BraTS20_Training_777\) is a "
                                            r"case of .*gt \(5 segmented cases\); give the ground truth of these"):
        evaluate(other, gt, progress=False)


def test_summary_json_and_table(folders, tmp_path):
    gt, pred = folders
    result = evaluate(pred, gt, out_csv=tmp_path / "metrics.csv", progress=False)
    assert result.json_path == tmp_path / "metrics_summary.json"
    summary = json.loads(result.json_path.read_text())
    assert (summary["cases"], summary["evaluated"], summary["failed"]) == (5, 1, 4)
    assert summary["failed_case_values"] == FAILED_CASE
    assert summary["missing"] == [case_id(2)] and summary["extra"] == [case_id(999)]
    assert set(summary["errors"]) == {case_id(3), case_id(4), case_id(6)}
    wt_dice = summary["metrics"]["WT"]["dice"]  # values 1, 0, 0, 0, 0
    assert set(wt_dice) == set(STATS)
    assert wt_dice == pytest.approx({"mean": 0.2, "std": 0.4, "median": 0.0, "25quantile": 0.0, "75quantile": 0.0})
    hd = summary["metrics"]["ET"]["hd95"]  # values 0 and 4 x 373.13
    assert hd["mean"] == pytest.approx(373.13 * 4 / 5) and hd["median"] == 373.13
    table = result.table()
    assert "WT" in table and "HD95 (mm)" in table and "0.2000" in table and "5 cases" in table
    report = result.report()
    assert case_id(2) in report and case_id(999) in report and "label 3" in report


def test_json_only_and_parallel_workers_agree(folders, tmp_path):
    gt, pred = folders
    serial = evaluate(pred, gt, out_json=tmp_path / "s.json", progress=False)
    assert serial.csv_path is None and (tmp_path / "s.json").exists()
    parallel = evaluate(pred, gt, progress=False, workers=2)
    assert parallel.rows == serial.rows and parallel.summary == serial.summary


def test_spacing_comes_from_the_ground_truth_header(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_case(tmp_path / "gt", case_id(1), shape=SHAPE, seg=None)
    g, p = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    g[:, :, 5], p[:, :, 7] = 2, 2  # oedema planes two slices apart: 4 mm
    save(tmp_path / "gt" / case_id(1) / f"{case_id(1)}_seg.nii.gz", g, affine)
    (tmp_path / "pred").mkdir()
    save(tmp_path / "pred" / f"{case_id(1)}.nii.gz", p, affine)
    (row,) = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False).rows
    assert row.metrics["WT"]["hd95"] == 4.0 and row.metrics["WT"]["dice"] == 0.0
    assert row.metrics["ET"] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0,
                                  "lesion_dice": 1.0, "lesion_hd95": 0.0, "lesion_tp": 0, "lesion_fn": 0, "lesion_fp": 0}


def test_folder_problems_are_one_line_errors(folders, tmp_path):
    gt, pred = folders
    with pytest.raises(TumorsegError, match="no such folder"):
        evaluate(tmp_path / "nowhere", gt, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TumorsegError, match="no predictions"):
        evaluate(tmp_path / "empty", gt, progress=False)
    both = tmp_path / "both"
    both.mkdir()
    for ext in (".nii", ".nii.gz"):
        save(both / f"{case_id(1)}{ext}", seg_of(gt, 1))
    result = evaluate(both, gt, progress=False)
    assert "more than one prediction" in result.errors[case_id(1)]


def test_real_case_scored_against_itself(real_data_dir, tmp_path):
    case = real_data_dir / "Brats18_CBICA_ABM_1"
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / f"{case.name}.nii.gz").symlink_to(case / f"{case.name}_seg.nii.gz")
    result = evaluate(tmp_path / "pred", case, out_csv=tmp_path / "m.csv", progress=False)
    (row,) = result.rows
    assert row.status == "ok"
    for region in ("WT", "TC", "ET"):
        assert row.metrics[region] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0,
                                          "lesion_dice": 1.0, "lesion_hd95": 0.0, "lesion_tp": row.metrics[region]["lesion_tp"],
                                          "lesion_fn": 0, "lesion_fp": 0}
        assert row.metrics[region]["lesion_tp"] >= 1
    assert result.summary["lesions"] == {r: {"tp": row.metrics[r]["lesion_tp"], "fn": 0, "fp": 0} for r in ("WT", "TC", "ET")}
    assert "0 missed, 0 false positives" in result.table()


def test_lesion_challenge_from_case_ids():
    from tumorseg.evaluation.evaluate import case_challenge

    assert case_challenge("BraTS-MEN-00004-000") == "MEN" and case_challenge("BraTS-MET-00001-000") == "MET"
    assert case_challenge("BraTS20_Training_001") == "GLI" and case_challenge("BraTS-PED-00001-000", "MET") == "MET"
    assert case_challenge("BraTS-GoAT-00001-000") == "GoAT" and case_challenge("BraTS-XYZ-00001-000") == "GLI"
    assert case_challenge("BraTS-GLI-00001-000", "brats-met") == "MET" and case_challenge("x", "gli") == "GLI"
    with pytest.raises(TumorsegError, match="unknown BraTS challenge 'LIVER'"):
        case_challenge("x", "LIVER")


def test_the_same_note_for_many_cases_is_one_line():
    from tumorseg.notes import grouped

    notes = [f"case_{i}: prediction read as brats2020 labels" for i in range(5)] + ["case_9: another thing", "bare"]
    assert grouped(notes) == ["prediction read as brats2020 labels (5 cases: case_0, case_1, case_2, ...)",
                               "case_9: another thing", "bare"]


def test_an_output_that_cannot_be_written_fails_before_the_scoring(folders, tmp_path, monkeypatch):
    import sys

    module = sys.modules["tumorseg.evaluation.evaluate"]
    gt, pred = folders
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(module, "_run_jobs", lambda *a: pytest.fail("scored although the results could not be kept"))
    with pytest.raises(TumorsegError, match=rf"^{tmp_path / 'file' / 'out'}: cannot write there \(.*\); write the "
                                            r"metrics elsewhere \(--out\)$"):
        evaluate(pred, gt, out_csv=tmp_path / "file/out/m.csv", progress=False)
    with pytest.raises(TumorsegError, match=rf"^{tmp_path}: a folder; give the file to write \(--out FOLDER/metrics.csv\)$"):
        evaluate(pred, gt, out_csv=tmp_path, progress=False)


def test_predictions_on_other_grids(folders, tmp_path, capsys):
    """The same voxels in RAS: scored as they are; a wider view (padded, header unchanged) or a
    missing folder: refused, and nothing created."""
    gt, _ = folders
    seg = nib.load(gt / case_id(1) / f"{case_id(1)}_seg.nii.gz")
    data = np.asarray(seg.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(data.shape[:2]) - 1
    (tmp_path / "ras").mkdir()
    save(tmp_path / "ras" / f"{case_id(1)}.nii.gz", data[::-1, ::-1].copy(), seg.affine @ flip)
    (row,) = evaluate(tmp_path / "ras", gt, cases=[case_id(1)], progress=False).rows
    assert row.status == "ok" and row.metrics["WT"]["dice"] == 1.0 and "resampled" not in row.message
    (tmp_path / "pad").mkdir()
    save(tmp_path / "pad" / f"{case_id(1)}.nii.gz", np.pad(data, 4), seg.affine)
    (row,) = evaluate(tmp_path / "pad", gt, cases=[case_id(1)], progress=False).rows
    assert row.status == "error" and "not the same field of view (cropped, padded or shifted" in row.message
    assert row.message.endswith("is the ground truth on its scans' grid?")
    (tmp_path / "nudged").mkdir()
    nudged = seg.affine.copy()
    nudged[:3, 3] += 0.01  # origins another tool rounded: the same voxels
    save(tmp_path / "nudged" / f"{case_id(1)}.nii.gz", data, nudged)
    (row,) = evaluate(tmp_path / "nudged", gt, cases=[case_id(1)], progress=False).rows
    assert row.status == "ok" and row.metrics["WT"]["dice"] == 1.0 and "centres under 0.05 voxel apart" in row.message
    with pytest.raises(TumorsegError, match="no such folder"):
        evaluate(tmp_path / "typo", gt, progress=False)
    assert not (tmp_path / "typo").exists()


def test_float_rounding_noise_in_truth_and_prediction_scores_as_the_integers(folders, tmp_path):
    gt, _ = folders
    seg = seg_of(gt, 1)
    noisy_gt = tmp_path / "gt" / case_id(1)
    noisy_gt.mkdir(parents=True)
    noise = np.where(seg > 0, np.where(seg % 2 == 0, 1e-6, -1e-6), 0.0)
    nib.save(nib.Nifti1Image((seg + noise).astype(np.float32), AFFINE), noisy_gt / f"{case_id(1)}_seg.nii.gz")
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image((seg - noise).astype(np.float32), AFFINE), tmp_path / "pred" / f"{case_id(1)}.nii.gz")
    (row,) = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False).rows
    assert row.status == "ok" and all(row.metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))


def test_an_unusable_ground_truth_is_not_the_models_failure(folders, tmp_path, capsys):
    gt, _ = folders
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    for n in (1, 2):
        (tmp_path / "gt" / case_id(n)).symlink_to(gt / case_id(n))
        save(tmp_path / "pred" / f"{case_id(n)}.nii.gz", seg_of(gt, n))
    broken = tmp_path / "gt" / case_id(3)
    broken.mkdir()
    bad = seg_of(gt, 3).copy()
    bad[0, 0, 0] = 5
    save(broken / f"{case_id(3)}_seg.nii.gz", bad)
    save(tmp_path / "pred" / f"{case_id(3)}.nii.gz", seg_of(gt, 3))
    result = evaluate(tmp_path / "pred", tmp_path / "gt", out_csv=tmp_path / "m.csv", progress=False)
    assert result.summary["cases"] == 2 and result.summary["failed"] == 0 and result.failed == []
    assert result.summary["metrics"]["WT"]["dice"]["mean"] == 1.0  # the two usable cases, both perfect
    assert list(result.truth_errors) == [case_id(3)] and "label" in result.truth_errors[case_id(3)]
    assert "5" in result.truth_errors[case_id(3)] and f"{case_id(3)}_seg.nii.gz" in result.truth_errors[case_id(3)]
    assert "ground truth unusable, not scored (1):" in result.report()
    with open(tmp_path / "m.csv") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert rows[case_id(3)]["status"] == "truth_error" and rows[case_id(3)]["WT_dice"] == ""
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(tmp_path / "c.csv")]) == 1
    assert "ground truth unusable" in capsys.readouterr().out
    for n in (1, 2):
        (tmp_path / "gt" / case_id(n)).unlink()
    with pytest.raises(TumorsegError, match="no ground truth could be used"):
        evaluate(tmp_path / "pred", tmp_path / "gt", progress=False, only_predicted=True)


def test_an_unusable_truth_without_a_usable_prediction_is_no_failure_either(folders, tmp_path):
    """A case whose prediction is missing, or given twice (`.nii` and `.nii.gz`), is failed only
    when its truth could have scored it; a broken truth is named as such instead."""
    gt, _ = folders
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt" / case_id(1)).symlink_to(gt / case_id(1))
    save(tmp_path / "pred" / f"{case_id(1)}.nii.gz", seg_of(gt, 1))
    bad = seg_of(gt, 3).copy()
    bad[0, 0, 0] = 5
    for n in (3, 4):
        (tmp_path / "gt" / case_id(n)).mkdir()
        save(tmp_path / "gt" / case_id(n) / f"{case_id(n)}_seg.nii.gz", bad)
    for ext in (".nii", ".nii.gz"):  # case 4: two files; case 3: none
        save(tmp_path / "pred" / f"{case_id(4)}{ext}", seg_of(gt, 4))
    result = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False, workers=2)
    assert sorted(result.truth_errors) == [case_id(3), case_id(4)] and result.failed == [] and not result.missing
    assert result.summary["cases"] == 1 and result.summary["failed"] == 0
    assert all("labels 5" in msg for msg in result.truth_errors.values())
    (tmp_path / "gt" / case_id(2)).symlink_to(gt / case_id(2))  # a usable truth: missing is still failed
    result = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False)
    assert result.missing == [case_id(2)] and result.failed == [case_id(2)] and result.summary["cases"] == 2


def test_a_flat_truth_folder_holding_no_conventions_labels_is_a_truth_error(folders, tmp_path):
    gt, _ = folders
    (tmp_path / "labels").mkdir()
    (tmp_path / "pred").mkdir()
    bad = seg_of(gt, 3).copy()
    bad[0, 0, 0] = 5
    for n, seg in ((1, seg_of(gt, 1)), (3, bad)):  # labelsTr style: names no convention
        save(tmp_path / "labels" / f"{case_id(n)}.nii.gz", seg)
        save(tmp_path / "pred" / f"{case_id(n)}.nii.gz", seg_of(gt, n))
    result = evaluate(tmp_path / "pred", tmp_path / "labels", progress=False)
    assert list(result.truth_errors) == [case_id(3)] and result.failed == [] and result.summary["cases"] == 1
    assert "has labels 5 outside" in result.truth_errors[case_id(3)]


def test_an_unfetched_prediction_link_is_named_and_a_dead_twin_ignored(folders, tmp_path):
    gt, _ = folders
    pred = tmp_path / "pred"
    pred.mkdir()
    save(pred / f"{case_id(1)}.nii.gz", seg_of(gt, 1))
    (pred / f"{case_id(1)}.nii").symlink_to("/gone/old.nii")  # a stale link beside the real file: not a second one
    (pred / f"{case_id(3)}.nii.gz").symlink_to("../.git/annex/objects/x.nii.gz")  # DataLad before `datalad get`
    rows = {r.case_id: r for r in evaluate(pred, gt, progress=False, only_predicted=True).rows}
    assert rows[case_id(1)].status == "ok"
    assert rows[case_id(3)].status == "error" and "not fetched? `datalad get` it" in rows[case_id(3)].message


def test_a_probability_map_given_as_labels_is_one_short_line(folders, tmp_path):
    """Each of its values listed made a 6 MB line (and a 153 MB report page); no convention makes it right."""
    gt, _ = folders
    preds = tmp_path / "preds"
    preds.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random(SHAPE, dtype=np.float32), AFFINE), preds / f"{case_id(1)}.nii.gz")
    scores = evaluate(preds, gt, only_predicted=True, progress=False)
    message = scores.errors[case_id(1)]
    assert message.endswith(": a probability or intensity map, not labels") and len(message) < 300, message
