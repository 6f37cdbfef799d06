"""Config section of the localisation benchmark (`localisation`): torch-free, composed by `cxrray.config`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from cxrray.data.settings import StrictModel

METHOD = Literal["oracle", "random", "gradcam", "integrated_gradients", "counterfactual", "reconstruction",
                 "attribution", "empty_prompt", "guided"]


class LocalisationConfig(StrictModel):
    """`cxrray evaluate localisation`: each method's map for each finding on the test split's positive images,
    scored against the ground-truth masks. `oracle` (|image - its true healthy counterpart|) is the
    known-answer check of the scoring, `random` (uniform noise) its chance level."""

    findings: list[str] = Field(default_factory=lambda: ["effusion", "cardiomegaly"])
    methods: list[METHOD] = Field(default_factory=lambda: ["oracle", "random", "gradcam", "integrated_gradients"])
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    train_images: int | None = Field(None, ge=2)  # cap on the classifier's training images (None: the split)
    images: int | None = Field(None, ge=2)  # cap on test images read (None: the split)
    # score only the pixels inside the lung fields (the paper's figure): for lung findings; the heart lies
    # outside them, so a cardiomegaly mask keeps only its crescent over the lungs
    lungs_only: bool = False
    tolerance_px: int = Field(1, ge=0)  # pointing game: the mask grown by this many pixels
    n_boot: int = Field(1000, ge=100)
    seed: int = 0
    grid_images: int = Field(6, ge=1)  # images per finding in the picture of maps


class Img2ImgStudyConfig(StrictModel):
    """`cxrray evaluate img2img` (`benchmarks.img2img`): the attribution paper's img2img examined where it works
    and where it fails, judged by a classifier trained here on real images and by the phantoms' true healthy
    renders and masks: the strength x guidance sweep, the paper's ablation (no text, no image prior, neither,
    no fine-tune) as FID in the judge's feature space, and zero-shot / localised induction on healthy images."""

    findings: list[str] = Field(default_factory=lambda: ["effusion", "cardiomegaly"])
    images: int = Field(24, ge=2)  # test positives per finding in the sweep and the ablation; healthy ones induced
    strengths: list[float] = Field(default_factory=lambda: [0.3, 0.55, 0.85], min_length=1)
    guidances: list[float] = Field(default_factory=lambda: [1.0, 4.0, 7.5], min_length=1)
    # healthy -> finding: the prompt and the judged finding; "side" (the patient's) for localised induction
    induction: list[dict[str, str]] = Field(default_factory=lambda: [
        {"name": "effusion", "prompt": "Pleural effusion.", "finding": "effusion"},
        {"name": "cardiomegaly", "prompt": "Cardiomegaly.", "finding": "cardiomegaly"},
        {"name": "left effusion", "prompt": "Large left pleural effusion.", "finding": "effusion", "side": "left"},
        {"name": "right effusion", "prompt": "Large right pleural effusion.", "finding": "effusion", "side": "right"}])
    seed: int = 0
