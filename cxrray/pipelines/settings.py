"""Config sections of the batch jobs (`encode`, `latents`, `probe`, `explain`, `audit`, ...): typed data owned by
the jobs. Torch-free; `cxrray.config` composes them."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from cxrray.data.settings import StrictModel
from cxrray.eval.confounding import ConfoundingSettings


class ActorPoolConfig(StrictModel):
    """The actor pool a batch job fans out over (`pipelines.fanout`)."""

    actors: int | None = Field(None, ge=1)  # pool size (the most, with min_actors); None: one per GPU now in the
    # cluster / two CPU actors locally
    min_actors: int | None = Field(None, ge=1)  # set: an autoscaling pool of min_actors..actors that grows as
    # nodes join (and work waits) and shrinks when idle; None: a fixed pool
    use_gpu: bool = False
    # custom Ray resources each actor also needs (e.g. {"spot": 1} to keep the job on the nodes that advertise it)
    actor_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _pool_range(self):
        if self.min_actors is not None and (self.actors is None or self.min_actors > self.actors):
            raise ValueError(f"min_actors={self.min_actors} needs actors (the pool's most) >= it, got actors={self.actors}")
        return self


class EncodeConfig(ActorPoolConfig):
    """Encode job: z from the EMA encoder and, optionally, x_T by deterministic DDIM inversion."""

    invert: bool = False
    invert_steps: int = Field(250, ge=1, le=1000)  # DiffChest: 250
    batch_size: int = Field(16, ge=1)
    chunk: int = Field(256, ge=1)  # samples per Parquet part: the unit of resumption


class LatentsConfig(ActorPoolConfig):
    """Latents job (`cxrray latents`): image shards -> latent shards (scaled VAE posterior means) with the
    reports tokenised by a WordPiece tokenizer trained here on the training split's de-identified reports."""

    max_tokens: int = Field(150, ge=4, le=512)  # Cheff: 150
    vocab_size: int = Field(8000, ge=64, le=100_000)
    # a word enters the tokenizer only if this many patients' reports use it (see data/report_tokens.py)
    min_patients: int = Field(3, ge=1)
    tokenizer_split: str = "train"
    batch_size: int = Field(16, ge=1)


class ProbeConfig(StrictModel):
    """Linear (logistic-regression) probe on z and its evaluation."""

    fit_splits: list[str] = Field(default_factory=lambda: ["finetune", "train"])  # first present is used
    test_split: str = "test"
    fractions: list[float] = Field(default_factory=lambda: [0.03, 0.1, 1.0])  # of fine-tune patients
    C: float = Field(10.0, gt=0)  # inverse L2 strength of sklearn's LogisticRegression
    min_positives: int = Field(30, ge=1)  # test positives needed to report a finding's AUROC
    bootstrap: int = Field(1000, ge=10)  # redraws for per-finding CIs
    paired_bootstrap: int = Field(10_000, ge=10)  # redraws for the paired model comparison
    age_bins: list[float] = Field(default_factory=lambda: [0, 40, 60, 80, 200])  # years, right-open
    seed: int = 0
    # per split read (fit and test): above it, a seeded patient-level sample of about this many images, chosen
    # part by part by hashing the patient id, so the driver's memory is bounded whatever the archive's size
    max_images: int | None = Field(None, ge=10)


class ExplainConfig(ActorPoolConfig):
    """Counterfactual explanations: z* = z + eps * y_t * w (DiffChest eq. 5) or the closed form (eq. 4)."""

    mode: Literal["linear", "closed_form"] = "linear"
    # the axis moved along (normalised z; toward/away is the direction along it): the probe's activation
    # pattern Cov(zn) w (default: what the data vary along, so the decoder renders it), its weight w
    # ("filter", DiffChest's own; with few fit images per z dimension the decoder barely renders it: README),
    # or the finding's effect with every other label held fixed ("effect": the de-confounded direction)
    axis: Literal["pattern", "filter", "effect"] = "pattern"
    # linear step: along the unit direction in units of sqrt(z_dim); on the effect axis in findings' worth
    # (1: the code shift the finding itself brings in the fit set)
    eps: float = Field(0.3, gt=0, le=10)
    target_probability: float = Field(0.9, gt=0, lt=1)  # closed form: probe probability to reach
    steps: int = Field(100, ge=1, le=1000)  # DDIM decode steps (paper: 100-200)
    invert_steps: int = Field(250, ge=1, le=1000)
    # decode with eps(z) + g (eps(z*) - eps(z)): the code change amplified g times along the inverted
    # trajectory (1: DiffChest's plain decode of z*); see README for what it does on each preset
    z_guidance: float = Field(1.0, ge=1.0, le=50.0)
    # None: decode the deterministic DDIM inversion (DiffChest). A fraction t in (0, 1): noise the image to
    # t * T (seeded by `seed`; the same noise for reconstruction and counterfactual) and decode from there
    # (Diff-AE's stochastic encoding): z steers what lies above that noise level, the rest is kept
    renoise: float | None = Field(None, gt=0.0, lt=1.0)
    # partial deterministic inversion: invert only to invert_to * T and decode from there (1: to the top)
    invert_to: float = Field(1.0, gt=0.0, le=1.0)
    # edit only inside a mask the model gives (no ground truth): outside it the decode retraces the inversion
    # back to the original (with renoise: the original is pasted there at every step, as in inpainting). "model": DiffEdit's |x0_hat(x_t, z*) - x0_hat(x_t, z)| over a few t; "decoded":
    # |decode(z*) - decode(z)|; either blurred (mask_blur px), scaled to its image's maximum, thresholded at
    # mask_threshold, dilated by mask_dilate px
    blend: Literal["none", "model", "decoded"] = "none"
    mask_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    mask_blur: float = Field(1.5, ge=0.0, le=16.0)
    mask_dilate: int = Field(2, ge=0, le=32)
    batch_size: int = Field(8, ge=1)
    seed: int = 0  # which images `cxrray explain --limit` picks from shards

    @model_validator(mode="after")
    def _inversion_levers_need_an_inversion(self) -> "ExplainConfig":
        if self.renoise is not None and self.invert_to < 1.0:
            raise ValueError("explain.invert_to is a partial deterministic inversion, explain.renoise a stochastic "
                             "encoding: leave explain.renoise unset to use it")
        if self.renoise is None and (self.blend != "none" or self.invert_to < 1.0) and self.steps != self.invert_steps:
            raise ValueError(f"explain.blend and explain.invert_to decode along the inversion's own timesteps: set "
                             f"explain.steps equal to explain.invert_steps (got {self.steps} and {self.invert_steps})")
        if self.axis == "effect" and self.mode == "closed_form":
            raise ValueError("explain.mode=closed_form steps until the probe reads the target, but on the effect axis "
                             "the probe's weight can point against the effect (it leans on the confounder): use "
                             "mode=linear (eps in findings' worth)")
        return self


class CounterfactualJudgeConfig(StrictModel):
    """The counterfactuals' independent judge (`cxrray.pipelines.diffchest.cf_judge`): a classifier of every drawn
    phantom label, trained on other patients' phantoms drawn with no planted confounder."""

    images: int = Field(2400, ge=16)  # training phantoms
    val_images: int = Field(400, ge=8)  # held out: early stopping and the judge's own AUROC
    seed_offset: int = Field(7919, ge=1)  # the judge's phantoms use the set's seed plus this: other patients
    width: int = Field(16, ge=4, le=256)
    epochs: int = Field(20, ge=1)
    patience: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


class AuditConfig(StrictModel):
    """Confounder audit: counterfactuals toward a finding from images negative for it."""

    images: int = Field(32, ge=2)  # negatives per audited finding
    split: str = "test"
    # image: probe on the re-encoded counterfactual minus on the plain reconstruction (what the image shows);
    # latent: probe on z* minus on z (what the probe direction drags along; cheap, exact for a linear probe)
    measure: Literal["image", "latent"] = "image"
    # closed_form: the smallest move that makes the probe say the finding (explain.target_probability); a fixed
    # linear step saturates every correlated probe and hides the ranking (measured on phantoms)
    mode: Literal["linear", "closed_form"] = "closed_form"
    min_effect: float = Field(0.05, ge=0)  # a candidate is flagged when its CI lower bound exceeds this
    # ... and its own probe's test AUROC (the probe's metrics.json) is at least this: a chance-level probe's
    # direction is noise, and a tight CI on noise is not a confounder. Labels with no measured AUROC are
    # reported as unvalidated and never flagged.
    min_probe_auroc: float = Field(0.6, ge=0, le=1)
    bootstrap: int = Field(1000, ge=10)
    seed: int = 0
    # with the encodings (`audit --encodings`): cross-fitted probes, patient bootstrap of the whole procedure,
    # permuted-label and random-direction nulls, Holm over labels (cxrray.eval.confounding); the verdicts
    statistics: ConfoundingSettings = Field(default_factory=ConfoundingSettings)


class GenerateConfig(ActorPoolConfig):
    """Generation job (`cxrray generate`): a cohort spec's rows -> synthetic shards, one shard per unit."""

    sampler: Literal["ddim", "ddpm"] = "ddim"  # ddim: eta 0; ddpm: ancestral (the paper's 1000 steps)
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(1.0, ge=1.0, le=20.0)  # classifier-free guidance (1 = plain conditional)
    sr_steps: int = Field(100, ge=1, le=2000)  # DDIM steps of the super-resolution stage (`generate --sr`)
    shard_samples: int = Field(64, ge=1)  # images per shard: the unit of resumption
    batch_size: int = Field(16, ge=1)


ARMS = ("base", "gen", "base+gen", "base+gen(pos)")


class ExperimentConfig(StrictModel):
    """Downstream cohort experiment (`cxrray experiment cohorts`): the echo detector trained per arm and
    seed on Ray Train, the grid fanned out with Ray Tune, evaluated on the real test split."""

    arms: list[Literal["base", "gen", "base+gen", "base+gen(pos)"]] = Field(default_factory=lambda: list(ARMS))
    seeds: int = Field(5, ge=1, le=100)  # the paper: 5 per arm, probabilities averaged
    size_factor: float = Field(2.0, gt=0)  # every arm is resampled with replacement to this x |Base| images
    positive: Literal["slvh", "dlv", "composite_slvh_dlv"] = "composite_slvh_dlv"  # what "(pos)" keeps
    train_split: str = "train"  # Base: the real split the generator was trained on
    val_split: str = "val"  # early stopping
    test_split: str = "test"
    # detector: a small CNN on the image + an MLP on (age, sex), regressing the three echo measurements
    width: int = Field(16, ge=4, le=256)  # channels of the first conv block (doubled per block)
    epochs: int = Field(30, ge=1)
    patience: int = Field(5, ge=1)  # epochs without a better validation NLL before stopping
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    num_workers: int = Field(1, ge=1)  # Ray Train workers per fit (DDP when > 1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    # fits at once; None: as many as the cluster's current CPUs / GPUs hold (set it where an autoscaler
    # should grow the cluster for more)
    max_concurrent: int | None = Field(None, ge=1)
    # evaluation
    bootstrap: int = Field(1000, ge=10)  # patient-clustered redraws for CIs
    paired_bootstrap: int = Field(2000, ge=10)  # paired redraws of each arm against Base
    age_bins: list[float] = Field(default_factory=lambda: [0, 60, 70, 80, 200])  # years, right-open
    recall: float = Field(0.5, gt=0, lt=1)  # operating point for precision / specificity
    min_positives: int = Field(5, ge=1)  # test positives a subgroup needs for an AUROC
    seed: int = 0


class SyntheticAuditConfig(StrictModel):
    """`cxrray audit-synthetic`: fidelity (an image-only judge trained on real images), image quality
    (FID / KID in the judge's feature space) and memorisation (nearest training image) of a synthetic set."""

    train_split: str = "train"  # the real images the generator was trained on
    val_split: str = "val"  # the judge's early stopping
    test_split: str = "test"  # real images it never saw: the reference for every comparison
    # judge: conv trunk + head regressing ivsd, lvidd, lvpwd, age and classifying sex from the image alone
    width: int = Field(16, ge=4, le=256)
    epochs: int = Field(30, ge=1)
    patience: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    kid_subset: int = Field(100, ge=2)  # KID subset size (capped at the smaller set)
    kid_subsets: int = Field(50, ge=1)
    pixel_size: int = Field(32, ge=4)  # images are average-pooled to this side for the pixel-space search
    near_copy_quantile: float = Field(0.01, gt=0, lt=0.5)  # a synthetic image is a near-copy when it is closer to
    # its nearest training image than this quantile of real test images' nearest-training distances
    grid_pairs: int = Field(8, ge=1)
    seed: int = 0


class GenerationEvalConfig(StrictModel):
    """`cxrray evaluate generation` (Cheff): the cascade's Table 2 analogue, FID / KID and MS-SSIM of its
    samples, conditioning accuracy read by a judge trained on real images, unconditional finding
    prevalence, and device removal by inpainting on phantoms against the same phantom without the device."""

    train_split: str = "train"  # the judge's training images (the real set's)
    val_split: str = "val"  # the judge's early stopping
    test_split: str = "test"  # reference images and the reports used as prompts
    images: int = Field(128, ge=2)  # real test images for Table 2 (FID / KID: every real test image)
    prompts: int = Field(128, ge=2)  # test reports used as prompts (one sample each; key order)
    unconditional: int = Field(128, ge=2)  # unconditional samples (prevalence, diversity)
    steps: int = Field(50, ge=1, le=1000)  # latent DDIM steps (Cheff: 150)
    sr_steps: int = Field(50, ge=1, le=2000)  # SR3 DDIM steps
    guidance: float = Field(1.0, ge=1.0, le=20.0)  # classifier-free guidance of the cascade's samples (Cheff: 1)
    guidance_sweep: list[Annotated[float, Field(ge=1.0, le=20.0)]] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 7.5])  # the latent model's own samples
    sr_starts: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # SR start sweep (1: from noise)
    batch_size: int = Field(32, ge=1)
    threads: int = Field(0, ge=0)  # torch threads on the driver (0: every core; no Ray work runs meanwhile)
    # judge: conv trunk + one logit per finding/device, trained on the real training split at judge_size
    width: int = Field(16, ge=4, le=256)
    judge_size: int | None = Field(None, ge=16)  # the side the judge reads every image at (None: the output size)
    epochs: int = Field(30, ge=1)
    patience: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_positives: int = Field(5, ge=1)  # a label is judged only with this many positives in train and test
    kid_subset: int = Field(50, ge=2)
    kid_subsets: int = Field(50, ge=1)
    diversity_pairs: int = Field(64, ge=1)  # random pairs for MS-SSIM
    # laterality: label -> lower-case keywords naming it in a report; the side a report gives it is read by
    # cxrray.eval.laterality and learnt by the judge as one more logit per label (1 = right)
    laterality: dict[str, list[str]] = Field(default_factory=lambda: {
        "effusion": ["effusion"], "pneumothorax": ["pneumothorax"], "chest_tube": ["chest tube"],
        "pacemaker": ["pacemaker"]})
    inpaint_cases: int = Field(16, ge=1)  # phantoms with a device, rendered with and without it
    inpaint_devices: list[str] = Field(default_factory=lambda: ["pacemaker", "chest_tube"])
    inpaint_dilate: int = Field(1, ge=0, le=16)  # pixels the device mask is grown by before inpainting
    grid_prompts: list[str] = Field(default_factory=lambda: [
        "Large pleural effusion in the right lower lung. A pacemaker in the left upper chest.",
        "The heart is enlarged.", "No acute cardiopulmonary process.", ""])  # a grid row each ("": unconditional)
    seed: int = 0


class SaliencyConfig(StrictModel):
    """The classical saliency baselines (`pipelines.saliency`): the classifier they explain (a conv trunk + one
    logit per finding, trained on the shards' train split with their labels) and integrated gradients' steps."""

    width: int = Field(16, ge=4, le=256)
    epochs: int = Field(20, ge=1)
    patience: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    ig_steps: int = Field(32, ge=2, le=512)  # integrated gradients: points on the path from the baseline


class AttributionConfig(StrictModel):
    """Latent-diffusion visual attribution (`pipelines.attribution`): img2img toward a healthy prompt. The
    paper states both strength 0.55 / guidance 4 ("most effective") and 0.85 / 7.5 with 75 steps (a figure)."""

    prompt: str = "Normal chest radiograph."  # the healthy class prompt, in the reports' own words (phantoms: an impression)
    strength: float = Field(0.55, ge=0.0, le=1.0)  # how far into the schedule the image's latent is noised
    guidance: float = Field(4.0, ge=1.0, le=20.0)  # classifier-free guidance toward the prompt
    steps: int = Field(50, ge=1, le=1000)  # sampler steps over the whole schedule (strength x steps run)
    scheduler: Literal["ddim", "pndm"] = "ddim"  # each image's noise: attribute.seed and its key
    # what the counterpart is subtracted from: the image (the paper), or its autoencoder reconstruction D(E(x))
    # (ours: the autoencoder's own error, in every counterpart, then leaves the map)
    reference: Literal["image", "reconstruction"] = "image"


class DreamBoothStage(StrictModel):
    """One fine-tuning stage: the train-split images of `finding` (None: images with no positive finding, the
    normal class) under `prompt`, for `steps` optimizer steps."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    prompt: str = Field(min_length=1, max_length=500)
    finding: str | None = None
    steps: int = Field(ge=1)


class DreamBoothConfig(StrictModel):
    """The attribution paper's fine-tune (`pipelines.attribution.dreambooth`): DreamBooth (Ruiz et al.) with
    prior preservation on class prompts, U-Net and text encoder trained, stages in order ("Normal chest scan"
    for 1200 steps, then each disease for 500, lr 5e-5). The prior: `prior_images` samples of the base model
    under `prior_prompt`, drawn once, trained beside every stage's instances with loss weight `prior_weight`."""

    stages: list[DreamBoothStage] = Field(default_factory=lambda: [
        DreamBoothStage(name="normal", prompt="Normal chest radiograph.", finding=None, steps=1200),
        DreamBoothStage(name="effusion", prompt="Pleural effusion.", finding="effusion", steps=500)], min_length=1)
    prior_prompt: str = "Chest radiograph."  # the class noun of DreamBooth: what every image here is
    prior_images: int = Field(200, ge=0)
    prior_weight: float = Field(1.0, ge=0.0)  # DreamBooth's lambda (1 in the paper and in diffusers' script)
    prior_steps: int = Field(50, ge=1, le=1000)  # DDIM steps for the prior samples
    instance_images: int | None = Field(None, ge=1)  # per stage, from the train split (None: all that qualify)
    global_batch: int = Field(8, ge=1)
    lr: float = Field(5e-5, gt=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)  # a fine-tune of hundreds of steps: the EMA must follow it
    seed: int = 0

    @model_validator(mode="after")
    def _distinct_stages(self) -> "DreamBoothConfig":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"dreambooth.stages need distinct names, got {names}")
        return self


class NoisyClassifierConfig(StrictModel):
    """DAug's noise-aware classifier (`pipelines.daug.noisy_classifier`): trained on x_t at random t."""

    width: int = Field(16, ge=4, le=256)
    # 40 / 8: at 20 / 4 the first run stopped at epoch 6 on a plateau; at 40 the validation BCE was still falling
    epochs: int = Field(40, ge=1)
    patience: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    train_images: int | None = Field(None, ge=2)  # cap on the training split read (None: all of it)
    timesteps: list[Annotated[int, Field(ge=0, le=999)]] = Field(default_factory=lambda: [0, 250, 500, 750])
    # training t ~ U{0..train_t_max}: the guidance only ever queries t at or below the translation's start
    train_t_max: int = Field(999, ge=0, le=999)


class DownstreamConfig(StrictModel):
    """DAug's downstream experiment (`pipelines.daug.downstream`): one `daug` model per arm and training fraction,
    each trained on Ray Train (`train` section's strategy and workers) for `images` images shown, then scored on
    `split`: per-class AUROC / AP, retrieval mAP@10 and Recall@1/5/10, paired patient-clustered bootstraps."""

    arms: list[Literal["image", "heatmaps", "shuffled", "no_text"]] = Field(
        default_factory=lambda: ["image", "heatmaps", "shuffled", "no_text"], min_length=2)
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [1.0, 0.1], min_length=1)
    model: dict[str, Any] = Field(default_factory=dict)  # overrides of the `daug` preset (width, heatmaps, ...)
    images: int = Field(20_000, ge=1)  # images shown per arm, the same at every fraction
    global_batch: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.9, ge=0, lt=1)  # short runs: an EMA of 0.995 over 150 steps keeps half the init
    split: str = "test"
    n_boot: int = Field(2000, ge=100)
    seed: int = 0


class AugmentConfig(ActorPoolConfig):
    """DAug's heatmap channels (`pipelines.daug.augment`): one classifier-guided translation per image and
    super-class, its heatmap written beside the image. DAug starts near t = 500 of 1000 (alpha_bar ~ 0.08)."""

    classes: list[str] = Field(default_factory=lambda: ["cardiac", "pleural"])  # the heatmaps (super-classes)
    direction: Literal["toward", "away"] = "toward"  # healthy -> diseased, or diseased -> healthy
    scale: float = Field(10.0, gt=0, le=1000.0)  # classifier guidance scale
    start_alpha_bar: float = Field(0.08, gt=0.0, lt=1.0)  # the noise level the translation starts from
    steps: int = Field(25, ge=1, le=1000)  # DDIM steps over the whole schedule (those below the start run)
    sigma: float = Field(1.0, ge=0.0)  # the heatmap's Gaussian smoothing, pixels
    seed: int = 0
    batch_size: int = Field(16, ge=1, le=1024)  # images of a shard translated together
