"""The side a report gives a finding: read back from phantom reports against the side the phantom drew."""
from __future__ import annotations

import numpy as np

from cxrray.data.phantom import PhantomConfig, sample_case
from cxrray.data.phantom.report import compose_report
from cxrray.eval.laterality import report_side, side_targets
from cxrray.pipelines.settings import GenerationEvalConfig


def test_report_side_is_the_side_the_phantom_drew_for_every_lateral_label():
    laterality = GenerationEvalConfig().laterality
    cfg = PhantomConfig(seed=5)
    read, checked = {k: 0 for k in laterality}, 0
    for i in range(400):
        case = sample_case(i, cfg)
        text = compose_report(case, phi_fraction=0.0).text
        for label, keywords in laterality.items():
            drawn = case.details[label]["side"] if case.labels[label] else None
            expected = drawn if drawn in ("left", "right") else None  # "both" has no single side
            assert report_side(text, keywords) == expected, (label, drawn, text)
            read[label] += expected is not None
            checked += 1
    assert checked == 400 * len(laterality)
    assert all(n >= 5 for n in read.values()), read  # every label was read with a side, not only as None


def test_report_side_negation_disagreement_and_targets():
    assert report_side("No pleural effusion. Small left pleural effusion.", ["effusion"]) == "left"
    assert report_side("There is no right pleural effusion.", ["effusion"]) is None
    assert report_side("Right pleural effusion. Left pleural effusion.", ["effusion"]) is None
    assert report_side("Bilateral pleural effusion.", ["effusion"]) is None
    assert report_side("Left-sided pacemaker with leads in the right heart.", ["pacemaker"]) == "left"
    y = side_targets(["Right chest tube in place.", "A left-sided chest tube is present.", "Clear lungs."],
                     {"chest_tube": ["chest tube"], "effusion": ["effusion"]})
    assert y.shape == (3, 2) and y[0, 0] == 1 and y[1, 0] == 0 and np.isnan(y[2]).all() and np.isnan(y[:, 1]).all()
