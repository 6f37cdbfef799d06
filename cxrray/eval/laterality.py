"""The side a report gives a finding or device ("right pleural effusion", "left-sided pacemaker").

Written by hand: a few keyword rules over de-identified sentences; no library in the stack reads laterality,
and a learned NLP labeller would need weights we cannot download.

Rules, per label: the report's sentences that name one of the label's keywords and are not negated
("no ...", "without ..."); in each, the first side word after the start of the sentence ("left", "right",
"bilateral", "both"). The label's side is "left" or "right" when every such sentence naming a side names that
one; None when none names a side, or the sides disagree / are bilateral.
"""
from __future__ import annotations

import re

import numpy as np

_SENTENCES = re.compile(r"(?<=[.!?;])\s+|\n+")
_SIDE = re.compile(r"\b(left|right|bilateral|both)\b")
_NEGATION = re.compile(r"\b(?:no|without|negative for)\s+(?:[\w-]+\s+){0,3}$")  # within 3 words before the keyword


def report_side(report: str, keywords: list[str]) -> str | None:
    """"left" | "right" | None for one label named by `keywords` (lower-case phrases) in `report`."""
    sides = set()
    for sentence in _SENTENCES.split(report.lower()):
        hits = [sentence.find(k) for k in keywords if k in sentence]
        if not hits or _NEGATION.search(sentence[:min(hits)]):
            continue
        side = _SIDE.search(sentence)
        if side:  # a sentence without a side ("effusion as described") neither sets nor contradicts one
            sides.add(side.group(1))
    return sides.pop() if len(sides) == 1 and sides <= {"left", "right"} else None


def side_targets(reports: list[str], laterality: dict[str, list[str]]) -> np.ndarray:
    """float32 [N, L] for the labels of `laterality` in its order: 1 = right, 0 = left, NaN = no single side."""
    code = {"right": 1.0, "left": 0.0, None: np.nan}
    return np.array([[code[report_side(r, keys)] for keys in laterality.values()] for r in reports],
                    dtype=np.float32).reshape(len(reports), len(laterality))
