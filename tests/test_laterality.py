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


def test_the_judge_reads_every_image_at_its_own_size():
    """A judge sized 32 gives a 64² image the features and logits of that image resized to 32² (as Inception
    reads 299²); unsized, it reads the image as given, and the two differ."""
    import torch

    from cxrray.families.sr.network import resize
    from cxrray.pipelines.judges import FindingJudge

    torch.manual_seed(0)
    image = torch.rand(3, 1, 64, 64) * 2 - 1
    sized = FindingJudge(5, 4, size=32).eval()
    unsized = FindingJudge(5, 4).eval()
    unsized.load_state_dict(sized.state_dict())
    with torch.no_grad():
        assert torch.allclose(sized(image), unsized(resize(image, 32)), atol=1e-6)
        assert sized.features(image).shape == (3, 16)
        assert not torch.allclose(sized(image), unsized(image), atol=1e-3)
