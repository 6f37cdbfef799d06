"""The `cxrray` command line: JSON outputs and clear errors with exit status 2."""
from __future__ import annotations

import json

import pytest

from cxrray.cli import main


def _padchest(tmp_path):
    path = tmp_path / "PADCHEST.csv"
    path.write_text(
        "ImageID,ImageDir,PatientID,PatientBirth,PatientSex_DICOM,Projection,MethodLabel,Labels\n"
        "a.png,0,p1,1950,M,PA,Physician,\"['pleural effusion', ' cardiomegaly']\"\n"
        "b.png,0,p1,1950,M,L,Physician,\"['normal ']\"\n"
        "c.png,1,p2,1970,F,AP,RNN_model,\"['nodule'\"\n"
        "d.png,1,p3,1980,F,PA,RNN_model,\"['cardiomegaly']\"\n")
    return path


def test_sources_summary_prints_one_json_object(tmp_path, capsys):
    assert main(["sources", "summary", "--source", "padchest", "--metadata", str(_padchest(tmp_path))]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["patients"] == 2 and summary["frontal_images"] == 2
    assert summary["findings"] == 3 and summary["rejected_rows"] == 1
    assert sum(s["images"] for s in summary["splits"].values()) == 3
    assert main(["sources", "summary", "--source", "padchest", "--metadata", str(_padchest(tmp_path)),
                 "--source-option", "protocol=diffchest"]) == 0
    splits = json.loads(capsys.readouterr().out)["splits"]
    assert splits["pretrain"] == {"images": 1, "patients": 1}


@pytest.mark.parametrize("argv,message", [
    (["sources", "summary", "--source", "imagenet", "--metadata", "x.csv"], "unknown source 'imagenet'"),
    (["sources", "summary", "--source", "nih", "--metadata", "/nonexistent.csv"], "not found: /nonexistent.csv"),
    (["sources", "summary", "--source", "nih", "--metadata", "{csv}", "--source-option", "colour=red"],
     "unknown option(s) ['colour']"),
    (["ingest", "--input", "/nonexistent", "--output", "file:///tmp/x"], "--input /nonexistent: not a directory"),
    (["ingest", "--input", ".", "--output", "gs://b/p"], "unsupported storage scheme 'gs'"),
    (["ingest", "--input", ".", "--output", "/tmp/x", "--source", "nih"], "--source nih needs --metadata"),
    (["ingest", "--input", ".", "--output", "/tmp/x", "--size", "8"], "ingest.size: Input should be greater"),
    (["phantoms", "--n", "3", "--out", "{tmp}", "--confounder", "tube:fracture:0.9:0.1"], "fracture"),
    (["phantoms", "--n", "0", "--out", "{tmp}"], "--n must be >= 1"),
])
def test_errors_name_what_and_where(argv, message, tmp_path, capsys):
    csv = tmp_path / "d.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position\n")
    argv = [a.replace("{csv}", str(csv)).replace("{tmp}", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"cxrray {argv[0]}: error:")


def test_phantoms_command_writes_dicoms_and_labels(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantoms", "--n", "6", "--out", str(out), "--confounder", "tube:effusion:0.9:0.05",
                 "--set", "phantom.size=64"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 6 and len(list((out / "images").glob("*.dcm"))) == 6
    assert (out / "labels.csv").read_text().startswith("path,patient,study,sex,age,view,report,ivsd,lvidd,lvpwd,")


def test_phantom_commands_fall_back_to_the_demo_salt_only_when_none_is_set(monkeypatch, capsys):
    import os

    from cxrray.cli import DEMO_SALT, _phantom_salt
    from cxrray.config import load_config

    cfg = load_config(None, [])
    monkeypatch.delenv(cfg.ingest.salt_env, raising=False)
    _phantom_salt(cfg, "reproduce")
    assert os.environ[cfg.ingest.salt_env] == DEMO_SALT and "[reproduce]" in capsys.readouterr().out
    monkeypatch.setenv(cfg.ingest.salt_env, "a-real-secret")
    _phantom_salt(cfg, "demo")
    assert os.environ[cfg.ingest.salt_env] == "a-real-secret" and capsys.readouterr().out == ""
