"""Procedural CXR phantoms: determinism, label model, planted findings, DICOM encoding, validation."""
from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pydantic
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from cxrray.data.phantom import (
    COLUMNS,
    DEVICES,
    DLV_CM,
    FINDINGS,
    LABELS,
    SLVH_CM,
    PhantomConfig,
    counterpart,
    decode,
    finding_masks,
    generate,
    healthy,
    lung_mask,
    parse_confounder,
    quantize,
    render,
    sample_case,
)

IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress",
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "StationName", "DeviceSerialNumber", "StudyDate",
    "StudyTime", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
)


@pytest.fixture(scope="module")
def cases300():
    cfg = PhantomConfig()
    return [sample_case(i, cfg) for i in range(300)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    cfg = PhantomConfig(size=64, seed=3)
    calls = []
    table = generate(20, out, cfg, progress=lambda i, n: calls.append((i, n)))
    return out, cfg, table, calls


# ---- determinism ----------------------------------------------------------------------------------
def test_same_seed_is_byte_identical_and_order_independent():
    cfg = PhantomConfig(size=96, seed=11)
    a = [sample_case(i, cfg) for i in (0, 5, 9)]
    b = [sample_case(i, cfg) for i in (9, 5, 0)][::-1]  # other order, fresh calls
    assert a == b
    for ca, cb in zip(a, b):
        assert render(ca, cfg).tobytes() == render(cb, cfg).tobytes()


def test_different_seed_differs():
    c0, c1 = sample_case(4, PhantomConfig(seed=0)), sample_case(4, PhantomConfig(seed=1))
    assert c0.patient.patient_id != c1.patient.patient_id
    p0, p1 = render(c0, PhantomConfig(size=64, seed=0)), render(c1, PhantomConfig(size=64, seed=1))
    assert p0.shape != p1.shape or not np.array_equal(p0, p1)
    labels0 = [tuple(sample_case(i, PhantomConfig(seed=0)).labels.values()) for i in range(30)]
    labels1 = [tuple(sample_case(i, PhantomConfig(seed=1)).labels.values()) for i in range(30)]
    assert labels0 != labels1


def test_render_shape_range_and_speed():
    cfg = PhantomConfig(size=256)
    cases = [sample_case(i, cfg) for i in range(8)]
    render(cases[0], cfg)
    t0 = time.perf_counter()
    imgs = [render(c, cfg) for c in cases]
    per_image = (time.perf_counter() - t0) / len(cases)
    widths = set()
    for c, im in zip(cases, imgs):
        assert im.dtype == np.float32 and im.shape[0] == 256
        assert 0.84 * 256 <= im.shape[1] <= 256 and im.shape[1] == round(256 * c.pose.aspect)
        assert im.min() >= 0.0 and im.max() <= 1.0 and im.std() > 0.1
        widths.add(im.shape[1])
    assert len(widths) > 1  # non-square, varying width
    assert per_image < 0.1, f"render took {per_image * 1e3:.0f} ms per 256px image"
    tiny = render(sample_case(0, PhantomConfig(size=16)), PhantomConfig(size=16))
    assert tiny.shape[0] == 16 and np.isfinite(tiny).all()


# ---- label model ----------------------------------------------------------------------------------
def test_prevalences_within_bounds(cases300):
    df = pd.DataFrame([c.labels for c in cases300])
    assert list(df.columns) == list(LABELS) == list(FINDINGS + DEVICES + ("slvh", "dlv"))
    bounds = {
        "cardiomegaly": (0.17, 0.35), "effusion": (0.17, 0.33), "nodule": (0.08, 0.23),
        "pneumothorax": (0.04, 0.17), "consolidation": (0.08, 0.23), "chest_tube": (0.04, 0.17),
        "pacemaker": (0.03, 0.14), "ecg_leads": (0.22, 0.39), "slvh": (0.03, 0.25), "dlv": (0.05, 0.28),
    }
    for name, (lo, hi) in bounds.items():
        assert lo <= df[name].mean() <= hi, (name, df[name].mean())
    sexes = [c.sex for c in cases300]
    assert 0.35 < sexes.count("M") / len(sexes) < 0.65
    ages = np.array([c.age for c in cases300])
    assert ages.min() >= 18 and ages.max() <= 100 and 50 < ages.mean() < 72
    views = [c.view for c in cases300]
    assert set(views) == {"PA", "AP"}


def test_echo_labels_follow_thresholds_and_shape_the_heart(cases300):
    for c in cases300:
        t = SLVH_CM[c.sex]
        assert c.labels["slvh"] == int(c.ivsd > t or c.lvpwd > t)
        assert c.labels["dlv"] == int(c.lvidd > DLV_CM[c.sex])
        assert c.labels["cardiomegaly"] == int(c.ctr > 0.5)
    ivsd, lvidd, lvpwd, ctr = (np.array([getattr(c, k) for c in cases300]) for k in ("ivsd", "lvidd", "lvpwd", "ctr"))
    assert 0.9 < ivsd.mean() < 1.2 and 0.12 < ivsd.std() < 0.35
    assert 4.6 < lvidd.mean() < 5.3 and 0.4 < lvidd.std() < 0.9
    assert 0.85 < lvpwd.mean() < 1.15
    male = np.array([c.sex == "M" for c in cases300])
    assert lvidd[male].mean() > lvidd[~male].mean() + 0.2
    outer = lvidd + ivsd + lvpwd - np.where(male, 7.0, 6.3)
    assert np.corrcoef(outer, ctr)[0, 1] > 0.7  # heart width grows with LVIDd + walls


def test_confounder_rates():
    spec = "tube:effusion:0.9:0.05"
    cfg, plain = PhantomConfig(confounder=spec), PhantomConfig()
    n = 2000
    conf = [sample_case(i, cfg).labels for i in range(n)]
    base = [sample_case(i, plain).labels for i in range(n)]
    eff = np.array([lab["effusion"] for lab in conf])
    tube = np.array([lab["chest_tube"] for lab in conf])
    # the confounder only changes the device: findings are drawn identically
    assert np.array_equal(eff, [lab["effusion"] for lab in base])
    for p, mask in ((0.9, eff == 1), (0.05, eff == 0)):
        k = mask.sum()
        tol = 4 * np.sqrt(p * (1 - p) / k)
        assert abs(tube[mask].mean() - p) < tol, (p, tube[mask].mean(), k)
    c = parse_confounder(spec)
    assert (c.device, c.finding, c.p1, c.p0) == ("chest_tube", "effusion", 0.9, 0.05)
    assert parse_confounder("ecg:cardiomegaly:1:0").device == "ecg_leads"


def test_patients_have_several_consistent_studies(cases300):
    by_patient = {}
    for c in cases300:
        by_patient.setdefault(c.patient.patient_id, []).append(c)
        assert re.fullmatch(r"MRN\d{8}", c.patient.patient_id)
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+", c.patient.name)
    assert 0.5 < len(by_patient) / len(cases300) < 0.7
    assert max(len(v) for v in by_patient.values()) >= 3
    for studies in by_patient.values():
        assert len({(s.patient.name, s.sex, s.patient.birth_date, s.patient.other_id) for s in studies}) == 1
        for s in studies:
            b, d = s.patient.birth_date, s.study_date
            assert s.age == d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    assert len({c.accession for c in cases300}) == len(cases300)


# ---- planted findings are visible -----------------------------------------------------------------
def _clean(case, keep=()):
    others = [k for k in FINDINGS[1:] + DEVICES if k not in keep]
    return not any(case.labels[k] for k in others)


def test_cardiomegaly_has_larger_bright_heart_region():
    cfg = PhantomConfig(size=96, seed=5)
    big, small = [], []
    for i in range(400):
        c = sample_case(i, cfg)
        if not _clean(c):
            continue
        group = big if c.labels["cardiomegaly"] else small
        if len(group) < 16:
            im = render(c, cfg)
            rows, cols = im.shape
            band = im[int(0.45 * rows):int(0.65 * rows), int(0.2 * cols):int(0.8 * cols)]
            group.append(band.mean())
        if len(big) == len(small) == 16:
            break
    big, small = np.array(big), np.array(small)
    se = np.sqrt(big.var(ddof=1) / len(big) + small.var(ddof=1) / len(small))
    assert big.mean() - small.mean() > max(0.03, 3 * se), (big.mean(), small.mean(), se)


def test_paired_findings_and_devices_change_the_image():
    cfg = PhantomConfig(size=64, seed=2)
    seen = set()
    for i in range(300):
        c = sample_case(i, cfg)
        todo = [k for k in ("effusion", "chest_tube", "pacemaker", "ecg_leads", "nodule", "consolidation",
                            "pneumothorax") if c.labels[k] and k not in seen]
        for name in todo:
            seen.add(name)
            with_it, without = render(c, cfg), render(counterpart(c, name), cfg)
            diff = with_it - without
            rows, cols = diff.shape
            if name != "pneumothorax":  # every other finding/device only adds density, nothing else moves
                assert diff.min() > -1e-5, (name, diff.min())
            if name == "effusion":
                basal = slice(int(0.5 * rows), int(0.8 * rows))
                assert diff[basal].mean() > 0.02, diff[basal].mean()
                assert diff[: int(0.35 * rows)].__abs__().max() < 1e-6  # apices untouched
            elif name == "pneumothorax":
                assert diff.min() < -0.05  # lucent rim
            else:  # bright at 64 px: devices well above lung texture
                assert diff.max() > (0.3 if name in DEVICES else 0.1), (name, diff.max())
                if name in ("chest_tube", "pacemaker"):
                    assert (diff > 0.15).sum() >= 0.4 * rows, name  # a line, not a speck
        if len(seen) == 7:
            break
    assert len(seen) == 7


def test_masks_are_exactly_where_removing_the_finding_changes_the_image(tmp_path):
    cfg = PhantomConfig(size=64, seed=2, confounder="tube:effusion:0.9:0.05")
    covered: dict[str, int] = {}
    for i in range(120):
        c = sample_case(i, cfg)
        image = render(c, cfg)
        masks = finding_masks(c, cfg, image)
        assert set(masks) == {k for k in FINDINGS + DEVICES if c.labels[k]}
        for name, mask in masks.items():
            diff = np.abs(image - render(counterpart(c, name), cfg))
            assert diff[mask].sum() >= 0.95 * diff.sum(), name  # the mask holds the change, not its soft edge
            if name != "nodule" or mask.any():  # a 64 px nodule may be sub-threshold
                assert mask.any(), name
            covered[name] = covered.get(name, 0) + 1
        if c.labels["cardiomegaly"]:  # the heart's border moves: the mask is a crescent beside the heart
            rows = masks["cardiomegaly"].any(1).nonzero()[0]
            assert 0.35 * image.shape[0] < rows.mean() < 0.85 * image.shape[0]
    assert {"cardiomegaly", "effusion", "chest_tube", "ecg_leads"} <= set(covered)
    with pytest.raises(ValueError, match="not drawn"):
        counterpart(sample_case(0, cfg), "slvh")
    table = generate(8, tmp_path, cfg.model_copy(update={"masks": True}))
    for _, row in table.iterrows():
        for name in FINDINGS + DEVICES:
            path = row[f"mask:{name}"]
            assert (isinstance(path, str) and (tmp_path / path).is_file()) == bool(row[name]), (name, path)
        assert (tmp_path / row["mask:lungs"]).is_file() and (tmp_path / row["image:healthy"]).is_file()


def test_the_healthy_counterpart_removes_every_finding_and_only_the_findings():
    cfg = PhantomConfig(size=64, seed=2, confounder="tube:effusion:0.9:0.05")
    for i in range(60):
        c = sample_case(i, cfg)
        image, well = render(c, cfg), render(healthy(c), cfg)
        masks = finding_masks(c, cfg, image)
        findings = np.zeros(image.shape, bool)
        for name in FINDINGS:
            findings |= masks.get(name, findings)
        assert not any(healthy(c).labels[f] for f in FINDINGS)
        assert all(healthy(c).labels[d] == c.labels[d] for d in DEVICES)  # devices kept
        assert np.abs(image - well)[~findings].max(initial=0) <= 0.004 or c.labels["cardiomegaly"], i
        if not any(c.labels[f] for f in FINDINGS):
            assert np.array_equal(image, well), i  # nothing to remove: the same pixels
        without_devices = healthy(c, keep_devices=False)
        assert not any(without_devices.labels[d] for d in DEVICES)
        lungs = lung_mask(c, cfg)
        assert 0.1 < lungs.mean() < 0.5 and np.array_equal(lungs, lung_mask(healthy(c), cfg)) or c.labels["cardiomegaly"]


# ---- DICOM -----------------------------------------------------------------------------------------
def test_generated_dicoms_decode_exactly_and_cover_encodings(generated):
    out, cfg, table, calls = generated
    assert calls == [(i, 20) for i in range(1, 21)]
    assert list(table.columns) == list(COLUMNS)
    on_disk = pd.read_csv(out / "labels.csv", dtype={"patient": str, "study": str})
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    photometrics, syntaxes = set(), set()
    for i, row in table.iterrows():
        assert re.fullmatch(r"images/phantom_\d{6}\.dcm", row["path"])
        ds = pydicom.dcmread(out / row["path"])
        case = sample_case(i, cfg)
        assert np.array_equal(decode(ds), quantize(render(case, cfg)))
        assert int(ds.pixel_array.max()) <= 4095
        photometrics.add(ds.PhotometricInterpretation)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel) == (16, 12, 11, 0, 1)
        assert "RescaleSlope" in ds and "RescaleIntercept" in ds and float(ds.WindowWidth) > 100
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        for tag in IDENTIFYING:
            assert str(ds.get(tag, "")).strip(), tag
        assert ds.PatientID == row["patient"] and ds.AccessionNumber == row["study"]
        assert ds.PatientSex == row["sex"] and ds.PatientAge == f"{row['age']:03d}Y"
        assert [row[k] for k in LABELS] == [case.labels[k] for k in LABELS]
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert syntaxes == {ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless}


def test_generated_identity_consistent_across_studies(generated):
    out, _, table, _ = generated
    headers = [pydicom.dcmread(out / p, stop_before_pixels=True) for p in table["path"]]
    by_id = {}
    for ds in headers:
        by_id.setdefault(ds.PatientID, []).append(ds)
    assert any(len(v) > 1 for v in by_id.values())
    for studies in by_id.values():
        assert len({(str(d.PatientName), d.PatientSex, d.PatientBirthDate, d.OtherPatientIDs) for d in studies}) == 1
        assert len({d.StudyInstanceUID for d in studies}) == len(studies)
    assert len({ds.SOPInstanceUID for ds in headers}) == len(headers)


def test_encoding_fractions_and_overrides():
    def kinds(**kw):
        cfg = PhantomConfig(**kw)
        return [(c.photometric, c.transfer_syntax) for c in (sample_case(i, cfg) for i in range(200))]

    default = kinds()
    mono1 = np.mean([p == "MONOCHROME1" for p, _ in default])
    compressed = np.mean([t in (RLELossless, JPEG2000Lossless) for _, t in default])
    assert abs(mono1 - 0.3) < 0.05 and abs(compressed - 0.3) < 0.05
    assert all(p == "MONOCHROME2" and t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
               for p, t in kinds(monochrome1_fraction=0.0, compressed_fraction=0.0))
    assert all(p == "MONOCHROME1" and t in (RLELossless, JPEG2000Lossless)
               for p, t in kinds(monochrome1_fraction=1.0, compressed_fraction=1.0))


# ---- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ("tube:effusion:0.9", ["device:finding:p1:p0", "tube", "pacemaker", "ecg"]),
    ("catheter:effusion:0.9:0.1", ["catheter", "tube", "pacemaker", "ecg"]),
    ("tube:fracture:0.9:0.1", ["fracture", "cardiomegaly", "effusion", "consolidation"]),
    ("tube:effusion:1.5:0.1", ["[0, 1]"]),
    ("tube:effusion:high:low", ["number"]),
])
def test_invalid_confounder_spec(spec, words):
    with pytest.raises(ValueError) as err:
        parse_confounder(spec)
    for w in words:
        assert w in str(err.value)
    with pytest.raises(pydantic.ValidationError, match="confounder"):
        PhantomConfig(confounder=spec)


@pytest.mark.parametrize("field, value", [
    ("size", 8), ("size", 4096), ("monochrome1_fraction", 1.5), ("compressed_fraction", -0.1),
    ("patients_per_image", 0.0), ("seed", -1), ("colour", "red"),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(pydantic.ValidationError) as err:
        PhantomConfig(**{field: value})
    assert field in str(err.value)


def test_config_assignment_is_validated():
    cfg = PhantomConfig()
    cfg.seed = 4
    assert sample_case(0, cfg) == sample_case(0, PhantomConfig(seed=4))
    with pytest.raises(pydantic.ValidationError, match="compressed_fraction"):
        cfg.compressed_fraction = 2.0
    with pytest.raises(pydantic.ValidationError, match="confounder"):
        cfg.confounder = "tube:effusion"


def _heart_table(cfg: PhantomConfig, n: int = 2000) -> dict[str, np.ndarray]:
    cases = [sample_case(i, cfg) for i in range(n)]
    return {"age": np.array([c.age for c in cases], float), "ctr": np.array([c.ctr for c in cases]),
            "young0": np.array([c.age < 60 for c in cases]),
            "positive": np.array([c.labels["slvh"] or c.labels["dlv"] for c in cases], float),
            "labels": [c.labels for c in cases]}


def test_age_options_make_age_visible_and_prevalence_age_dependent():
    """cxr_ddpm's 'lift in the young' needs age in the image and disease that depends on it (issue 13, part 4)."""
    base = _heart_table(PhantomConfig())
    aged = _heart_table(PhantomConfig(age_heart=0.04))
    r_base, r_aged = np.corrcoef(base["age"], base["ctr"])[0, 1], np.corrcoef(aged["age"], aged["ctr"])[0, 1]
    assert r_aged > r_base + 0.3, (r_base, r_aged)

    old, young = base["age"] >= 70, base["age"] < 50
    flat = base["positive"][old].mean() / base["positive"][young].mean()
    assert 0.6 < flat < 1.7, flat  # default: prevalence barely depends on age
    sloped = _heart_table(PhantomConfig(disease_age_slope=1.0))
    steep = sloped["positive"][old].mean() / sloped["positive"][young].mean()
    assert steep > 2 * flat, (flat, steep)


def test_young_positives_can_be_thinned_out_leaving_the_old_untouched():
    base = _heart_table(PhantomConfig())
    thin = _heart_table(PhantomConfig(young_positive_keep=0.2, young_age=60))
    young = base["age"] < 55  # young at every study (first-study age < 60)
    assert thin["positive"][young].mean() < 0.6 * base["positive"][young].mean()
    old = base["age"] >= 66  # at least 60 at the first study (studies span <= 4.4 years)
    assert all(a == b for a, b, o in zip(base["labels"], thin["labels"], old) if o)
    assert thin["positive"][old].mean() == base["positive"][old].mean()


def test_labels_csv_records_the_drawn_ctr(tmp_path):
    table = generate(3, tmp_path, PhantomConfig(size=64))
    assert [round(sample_case(i, PhantomConfig(size=64)).ctr, 4) for i in range(3)] == list(table["ctr"])
