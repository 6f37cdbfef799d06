"""Cohort specs for the covariate DDPM (cxr_ddpm): what a synthetic cohort should look like, checked
against the model before anything is generated, and drawn reproducibly.

A spec (YAML; units: years, cm) gives the count, the seed, the sex mix and, per numeric covariate the
model is conditioned on (age, ivsd, lvidd, lvpwd), a normal distribution either in raw units
(`normal: [mean, sd]`) or relative to the model's training statistics in z-units (`shift_sd`,
`scale_sd`: mean = m + shift_sd * s, sd = s * scale_sd), with optional truncation bounds (`clip`:
values outside are redrawn, so the distribution is truncated, not piled up at the bounds). A
covariate the spec leaves out follows the training distribution. `correlation: training` draws the
covariates jointly with the training rows' correlation matrix (stored with the model), so IVSd and
LVPWd move together as they do in patients; `independent` is the paper's choice. `only: [slvh]`
keeps only rows positive for every listed label.

Labels come from the requested covariates through the CheXchoNet thresholds (the one function
`echo_labels`), as in the paper: they say what was asked for, not what the image shows.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxrray.data.sources.chexchonet import FINDINGS, echo_labels
from cxrray.errors import InputError
from cxrray.families.ddpm.config import NUMERIC, RANGES, UNITS, DDPMConfig

ECHO = ("ivsd", "lvidd", "lvpwd")
MAX_DRAWS_PER_ROW = 1000  # a spec whose filters keep fewer than 1 in 1000 draws is refused


class CovariateSpec(BaseModel):
    """One numeric covariate: `normal` in raw units, or `shift_sd`/`scale_sd` in training z-units."""

    model_config = ConfigDict(extra="forbid")

    normal: tuple[float, float] | None = None
    shift_sd: float | None = None
    scale_sd: float | None = Field(None, gt=0)
    clip: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "CovariateSpec":
        if self.normal is not None and (self.shift_sd is not None or self.scale_sd is not None):
            raise ValueError("give either normal: [mean, sd] or shift_sd/scale_sd, not both")
        if self.normal is not None and not self.normal[1] > 0:
            raise ValueError(f"normal: sd must be > 0, got {self.normal[1]}")
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise ValueError(f"clip: lower bound {self.clip[0]} must be below upper bound {self.clip[1]}")
        return self


class CohortSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1, le=10_000_000)
    seed: int = Field(0, ge=0)
    sex: dict[Literal["M", "F"], float] = {"M": 0.5, "F": 0.5}
    view: dict[str, float] | None = None  # refused unless the model is conditioned on view (none is yet)
    covariates: dict[str, CovariateSpec] = {}
    correlation: Literal["independent", "training"] = "independent"
    only: list[Literal["slvh", "dlv", "composite_slvh_dlv"]] = []

    @field_validator("sex")
    @classmethod
    def _proportions(cls, v: dict[str, float]) -> dict[str, float]:
        if any(p < 0 for p in v.values()) or not math.isclose(sum(v.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"proportions must be >= 0 and sum to 1, got {v}")
        return v


def load_spec(path: str | Path, n: int | None = None) -> CohortSpec:
    """A cohort spec from YAML (`n` overrides the file's count); errors name the file and the field."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such cohort spec") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a cohort spec is a mapping (n, seed, sex, covariates, ...)")
    if n is not None:
        raw["n"] = n
    try:
        return CohortSpec(**raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InputError(f"{path}: {problems}") from None


class Resolved(BaseModel):
    """A spec made concrete for one model: per numeric covariate its raw-unit mean, sd and bounds."""

    names: list[str]
    mean: list[float]
    sd: list[float]
    low: list[float]
    high: list[float]
    corr: list[list[float]]


def resolve(spec: CohortSpec, model: DDPMConfig) -> Resolved:
    """Check `spec` against the model (its covariates, training statistics and supported ranges) and
    return the distribution to draw from. InputError names the offending field."""
    conditioned = set(model.covariates)
    for name in spec.covariates:
        if name not in conditioned or name not in NUMERIC:
            raise InputError(f"covariates.{name}: unknown covariate; this model is conditioned on "
                             f"{[c for c in model.covariates if c in NUMERIC]} (sex has its own field)")
    if spec.view is not None:
        raise InputError("view: this model is not conditioned on view; leave the field out")
    if "sex" not in conditioned and spec.sex != {"M": 0.5, "F": 0.5}:
        raise InputError("sex: this model is not conditioned on sex")
    stats = model.covariate_stats or {}
    names = [c for c in model.covariates if c in NUMERIC]
    mean, sd, low, high = [], [], [], []
    for name in names:
        want = spec.covariates.get(name, CovariateSpec())
        where, unit = f"covariates.{name}", UNITS[name]
        lo, hi = RANGES[name]
        if want.normal is not None:
            m, s = want.normal
        else:
            if name not in stats:
                raise InputError(f"{where}: the model has no training statistics for {name}; give normal: [mean, sd]")
            m0, s0 = stats[name]
            m, s = m0 + (want.shift_sd or 0.0) * s0, s0 * (want.scale_sd or 1.0)
        if not lo <= m <= hi:
            raise InputError(f"{where}: mean {m:g} {unit} is outside the model's supported range {lo:g}-{hi:g} {unit}")
        if want.clip is not None:
            c_lo, c_hi = want.clip
            if c_lo < lo or c_hi > hi:
                raise InputError(f"{where}.clip: [{c_lo:g}, {c_hi:g}] {unit} reaches outside the supported range "
                                 f"{lo:g}-{hi:g} {unit}")
            lo, hi = c_lo, c_hi
        mean.append(float(m)), sd.append(float(s)), low.append(float(lo)), high.append(float(hi))
    corr = np.eye(len(names))
    if spec.correlation == "training":
        table = model.covariate_corr
        if not table or any(n not in table for n in names):
            raise InputError("correlation: training needs the model's covariate correlations (pretrained by "
                             "cxrray >= this version); use correlation: independent")
        corr = np.array([[table[a][b] for b in names] for a in names])
    return Resolved(names=names, mean=mean, sd=sd, low=low, high=high, corr=corr.tolist())


def draw(spec: CohortSpec, model: DDPMConfig) -> list[dict]:
    """The spec's `n` rows, a pure function of (spec, model statistics): each {"index", "sex", "age",
    "covariates": {echo name: cm}, "labels": [slvh, dlv, composite]} (NaN where a covariate is not
    conditioned on). Rejection sampling for `clip` and `only`, in blocks, from one seeded generator."""
    r = resolve(spec, model)
    rng = np.random.default_rng(spec.seed)
    chol = np.linalg.cholesky(np.asarray(r.corr) + 1e-9 * np.eye(len(r.names))) if r.names else None
    sexes, weights = list(spec.sex), np.array(list(spec.sex.values()))
    rows: list[dict] = []
    drawn, block = 0, max(256, spec.n)
    while len(rows) < spec.n:
        if drawn >= MAX_DRAWS_PER_ROW * spec.n:
            raise InputError(f"clip/only keep {len(rows)} of {drawn:,} draws: fewer than 1 in "
                             f"{MAX_DRAWS_PER_ROW}; widen the bounds or drop a filter")
        values = (rng.standard_normal((block, len(r.names))) @ chol.T) * r.sd + r.mean if r.names else np.zeros((block, 0))
        sex = rng.choice(len(sexes), size=block, p=weights / weights.sum())
        drawn += block
        inside = ((values >= r.low) & (values <= r.high)).all(axis=1)
        for i in np.flatnonzero(inside):
            row = _row(len(rows), sexes[sex[i]] if "sex" in model.covariates else None, dict(zip(r.names, values[i])))
            if all(row["labels"][FINDINGS.index(label)] == 1.0 for label in spec.only):
                rows.append(row)
                if len(rows) == spec.n:
                    break
    return rows


def _row(index: int, sex: str | None, values: dict[str, float]) -> dict:
    echo = {c: round(float(values[c]), 4) for c in ECHO if c in values}
    labels = echo_labels(sex, *(echo.get(c, float("nan")) for c in ECHO))
    age = round(float(values["age"]), 2) if "age" in values else None
    return {"index": index, "sex": sex, "age": age, "covariates": echo, "labels": labels}


def describe(rows: list[dict], model: DDPMConfig | None = None) -> dict:
    """Composition of drawn rows: age (mean, sd, % under 60), % women, label prevalence, echo means/sd;
    with `model`, its training means/sd beside them (the reference the z-units refer to)."""
    ages = np.array([r["age"] for r in rows if r["age"] is not None], dtype=float)
    out: dict = {"n": len(rows)}
    if ages.size:
        out["age"] = {"mean": float(ages.mean()), "sd": float(ages.std()), "under_60_pct": float((ages < 60).mean() * 100)}
    sexes = [r["sex"] for r in rows if r["sex"] is not None]
    if sexes:
        out["women_pct"] = 100.0 * sexes.count("F") / len(sexes)
    labels = np.array([r["labels"] for r in rows], dtype=float)
    out["prevalence_pct"] = {f: (float(np.nanmean(labels[:, i]) * 100) if np.isfinite(labels[:, i]).any() else None)
                             for i, f in enumerate(FINDINGS)}
    out["echo_cm"] = {}
    for c in ECHO:
        v = np.array([r["covariates"][c] for r in rows if c in r["covariates"]], dtype=float)
        if v.size:
            out["echo_cm"][c] = {"mean": float(v.mean()), "sd": float(v.std())}
    if model is not None and model.covariate_stats:
        out["training"] = {c: {"mean": m, "sd": s} for c, (m, s) in model.covariate_stats.items()}
    return out


def describe_text(summary: dict) -> str:
    """The composition as a few human lines (the CLI prints these, then the JSON)."""
    lines = [f"cohort of {summary['n']:,} images"]
    if "age" in summary:
        a = summary["age"]
        lines.append(f"  age {a['mean']:.1f} +- {a['sd']:.1f} years, {a['under_60_pct']:.1f}% under 60")
    if "women_pct" in summary:
        lines.append(f"  women {summary['women_pct']:.1f}%")
    prev = ", ".join(f"{f} {p:.1f}%" for f, p in summary["prevalence_pct"].items() if p is not None)
    lines.append(f"  prevalence (from the requested covariates): {prev or 'n/a (no echo covariates)'}")
    for c, v in summary["echo_cm"].items():
        ref = summary.get("training", {}).get(c)
        lines.append(f"  {c} {v['mean']:.2f} +- {v['sd']:.2f} cm" +
                     (f" (training {ref['mean']:.2f} +- {ref['sd']:.2f})" if ref else ""))
    return "\n".join(lines)
