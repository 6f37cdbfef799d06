"""Phantom label vocabulary, configuration and confounder specs."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

FINDINGS = ("cardiomegaly", "effusion", "nodule", "pneumothorax", "consolidation")
DEVICES = ("chest_tube", "pacemaker", "ecg_leads")
LABELS = FINDINGS + DEVICES + ("slvh", "dlv")

#: short device names accepted in confounder specs -> label column
DEVICE_ALIASES = {"tube": "chest_tube", "pacemaker": "pacemaker", "ecg": "ecg_leads"}
CONFOUNDER_FORMAT = "'device:finding:p1:p0', e.g. 'tube:effusion:0.9:0.05'"

#: marginal prevalences of findings and devices when nothing is confounded (cardiomegaly follows
#: from the heart model instead, roughly 25%)
PREVALENCE = {
    "effusion": 0.25,
    "nodule": 0.15,
    "pneumothorax": 0.10,
    "consolidation": 0.15,
    "chest_tube": 0.10,
    "pacemaker": 0.08,
    "ecg_leads": 0.30,
}


@dataclass(frozen=True)
class Confounder:
    """A device planted with probability p1 when `finding` is present and p0 when it is not.

    `device` is the label column (``chest_tube``, ``pacemaker`` or ``ecg_leads``)."""

    device: str
    finding: str
    p1: float
    p0: float

    def __str__(self) -> str:
        short = {v: k for k, v in DEVICE_ALIASES.items()}[self.device]
        return f"{short}:{self.finding}:{self.p1:g}:{self.p0:g}"


def parse_confounder(spec: str) -> Confounder:
    """Parse ``"device:finding:p1:p0"``; devices: tube, pacemaker, ecg (or their label names)."""
    allowed = (
        f"devices: {', '.join(DEVICE_ALIASES)} (or {', '.join(DEVICES)}); "
        f"findings: {', '.join(FINDINGS)}; expected format {CONFOUNDER_FORMAT}"
    )
    if not isinstance(spec, str):
        raise ValueError(f"confounder spec must be a string; {allowed}")
    parts = [p.strip() for p in spec.strip().split(":")]
    if len(parts) != 4:
        raise ValueError(f"invalid confounder spec {spec!r}: need 4 ':'-separated fields; {allowed}")
    dev, finding, s1, s0 = parts
    device = DEVICE_ALIASES.get(dev.lower(), dev.lower() if dev.lower() in DEVICES else None)
    if device is None:
        raise ValueError(f"invalid confounder spec {spec!r}: unknown device {dev!r}; {allowed}")
    if finding.lower() not in FINDINGS:
        raise ValueError(f"invalid confounder spec {spec!r}: unknown finding {finding!r}; {allowed}")
    try:
        p1, p0 = float(s1), float(s0)
    except ValueError:
        raise ValueError(f"invalid confounder spec {spec!r}: p1/p0 must be numbers; {allowed}") from None
    if not (0.0 <= p1 <= 1.0 and 0.0 <= p0 <= 1.0):
        raise ValueError(f"invalid confounder spec {spec!r}: p1 and p0 must lie in [0, 1]; {allowed}")
    return Confounder(device=device, finding=finding.lower(), p1=p1, p0=p0)


class PhantomConfig(BaseModel):
    """Settings of a phantom data set; every image is a function of (config, index)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    size: int = Field(256, ge=16, le=2048, description="image height in pixels; width is ~0.85-1.0x")
    monochrome1_fraction: float = Field(0.3, ge=0.0, le=1.0)
    compressed_fraction: float = Field(0.3, ge=0.0, le=1.0)
    patients_per_image: float = Field(0.6, gt=0.0, le=1.0, description="distinct patients per image")
    confounder: str | None = Field(None, description=f"planted device-finding correlation {CONFOUNDER_FORMAT}")
    seed: int = Field(0, ge=0, lt=2**63)
    report_phi_fraction: float = Field(0.25, ge=0.0, le=1.0,
                                       description="fraction of reports carrying identifying prose (de-id yardstick)")
    # age as the image shows it and as disease depends on it (cxr_ddpm's "lift in the young" needs both)
    age_heart: float = Field(0.005, ge=0.0, le=0.1, description="cardiothoracic ratio added per decade of age "
                                                                 "above 60 (0.005: barely visible)")
    disease_age_slope: float = Field(0.0, ge=-3.0, le=3.0, description="log-odds per decade (around age 61) of "
                                     "the latent dilated / hypertrophied ventricle behind DLV / SLVH; 0: flat")
    young_age: float = Field(60.0, ge=0.0, le=120.0, description="age (at the first study) below which "
                                                                 "young_positive_keep applies")
    young_positive_keep: float = Field(1.0, ge=0.0, le=1.0, description="fraction of young patients with a latent "
                                       "heart disease kept as such (the rest get normal hearts): a Base set "
                                       "that under-represents the young with disease")
    masks: bool = Field(False, description="also write the ground truth of where findings are: each drawn "
                                           "label's mask and the lung fields (masks/*.png, labels.csv columns "
                                           "mask:<label>, mask:lungs) and the healthy counterpart "
                                           "(counterparts/*.dcm, column image:healthy)")

    @field_validator("confounder")
    @classmethod
    def _check_confounder(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        parse_confounder(v)
        return v.strip()

    @property
    def parsed_confounder(self) -> Confounder | None:
        return parse_confounder(self.confounder) if self.confounder else None
