"""Typed, validated configuration: named presets, a YAML file, then `--set key=value` overrides.

Each stage owns its section's schema; this module composes them and is the only place presets
live. Precedence: preset < YAML < overrides. A YAML file may name its base with `preset: NAME`.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from cxrray.data.phantom.config import PhantomConfig
from cxrray.data.settings import DecodeConfig, IngestConfig, StrictModel, resolve_salt  # noqa: F401 (re-exported)
from cxrray.errors import ConfigError
from cxrray.families import FAMILIES, get_family

#: `model` is one of the registered families' configs, chosen by its `family` field
ModelConfig = Annotated[Union[tuple(get_family(name).config for name in FAMILIES)], Field(discriminator="family")]
DEFAULT_FAMILY = "diffae"


class TrainConfig(StrictModel):
    """Pretraining schedule, counted in images shown with an explicit global batch, so the schedule
    does not change with the number of workers."""

    strategy: Literal["deepspeed", "ddp"] = "deepspeed"  # ddp: plain PyTorch DDP baseline
    zero_stage: int = Field(1, ge=0, le=2)  # 3 partitions parameters, which the EMA needs whole
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)  # fractional on small machines: leaves CPU for Ray Data
    gpus_per_worker: float = Field(1.0, gt=0)
    global_batch: int = Field(16, ge=1)  # images per optimizer step over all workers
    images: int = Field(20_000, ge=1)  # training length (the paper: 200M)
    lr: float = Field(1e-4, gt=0)  # Adam, no weight decay (DiffChest)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = False
    compile: bool = False
    checkpoint_every: int = Field(5_000, ge=1)  # images
    eval_every: int = Field(10_000, ge=1)  # images
    log_every: int = Field(500, ge=1)  # images
    keep_checkpoints: int = Field(3, ge=1)
    max_failures: int = Field(3, ge=0)  # worker failures survived by restoring the last checkpoint
    split: str | None = "train"  # shard split to train on (PadChest DiffChest protocol: "pretrain")
    eval_split: str | None = "val"
    eval_images: int = Field(8, ge=1)
    sample_steps: int = Field(50, ge=1)  # DDIM steps for the eval grids
    seed: int = 0


class EncodeConfig(StrictModel):
    """Encode job: z from the EMA encoder and, optionally, x_T by deterministic DDIM inversion."""

    invert: bool = False
    invert_steps: int = Field(250, ge=1, le=1000)  # DiffChest: 250
    batch_size: int = Field(16, ge=1)
    chunk: int = Field(256, ge=1)  # samples per Parquet part: the unit of resumption
    actors: int | None = Field(None, ge=1)  # actor-pool size; None: one per GPU / two CPU actors locally
    use_gpu: bool = False


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


class ExplainConfig(StrictModel):
    """Counterfactual explanations: z* = z + eps * y_t * w (DiffChest eq. 5) or the closed form (eq. 4)."""

    mode: Literal["linear", "closed_form"] = "linear"
    eps: float = Field(0.3, gt=0, le=10)  # step along the unit probe direction, in units of sqrt(z_dim)
    target_probability: float = Field(0.9, gt=0, lt=1)  # closed form: probe probability to reach
    steps: int = Field(100, ge=1, le=1000)  # DDIM decode steps (paper: 100-200)
    invert_steps: int = Field(250, ge=1, le=1000)
    batch_size: int = Field(8, ge=1)
    actors: int | None = Field(None, ge=1)
    use_gpu: bool = False
    seed: int = 0  # which images `cxrray explain --limit` picks from shards


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
    # direction is noise, and a tight CI on noise is not a confounder. Labels with no measured AUROC are not gated.
    min_probe_auroc: float = Field(0.6, ge=0, le=1)
    bootstrap: int = Field(1000, ge=10)
    seed: int = 0


class ServeConfig(StrictModel):
    """`cxrray serve` (Ray Serve): request limits, dynamic batching and the replicas of its three
    deployments: ingress (HTTP, upload checks and decoding), classifier (encoder + probe, batched),
    explainer (counterfactuals and generation). Replica ranges are (min, max) for the autoscaler."""

    host: str = "127.0.0.1"  # HTTP proxy address; anything wider only behind an authenticating gateway
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str = "CXRRAY_API_KEY"  # when this variable is set, /v1 needs `Authorization: Bearer <key>`
    max_upload_bytes: int = Field(32 * 2**20, ge=1024)  # larger uploads: 413
    max_pixels: int = Field(40_000_000, ge=1)  # rows*cols of an upload (and <= ingest.decode.max_pixels): 413
    max_batch_size: int = Field(8, ge=1)  # classifier @serve.batch
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    max_steps: int = Field(100, ge=1, le=1000)  # DDIM decode steps a request may ask for (explain, generate)
    max_invert_steps: int = Field(250, ge=1, le=1000)
    max_generate: int = Field(8, ge=1, le=64)  # images per /v1/generate request
    ingress_replicas: tuple[int, int] = (1, 2)
    classifier_replicas: tuple[int, int] = (1, 2)
    explainer_replicas: tuple[int, int] = (1, 1)
    target_ongoing_requests: float = Field(4, gt=0)  # ingress and classifier, per replica (explainer: 1)
    ingress_num_cpus: float = Field(0.25, ge=0)
    classifier_num_cpus: float = Field(0.5, ge=0)  # defaults fit a 2-core machine; clusters set their own
    classifier_num_gpus: float = Field(0.0, ge=0)  # fractional: replicas share a GPU (e.g. 0.25)
    explainer_num_cpus: float = Field(0.5, ge=0)
    explainer_num_gpus: float = Field(0.0, ge=0)
    explainer_max_queued: int = Field(32, ge=-1)  # explain/generate calls queued beyond this: 503 (-1: no limit)


class TrackingConfig(StrictModel):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "cxrray-pretrain"
    registered_model: str | None = None  # None: cxrray-<family>

    def model_name(self, family: str) -> str:
        """The registered model name for a family's checkpoints."""
        return self.registered_model or f"cxrray-{family}"


class Config(StrictModel):
    preset: str = "tiny"
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    model: ModelConfig = Field(default_factory=lambda: get_family(DEFAULT_FAMILY).preset("tiny"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_family(cls, data: Any) -> Any:
        """Configs written before families existed have a model section without `family`: diffae."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "family" not in data["model"]:
            data = {**data, "model": {"family": DEFAULT_FAMILY, **data["model"]}}
        return data


PRESETS: dict[str, dict[str, Any]] = {
    # tiny: the CPU demo/test model (2.4M params at 64²). lr 1e-3, not the paper's 1e-4 (which is for the
    # 159M-param model at batch 128): on phantoms, 200 steps at 1e-3 give chest-like samples, at 1e-4 noise.
    "tiny": {"ingest": {"size": 64}, "phantom": {"size": 128},
             "train": {"global_batch": 16, "images": 3_200, "lr": 1e-3, "ema_decay": 0.995,
                       "checkpoint_every": 800, "eval_every": 1_600, "log_every": 160, "sample_steps": 25},
             # the tiny CPU model's decoder barely follows z given an inverted x_T (|counterfactual - reconstruction|
             # ~0.001 at eps 0.3), so its audit measures in latent space; trained models use the image measure
             "audit": {"measure": "latent"}},
    "small": {"ingest": {"size": 128}, "phantom": {"size": 192},
              "train": {"global_batch": 64, "images": 2_000_000, "ema_decay": 0.9995}},
    "paper": {"ingest": {"size": 256}, "phantom": {"size": 320},
              "train": {"global_batch": 128, "images": 200_000_000, "use_gpu": True, "num_workers": 8,
                        "checkpoint_every": 1_000_000, "eval_every": 5_000_000, "log_every": 50_000,
                        "cpus_per_worker": 8, "sample_steps": 100}},
}


def _deep_merge(base: dict, update: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. ingest.size=128)")
    dotted, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    tree: dict = {}
    node = tree
    keys = dotted.strip().split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return tree


def _allowed_fields(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the model that `loc` (minus its last element) points into."""
    for key in loc[:-1]:
        field = model.model_fields.get(str(key))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_fields(Config, e["loc"]))
            lines.append(f"{where}: unknown field (allowed: {allowed})")
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def _model_section(preset: str, given: Mapping[str, Any]) -> dict:
    """The chosen family's preset of this name (its own sizes), then what the YAML / --set gave."""
    family = given.get("family", DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown {family!r} (registered: {', '.join(FAMILIES)})")
    presets = get_family(family).presets
    return {**copy.deepcopy(presets.get(preset, presets["tiny"])), **given, "family": family}


def load_config(source: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Preset name or YAML path (None -> "tiny"), then dotted overrides like `ingest.size=128`."""
    source = "tiny" if source is None else str(source)
    if source in PRESETS:
        tree = {"preset": source, **copy.deepcopy(PRESETS[source])}
    elif Path(source).is_file():
        loaded = yaml.safe_load(Path(source).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
        base = loaded.get("preset", "tiny")
        if base not in PRESETS:
            raise ConfigError(f"{source}: preset: unknown {base!r} (allowed: {', '.join(PRESETS)})")
        tree = _deep_merge({"preset": base, **PRESETS[base]}, loaded)
    else:
        raise ConfigError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    for item in overrides:
        tree = _deep_merge(tree, _parse_override(item))
    tree["model"] = _model_section(tree["preset"], tree.get("model") or {})
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None
