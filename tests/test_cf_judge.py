"""The counterfactuals' independent judge and the levers that keep the patient (issue 27 §2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrray.config import load_config
from cxrray.data.phantom import sample_case

CFG = load_config("tiny", ["phantom.confounder=tube:effusion:0.9:0.05", "phantom.size=64", "ingest.size=32"])


def test_the_judge_reads_ingests_pixels_and_its_phantoms_have_no_confounder_and_other_patients(tmp_path):
    from cxrray.data.ingest import prepare_image
    from cxrray.data.phantom import generate, image_name
    from cxrray.pipelines.diffchest.cf_judge import judge_phantoms, model_image

    generate(4, tmp_path, CFG.phantom)
    for i in range(4):
        on_disk = prepare_image((tmp_path / image_name(i)).read_bytes(), CFG.ingest)
        np.testing.assert_array_equal(model_image(sample_case(i, CFG.phantom), CFG.phantom, CFG.ingest), on_disk)
    own = judge_phantoms(CFG.phantom, CFG.cf_judge)
    assert own.confounder is None and own.seed != CFG.phantom.seed
    ids = {sample_case(i, CFG.phantom).patient.patient_id for i in range(64)}
    assert not ids & {sample_case(i, own).patient.patient_id for i in range(64)}
    # unconfounded: the tube follows its base prevalence whatever the effusion
    cases = [sample_case(i, own) for i in range(600)]
    tube = np.array([c.labels["chest_tube"] for c in cases])
    effusion = np.array([c.labels["effusion"] for c in cases], bool)
    assert abs(tube[effusion].mean() - tube[~effusion].mean()) < 0.08


def test_a_trained_judge_saves_loads_and_reads_the_paired_render(tmp_path):
    from cxrray.data.phantom import with_label
    from cxrray.pipelines.diffchest.cf_judge import LABELS, load_judge, model_image, paired_renders, train_counterfactual_judge

    cfg = CFG.cf_judge.model_copy(update={"images": 96, "val_images": 48, "epochs": 1})
    lines: list[str] = []
    judge = train_counterfactual_judge(CFG.phantom, CFG.ingest, cfg, progress=lines.append)
    assert any("held-out AUROC" in line for line in lines) and set(judge.record["val_auroc"]) == set(LABELS)
    cases = [sample_case(i, CFG.phantom) for i in range(6)]
    paired = paired_renders(cases, "effusion", CFG.phantom, CFG.ingest)
    assert paired.shape == (6, 1, 32, 32)
    np.testing.assert_array_equal(paired[2, 0].numpy(),
                                  model_image(with_label(cases[2], "effusion"), CFG.phantom, CFG.ingest))
    loaded = load_judge(judge.save(tmp_path / "judge"))
    np.testing.assert_allclose(loaded.probabilities(paired), judge.probabilities(paired), atol=1e-6)
    assert loaded.record["val_auroc"] == judge.record["val_auroc"]


def test_the_edit_mask_is_blurred_scaled_thresholded_and_dilated():
    from cxrray.pipelines.diffchest.counterfactual import edit_mask
    from cxrray.pipelines.settings import ExplainConfig

    change = torch.zeros(2, 1, 32, 32)
    change[0, 0, 10:14, 20:24] = 1.0  # one blob
    change[0, 0, 0, 0] = 0.2  # a weak speck: under the threshold after scaling
    change[1, 0, 5:7, 5:7] = 50.0  # scale does not matter
    mask = edit_mask(change, ExplainConfig(mask_blur=0.0, mask_threshold=0.5, mask_dilate=1))
    assert mask.shape == change.shape and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, 9:15, 19:25].all() and mask[0].sum() == 36 and mask[0, 0, 0, 0] == 0
    assert mask[1].sum() == 16
    blurred = edit_mask(change, ExplainConfig(mask_blur=2.0, mask_threshold=0.5, mask_dilate=0))
    assert 0 < blurred[0].sum() < 36 and blurred[0, 0, 11:13, 21:23].all()


def test_inversion_levers_are_refused_where_they_cannot_work():
    from pydantic import ValidationError

    from cxrray.pipelines.settings import ExplainConfig

    with pytest.raises(ValidationError, match="leave explain.renoise unset"):
        ExplainConfig(renoise=0.5, invert_to=0.6)
    assert ExplainConfig(invert_to=0.6, blend="decoded", steps=50, invert_steps=50).blend == "decoded"
    with pytest.raises(ValidationError, match="explain.steps equal to explain.invert_steps"):
        ExplainConfig(blend="model", steps=100, invert_steps=250)  # would fail only after the inversion
    with pytest.raises(ValidationError, match="use mode=linear"):
        ExplainConfig(axis="effect", mode="closed_form")
    assert ExplainConfig(renoise=0.6, blend="model").blend == "model"  # inpainting in the model's mask


def test_goals_are_checked_against_the_original_and_need_all_four():
    from cxrray.pipelines.diffchest.cf_eval import GOALS, goals_met

    def result(effect, tube, ratio, ssim, confounder="chest_tube"):
        return {"judged": {"effect_vs_original": {"mean": effect}, "confounder": confounder,
                           "confounder_move_vs_original": tube},
                "vs_original": {"l1_ratio": {"ratio": ratio}, "ssim_outside": {"mean": ssim}}}

    assert goals_met(result(0.35, 0.05, 3.5, 0.95))["all"]
    assert GOALS == {"judge_effect": 0.3, "confounder_move": 0.1, "l1_ratio": 3.0, "ssim_outside": 0.9}
    for bad in (result(0.2, 0.05, 3.5, 0.95), result(0.35, -0.15, 3.5, 0.95), result(0.35, 0.05, None, 0.95),
                result(0.35, 0.05, 3.5, 0.85)):
        met = goals_met(bad)
        assert not met["all"] and sum(not v for k, v in met.items() if k != "all") == 1
    assert goals_met(result(0.35, None, 3.5, 0.95, confounder=None))["confounder_move"]  # none planted


def test_blended_counterfactuals_keep_the_original_exactly_outside_the_models_mask():
    """Deterministic inversion (trajectory retraced) and stochastic encoding (original pasted, as in
    inpainting): outside the mask the counterfactual is the original image, inside it the code's change."""
    from cxrray.families.diffae.network import DiffAE, DiffAEConfig
    from cxrray.pipelines.diffchest.counterfactual import decode_pair
    from cxrray.pipelines.settings import ExplainConfig

    torch.manual_seed(0)
    model = DiffAE(DiffAEConfig(image_size=32, base_channels=16, channel_mult=(1, 2), layers_per_block=1,
                                attention_resolutions=(16,), z_dim=16, norm_groups=8)).eval()
    x0 = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = model.encode(x0)
    z_star = z + 3.0
    for extra in ({}, {"renoise": 0.5}, {"invert_to": 0.6}):
        for blend in ("model", "decoded"):
            cfg = ExplainConfig(steps=8, invert_steps=8, blend=blend, mask_threshold=0.5, **extra)
            out = decode_pair(model, x0, z, z_star, cfg, with_reference=True)
            keep = out["mask"] == 0
            assert 0 < keep.float().mean() < 1, (extra, blend)
            assert torch.equal(out["counterfactual"][keep], x0.clamp(-1, 1)[keep]), (extra, blend)
            assert (out["counterfactual"] - x0).abs()[~keep].mean() > 1e-3, (extra, blend)


@pytest.mark.slow
def test_the_default_judge_reads_effusion_and_the_tube_apart_and_the_paired_render_reaches_the_goal():
    """The demo's phantom settings, the default judge (~7 min on 2 cores). Thresholds: held-out AUROC >= 0.95
    for effusion and chest tube (set after seeing 1.000 on 2026-12-04, as a margin), and on the true paired
    renders of 24 confounded-set patients without effusion the judged effect must reach the issue's own goal
    (>= 0.3) with the tube moving < 0.1 (the goal's numbers, fixed before): a judge that fails this cannot
    score any counterfactual."""
    from cxrray.cli import DEMO_OVERRIDES
    from cxrray.pipelines.diffchest.cf_judge import LABELS, paired_renders, train_counterfactual_judge, model_image

    cfg = load_config("tiny", DEMO_OVERRIDES)
    judge = train_counterfactual_judge(cfg.phantom, cfg.ingest, cfg.cf_judge, progress=lambda line: None)
    assert judge.record["val_auroc"]["effusion"] >= 0.95 and judge.record["val_auroc"]["chest_tube"] >= 0.95
    cases = [c for c in (sample_case(i, cfg.phantom) for i in range(200)) if not c.labels["effusion"]][:24]
    x0 = torch.from_numpy(np.stack([model_image(c, cfg.phantom, cfg.ingest) for c in cases]))[:, None]
    before, after = judge.probabilities(x0), judge.probabilities(paired_renders(cases, "effusion", cfg.phantom, cfg.ingest))
    effusion, tube = LABELS.index("effusion"), LABELS.index("chest_tube")
    assert (after[:, effusion] - before[:, effusion]).mean() >= 0.3
    assert abs((after[:, tube] - before[:, tube]).mean()) < 0.1
