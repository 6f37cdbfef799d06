"""Free-text radiology reports for phantom cases, with the truth needed to measure de-identification.

A report is composed from the planted truth of its case (findings with laterality and severity,
devices, negations) in varied phrasing, as FINDINGS + IMPRESSION sections. For a fraction of cases
(`PhantomConfig.report_phi_fraction`) it also carries identifying prose of every Safe Harbor kind
(patient name, dates, times, phone and fax, physician, MRN / accession, e-mail, street address and
ZIP, SSN, URL, IP address, and the age when over 89), the way hospital reports do.
`PhantomReport.phi` lists each planted identifier string by category and `clinical` every clinical
sentence, so a test can check that the identifiers are gone and the clinical text is intact.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

from .cases import PhantomCase, report_rng
from .dicom import FIELD_OF_VIEW_MM
from .names import FAMILY, GIVEN_F, GIVEN_M

#: categories of planted identifiers, as measured
PHI_CATEGORIES = ("name", "date", "time", "phone", "physician", "mrn", "email", "address", "ssn", "url", "ip",
                  "age")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


@dataclass
class PhantomReport:
    text: str
    phi: dict[str, list[str]] = field(default_factory=dict)  # category -> planted strings
    clinical: list[str] = field(default_factory=list)  # sentences that must survive verbatim


def compose_report(case: PhantomCase, phi_fraction: float) -> PhantomReport:
    """The report of `case`; a pure function of the case (its own random stream)."""
    rng = report_rng(case)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    findings = _findings(case, rng, pick)
    impression = _impression(case, pick)
    report = PhantomReport("", {}, findings + [impression])
    with_phi = rng.random() < phi_fraction
    history, closing = (_identifying_prose(case, rng, pick, report.phi) if with_phi else ([], []))
    extra = [pick(("Compared with 2 prior studies.", "No prior studies for comparison.",
                   "Degenerative change at the T7 vertebra.", "Stable appearance since the prior examination."))]
    report.clinical += extra
    body = " ".join(findings + extra)
    report.text = " ".join(history + [f"FINDINGS: {body}", f"IMPRESSION: {impression}"] + closing)
    return report


# --- clinical prose ------------------------------------------------------------------------------
def _side(side: str) -> str:
    return "bilateral" if side == "both" else side


def _lobe(side: str, t: float) -> str:
    if side == "right":
        return "upper" if t < 0.4 else "middle" if t < 0.65 else "lower"
    return "upper" if t < 0.55 else "lower"


def _findings(case: PhantomCase, rng: np.random.Generator, pick) -> list[str]:
    d, lab, out = case.details, case.labels, []
    if lab["cardiomegaly"]:
        grade = "mild" if case.ctr < 0.56 else "moderate" if case.ctr < 0.62 else "marked"
        out.append(pick((f"The heart is enlarged, {grade} cardiomegaly.", f"{grade.capitalize()} cardiomegaly.",
                         f"There is {grade} enlargement of the cardiac silhouette.")))
    elif rng.random() < 0.7:
        out.append(pick(("Heart size is normal.", "No cardiomegaly.", "The cardiac silhouette is within normal limits.")))
    if lab["effusion"]:
        e = d["effusion"]
        h = max(e["height"])
        grade = "small" if h < 0.27 else "moderate" if h < 0.36 else "large"
        side = _side(e["side"])
        out.append(pick((f"{grade.capitalize()} {side} pleural effusion.",
                         f"There is a {grade} {side} pleural effusion.",
                         f"{side.capitalize()} pleural effusion, {grade} in size.")))
    elif rng.random() < 0.7:
        out.append(pick(("No pleural effusion.", "No evidence of pleural effusion.",
                         "The costophrenic angles are sharp, no effusion.")))
    if lab["pneumothorax"]:
        p = d["pneumothorax"]
        grade = "small" if p["gap"] < 0.05 else "moderate"
        out.append(pick((f"{grade.capitalize()} {p['side']} apical pneumothorax.",
                         f"There is a {grade} {p['side']}-sided pneumothorax.")))
    elif rng.random() < 0.6:
        out.append(pick(("No pneumothorax.", "There is no pneumothorax.")))
    if lab["nodule"]:
        n = d["nodule"]
        mm = int(round(2 * n["radius"] * FIELD_OF_VIEW_MM))
        out.append(pick((f"{mm} mm nodule in the {n['side']} {_lobe(n['side'], n['t'])} lobe.",
                         f"A {mm} mm pulmonary nodule projects over the {n['side']} {_lobe(n['side'], n['t'])} lobe.")))
    if lab["consolidation"]:
        c = d["consolidation"]
        out.append(pick((f"Patchy consolidation in the {c['side']} {_lobe(c['side'], c['t'])} lobe.",
                         f"{c['side'].capitalize()} {_lobe(c['side'], c['t'])} lobe consolidation, likely pneumonia.")))
    elif rng.random() < 0.5:
        out.append(pick(("No focal consolidation.", "The lungs are clear without focal consolidation.")))
    if lab["chest_tube"]:
        side = d["chest_tube"]["side"]
        out.append(pick((f"{side.capitalize()} chest tube in place.", f"A {side}-sided chest tube is present.")))
    if lab["pacemaker"]:
        side = d["pacemaker"]["side"]
        out.append(pick((f"Pacemaker in the {side} upper chest.",
                         f"{side.capitalize()}-sided pacemaker with leads in the right heart.")))
    if lab["ecg_leads"]:
        out.append(pick(("ECG leads overlie the chest.", "External monitoring leads project over the chest.")))
    return out


def _impression(case: PhantomCase, pick) -> str:
    names = {"cardiomegaly": "cardiomegaly", "effusion": "pleural effusion", "pneumothorax": "pneumothorax",
             "nodule": "pulmonary nodule", "consolidation": "consolidation"}
    positive = [v for k, v in names.items() if case.labels[k]]
    if not positive:
        return pick(("No acute cardiopulmonary process.", "Normal chest radiograph."))
    return ", ".join(positive).capitalize() + " as described."


# --- identifying prose ---------------------------------------------------------------------------
def _date_text(date, style: int) -> str:
    return (f"{date.month:02d}/{date.day:02d}/{date.year}", date.isoformat(),
            f"{date.day} {_MONTHS[date.month - 1][:3]} {date.year}",
            f"{_MONTHS[date.month - 1]} {date.day}, {date.year}", f"{date.day:02d}.{date.month:02d}.{date.year}")[style]


def _phone(rng: np.random.Generator, style: int) -> str:
    a, b, c = int(rng.integers(201, 989)), int(rng.integers(200, 999)), int(rng.integers(0, 10000))
    return (f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"{a}.{b}.{c:04d}", f"+1 {a} {b} {c:04d}")[style]


def _other_person(rng: np.random.Generator) -> tuple[str, str]:
    given = GIVEN_M + GIVEN_F
    return given[int(rng.integers(len(given)))].title(), FAMILY[int(rng.integers(len(FAMILY)))].title()


def _identifying_prose(case: PhantomCase, rng: np.random.Generator, pick, phi: dict) -> tuple[list[str], list[str]]:
    """(sentences before FINDINGS, sentences after IMPRESSION); fills `phi` with what was planted."""
    p = case.patient
    family, given = p.family.title(), p.given.title()
    name = pick((f"{given} {family}", p.name, f"{family}, {given}",
                 f"{'Mr.' if p.sex == 'M' else 'Ms.'} {family}", f"{given[0]}. {family}"))
    prior = case.study_date - dt.timedelta(days=int(rng.integers(30, 900)))
    dates = [_date_text(case.study_date, int(rng.integers(5))), _date_text(prior, int(rng.integers(5)))]
    time = pick((f"{case.study_time[:2]}:{case.study_time[2:4]}",
                 f"{int(case.study_time[:2]) % 12 or 12}:{case.study_time[2:4]} {'PM' if int(case.study_time[:2]) >= 12 else 'AM'}",
                 f"{case.study_time[:4]} hours"))
    phone, fax = _phone(rng, int(rng.integers(4))), _phone(rng, int(rng.integers(4)))
    if rng.random() < 0.5:  # the referring physician of the header, or somebody the header does not name
        doc_family, doc_given = (s.title() for s in case.referring.split("^"))
    else:
        doc_given, doc_family = _other_person(rng)
    doctor, doctor_phrase = pick(((doc_family, f"Dr. {doc_family}"),
                                  (f"{doc_given} {doc_family}", f"Dr. {doc_given} {doc_family}"),
                                  (f"{doc_given} {doc_family}", f"{doc_given} {doc_family}, MD")))
    mrn_digits = p.patient_id[3:]
    mrn_written, mrn = pick(((mrn_digits, f"MRN: {mrn_digits}"), (p.patient_id, p.patient_id),
                             (mrn_digits, f"medical record number {mrn_digits}")))
    accession = case.accession
    email = f"{given.lower()}.{family.lower()}@{pick(('mailbox.example', 'post.example', 'inbox.example'))}.com"
    street, town, zipcode = p.address.split("^^")
    street = street.title()
    town = town.title()
    ssn = f"{int(rng.integers(100, 900)):03d}-{int(rng.integers(10, 99)):02d}-{int(rng.integers(1000, 9999)):04d}"
    url = f"https://pacs.{town.lower()}-hospital.example/viewer?study={accession}"
    ip = f"10.{int(rng.integers(0, 255))}.{int(rng.integers(0, 255))}.{int(rng.integers(1, 255))}"
    age = f"{case.age}-year-old"
    sex = "man" if p.sex == "M" else "woman"

    phi.update({"name": [name], "date": dates, "time": [time], "phone": [phone, fax],
                "physician": [doctor],
                "mrn": [mrn_written, accession], "email": [email], "address": [street, town, zipcode], "ssn": [ssn],
                "url": [url], "ip": [ip]})
    if case.age > 89:
        phi["age"] = [age]
    history = [
        pick((f"Patient: {name}, {mrn}.", f"{name} ({mrn}) presents with cough.", f"Images of {name}, {mrn}, reviewed.")),
        f"HISTORY: {age} {sex} with shortness of breath, SSN {ssn}, living at {street}, {town} {zipcode}.",
        pick((f"Comparison is made with the radiograph dated {dates[1]}.", f"COMPARISON: {dates[1]}.",
              f"Prior study from {dates[1]} was reviewed.")),
        f"Study {accession} performed on {dates[0]} at {time}.",
    ]
    closing = [
        pick((f"Results called to {doctor_phrase} at {phone}.", f"Findings discussed with {doctor_phrase} by phone {phone}.")),
        f"Copy faxed to {fax}; questions to {email}.",
        f"Images available at {url} from workstation {ip}.",
    ]
    return history, closing
