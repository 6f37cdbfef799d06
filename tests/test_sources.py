"""Dataset adapters on small metadata files in each dataset's real format, quirks included."""
from __future__ import annotations

import gzip
import json
import math
import textwrap

import numpy as np
import pytest

from cxrray.data.sources import SOURCES, load_source
from cxrray.data.sources.mimic import report_section
from cxrray.errors import InputError

N = np.nan


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def rejected(table) -> dict[int, str]:
    return {r["row"]: r["reason"] for r in table.rejects}


def assert_patient_level(table) -> None:
    per_patient = table.meta.groupby("patient")["split"].nunique()
    assert per_patient.max() == 1, per_patient[per_patient > 1]


# ------------------------------------------------------------------------------------------------ PadChest

PADCHEST = """
,ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,Projection,MethodLabel,Labels,Report
0,a.png,0,20140915,s1,p1,1950.0,M,PA,Physician,"['pleural effusion', ' cardiomegaly']",derrame pleural
1,b.png,0,20140915,s1,p1,1950.0,M,L,Physician,"['normal ']",
2,c.png,3,20150101,s2,p2,,F,AP_horizontal,RNN_model,"['Cardiomegaly', '']",
3,d.png,3,20150101,s3,p3,1960,O,COSTAL,RNN_model,"['effusion'",
4,e.png,4,20150101,s4,p4,1970,F,AP,RNN_model,,
5,f.png,4,20150101,s5,p5,1970,F,EXCLUDE,RNN_model,"{'a': 1}",
6,g.png,4,20150101,s6,p6,1970,F,PA,RNN_model,"__import__('os').getcwd()",
"""


def test_padchest_labels_paths_and_rejects(tmp_path):
    table = load_source("padchest", write(tmp_path / "padchest.csv", PADCHEST))
    assert table.findings == ["cardiomegaly", "normal", "pleural effusion"]
    np.testing.assert_array_equal(table.labels, [[1, 0, 1], [0, 1, 0], [1, 0, 0]])
    meta = table.meta
    assert meta["path"].tolist() == ["0/a.png", "0/b.png", "3/c.png"]
    assert meta["view"].tolist() == ["PA", "LATERAL", "AP"]
    assert meta["sex"].tolist() == ["M", "M", "F"]
    np.testing.assert_array_equal(meta["age"], [64, 64, N])
    assert meta["report"].tolist() == ["derrame pleural", None, None]
    assert meta["study"].tolist() == ["s1", "s1", "s2"]
    reasons = rejected(table)
    assert sorted(reasons) == [4, 5, 6, 7]
    assert all("'Labels'" in r for r in reasons.values())
    assert "unparseable" in reasons[4] and "['effusion'" in reasons[4]
    assert "empty" in reasons[5] and "not a list" in reasons[6] and "unparseable" in reasons[7]
    assert_patient_level(table)


def test_padchest_optional_columns_absent_and_projection_mapping(tmp_path):
    csv = """
    ImageID,ImageDir,PatientID,PatientBirth,PatientSex_DICOM,Projection,MethodLabel,Labels
    a.png,1,p1,1950,F,AP,Physician,['normal']
    b.png,1,p1,1950,F,LATERAL,Physician,['normal']
    c.png,1,p2,1950,,EXCLUDE,Physician,[]
    """
    table = load_source("padchest", write(tmp_path / "p.csv", csv))
    assert table.meta["view"].tolist() == ["AP", "LATERAL", None]
    assert table.meta["sex"].tolist() == ["F", "F", None]
    assert table.meta["study"].tolist() == [None] * 3 and table.meta["report"].tolist() == [None] * 3
    assert np.isnan(table.meta["age"]).all()  # no study date: no age
    np.testing.assert_array_equal(table.labels, [[1], [1], [0]])


def _diffchest_csv(path):
    lines = ["ImageID,ImageDir,PatientID,PatientBirth,PatientSex_DICOM,Projection,MethodLabel,Labels"]
    for p in range(200):  # physician-labelled patients, half of them also with RNN-labelled images
        lines.append(f"ph{p}_0.png,0,ph{p},1950,M,PA,Physician,['normal']")
        if p % 2:
            lines.append(f"ph{p}_1.png,0,ph{p},1950,M,PA,RNN_model,['normal']")
    for p in range(60):
        lines.append(f"rnn{p}.png,1,rnn{p},1950,F,PA,RNN_model,['cardiomegaly']")
    return write(path, "\n".join(lines) + "\n")


def test_padchest_diffchest_protocol(tmp_path):
    table = load_source("padchest", _diffchest_csv(tmp_path / "p.csv"), protocol="diffchest", seed=3)
    meta = table.meta
    rnn = meta["patient"].str.startswith("rnn")
    assert (meta.loc[rnn, "split"] == "pretrain").all()
    assert set(meta.loc[~rnn, "split"]) == {"finetune", "test"}
    assert_patient_level(table)
    per_patient = meta.loc[~rnn].groupby("patient")["split"].first()
    assert 0.6 < (per_patient == "finetune").mean() < 0.8
    again = load_source("padchest", tmp_path / "p.csv", protocol="diffchest", seed=3)
    assert again.meta["split"].tolist() == meta["split"].tolist()
    with pytest.raises(ValueError, match="protocol"):
        load_source("padchest", tmp_path / "p.csv", protocol="nope")


def test_random_split_is_deterministic_and_patient_level(tmp_path):
    path = _diffchest_csv(tmp_path / "p.csv")
    a, b = load_source("padchest", path, seed=1), load_source("padchest", path, seed=1)
    assert a.meta["split"].tolist() == b.meta["split"].tolist()
    assert set(a.meta["split"]) == {"train", "val", "test"}
    assert_patient_level(a)
    other = load_source("padchest", path, seed=2)
    assert other.meta["split"].tolist() != a.meta["split"].tolist()
    custom = load_source("padchest", path, fractions={"a": 0.5, "b": 0.5})
    assert set(custom.meta["split"]) == {"a", "b"}


# ------------------------------------------------------------------------------------------------ CheXpert

CHEXPERT = """
Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Pleural Effusion,Cardiomegaly,Edema
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,0.0,,
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Male,87,Frontal,PA,,-1.0,1.0,-1.0
CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Male,87,Lateral,,,,-1.0,0.0
CheXpert-v1.0-small/train/study3/view1_frontal.jpg,Male,50,Frontal,AP,,,,
CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Unknown,0,Frontal,AP,,2.0,,
CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg,Female,40,Frontal,AP,,,yes,
CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Unknown,73,Frontal,LL,0.0,,,
"""


@pytest.mark.parametrize(
    "policy, u", [("nan", N), ("positive", 1.0), ("negative", 0.0)],
)
def test_chexpert_uncertain_policies(tmp_path, policy, u):
    table = load_source("chexpert", write(tmp_path / "train.csv", CHEXPERT), uncertain=policy)
    assert table.findings == ["No Finding", "Pleural Effusion", "Cardiomegaly", "Edema"]  # file order
    expected = [[1, 0, N, N], [N, u, 1, u], [N, N, u, 0], [0, N, N, N]]
    np.testing.assert_array_equal(table.labels, np.array(expected, dtype=np.float32))


def test_chexpert_meta_and_rejects(tmp_path):
    table = load_source("chexpert", write(tmp_path / "train.csv", CHEXPERT))
    meta = table.meta
    assert meta["path"].tolist()[:2] == [
        "train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study2/view1_frontal.jpg"]
    assert meta["patient"].tolist() == ["patient00001", "patient00002", "patient00002", "patient64541"]
    assert meta["study"].tolist() == ["patient00001/study1", "patient00002/study2", "patient00002/study2",
                                      "patient64541/study1"]
    assert meta["view"].tolist() == ["AP", "PA", "LATERAL", None]
    assert meta["sex"].tolist() == ["F", "M", "M", None]
    np.testing.assert_array_equal(meta["age"], [68, 87, 87, 73])
    reasons = rejected(table)
    assert sorted(reasons) == [4, 5, 6]
    assert "'Path'" in reasons[4] and "patient" in reasons[4]
    assert "'Pleural Effusion'" in reasons[5] and "'2.0'" in reasons[5]
    assert "'Cardiomegaly'" in reasons[6] and "'yes'" in reasons[6]
    assert_patient_level(table)


# ------------------------------------------------------------------------------------------------ MIMIC-CXR

REPORT_FULL = """
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 
 The lungs are clear.  No pleural effusion
 or pneumothorax.
 
 IMPRESSION:  No acute cardiopulmonary process.
"""
REPORT_IMPRESSION = """
 INDICATION:  Fever.
 IMPRESSION:
  Small left effusion.
 NOTIFICATION:  Called to Dr. ___.
"""
REPORT_NEITHER = """
 WET READ: ___ 9:00 PM  no pneumonia
 INDICATION:  Chest pain.
"""


def test_report_sections():
    assert report_section(REPORT_FULL) == "The lungs are clear. No pleural effusion or pneumothorax."
    assert report_section(REPORT_IMPRESSION) == "Small left effusion."
    assert report_section(REPORT_NEITHER) is None
    assert report_section(" FINDINGS: \n IMPRESSION: Stable.\n") == "Stable."  # empty FINDINGS falls back
    # Cheff's text: FINDINGS and IMPRESSION joined; either alone when the other is missing
    both = "findings+impression"
    assert report_section(REPORT_FULL, both) == ("The lungs are clear. No pleural effusion or pneumothorax. "
                                                 "No acute cardiopulmonary process.")
    assert report_section(REPORT_IMPRESSION, both) == "Small left effusion."
    assert report_section(REPORT_NEITHER, both) is None


def _mimic(tmp_path, split_file=True):
    root = tmp_path / "mimic"
    write(root / "mimic-cxr-2.0.0-metadata.csv", """
    dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime
    d1,10000032,50000001,CHEST (PA AND LAT),PA,3056,2544,21820101,152345.0
    d2,10000032,50000001,CHEST (PA AND LAT),LATERAL,3056,2544,21820101,152345.0
    d3,10000032,50000002,CHEST (PORTABLE AP),AP,3056,2544,21830615,101010.0
    d4,10000033,50000003,CHEST (PA AND LAT),LL,3056,2544,21500101,101010.0
    d5,11000001,50000004,CHEST (PORTABLE AP),AP AXIAL,3056,2544,,
    d6,abc,50000005,CHEST (PA AND LAT),PA,3056,2544,21500101,101010.0
    d7,10000034,50000006,CHEST (PA AND LAT),PA,3056,2544,21500101,101010.0
    """)
    write(root / "mimic-cxr-2.0.0-chexpert.csv", """
    subject_id,study_id,Atelectasis,Cardiomegaly,Edema,No Finding
    10000032,50000001,,1.0,-1.0,
    10000032,50000002,0.0,,,
    10000033,50000003,,,,1.0
    10000034,50000006,x,,,
    """)
    if split_file:
        write(root / "mimic-cxr-2.0.0-split.csv", """
        dicom_id,study_id,subject_id,split
        d1,50000001,10000032,validate
        d2,50000001,10000032,validate
        d4,50000003,10000033,test
        """)
    write(root / "patients.csv", """
    subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
    10000032,F,52,2180,2014 - 2016,
    10000033,M,70,,2008 - 2010,
    """)
    write(root / "files/p10/p10000032/s50000001.txt", REPORT_FULL)
    write(root / "files/p10/p10000032/s50000002.txt", REPORT_IMPRESSION)
    write(root / "files/p10/p10000033/s50000003.txt", REPORT_NEITHER)
    return root / "mimic-cxr-2.0.0-metadata.csv"


def test_mimic(tmp_path):
    table = load_source("mimic", _mimic(tmp_path), uncertain="positive")
    meta = table.meta
    assert table.findings == ["Atelectasis", "Cardiomegaly", "Edema", "No Finding"]
    np.testing.assert_array_equal(table.labels, [[N, 1, 1, N], [N, 1, 1, N], [0, N, N, N], [N, N, N, 1], [N] * 4])
    assert meta["path"].tolist()[0] == "files/p10/p10000032/s50000001/d1.dcm"
    assert meta["patient"].tolist() == ["10000032"] * 3 + ["10000033", "11000001"]
    assert meta["study"].tolist() == ["50000001", "50000001", "50000002", "50000003", "50000004"]
    assert meta["view"].tolist() == ["PA", "LATERAL", "AP", "LATERAL", None]
    assert meta["sex"].tolist() == ["F", "F", "F", "M", None]
    np.testing.assert_array_equal(meta["age"], [54, 54, 55, 70, N])  # anchor_age shifted to the study year
    assert meta["report"].tolist()[:2] == ["The lungs are clear. No pleural effusion or pneumothorax."] * 2
    assert meta["report"].tolist()[2:] == ["Small left effusion.", None, None]
    # split file: d1/d2 listed, d3 takes its patient's official split, d4 listed, d5 automatic
    assert meta["split"].tolist()[:4] == ["val", "val", "val", "test"]
    assert meta["split"].iloc[4] in {"train", "val", "test"}
    reasons = rejected(table)
    assert sorted(reasons) == [6, 7]
    assert "'subject_id'" in reasons[6] and "'abc'" in reasons[6]
    assert "mimic-cxr-2.0.0-chexpert.csv row 4" in reasons[7] and "'Atelectasis'" in reasons[7]
    cheff = load_source("mimic", _mimic(tmp_path), sections="findings+impression").meta["report"].tolist()
    assert cheff[0].endswith("pneumothorax. No acute cardiopulmonary process.") and cheff[2] == "Small left effusion."
    with pytest.raises(InputError, match="sections='impression'"):
        load_source("mimic", _mimic(tmp_path), sections="impression")


def test_mimic_without_split_file_and_jpg(tmp_path):
    metadata = _mimic(tmp_path, split_file=False)
    table = load_source("mimic", metadata, extension=".jpg", reports=tmp_path / "nowhere", seed=5)
    assert table.meta["path"].iloc[0] == "files/p10/p10000032/s50000001/d1.jpg"
    assert table.meta["report"].isna().all()
    np.testing.assert_array_equal(table.labels[0], [N, 1, N, N])  # uncertain -> NaN by default
    assert_patient_level(table)
    again = load_source("mimic", metadata, seed=5)
    assert again.meta["split"].tolist() == table.meta["split"].tolist()


def test_mimic_gzipped_release_files(tmp_path):
    metadata = _mimic(tmp_path, split_file=False)
    for name in ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-chexpert.csv"):
        plain = metadata.parent / name
        (metadata.parent / f"{name}.gz").write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    table = load_source("mimic", metadata.parent / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert len(table) == 5 and table.labels[3, 3] == 1


# ------------------------------------------------------------------------------------------------ NIH

NIH = """
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,
00000001_001.png,Cardiomegaly|Emphysema,1,1,058Y,M,PA,2894,2729,0.143,0.143,
00000002_000.png,No Finding,0,2,412,F,AP,2500,2048,0.168,0.168,
00000003_000.png,,0,3,81,F,PA,2500,2048,0.168,0.168,
00000004_000.png,Effusion|Pleural_Thickening,0,4,abc,F,AP,2500,2048,0.168,0.168,
"""


def test_nih(tmp_path):
    table = load_source("nih", write(tmp_path / "Data_Entry_2017.csv", NIH))
    assert table.findings == ["Cardiomegaly", "Effusion", "Emphysema", "Pleural_Thickening"]
    np.testing.assert_array_equal(table.labels, [[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]])
    meta = table.meta
    assert meta["path"].tolist() == ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000004_000.png"]
    np.testing.assert_array_equal(meta["age"], [58, 58, N, N])
    assert meta["sex"].tolist() == ["M", "M", "F", "F"] and meta["view"].tolist() == ["PA", "PA", "AP", "AP"]
    reasons = rejected(table)
    assert list(reasons) == [4] and "'Finding Labels'" in reasons[4]
    assert_patient_level(table)


def test_nih_test_list(tmp_path):
    lines = [NIH.strip().splitlines()[0]] + [
        f"{p:08d}_000.png,No Finding,0,{p},50,M,PA,1,1,0.1,0.1," for p in range(1, 101)]
    metadata = write(tmp_path / "Data_Entry_2017.csv", "\n".join(lines) + "\n")
    write(tmp_path / "test_list.txt", "00000002_000.png\n00000005_000.png\n")
    split = load_source("nih", metadata).meta.set_index("path")["split"]
    assert split["00000002_000.png"] == "test" and split["00000005_000.png"] == "test"
    assert set(split.drop(["00000002_000.png", "00000005_000.png"])) == {"train", "val"}


# ------------------------------------------------------------------------------------------------ CheXchoNet

CHEXCHONET = """
cxr_filename,patient_id,age,sex,ivsd,lvidd,lvpwd,split
m_at.png,1,60,M,1.5,5.9,1.5,train
m_above.png,2,61,Male,1.51,5.91,1.0,eval
f_at.png,3,62,F,1.4,5.3,1.4,test
f_above.png,4,63,Female,1.0,5.31,1.41,
missing.png,5,64,M,,,1.0,
partial.png,6,65,M,,5.0,1.6,
bad.png,7,66,F,abc,5.0,1.0,
neg.png,8,67,F,1.0,-4.0,1.0,
nosex.png,9,68,,1.0,5.0,1.0,
"""


def test_chexchonet_thresholds(tmp_path):
    table = load_source("chexchonet", write(tmp_path / "chexchonet.csv", CHEXCHONET))
    assert table.findings == ["slvh", "dlv", "composite_slvh_dlv"]
    expected = [[0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1], [N, N, N], [1, 0, 1], [N, N, N]]
    np.testing.assert_array_equal(table.labels, np.array(expected, dtype=np.float32))
    meta = table.meta
    assert meta["sex"].tolist() == ["M", "M", "F", "F", "M", "M", None]
    assert meta["covariates"].iloc[0] == {"ivsd": 1.5, "lvidd": 5.9, "lvpwd": 1.5}
    assert math.isnan(meta["covariates"].iloc[4]["ivsd"])
    assert meta["split"].tolist()[:3] == ["train", "val", "test"]
    assert set(meta["split"].tolist()[3:]) <= {"train", "val", "test"}
    reasons = rejected(table)
    assert sorted(reasons) == [7, 8]
    assert "'ivsd'" in reasons[7] and "'abc'" in reasons[7]
    assert "'lvidd'" in reasons[8] and "'-4.0'" in reasons[8]


def test_chexchonet_cxr_path_column(tmp_path):
    csv = "cxr_filename,cxr_path,patient_id,age,sex,ivsd,lvidd,lvpwd\na.png,images/a.png,1,50,F,1.0,5.0,1.0\n"
    table = load_source("chexchonet", write(tmp_path / "c.csv", csv))
    assert table.meta["path"].tolist() == ["images/a.png"]


# ------------------------------------------------------------------------------------------------ Folder

FOLDER = """
path,patient,sex,age,view,split,Cardiomegaly,Effusion,ivsd
img/a.png,p1,F,50,PA,,1,0,1.2
img/b.png,,M,,lateral,test,,1,
img/c.png,p2,X,200,XX,,yes,0,
../outside.png,p3,F,40,PA,,0,0,
img/a.png,p4,F,40,PA,,0,0,
/abs/d.png,p5,F,40,PA,,0,0,
img/e.png,p6,F,40,AP,,2,,
img/f.png,p7,F,40,AP,,0,-1,
./img/g.png,p8,F,40,AP,val,1,1.0,
img/h.png,p9,F,40,AP,,1,1,,extra
"""


def test_folder(tmp_path):
    table = load_source("folder", write(tmp_path / "labels.csv", FOLDER))
    assert table.findings == ["Cardiomegaly", "Effusion"]
    np.testing.assert_array_equal(table.labels, [[1, 0], [N, 1], [1, 1]])
    meta = table.meta
    assert meta["path"].tolist() == ["img/a.png", "img/b.png", "img/g.png"]
    assert meta["patient"].tolist() == ["p1", "img/b.png", "p8"]
    assert meta["view"].tolist() == ["PA", "LATERAL", "AP"]
    assert meta["split"].tolist()[1:] == ["test", "val"]
    assert meta["covariates"].iloc[0] == {"ivsd": 1.2}
    assert meta["report"].tolist() == [None] * 3
    reasons = rejected(table)
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 10]
    assert "'Cardiomegaly'" in reasons[3] and "'yes'" in reasons[3]
    assert "escapes" in reasons[4]
    assert "duplicate path" in reasons[5] and "row 1" in reasons[5]
    assert "absolute" in reasons[6]
    assert "'Cardiomegaly'" in reasons[7] and "'2'" in reasons[7]
    assert "'Effusion'" in reasons[8] and "'-1'" in reasons[8]
    assert "fields" in reasons[10]


def test_folder_requires_path_column(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_source("folder", write(tmp_path / "x.csv", "file,Cardiomegaly\na.png,1\n"))


# ------------------------------------------------------------------------------------------------ registry

def test_registry_errors(tmp_path):
    assert set(SOURCES) == {"padchest", "chexpert", "mimic", "nih", "chexchonet", "folder"}
    with pytest.raises(ValueError, match="chexchonet"):
        load_source("openi", tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_source("nih", tmp_path / "missing.csv")
    metadata = write(tmp_path / "train.csv", CHEXPERT)
    for name in SOURCES:  # every adapter validates the common options
        with pytest.raises(ValueError, match="positive"):
            load_source(name, metadata, uncertain="maybe")
    with pytest.raises(ValueError, match="fractions"):
        load_source("chexpert", metadata, fractions={"train": -1.0})


def test_summary_is_json(tmp_path):
    summary = load_source("folder", write(tmp_path / "labels.csv", FOLDER)).summary()
    assert summary["images"] == 3 and summary["rejected_rows"] == 7
    assert summary["positives"] == {"Cardiomegaly": 2, "Effusion": 2}
    json.dumps(summary)
