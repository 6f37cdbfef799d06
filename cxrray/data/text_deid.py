"""Free-text de-identification: HIPAA Safe Harbor's identifiers removed from reports and messages.

One function for every free-text field that leaves ingest or a Serve error path: `TextDeidentifier`
finds spans with two kinds of rules and replaces each with a typed placeholder (`[NAME]`, `[DATE]` …),
so a reader and a tokenizer see that something was removed:

1. the study's known identifiers (`KnownIdentifiers`, from DICOM headers and the metadata row): the
   people's names in every order and case ("FAMILY^GIVEN", "Given Family", "Family, G.", "G. Family",
   "G.F."), IDs, addresses; plus a configurable list of other names (a hospital's staff list);
2. pattern rules for what no header holds: names after titles / before degrees / after reporting
   verbs, dates (numeric, ISO, DICOM, month-name forms), times, phone and fax numbers, e-mail, URLs,
   IP addresses, MRN / accession / account-like numbers, SSNs, street addresses, ZIP codes and ages
   over 89.

Hand-written because no library checked works offline here (philter-lite needs NLTK data that cannot
be downloaded; scrubadub's detectors missed names, dates, phones and MRNs). Dates are replaced by
`[DATE]` or, with `dates="shift"`, moved by a per-patient offset (from a salted hash, so intervals
within a patient survive and reruns are byte-identical) and written as ISO dates.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cxrray.data.deid import salted_hash
from cxrray.errors import InputError

#: Safe Harbor: ages over 89 are aggregated into one category, reported as this value
AGE_CAP = 90.0


class TextDeidConfig(BaseModel):
    """How free text is de-identified (`ingest.text`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dates: Literal["placeholder", "shift"] = "placeholder"  # shift: per-patient salted offset, ISO output
    max_shift_days: int = Field(365, ge=1, le=3650)  # shift drawn uniformly from [-max, +max] \ {0}
    names: list[str] = Field(default_factory=list)  # other names to remove wherever they occur
    names_file: str | None = None  # one name per line (e.g. the hospital's staff list)

    def resolved(self) -> "TextDeidConfig":
        """The same settings with `names_file` read into `names` (read once, shipped to workers)."""
        return self.model_copy(update={"names": _extra_names(self), "names_file": None})


@dataclass
class KnownIdentifiers:
    """What the study itself knows identifies people: person names ("FAMILY^GIVEN^MIDDLE" or
    "Given Family") and other values, each with its placeholder type (ID, ADDRESS, INSTITUTION)."""

    names: list[str] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)  # (type, value)

    def __add__(self, more: "KnownIdentifiers") -> "KnownIdentifiers":
        return KnownIdentifiers(self.names + more.names, self.other + more.other)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str  # placeholder type: NAME, DATE, ...


# ---------------------------------------------------------------------------------------------
# pattern rules: (placeholder type, regex); a named group `phi` marks the part to replace
# (titles, labels such as "MRN:" and units stay), otherwise the whole match is replaced.
# ---------------------------------------------------------------------------------------------
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_MONTH_NO = {m[:3].lower(): i + 1 for i, m in enumerate(_MONTHS)}
_MONTH_WORDS = sorted({v for m in _MONTHS for v in (m, m.upper(), m[:3], m[:3].upper())} | {"Sept", "SEPT"},
                      key=len, reverse=True)
# Title or UPPER case only, so the verbs "may" and "march" in prose are not read as months
_MONTH = "(?:" + "|".join(_MONTH_WORDS) + r")\.?"
_WORD = r"[A-Z][A-Za-z'’\-]*[A-Za-z]"  # a capitalised (or upper-case) word of 2+ letters
_PERSON = rf"(?:[A-Z]\.\s?)*{_WORD}(?:\s+(?:[A-Z]\.\s?)*{_WORD}){{0,2}}"
_TITLES = r"(?:Dr|DR|Drs|Doctor|DOCTOR|Mr|MR|Mrs|MRS|Ms|MS|Miss|MISS|Mx|Prof|PROF|Professor|Nurse|Rev)"
_DEGREES = r"(?:M\.?D|D\.?O|R\.?N|N\.?P|P\.?A\.?-C|Ph\.?D|MBBS|FRCR)\b\.?"
_VERBS = (r"(?i:discussed with|called to|communicated to|conveyed to|reported to|notified|informed|"
          r"reviewed with|spoke with|spoken with|paged|dictated by|signed by|read by|electronically signed by|"
          r"attending|resident|radiologist|physician|technologist|referring physician|referred by|"
          r"ordered by|patient name|patient\s*:|name\s*:)")
_STREET = (r"(?i:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|court|ct|crescent|cres|terrace|"
           r"close|way|place|pl|parkway|pkwy|highway|hwy|square|sq|circle|cir)\b\.?")
_ID_LABEL = (r"(?i:MRN|medical record(?:\s+(?:number|no\.?))?|record\s+(?:number|no\.?)|accession(?:\s+(?:number|no\.?))?|"
             r"acc\.?\s*(?:no\.?|#)|account(?:\s+(?:number|no\.?))?|acct\.?|encounter(?:\s+(?:number|no\.?))?|"
             r"visit\s+(?:number|no\.?)|patient\s+id|member\s+id|policy(?:\s+(?:number|no\.?))?|"
             r"health\s+plan(?:\s+(?:number|no\.?))?|license(?:\s+(?:number|no\.?))?|specimen(?:\s+(?:number|no\.?))?|"
             r"id|ID)")
_AGE_WORDS = r"(?:[\s-]*(?:years?|yrs?|y/o|y\.o\.|yo)\b|-year)"

PATTERN_RULES: list[tuple[str, re.Pattern]] = [(kind, re.compile(rx)) for kind, rx in [
    ("EMAIL", r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    ("URL", r"(?i:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]"),
    ("IP", r"\b(?:25[0-5]|2[0-4]\d|1?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}\b"),
    ("SSN", r"\b\d{3}-\d{2}-\d{4}\b"),
    ("SSN", r"(?i:\b(?:SSN|social security(?:\s+(?:number|no\.?))?)\s*[:#]?\s*)(?P<phi>\d[\d -]{7,10}\d)"),
    ("PHONE", r"(?<![\w/])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
              r"(?:\s*(?i:x|ext\.?|extension)\s*\d{1,5}\b)?"),
    ("PHONE", r"(?i:\b(?:phone|tel|telephone|pager|beeper|fax|cell|mobile|ext|extension)\.?\s*(?:number|no\.?)?\s*[:#]?\s*)"
              r"(?P<phi>\+?\d[\d ().-]{2,16}\d)"),
    ("DATE", rf"\b(?P<phi>\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{2,4}})\b"),
    ("DATE", rf"\b(?P<phi>{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})\b"),
    ("DATE", rf"\b(?P<phi>{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?)\b(?!\s*(?:mm|cm|%))"),
    ("DATE", rf"\b(?P<phi>{_MONTH},?\s+\d{{4}})\b"),
    ("DATE", r"\b\d{4}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])\b"),
    ("DATE", r"\b(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|[12]\d|3[01])[-/.](?:\d{4}|\d{2})\b"),
    ("DATE", r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"),
    ("DATE", r"(?i:\b(?:on|dated|since|from|of|until|through|seen|performed|obtained)\s+)(?P<phi>(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01]))\b"),
    ("TIME", r"\b(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?:\s*(?i:[ap]\.m\.|[ap]m\b))?"),
    ("TIME", r"\b(?:1[0-2]|0?[1-9])\s*(?i:[ap]\.m\.|[ap]m\b)"),
    ("TIME", r"\b(?:[01]\d|2[0-3])[0-5]\d\s*(?i:hours|hrs|h)\b"),
    ("AGE>89", rf"\b(?P<phi>(?:9\d|1[0-4]\d)){_AGE_WORDS}"),
    ("AGE>89", r"(?i:\b(?:age|aged)\s*:?\s*)(?P<phi>9\d|1[0-4]\d)\b"),
    ("NAME", rf"\b{_TITLES}\.?\s+(?P<phi>{_PERSON})"),
    ("NAME", rf"(?P<phi>\b{_WORD}(?:\s+[A-Z]\.)?\s+{_WORD}),?\s+{_DEGREES}"),
    ("NAME", rf"\b{_VERBS}\s*:?\s+(?:{_TITLES}\.?\s+)?(?P<phi>{_PERSON})"),
    ("NAME", rf"\b{_WORD}(?:\^+{_WORD})+"),  # DICOM person-name form FAMILY^GIVEN^MIDDLE
    ("ADDRESS", rf"\b\d{{1,5}}\s+(?:{_WORD}\s+){{1,3}}{_STREET}"
                rf"(?:,?\s*(?i:apt|apartment|suite|unit|#)\.?\s*\w+)?"
                rf"(?:,\s*{_WORD}(?:\s+{_WORD})?)?(?:,?\s+[A-Z]{{2}}\b)?(?:,?\s+\d{{5}}(?:-\d{{4}})?\b)?"),
    ("ADDRESS", r"(?i:\bP\.?\s?O\.?\s+Box\s+\d+)"),
    ("MRN", rf"\b{_ID_LABEL}\s*(?:[:#]|no\.?)?\s*(?P<phi>(?=[A-Za-z-]*\d)[A-Za-z0-9][A-Za-z0-9-]{{3,}})\b"),
    ("ID", r"\b[A-Z]{1,4}-?\d{5,}\b"),
]]
#: bare numbers: identifiers in a report, but ordinary in a program's own error messages
NUMBER_RULES: list[tuple[str, re.Pattern]] = [(kind, re.compile(rx)) for kind, rx in [
    ("PHONE", r"\b\d{3}-\d{4}\b"),
    ("ZIP", r"\b\d{5}(?:-\d{4})?\b"),
    ("ID", r"\b\d{6,}\b"),
]]
RULES = PATTERN_RULES + NUMBER_RULES

_DATE_PARSERS = (
    (re.compile(r"^(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})$"), ("y", "m", "d")),
    (re.compile(r"^(\d{1,2})[-/.](\d{1,2})[-/.](\d{2,4})$"), ("m", "d", "y")),
    (re.compile(r"^(\d{4})(\d{2})(\d{2})$"), ("y", "m", "d")),
    (re.compile(r"^(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?([A-Za-z]+)\.?,?\s+(\d{2,4})$"), ("d", "M", "y")),
    (re.compile(r"^([A-Za-z]+)\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})$"), ("M", "d", "y")),
    (re.compile(r"^([A-Za-z]+)\.?\s+(\d{1,2})(?:st|nd|rd|th)?$"), ("M", "d")),
    (re.compile(r"^(\d{1,2})/(\d{1,2})$"), ("m", "d")),
)


class TextDeidentifier:
    """Callable text -> text with every identifier replaced by a typed placeholder.

    `known`: the study's own identifiers; `date_shift_days`: the patient's offset when dates are
    shifted (see `date_shift`), else None. Build one per sample (known identifiers differ)."""

    def __init__(self, cfg: TextDeidConfig | None = None, known: KnownIdentifiers | None = None,
                 date_shift_days: int | None = None, rules: list[tuple[str, re.Pattern]] = RULES):
        self.cfg = cfg or TextDeidConfig()
        self.shift = date_shift_days if self.cfg.dates == "shift" else None
        self._rules = _known_patterns(known or KnownIdentifiers(), _extra_names(self.cfg)) + rules

    def spans(self, text: str) -> list[Span]:
        """Non-overlapping identifier spans, leftmost-longest first."""
        found = []
        for kind, rx in self._rules:
            for m in rx.finditer(text):
                start, end = m.span("phi") if "phi" in rx.groupindex and m.group("phi") else m.span()
                if end > start:
                    found.append(Span(start, end, kind))
        found.sort(key=lambda s: (s.start, -(s.end - s.start)))
        kept, last = [], -1
        for span in found:
            if span.start >= last:
                kept.append(span)
                last = span.end
        return kept

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return text
        out, pos = [], 0
        for span in self.spans(text):
            out += [text[pos:span.start], self._replacement(text[span.start:span.end], span.kind)]
            pos = span.end
        out.append(text[pos:])
        return "".join(out)

    def _replacement(self, original: str, kind: str) -> str:
        if kind == "DATE" and self.shift is not None:
            shifted = _shift_date(original, self.shift)
            if shifted:
                return shifted
        return f"[{kind}]"


def for_patient(cfg: TextDeidConfig, known: KnownIdentifiers, patient: str, salt: str) -> TextDeidentifier:
    """The de-identifier ingest applies to one sample's free text (its patient's date offset)."""
    return TextDeidentifier(cfg, known, date_shift(patient, salt, cfg.max_shift_days))


def date_shift(patient: str, salt: str, max_days: int) -> int:
    """Per-patient date offset in days, in [-max_days, max_days] without 0, from a salted hash."""
    value = int(salted_hash(patient, salt, "date-shift", 12), 16) % (2 * max_days)
    return value - max_days if value < max_days else value - max_days + 1


def cap_age(age: float | None) -> float | None:
    """Safe Harbor: ages over 89 (90 and older) become 90, one "90 or older" category."""
    return AGE_CAP if age is not None and age == age and age >= AGE_CAP else age


def scrub_message(text: str, known: KnownIdentifiers) -> str:
    """A log or error message: the known identifiers and the pattern rules except bare numbers (sizes
    and counts in our own messages), dates as placeholders."""
    return TextDeidentifier(TextDeidConfig(), known, rules=PATTERN_RULES)(text)


# ---------------------------------------------------------------------------------------------
def _name_parts(name: str) -> list[str]:
    return [p for p in re.split(r"[\^,\s]+", name.strip()) if p]


def _known_patterns(known: KnownIdentifiers, extra_names: list[str]) -> list[tuple[str, re.Pattern]]:
    """Whole-word, case-insensitive patterns for the study's own identifiers."""
    rules: list[tuple[str, re.Pattern]] = []
    words: set[str] = set()
    for name in known.names + extra_names:
        parts = [p for p in _name_parts(name) if len(p.rstrip(".")) >= 2]
        words |= {p for p in parts if len(p) >= 3}  # shorter parts ("Ng", "Li") only as a whole name
        if len(parts) >= 2:
            f, g = re.escape(parts[0]), re.escape(parts[1])
            whole = rf"{f}\^+{g}|{g}\s+{f}|{f},?\s+{g}"
            initials = rf"{g[0]}\.\s?{f}|{f},?\s+{g[0]}\b\.?|{g[0]}\.\s?{f[0]}\.|{f[0]}\.\s?{g[0]}\."
            rules.append(("NAME", re.compile(rf"(?i)(?<!\w)(?:{whole}|{initials})(?!\w)")))
    if words:
        alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        # a person's words joined by ^, spaces or commas form one span
        rules.append(("NAME", re.compile(rf"(?i)\b(?:{alt})(?:(?:\^+|,?\s+)(?:{alt}))*\b")))
    for kind, value in sorted(set(known.other), key=lambda kv: len(kv[1]), reverse=True):
        pieces = [re.escape(p) for p in re.split(r"[\^\s]+", value.strip()) if p]
        if not pieces or not _worth_matching(value.strip()):
            continue
        rules.append((kind, re.compile(r"(?i)(?<!\w)" + r"[\^\s,]+".join(pieces) + r"(?!\w)")))
        if "^" in value:  # DICOM address components ("12 X AVENUE^^TOWN^^10021"): each one alone
            rules += [(kind, re.compile(rf"(?i)(?<!\w){re.escape(p.strip())}(?!\w)"))
                      for p in value.split("^") if _worth_matching(p.strip())]
    return rules


def _worth_matching(value: str) -> bool:
    """Skip what would remove clinical text by accident: short strings, small numbers."""
    if len(value) < 3:
        return False
    return not (value.isdigit() and len(value) < 4)


def _extra_names(cfg: TextDeidConfig) -> list[str]:
    names = list(cfg.names)
    if cfg.names_file:
        try:
            names += [line.strip() for line in Path(cfg.names_file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise InputError(f"ingest.text.names_file: cannot read {cfg.names_file!r} ({exc.strerror})") from None
    return names


def _shift_date(text: str, days: int) -> str | None:
    """The date in `text` moved by `days`, as ISO (YYYY-MM-DD) or, without a year, 'Month D'."""
    text = text.strip()
    for rx, order in _DATE_PARSERS:
        m = rx.match(text)
        if not m:
            continue
        parts = dict(zip(order, m.groups()))
        try:
            month = int(parts["m"]) if "m" in parts else _MONTH_NO[parts["M"][:3].lower()]
            day, year = int(parts["d"]), parts.get("y")
            if "m" in parts and month > 12 and day <= 12:  # day-first numeric date
                month, day = day, month
            if year is None:
                moved = dt.date(2000, month, day) + dt.timedelta(days=days)  # leap year: every day exists
                return f"{_MONTHS[moved.month - 1]} {moved.day}"
            y = int(year) + (2000 if len(year) == 2 and int(year) < 50 else 1900 if len(year) == 2 else 0)
            return (dt.date(y, month, day) + dt.timedelta(days=days)).isoformat()
        except (KeyError, ValueError, OverflowError):
            return None
    return None


def known_from_row(row: dict) -> KnownIdentifiers:
    """The raw identifiers of a metadata row (patient and study IDs, a name column if present)."""
    names = [str(row[k]) for k in ("name", "patient_name") if row.get(k)]
    other = [("ID", str(row[k])) for k in ("patient", "study") if row.get(k)]
    return KnownIdentifiers(names, other)
