"""The model-family contract: what a family provides and what the plumbing may ask of it.

A family is one package under `cxrray.families` that defines `FAMILY = Family(...)` and one line in
the registry (`cxrray.families.FAMILIES`). Its package `__init__` and config module stay torch-free
(the config composes them at start-up); everything that needs torch is imported inside the callables.

The plumbing written once (the Ray Train loop, checkpoints, `load_model`, MLflow, export, jobs, Serve)
calls only these fields, so it never branches on a family's class:

- `config` / `presets`: the typed architecture (a pydantic model whose `family` field is the
  discriminator) and its named sizes (`tiny`, `small`, `paper`);
- `build(cfg) -> nn.Module`: the network (everything that is checkpointed);
- `loss(model, batch) -> scalar tensor`: the training objective on the whole batch dict (image
  [B, C, S, S] in [-1, 1], labels [B, F] with NaN, covariates, age, sex, report text, extra members),
  optimised over every trainable parameter (requires_grad) that no later objective claims;
- `objectives`: further `Objective`s, each a loss with its own optimiser over its own parameters (a
  VAE's discriminator), stepped after the main one on the same batch;
- `prepare(cfg, data_uri) -> cfg`: driver-side, before training (e.g. covariate statistics from the
  training split, stored in the config and so with the model);
- `initialise(model)`: on each worker when training starts from scratch (not on resume), fill parts
  that come trained from elsewhere (a latent diffusion model's frozen autoencoder, from its checkpoint);
- `evaluate(model, batch, seed, steps) -> Evaluation`: what the loop logs (metrics and image rows);
- `capabilities`: what jobs and Serve may ask (`require` refuses the rest with a clear message);
- `export(model, folder) -> list[str]`: diffusers `save_pretrained` folders, returning what could not
  be expressed in diffusers' classes;
- `conditions(cfg) -> {name: JSON schema}`: what a generation request may condition on (validated by
  Serve against these names and ranges), and `generate(model, GenerateRequest) -> Generated` (the
  "sample" capability: seeded images from noise, under those conditions where the family has them);
- `inpaint(model, images, mask, GenerateRequest) -> Generated` (the "inpaint" capability): images [n, C, S, S]
  with the region where mask [n, C, S, S] is 1 generated anew under the request's conditions, the rest kept;
- `upscale(model, low, steps, generator) -> images` (the "upscale" capability): super-resolution;
- the "guide" capability: forward(x_t, t) gives logits whose gradient guides a pixel DDPM's sampling (DAug);
- the "embed" capability: `embed(images)` gives unit retrieval embeddings and forward(images) class logits;
- the "reconstruct" capability: the network's forward(images) is its reconstruction D(E(x)) (pyfunc, Serve).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable

from cxrray.errors import InputError

CAPABILITIES = ("encode", "sample", "invert", "counterfactual", "generate", "reconstruct", "latents", "upscale",
                "inpaint", "embed", "guide")


@dataclass
class Evaluation:
    """Metrics (floats) and titled image rows ([B, C, S, S] tensors in [-1, 1], one grid per entry)."""

    metrics: dict[str, float] = field(default_factory=dict)
    grids: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """A further training objective: `loss(model, batch)` minimised by its own Adam (lr x `lr_scale`) over
    `parameters(model)` only. Those parameters are excluded from the main objective's optimiser."""

    name: str
    loss: Callable[[Any, dict], Any]
    parameters: Callable[[Any], list]
    lr_scale: float = 1.0


@dataclass
class GenerateRequest:
    """What `Family.generate` gets: n images, sampler steps, a seeded generator (CPU), the conditions (raw
    values by name as `conditions(cfg)` describes them, one value for all n images or a list of n, one
    per image; an absent name is unobserved), the classifier-free guidance scale, the sampler ("ddim",
    eta 0, or "ddpm", ancestral), and a prior for families that sample a latent from data statistics
    (DiffAE: the probe's z mean/std) or None."""

    n: int
    steps: int
    generator: Any
    conditions: dict[str, Any] = field(default_factory=dict)
    guidance: float = 1.0
    z_prior: tuple[Any, Any] | None = None
    sampler: str = "ddim"


@dataclass
class Generated:
    """Images float32 [n, C, S, S] in [-1, 1] and one sentence saying how they were made (provenance)."""

    images: Any
    how: str


def no_conditions(cfg) -> dict[str, dict]:
    return {}


@dataclass(frozen=True)
class Family:
    name: str
    config: type
    presets: dict[str, dict[str, Any]]
    build: Callable[[Any], Any]
    loss: Callable[[Any, dict], Any]
    evaluate: Callable[..., Evaluation]
    capabilities: frozenset[str]
    export: Callable[[Any, Any], list[str]]
    prepare: Callable[[Any, str], Any] = staticmethod(lambda cfg, data_uri: cfg)
    initialise: Callable[[Any], None] = staticmethod(lambda model: None)
    # once after every optimizer step (every objective stepped, however many micro-batches it accumulated):
    # where a step-counted schedule counts, never in `loss`, which runs once per micro-batch
    after_step: Callable[[Any], None] = staticmethod(lambda model: None)
    objectives: tuple[Objective, ...] = ()
    generate: Callable[[Any, GenerateRequest], Generated] | None = None
    inpaint: Callable[[Any, Any, Any, GenerateRequest], Generated] | None = None
    upscale: Callable[..., Any] | None = None
    conditions: Callable[[Any], dict[str, dict]] = no_conditions
    description: str = ""

    def preset(self, name: str, **overrides: Any):
        if name not in self.presets:
            raise ValueError(f"family {self.name!r} has no preset {name!r}; presets: {', '.join(self.presets)}")
        return self.config(**{**self.presets[name], **overrides})

    def require(self, capability: str) -> None:
        """Raise a clear error if this family cannot do `capability`."""
        if capability not in self.capabilities:
            raise CapabilityError(f"model family {self.name!r} cannot {capability}: it has "
                                  f"{', '.join(sorted(self.capabilities)) or 'no inference capabilities'}")


class CapabilityError(InputError):
    """A stage asked a model family for something it does not do."""


def lazy(module: str, attr: str) -> Callable:
    """A callable that imports `module` and calls its `attr` on use: keeps family packages torch-free."""
    def call(*args, **kwargs):
        return getattr(import_module(module), attr)(*args, **kwargs)

    call.__qualname__ = f"{module}.{attr}"
    return call
