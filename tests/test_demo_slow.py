"""Slow (`pytest -m slow`, ~25 min on 2 cores): the whole main job on phantoms with a planted confounder
(chest tube present with p=0.9 given effusion, 0.05 without). The tiny model's linear probe reaches
AUROC >= 0.85 for cardiomegaly and effusion on the test split, and the audit ranks the chest tube first
for effusion (flagged) but does not flag it for cardiomegaly (uncorrelated with it). The counterfactual
images' goals of issue 12 are asserted too, as a strict expected failure until they are met."""
from __future__ import annotations

import json
import os

import pytest

from cxrray.cli import DEMO_OVERRIDES
from cxrray.config import load_config
from cxrray.data.phantom import TRUTH
from cxrray.eval.deid import measure, read_truth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    from cxrray.demo import run_demo

    tmp_path = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = load_config("tiny", DEMO_OVERRIDES + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "phantom.seed=11"])
        summary = run_demo(cfg, n=1200, workdir=tmp_path / "out", shards=f"file://{tmp_path}/shards",
                           run=f"file://{tmp_path}/run")
    finally:
        os.chdir(cwd)
    return tmp_path, summary


def test_demo_probe_auroc_and_audit_find_the_planted_confounder(demo):
    tmp_path, summary = demo
    metrics = json.loads((tmp_path / "out" / "probe" / "metrics.json").read_text())
    effusion, cardiomegaly = metrics["findings"]["effusion"], metrics["findings"]["cardiomegaly"]
    # 0.85, lowered from 0.9 after measuring v prediction (issue 12): its z carries the whole image, and the
    # linear probe read less from it at 3,200 images (cardiomegaly 0.869, effusion 0.905; eps: 0.986, 0.995)
    assert effusion["positives"] >= 30 and effusion["auroc"] >= 0.85, effusion
    assert cardiomegaly["positives"] >= 30 and cardiomegaly["auroc"] >= 0.85, cardiomegaly
    audit = json.loads((tmp_path / "out" / "audit" / "audit.json").read_text())["findings"]
    assert audit["effusion"]["candidates"][0]["label"] == "chest_tube", audit["effusion"]["candidates"][:3]
    assert "chest_tube" in audit["effusion"]["confounders"]  # planted beside effusion: co-occurs in the fit split
    assert "chest_tube" not in audit["cardiomegaly"]["flagged"], audit["cardiomegaly"]["candidates"][:3]
    page = (tmp_path / "out" / "report.html").read_text()
    for heading in ("Linear probe on z", "Counterfactual explanations", "Confounder audit", "chest_tube"):
        assert heading in page
    assert os.path.exists(summary["counterfactual_grid"])
    # no planted report identifier in anything the job wrote: shards, run, outputs, MLflow's database
    truth = read_truth(tmp_path / "out" / "phantoms" / TRUTH)
    written = [p for p in sorted(tmp_path.rglob("*")) if p.is_file() and "phantoms" not in p.parts]
    result = measure(truth, {path: "" for path in truth}, corpus=b"\n".join(p.read_bytes() for p in written))
    assert result["identifiers"] > 1000 and result["removed"] == 1.0, result["leak_examples"]


def test_demo_localisation_scores_its_known_answers_and_every_method(demo):
    """The benchmark's own checks on the demo's test split: oracle near 1, random at chance, every method
    scored (their figures go to the README; issue 29's 0.8 threshold is for the generative methods)."""
    from cxrray.demo import LOCALISED

    tmp_path, summary = demo
    for finding in ("effusion", "cardiomegaly"):
        scores = summary["localisation"][finding]
        assert set(scores) == set(LOCALISED), scores
        assert scores["oracle"] > 0.95 and 0.4 < scores["random"] < 0.6, (finding, scores)
    assert "Where is the disease?" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.xfail(strict=True, reason="issue 12 goals not met on the tiny demo: image effect -0.002 at eps 1 "
                   "(+0.142 at eps 2, SSIM outside 0.752), energy ratio 1.36 (bench/counterfactual.py)")
def test_counterfactual_images_carry_the_finding(demo):
    """Issue 12's goals, on the audit's counterfactuals toward effusion (24 negatives): the probe on the
    re-encoded image moves by >= 0.3, the change is >= 3x denser where effusion can appear, SSIM outside >= 0.9."""
    _, summary = demo
    effusion = summary["counterfactual_measured"]["effusion"]
    assert effusion["images"] >= 24
    assert effusion["image_effect"]["mean"] >= 0.3, effusion["image_effect"]
    assert effusion["energy_ratio"]["ratio"] >= 3, effusion["energy_ratio"]
    assert effusion["ssim_outside"]["mean"] >= 0.9, effusion["ssim_outside"]
