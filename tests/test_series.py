import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.labels import MODALITIES
from tumorseg.layouts import discover_cases
from tumorseg.layouts.series import guess_case, guess_series, propose_case_list
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
    # before contrast said outright; a post-operative scan is no contrast
    ("t1_se_tra_vor_KM_3.nii.gz", "t1"), ("AX_T1_NON_CONTRAST_3.nii.gz", "t1"), ("T1_W_O_GAD.nii.gz", "t1"),
    ("AX_T1_C-_3.nii.gz", "t1"), ("T1_post_op.nii.gz", "t1"), ("00001_t1n_bet.nii.gz", "t1"),
    ("T1_gadovist.nii.gz", "t1ce"), ("T1_postgado.nii.gz", "t1ce"), ("T1WGd.nii.gz", "t1ce"), ("00001_t1c_bet.nii.gz", "t1ce"),
    ("00001_t2f_bet.nii.gz", "flair"), ("t2_spc_da-fl_sag_p2_iso_7.nii.gz", "flair"),
    ("T2W_FFE_6.nii.gz", None), ("t2_fl2d_tra_hemo_8.nii.gz", None), ("t2_medic_tra.nii.gz", None),  # T2*
    ("SUB_T1_POST-PRE_12.nii.gz", None), ("t1_vibe_fs_tra_SUB.nii.gz", None), ("T1map.nii.gz", None),
    ("T1_relCBV.nii.gz", None), ("mp2rage_UNI_Images.nii.gz", None), ("AX_T1_TUMOR_PROTOCOL.nii.gz", "t1"),
    # a second review: negations in other languages, words that are no contrast, T2* without its `*`
    ("T1_SE_TRA_SANS_GADO_3.nii.gz", "t1"), ("t1_se_tra_ohne_KM_3.nii.gz", "t1"), ("T1_senza_mdc.nii.gz", "t1"),
    ("T1_PREGAD_5.nii.gz", "t1"), ("T1_NONGAD.nii.gz", "t1"), ("T1_sin_contraste.nii.gz", "t1"), ("T1pre.nii.gz", "t1"),
    ("AX_T1_POST_NO_FS_9.nii.gz", "t1ce"), ("AX_T1_POST_FOSSA_6.nii.gz", "t1"), ("postT1.nii.gz", "t1ce"),
    ("t1_mprage_KM-nativ_13.nii.gz", "t1"), ("t1_mp2rage_sag_p3_iso_T1_Images_5.nii.gz", None),
    ("T2_EPI.nii.gz", None), ("t2_swi3d1r.nii.gz", None), ("t2_tirm_cor.nii.gz", None),  # a STIR
    ("t2_tirm_tra_dark-fluid_native_5.nii.gz", "flair"), ("t2_spcir_sag.nii.gz", "flair"),
    ("t1_mprage_sag_KM_MorphoBox_Segmentation_14.nii.gz", None), ("T1_pilot.nii.gz", None),
    ("t1_mprage_sag_p2_iso_ND_5.nii.gz", None), ("AX_BRAVO_C+_Reformatted.nii.gz", None),
    ("AX_T1_W_O_IV_CONTRAST_3.nii.gz", "t1"), ("T1_SENZA_MEZZO_DI_CONTRASTO.nii.gz", "t1"), ("T1_bez_Gd.nii.gz", "t1"),
    ("T2_FE_AX_5.nii.gz", None), ("T2_FLASH_TRA.nii.gz", None), ("CT_1.nii.gz", None), ("T1_POST_BIOPSY.nii.gz", "t1"),
    # a fourth review: a negation of something else (fat saturation, a navigator) is no contrast's
    ("Ax_3D_SPGR_FOR_STEALTH_+C_10.nii.gz", "t1ce"), ("10_t1_se_tra_NON_FS_POST.nii.gz", "t1ce"),
    ("T1_NO_FS_+C.nii.gz", "t1ce"), ("AX_T1_NO_SAT_POST.nii.gz", "t1ce"), ("T1_PRE_AND_POST.nii.gz", "t1"),
])
def test_modalities_guessed_from_series_names(name, modality):
    """Siemens', GE's and Philips' protocol names; diffusion, phase, T2* and localizers are no modality."""
    guess = guess_series(name)
    assert ("t1ce" if guess == ("t1", "after") else guess and guess[0]) == modality


@pytest.mark.parametrize("names, t1, t1ce", [
    (["t1_mprage_sag_3", "t1_mprage_sag_POST_GAD_9"], "t1_mprage_sag_3", "t1_mprage_sag_POST_GAD_9"),
    (["t1_se_tra_vor_KM_3", "t1_mprage_sag_p2_iso_9"], "t1_se_tra_vor_KM_3", None),  # the MPRAGE: after? not said
    (["AX_T1_NON_CONTRAST_3", "AX_3D_BRAVO_9"], "AX_T1_NON_CONTRAST_3", None),
    (["t1_mprage_sag_p2_iso_9"], None, None),  # an MPRAGE acquired only after gadolinium is common
    (["T1_PRE_3", "T1_MPRAGE_5", "T1_POST_9"], "T1_PRE_3", "T1_POST_9"),
    # the folder's words (dcm2niix's %f) decide no series' contrast
    (["MRI_BRAIN_W_WO_CONTRAST_SAG_3D_T1_BRAVO_C+_20230101120000_9", "MRI_BRAIN_W_WO_CONTRAST_AX_T1_20230101120000_3"],
     None, "MRI_BRAIN_W_WO_CONTRAST_SAG_3D_T1_BRAVO_C+_20230101120000_9"),  # another protocol: after contrast too?
    (["t1_se_tra_KM_10", "t1_mprage_sag_p2_iso_9"], None, "t1_se_tra_KM_10"),
    (["AX_T1_NO_IV_CONTRAST_3", "8_SAG_3D_T1_MPRAGE"], "AX_T1_NO_IV_CONTRAST_3", None),
    (["t1_se_tra_uten_kontrast_3", "t1_mprage_sag_p2_iso_9"], "t1_se_tra_uten_kontrast_3", None),
    (["T1W_SE+FS_3", "T1W_3D_TFE_9"], None, None),  # `+FS`: fat saturation, no contrast
    (["Brain_Pre_Op_t1_mprage_sag_Gd_20230101_12", "Brain_Pre_Op_t2_tse_tra_20230101_4"], None, "Brain_Pre_Op_t1_mprage_sag_Gd_20230101_12"),
    (["T1_SE_TRA_SANS_GADO_3", "T1_MPRAGE_SAG_3D_7"], "T1_SE_TRA_SANS_GADO_3", None),
])
def test_t1s_told_apart_only_by_what_their_names_say(names, t1, t1ce):
    case = guess_case("p", [Path(f"{n}.nii.gz") for n in names])
    assert (case.files.get("t1"), case.files.get("t1ce")) == tuple(Path(f"{n}.nii.gz") if n else None for n in (t1, t1ce))
    if t1ce is None:
        assert any(n.startswith("t1ce: T1 series whose names do not say before or after contrast") for n in case.notes)


def test_a_users_file_beside_the_series_leaves_the_folders_words_out():
    words = "MRI_BRAIN_WITH_CONTRAST_"
    names = [f"{words}t1_se_tra_20200101120000_3", f"{words}t2_tse_tra_20200101120000_4",
             f"{words}t2_tirm_tra_dark-fluid_20200101120000_5", "seg"]
    case = guess_case("p", [Path(f"{n}.nii.gz") for n in names])
    assert "t1" not in case.files and "t1ce" not in case.files and case.files["seg"] == Path("seg.nii.gz")


def test_series_of_two_studies_in_one_folder_fill_no_row():
    names = ["P_t1_mprage_20230101120000_3", "P_t2_tse_20230101120000_4", "P_t1_mprage_POST_20230815120000_9",
             "P_flair_20230815120000_5"]
    case = guess_case("p", [Path(f"{n}.nii.gz") for n in names])
    assert case.files == {} and case.notes == ["series of 2 studies (20230101, 20230815) in one folder: give each study "
                                               "a folder of its own, or fill the row in"]


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
    tsv = tmp_path / "cases.tsv"  # read back by its suffix: tab-separated
    assert main(["cases", str(tmp_path / "data"), str(tsv)]) == 0
    assert [c.case_id for c in discover_cases(tsv)] == [c.case_id for c in discover_cases(table)]


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


def test_cases_keeps_what_discovery_knows_and_refuses_labels_a_list_cannot_carry(tmp_path):
    for patient in ("Patient-001", "Patient-002"):  # longitudinal: visits named alike, told apart by their patient
        write_case(tmp_path / "long" / patient, "week-000")
    ids = [r.case_id for r in propose_case_list(tmp_path / "long")]
    assert ids == ["Patient-001_week-000", "Patient-002_week-000"]
    synthesize(tmp_path / "b23", 1, shape=(16, 16, 16), layout="brats2023", progress=False)
    with pytest.raises(TumorsegError, match="brats2023 cases with brats2023 labels, which a case list cannot carry"):
        propose_case_list(tmp_path / "b23")


def test_a_series_folder_named_by_plane_is_not_read_as_a_case_called_ax(tmp_path, capsys):
    """dcm2niix -f %d: `AX_T1`, `AX_T1_POST` had made a case `AX` (and `Sag_T1` beside them a case `Sag`)."""
    write_case(tmp_path / "raw", "p")
    folder = tmp_path / "data" / "P1"
    folder.mkdir(parents=True)
    for m, name in (("t1", "AX_T1"), ("t1ce", "AX_T1_POST"), ("t2", "AX_T2"), ("flair", "Sag_FLAIR")):
        os.symlink(tmp_path / "raw" / "p" / f"p_{m}.nii.gz", folder / f"{name}.nii.gz")
    with pytest.raises(TumorsegError, match="no cases found"):
        discover_cases(tmp_path / "data")
    for case_id, names in (("P01", ("P01_T1w", "P01_T1Gd", "P01_T2w", "P01_T2-FLAIR")),  # one modality, two words
                           ("GBM-COR-012", ("GBM-COR-012_t1", "GBM-COR-012_t1ce", "GBM-COR-012_t2", "GBM-COR-012_flair"))):
        usual = tmp_path / "usual" / case_id  # a case id holding a plane's word is still a case
        usual.mkdir(parents=True)
        for name, m in zip(names, MODALITIES):
            os.symlink(tmp_path / "raw" / "p" / f"p_{m}.nii.gz", usual / f"{name}.nii.gz")
        (case,) = discover_cases(usual)
        assert case.case_id == case_id and set(case.images) == set(MODALITIES)
    for case_id in ("P01_T1", "P01_T2"):  # timepoints named T1, T2: their folder's name is the case's
        timepoint = tmp_path / "timepoints" / case_id
        timepoint.mkdir(parents=True)
        for m in MODALITIES:
            os.symlink(tmp_path / "raw" / "p" / f"p_{m}.nii.gz", timepoint / f"{case_id}_{m}.nii.gz")
    cases = discover_cases(tmp_path / "timepoints")
    assert [c.case_id for c in cases] == ["P01_T1", "P01_T2"] and all(set(c.images) == set(MODALITIES) for c in cases)
    for i, names in enumerate((("3_SAG_T1_FLAIR", "5_AX_T2_FLAIR"), ("T2W_FLAIR", "T2W_TSE"), ("T2_native", "T1W_SE"),
                               ("3_T1", "5_T2", "6_FLAIR", "9_T1_POST"))):  # dcm2niix -f %s_%d: series numbers
        other = tmp_path / "more" / f"P{i}"  # a prefix naming a modality is a series' words (`T2` + `native`)
        other.mkdir(parents=True)
        for name in names:
            os.symlink(tmp_path / "raw" / "p" / "p_t2.nii.gz", other / f"{name}.nii.gz")
        with pytest.raises(TumorsegError, match="no cases found"):
            discover_cases(other)
    (row,) = propose_case_list(tmp_path / "data")
    assert row.case_id == "P1" and {k: p.name for k, p in row.files.items()} == {
        "t1": "AX_T1.nii.gz", "t1ce": "AX_T1_POST.nii.gz", "t2": "AX_T2.nii.gz", "flair": "Sag_FLAIR.nii.gz"}


def test_lists_read_back_from_a_linked_folder_a_patients_own_folder_and_names_not_utf8(tmp_path, monkeypatch):
    write_case(tmp_path / "raw", "p")
    patient = tmp_path / "data" / os.fsdecode(b"M\xfcller")  # an old zip's name: not UTF-8
    _series_patient(patient, {m: tmp_path / "raw" / "p" / f"p_{m}.nii.gz" for m in MODALITIES})
    (tmp_path / "far" / "lists").mkdir(parents=True)
    os.symlink(tmp_path / "far" / "lists", tmp_path / "lists")  # a list written through a link to its folder
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # a strict stdout
    proc = subprocess.run([sys.executable, "-m", "tumorseg", "cases", str(tmp_path / "data"), str(tmp_path / "lists/c.csv")],
                          capture_output=True, timeout=60, env=env)
    assert proc.returncode == 0 and b"M\xfcller" in proc.stdout, proc.stderr
    (case,) = discover_cases(tmp_path / "lists" / "c.csv")
    assert case.case_id == os.fsdecode(b"M\xfcller") and all(case.image(m).exists() for m in MODALITIES)
    monkeypatch.chdir(patient)  # one patient's folder given as `.`: named by its folder
    (row,) = propose_case_list(".")
    assert row.case_id == os.fsdecode(b"M\xfcller")



def test_a_folder_per_series_makes_one_case_per_patient(tmp_path):
    """dcm2niix run in each series' folder (`P1/3_t1_mprage_sag/*.nii.gz`): one patient's row, named by
    the patient, the series told by their folders' names (a helper's review: one case per series)."""
    write_case(tmp_path / "raw", "p")
    series = {"3_t1_mprage_sag": "t1", "9_t1_mprage_sag_POST_GAD": "t1ce", "4_t2_tse_tra": "t2",
              "5_t2_tirm_tra_dark-fluid": "flair", "1_localizer": "t2"}
    for patient in ("P1", "P2"):
        for folder, m in series.items():
            (tmp_path / "data" / patient / folder).mkdir(parents=True)
            os.symlink(tmp_path / "raw" / "p" / f"p_{m}.nii.gz", tmp_path / "data" / patient / folder / "image.nii.gz")
    rows = propose_case_list(tmp_path / "data")
    assert [r.case_id for r in rows] == ["P1", "P2"]
    assert {k: p.parent.name for k, p in rows[0].files.items()} == {
        "t1": "3_t1_mprage_sag", "t1ce": "9_t1_mprage_sag_POST_GAD", "t2": "4_t2_tse_tra", "flair": "5_t2_tirm_tra_dark-fluid"}


def test_export_trees_keep_patients_apart_and_together(tmp_path):
    """A fourth review's trees: patients' series folders side by side (`P001_t1_mprage_sag_3/`) stay
    apart; a series folder of three files (echoes, phase), and the patient's own segmentation, stay
    with the patient."""
    def tree(paths):
        for path in paths:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(b"")

    tree(["side/P001_t1_mprage_sag_3/a.nii.gz", "side/P001_t1_mprage_sag_post_9/a.nii.gz",
          "side/P002_t2_tse_tra_5/a.nii.gz", "side/P002_t2_flair_tra_6/a.nii.gz"])
    assert "side" not in {r.case_id for r in propose_case_list(tmp_path / "side")}  # never one row of two patients
    tree(["one/P1/3_t1_mprage_sag/a.nii.gz", "one/P1/9_t1_mprage_sag_POST/a.nii.gz", "one/P1/6_t2_flair_tra/a.nii.gz",
          "one/P1/5_t2_tse_tra/a_e1.nii.gz", "one/P1/5_t2_tse_tra/a_e2.nii.gz", "one/P1/5_t2_tse_tra/a_ph.nii.gz",
          "one/P1/seg.nii.gz"])
    (row,) = propose_case_list(tmp_path / "one")
    assert row.case_id == "P1" and row.files["seg"].name == "seg.nii.gz"
    assert {k: p.parent.name for k, p in row.files.items() if k != "seg"} == {
        "t1": "3_t1_mprage_sag", "t1ce": "9_t1_mprage_sag_POST", "flair": "6_t2_flair_tra"}
    assert any(n.startswith("t2: ") for n in row.notes)  # a dual echo's: which one is for a person to say
