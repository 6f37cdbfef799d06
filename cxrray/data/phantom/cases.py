"""Case sampling: identity, demographics, echo covariates, labels, pose and file encoding.

Everything about image `index` is a pure function of ``(cfg, index)``: patients are assigned within
blocks of `_BLOCK` consecutive indices, and every random draw uses a generator seeded with
``[cfg.seed, tag, ...]``, so any case can be re-created on its own, in any process, in any order.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from .config import FINDINGS, LABELS, PREVALENCE, PhantomConfig
from .names import FAMILY, GIVEN_F, GIVEN_M, INSTITUTIONS, STREETS, TOWNS

_BLOCK = 32  # patients are drawn per block of consecutive indices
_TAG_BLOCK, _TAG_PATIENT, _TAG_STUDY, _TAG_RENDER, _TAG_CODEC, _TAG_IDS, _TAG_REPORT, _TAG_THIN = 1, 2, 3, 4, 5, 6, 7, 8
_DILATED, _HYPER = 0.14, 0.15  # prevalence of the latent ventricles at age 61 (flat across age by default)
_EPOCH = _dt.date(2012, 1, 1)

#: echo thresholds (cm): slvh if IVSd or LVPWd above, dlv if LVIDd above
SLVH_CM = {"M": 1.5, "F": 1.4}
DLV_CM = {"M": 5.9, "F": 5.3}


@dataclass(frozen=True)
class Patient:
    number: int          # global patient number (unique per seed)
    patient_id: str      # "MRN" + 8 digits
    other_id: str
    family: str
    given: str
    sex: str             # "M" | "F"
    birth_date: _dt.date
    address: str
    dilated: bool        # latent dilated left ventricle
    hypertrophic: bool   # latent LV hypertrophy
    habitus: float       # thorax width factor

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"


@dataclass(frozen=True)
class Pose:
    rotation_deg: float
    shift_x: float   # fraction of image height
    shift_y: float
    scale: float
    aspect: float    # width / height


@dataclass(frozen=True)
class PhantomCase:
    index: int
    seed: int
    patient: Patient
    accession: str
    study_id: str
    study_date: _dt.date
    study_time: str
    institution: tuple[str, str]   # (name, address)
    station: str
    device_serial: str
    referring: str
    performing: str
    operator: str
    age: int
    view: str                      # "PA" | "AP"
    ivsd: float
    lvidd: float
    lvpwd: float
    ctr: float                     # cardiothoracic ratio drawn in the image
    labels: dict[str, int]
    pose: Pose
    photometric: str               # "MONOCHROME1" | "MONOCHROME2"
    transfer_syntax: str           # transfer syntax UID
    details: dict = field(default_factory=dict)  # geometry of findings/devices for the renderer

    @property
    def sex(self) -> str:
        return self.patient.sex

    def row(self) -> dict:
        """One labels.csv row (without `path`)."""
        out = {
            "patient": self.patient.patient_id,
            "study": self.accession,
            "sex": self.sex,
            "age": self.age,
            "view": self.view,
            "ivsd": self.ivsd,
            "lvidd": self.lvidd,
            "lvpwd": self.lvpwd,
            "ctr": round(self.ctr, 4),
        }
        out.update({k: int(self.labels[k]) for k in LABELS})
        return out


def _affine_id(seed: int, salt: int, number: int, modulus: int = 10**8) -> int:
    """Bijective scramble of `number` mod `modulus`: distinct numbers never collide."""
    a, b = np.random.default_rng([seed, _TAG_IDS, salt]).integers(1, modulus, size=2)
    a = int(a) | 1
    if a % 5 == 0:
        a += 2
    return (a * number + int(b)) % modulus


def _patient_number(index: int, cfg: PhantomConfig) -> int:
    block, pos = divmod(index, _BLOCK)
    rng = np.random.default_rng([cfg.seed, _TAG_BLOCK, block])
    expected = _BLOCK * cfg.patients_per_image
    m = int(expected) + int(rng.random() < expected - int(expected))
    m = min(max(m, 1), _BLOCK)
    owners = np.concatenate([np.arange(m), rng.integers(0, m, _BLOCK - m)])
    rng.shuffle(owners)
    return block * _BLOCK + int(owners[pos])


def _patient(number: int, cfg: PhantomConfig) -> tuple[Patient, dict, _dt.date]:
    rng = np.random.default_rng([cfg.seed, _TAG_PATIENT, number])
    sex = "M" if rng.random() < 0.5 else "F"
    given = (GIVEN_M if sex == "M" else GIVEN_F)[rng.integers(len(GIVEN_M if sex == "M" else GIVEN_F))]
    family = FAMILY[rng.integers(len(FAMILY))]
    first_study = _EPOCH + _dt.timedelta(days=int(rng.integers(0, 365 * 11)))
    age0 = float(np.clip(rng.normal(61, 15), 19, 94))
    birth = first_study - _dt.timedelta(days=int(age0 * 365.25))
    address = (f"{rng.integers(1, 400)} {STREETS[rng.integers(len(STREETS))]}^^"
               f"{TOWNS[rng.integers(len(TOWNS))]}^^{rng.integers(10000, 99999)}")
    dilated = bool(rng.random() < _age_prevalence(_DILATED, age0, cfg.disease_age_slope))
    hyper = bool(rng.random() < _age_prevalence(_HYPER, age0, cfg.disease_age_slope))
    if (dilated or hyper) and age0 < cfg.young_age and cfg.young_positive_keep < 1.0:
        # thin out young patients with structural heart disease (their own stream: nothing else shifts)
        if np.random.default_rng([cfg.seed, _TAG_THIN, number]).random() >= cfg.young_positive_keep:
            dilated = hyper = False
    male = sex == "M"
    # baseline echo (cm); mixture of normal hearts and latent dilated / hypertrophied ventricles
    lvidd = rng.normal(5.05 if male else 4.55, 0.42 if male else 0.38) + dilated * rng.normal(1.35, 0.35)
    wall = rng.normal(0.0, 1.0)
    ivsd = (1.0 if male else 0.9) + 0.12 * wall + rng.normal(0, 0.06) + hyper * rng.normal(0.5, 0.12)
    lvpwd = (0.97 if male else 0.88) + 0.10 * wall + rng.normal(0, 0.06) + hyper * rng.normal(0.42, 0.1)
    echo = {"ivsd": ivsd, "lvidd": lvidd, "lvpwd": lvpwd}
    patient = Patient(
        number=number,
        patient_id=f"MRN{_affine_id(cfg.seed, 1, number):08d}",
        other_id=f"H{_affine_id(cfg.seed, 2, number, 10**7):07d}",
        family=family,
        given=given,
        sex=sex,
        birth_date=birth,
        address=address,
        dilated=dilated,
        hypertrophic=hyper,
        habitus=float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1)),
    )
    return patient, echo, first_study


def _age_prevalence(p61: float, age: float, slope: float) -> float:
    """Prevalence at `age` with log-odds `slope` per decade around p61 at 61 years (slope 0: p61 exactly)."""
    if slope == 0.0:
        return p61
    return float(1.0 / (1.0 + np.exp(-(np.log(p61 / (1 - p61)) + slope * (age - 61.0) / 10.0))))


def _codec(index: int, cfg: PhantomConfig) -> tuple[str, str]:
    """(photometric, transfer syntax) from low-discrepancy sequences: even small sets mix all kinds."""
    o1, o2 = np.random.default_rng([cfg.seed, _TAG_CODEC]).random(2)
    u = (o1 + index * 0.6180339887498949) % 1.0
    v = (o2 + index * 0.4142135623730950) % 1.0
    cf = cfg.compressed_fraction
    if u < cf:
        ts = RLELossless if u < cf / 2 else JPEG2000Lossless
    else:
        ts = ExplicitVRLittleEndian if (u - cf) / max(1.0 - cf, 1e-12) < 0.75 else ImplicitVRLittleEndian
    photometric = "MONOCHROME1" if v < cfg.monochrome1_fraction else "MONOCHROME2"
    return photometric, str(ts)


def _age(birth: _dt.date, on: _dt.date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _person(rng: np.random.Generator) -> str:
    given = GIVEN_M + GIVEN_F
    return f"{FAMILY[rng.integers(len(FAMILY))]}^{given[rng.integers(len(given))]}"


def sample_case(index: int, cfg: PhantomConfig) -> PhantomCase:
    """Everything about image `index` except its pixels (cheap: no rendering)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    patient, echo0, first_study = _patient(_patient_number(index, cfg), cfg)
    rng = np.random.default_rng([cfg.seed, _TAG_STUDY, index])
    u = rng.random(16)  # fixed draws for labels so confounders never shift other streams

    # --- study identity -------------------------------------------------------------------
    study_date = first_study + _dt.timedelta(days=int(rng.integers(0, 1600)))
    study_time = f"{rng.integers(7, 20):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    inst = INSTITUTIONS[rng.integers(len(INSTITUTIONS))]
    station_no = int(rng.integers(1, 7))
    age = _age(patient.birth_date, study_date)

    # --- covariates -----------------------------------------------------------------------
    drift = rng.normal(0.0, 0.06, size=3)
    ivsd = round(float(np.clip(echo0["ivsd"] + drift[0], 0.5, 2.6)), 2)
    lvidd = round(float(np.clip(echo0["lvidd"] + 1.5 * drift[1], 3.0, 8.5)), 2)
    lvpwd = round(float(np.clip(echo0["lvpwd"] + drift[2], 0.5, 2.6)), 2)
    d_ref = 7.0 if patient.sex == "M" else 6.3
    # heart width grows with the LV outer diameter (LVIDd + both walls); past ~0.8 cm above the sex
    # norm the ventricle remodels and the silhouette widens steeply, so CTR is bimodal around 0.5
    x = (lvidd + ivsd + lvpwd) - d_ref
    ctr = 0.425 + 0.03 * x + 0.1 / (1.0 + np.exp(-(x - 0.8) / 0.15)) + cfg.age_heart / 10 * (age - 60)  # per decade; default = 0.0005 per year
    ctr += rng.normal(0, 0.015)
    ctr = float(np.clip(ctr, 0.34, 0.74))

    labels = {k: 0 for k in LABELS}
    labels["cardiomegaly"] = int(ctr > 0.5)
    for i, name in enumerate(FINDINGS[1:], start=1):
        labels[name] = int(u[i] < PREVALENCE[name])
    conf = cfg.parsed_confounder
    for i, name in enumerate(("chest_tube", "pacemaker", "ecg_leads"), start=5):
        p = PREVALENCE[name]
        if conf is not None and conf.device == name:
            p = conf.p1 if labels[conf.finding] else conf.p0
        labels[name] = int(u[i] < p)
    labels["slvh"] = int(ivsd > SLVH_CM[patient.sex] or lvpwd > SLVH_CM[patient.sex])
    labels["dlv"] = int(lvidd > DLV_CM[patient.sex])

    # --- geometry of findings / devices (consumed by the renderer) -------------------------
    sides = ("right", "left")  # patient sides; patient right is image left
    details: dict = {"inspiration": float(rng.normal(0.0, 0.015)), "habitus": patient.habitus}
    if labels["effusion"]:
        side = ("right", "left", "both")[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
        details["effusion"] = {"side": side, "height": rng.uniform(0.2, 0.45, size=2).tolist()}  # of lung height
    if labels["pneumothorax"]:
        details["pneumothorax"] = {"side": sides[rng.integers(2)], "gap": float(rng.uniform(0.035, 0.075))}
    if labels["consolidation"]:
        details["consolidation"] = {
            "side": sides[rng.integers(2)],
            "t": float(rng.uniform(0.3, 0.8)),      # vertical position in the lung (0 apex, 1 base)
            "a": float(rng.uniform(0.35, 0.75)),    # lateral position (0 medial, 1 lateral)
            "size": float(rng.uniform(0.06, 0.1)),
        }
    if labels["nodule"]:
        details["nodule"] = {
            "side": sides[rng.integers(2)],
            "t": float(rng.uniform(0.2, 0.75)),
            "a": float(rng.uniform(0.35, 0.8)),
            "radius": float(rng.uniform(0.014, 0.024)),
        }
    if labels["chest_tube"]:
        side = sides[rng.integers(2)]
        for finding in ("effusion", "pneumothorax"):
            if finding in details and details[finding]["side"] != "both":
                side = details[finding]["side"]
        details["chest_tube"] = {"side": side, "bend": float(rng.uniform(-0.03, 0.03)),
                                 "tip": float(rng.uniform(0.16, 0.22))}
    if labels["pacemaker"]:
        details["pacemaker"] = {"side": "left" if rng.random() < 0.85 else "right",
                                "x": float(rng.uniform(0.2, 0.28)), "y": float(rng.uniform(0.13, 0.19))}
    if labels["ecg_leads"]:
        details["ecg_leads"] = {"n": int(rng.integers(3, 6)), "jitter": rng.normal(0, 0.02, size=(5, 2)).tolist()}

    view = "AP" if u[10] < 0.25 else "PA"
    pose = Pose(
        rotation_deg=float(np.clip(rng.normal(0.0, 2.5), -6.0, 6.0)),
        shift_x=float(np.clip(rng.normal(0.0, 0.025), -0.06, 0.06)),
        shift_y=float(np.clip(rng.normal(0.0, 0.02), -0.05, 0.05)),
        scale=float(rng.uniform(0.92, 1.05)),
        aspect=float(rng.uniform(0.85, 1.0)),
    )
    photometric, ts = _codec(index, cfg)
    return PhantomCase(
        index=index,
        seed=cfg.seed,
        patient=patient,
        accession=f"AC{_affine_id(cfg.seed, 3, index):08d}",
        study_id=str(int(rng.integers(1, 99999))),
        study_date=study_date,
        study_time=study_time,
        institution=inst,
        station=f"{inst[0].split()[0].upper()[:8]}DX{station_no:02d}",
        device_serial=f"SN{_affine_id(cfg.seed, 4, INSTITUTIONS.index(inst) * 10 + station_no, 10**6):06d}",
        referring=_person(rng),
        performing=_person(rng),
        operator=_person(rng),
        age=age,
        view=view,
        ivsd=ivsd,
        lvidd=lvidd,
        lvpwd=lvpwd,
        ctr=ctr,
        labels=labels,
        pose=pose,
        photometric=photometric,
        transfer_syntax=ts,
        details=details,
    )


def render_rng(case: PhantomCase, part: int = 0) -> np.random.Generator:
    """Generator for one part of the renderer's own randomness (texture, noise) of this case.

    Each part (vessels, ribs, noise, a finding's texture...) has its own stream, so removing or
    adding one finding re-renders everything else identically (paired / counterfactual images)."""
    return np.random.default_rng([case.seed, _TAG_RENDER, case.index, part])


def report_rng(case: PhantomCase) -> np.random.Generator:
    """Generator for the wording of this case's report (independent of labels and pixels)."""
    return np.random.default_rng([case.seed, _TAG_REPORT, case.index])
