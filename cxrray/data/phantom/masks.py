"""Ground truth for where a finding is: the same case rendered without it, and the pixels that differ.

Rendering draws each part's randomness from its own stream (`render_rng`), so removing one finding or
device from a case leaves every other pixel bit-identical (texture, noise, exposure, other devices).
`counterpart(case, label)` is that case without `label`; `finding_masks` compares the two renders and
returns, per drawn label, the pixels the label changed. These masks are the yardstick for where a
counterfactual or an attribution map puts its change. `healthy(case)` is the case without any finding
(its ideal healthy counterpart), `lung_mask` its lung fields (where a map "restricted to the lungs" looks).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .cases import PhantomCase
from .config import DEVICES, FINDINGS, PhantomConfig
from .drawing import anatomy, render

#: labels drawn in the image (slvh and dlv are echo measurements: not drawn)
DRAWN = FINDINGS + DEVICES
#: a pixel belongs to a label's mask when removing the label changes its density by more than this
#: (the renders are otherwise identical, so any change is the label's; 0.004 ~ 1/250 of the range)
THRESHOLD = 0.004
NORMAL_CTR = 0.45  # cardiomegaly removed: a normal cardiothoracic ratio (the label is ctr > 0.5)


def counterpart(case: PhantomCase, label: str) -> PhantomCase:
    """The same case without `label` (everything else, identity included, unchanged)."""
    if label not in DRAWN:
        raise ValueError(f"{label!r} is not drawn in the image; drawn labels: {', '.join(DRAWN)}")
    labels = {**case.labels, label: 0}
    if label == "cardiomegaly":
        return dataclasses.replace(case, labels=labels, ctr=min(case.ctr, NORMAL_CTR))
    details = {k: v for k, v in case.details.items() if k != label}
    return dataclasses.replace(case, labels=labels, details=details)


def healthy(case: PhantomCase, keep_devices: bool = True) -> PhantomCase:
    """The same case without any finding it is positive for (devices kept unless `keep_devices` is false):
    what an ideal "healthy counterpart" of this patient renders as."""
    removed = [f for f in FINDINGS if case.labels.get(f)]
    removed += [] if keep_devices else [d for d in DEVICES if case.labels.get(d)]
    for label in removed:
        case = counterpart(case, label)
    return case


def lung_mask(case: PhantomCase, cfg: PhantomConfig) -> np.ndarray:
    """bool [rows, cols]: the lung fields (inside either lung's outline) less the heart's shadow, on the
    case's own grid. The heart's outline is this case's own (its CTR): cardiomegaly shrinks the lung fields;
    no other finding changes them."""
    an = anatomy(case, cfg)
    heart, _ = an.heart()
    return ((an.lung_sdf(-1) < 0) | (an.lung_sdf(1) < 0)) & (heart < 0.5)


def finding_masks(case: PhantomCase, cfg: PhantomConfig, image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{label: bool [rows, cols]} for every drawn label the case is positive for (`image`: its render,
    if already made). A label whose removal changes no pixel (e.g. a heart just over the threshold) gets
    an empty mask."""
    image = render(case, cfg) if image is None else image
    return {label: np.abs(image - render(counterpart(case, label), cfg)) > THRESHOLD
            for label in DRAWN if case.labels.get(label)}


#: the largest version of a finding the phantoms draw, per label: where it can appear in a given patient
_LARGEST = {
    "effusion": [{"effusion": {"side": "both", "height": [0.45, 0.45]}}],
    "chest_tube": [{"chest_tube": {"side": side, "bend": 0.0, "tip": 0.16}} for side in ("right", "left")],
}
LARGEST_CTR = 0.62


def with_label(case: PhantomCase, label: str, variant: int = 0) -> PhantomCase:
    """The same case with the largest drawn version of `label` added (`variant` picks a side where
    there are several); supported: cardiomegaly, effusion, chest_tube."""
    labels = {**case.labels, label: 1}
    if label == "cardiomegaly":
        return dataclasses.replace(case, labels=labels, ctr=max(case.ctr, LARGEST_CTR))
    if label not in _LARGEST:
        raise ValueError(f"no largest version of {label!r}; supported: cardiomegaly, {', '.join(_LARGEST)}")
    return dataclasses.replace(case, labels=labels, details={**case.details, **_LARGEST[label][variant]})


def region(case: PhantomCase, cfg: PhantomConfig, label: str, image: np.ndarray | None = None) -> np.ndarray:
    """bool [rows, cols]: where `label` can appear in this patient (the pixels its largest version, on
    either side, changes) — the yardstick for a counterfactual toward `label` of an image without it."""
    base = render(counterpart(case, label), cfg) if case.labels.get(label) else (
        render(case, cfg) if image is None else image)
    variants = len(_LARGEST.get(label, [None]))
    return np.any([np.abs(render(with_label(case, label, v), cfg) - base) > THRESHOLD for v in range(variants)], axis=0)
