"""Measure free-text de-identification against planted truth (phantom `report_truth.jsonl`).

Two figures: the share of planted identifier strings that are gone (per category; a string counts
as leaked if it occurs, case-insensitively and as a whole token — not inside a longer run of letters
and digits, where a 5-digit ZIP occurs by chance in hex digests and image bytes — in the text of its
own report or anywhere in an optional corpus of every byte written), and the share of clinical
sentences kept verbatim.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping


def read_truth(path: str | Path) -> dict[str, dict]:
    """report_truth.jsonl -> {path: {"phi": {category: [str]}, "clinical": [str]}}."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                out[row["path"]] = {"phi": row.get("phi", {}), "clinical": row.get("clinical", [])}
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a truth record ({type(exc).__name__})") from None
    return out


def measure(truth: Mapping[str, dict], texts: Mapping[str, str | None], corpus: bytes | None = None,
            examples: int = 5) -> dict:
    """Removal per category and clinical retention over the reports in `texts` ({path: output text})."""
    haystack = corpus.lower() if corpus is not None else None
    tokens = set(_TOKEN.findall(haystack)) if haystack is not None else set()  # prefilter: one pass
    per: dict[str, dict] = {}
    leaks: list[dict] = []
    kept = sentences = reports = 0
    for path, record in truth.items():
        if path not in texts:
            continue
        reports += 1
        text = (texts[path] or "").lower().encode()
        for category, planted in record["phi"].items():
            row = per.setdefault(category, {"planted": 0, "leaked": 0})
            for value in planted:
                row["planted"] += 1
                needle = value.lower().encode()
                in_corpus = haystack is not None and set(_TOKEN.findall(needle)) <= tokens and _occurs(needle, haystack)
                if in_corpus or _occurs(needle, text):
                    row["leaked"] += 1
                    if len(leaks) < examples:
                        leaks.append({"path": path, "category": category, "value": value})
        for sentence in record["clinical"]:
            sentences += 1
            kept += sentence.lower().encode() in text
    for row in per.values():
        row["removed"] = 1.0 - row["leaked"] / row["planted"] if row["planted"] else None
    planted = sum(r["planted"] for r in per.values())
    leaked = sum(r["leaked"] for r in per.values())
    return {"reports": reports, "identifiers": planted, "removed": 1.0 - leaked / planted if planted else None,
            "by_category": dict(sorted(per.items())), "clinical_sentences": sentences,
            "clinical_kept": kept / sentences if sentences else None, "leak_examples": leaks}


def _occurs(needle: bytes, haystack: bytes) -> bool:
    """`needle` in `haystack` as a whole token (str.find, then a boundary check: fast on megabytes)."""
    start = haystack.find(needle)
    while start >= 0:
        end = start + len(needle)
        if not (start and _ALNUM[haystack[start - 1]]) and not (end < len(haystack) and _ALNUM[haystack[end]]):
            return True
        start = haystack.find(needle, start + 1)
    return False


_TOKEN = re.compile(rb"[a-z0-9]+")
_ALNUM = [chr(b).isascii() and chr(b).isalnum() for b in range(256)]


def table(result: dict) -> str:
    """Plain-text table of a `measure` result."""
    lines = [f"{'category':<12} {'planted':>8} {'leaked':>7} {'removed':>8}"]
    for category, row in result["by_category"].items():
        lines.append(f"{category:<12} {row['planted']:>8} {row['leaked']:>7} {row['removed']:>8.2%}")
    lines.append(f"{'all':<12} {result['identifiers']:>8} "
                 f"{sum(r['leaked'] for r in result['by_category'].values()):>7} {result['removed'] or 0:>8.2%}")
    lines.append(f"clinical sentences kept verbatim: {result['clinical_kept'] or 0:.2%} of {result['clinical_sentences']}")
    return "\n".join(lines)


def concat(blobs: Iterable[bytes]) -> bytes:
    return b"\n".join(blobs)
