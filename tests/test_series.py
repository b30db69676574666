import csv
import os

import pytest

from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.labels import MODALITIES
from tumorseg.layouts import discover_cases
from tumorseg.layouts.series import guess_modality, propose_case_list
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.synth import synthesize

from factory import write_case

# A patient's series as dcm2niix names them (`%f_%p_%t_%s`: folder, protocol, time, series number).
SERIES = {"t1": "DICOM_t1_mprage_sag_p2_iso_20190101120000_3", "t1ce": "DICOM_t1_mprage_sag_p2_iso_POST_GAD_20190101120000_9",
          "t2": "DICOM_t2_tse_tra_20190101120000_4", "flair": "DICOM_t2_tirm_tra_dark-fluid_20190101120000_5"}


@pytest.mark.parametrize("name, modality", [
    ("3_t1_mprage_sag.nii.gz", "t1"), ("MPRAGE_PRE_3.nii", "t1"), ("T1_SE_AX_PRE_GD_4.nii.gz", "t1"),
    ("T1_MPRAGE_POST_GAD_9.nii.gz", "t1ce"), ("sT1W_3D_TFE_+C_801.nii.gz", "t1ce"), ("AX_3D_T1_BRAVO_C+_10.nii.gz", "t1ce"),
    ("t1_fl3d_tra_KM_12.nii.gz", "t1ce"), ("AX_T1_FLAIR_POST_7.nii.gz", "t1ce"),  # GE's T1 FLAIR is T1-weighted
    ("AX_T2_FSE_3.nii.gz", "t2"), ("T2W_TSE_5.nii.gz", "t2"), ("AX_T2_FLAIR_5.nii.gz", "flair"),
    ("t2_tirm_tra_dark-fluid_4.nii.gz", "flair"), ("SAG_3D_FLAIR_4.nii.gz", "flair"), ("T1Gd.nii.gz", "t1ce"),
    ("tumor_seg.nii.gz", "seg"),
    ("localizer_1.nii.gz", None), ("AAHead_Scout_1.nii.gz", None), ("ep2d_diff_ADC_6.nii.gz", None),
    ("t1_mprage_sag_ph_3.nii.gz", None), ("AX_SWI_8.nii.gz", None), ("t2_star_gre_7.nii.gz", None), ("AX_T2*_GRE_7.nii.gz", None), ("AX_T2_GRE_7.nii.gz", None),
    ("brain_mask.nii.gz", None), ("20190101120000_11.nii.gz", None),
])
def test_modalities_guessed_from_series_names(name, modality):
    """Siemens', GE's and Philips' protocol names; diffusion, phase, T2* and localizers are no modality."""
    assert guess_modality(name) == modality


def _series_patient(folder, scans: dict) -> None:
    folder.mkdir(parents=True)
    for modality, path in scans.items():
        os.symlink(path, folder / f"{SERIES[modality]}.nii.gz")
    os.symlink(scans["t2"], folder / "DICOM_localizer_20190101120000_1.nii.gz")


def _read(table):
    with open(table, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cases_proposes_a_list_for_series_named_scans_beside_a_layouts_cases(tmp_path, capsys):
    write_case(tmp_path / "data", "BraTS20_Training_001")  # read as its layout reads it
    raw = tmp_path / "raw"
    for i in range(2):
        write_case(raw, f"p{i}", seed=i)
    for i in range(2):  # two patients, each a `visit1` folder: named by the folders above
        _series_patient(tmp_path / "data" / f"patient{i}" / "visit1",
                        {m: raw / f"p{i}" / f"p{i}_{m}.nii.gz" for m in MODALITIES})
    os.symlink(raw / "p1" / "p1_t2.nii.gz", tmp_path / "data" / "patient1" / "visit1" / "AX_T2_FSE_6.nii.gz")
    table = tmp_path / "cases.csv"
    assert main(["cases", str(tmp_path / "data"), str(table)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {table}: 3 case(s), 2 of them guessed from series names" in out
    assert "t2: 2 candidates (AX_T2_FSE_6, DICOM_t2_tse_tra_20190101120000_4); fill in the one to use" in out
    rows = {r["case"]: r for r in _read(table)}
    assert list(rows) == ["BraTS20_Training_001", "patient0_visit1", "patient1_visit1"]
    assert rows["patient1_visit1"]["t2"] == "" and rows["patient0_visit1"]["seg"] == ""
    assert rows["BraTS20_Training_001"]["seg"] == "data/BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz"
    cases = {c.case_id: c for c in discover_cases(table)}  # the list reads back as tumorseg reads lists
    for m in MODALITIES:
        assert os.path.samefile(cases["patient0_visit1"].image(m), raw / "p0" / f"p0_{m}.nii.gz")
    assert "t2" not in cases["patient1_visit1"].images  # left for a person to fill in
    assert main(["cases", str(tmp_path / "data"), str(table)]) == 2  # a list someone may have corrected
    assert capsys.readouterr().err.strip() == f"tumorseg cases: error: {table}: exists; --force replaces it"
    assert main(["cases", str(tmp_path / "data"), str(tmp_path / "cases.txt")]) == 2


def test_cases_refuses_what_a_list_cannot_hold(tmp_path):
    synthesize(tmp_path / "msd", 1, shape=(16, 16, 16), layout="msd", progress=False)
    with pytest.raises(TumorsegError, match="4-D files .MSD.: tumorseg reads them as they are"):
        propose_case_list(tmp_path / "msd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TumorsegError, match="no NIfTI scans found"):
        propose_case_list(tmp_path / "empty")


def test_a_proposed_list_of_real_scans_is_prepared(real_data_dir, tmp_path):
    """Two real cases as a scanner's series: the list `cases` writes is what prepare reads."""
    for case in sorted(real_data_dir.iterdir())[:2]:
        _series_patient(tmp_path / "clinic" / case.name, {m: case / f"{case.name}_{m}.nii.gz" for m in MODALITIES})
        os.symlink(case / f"{case.name}_seg.nii.gz", tmp_path / "clinic" / case.name / "tumour_seg.nii.gz")
    table = tmp_path / "clinic.csv"
    assert main(["cases", str(tmp_path / "clinic"), str(table)]) == 0
    result = prepare(table, tmp_path / "prep", PrepareConfig(), workers=1, progress=False)
    assert result.manifest["counts"]["failed"] == 0 and len(result.manifest["cases"]) == 2
    for record in result.manifest["cases"]:
        assert record["sources"]["t1ce"].endswith(SERIES["t1ce"] + ".nii.gz") and record["segmentation"]
