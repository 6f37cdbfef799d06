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
