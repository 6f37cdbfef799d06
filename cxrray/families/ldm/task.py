"""Training objective, data preparation, evaluation, generation and export of the latent diffusion model.

The loss is eps-MSE (or v-MSE, `prediction_type="v_prediction"`) on latents at t ~ U{0..T-1} under the
model's schedule (optionally rescaled to zero terminal SNR). Latents come from the batch's
`latent` column (latent shards, `cxrray latents`) or, without it, from the frozen autoencoder on the fly;
report ids from its `tokens` column (a report-conditioned model), each row replaced by the empty report
with probability `cond_drop` (classifier-free guidance).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cxrray.errors import InputError
from cxrray.families.base import Evaluation, Generated, GenerateRequest
from cxrray.families.ldm.config import LDMConfig
from cxrray.families.ldm.network import LatentDiffusion, empty_report
from cxrray.families.parts import model_tokenizer


def batch_latents(model: LatentDiffusion, batch: dict) -> torch.Tensor:
    if "latent" in batch:
        return torch.as_tensor(batch["latent"]).float()
    return model.latents(batch["image"].float())


def batch_ids(model: LatentDiffusion, batch: dict, n: int, device) -> torch.Tensor | None:
    """Report ids long [n, max_tokens] (the empty report where the batch has none); None when text=False."""
    if not model.cfg.text:
        return None
    if "tokens" in batch:
        ids = torch.as_tensor(batch["tokens"]).to(device).long()
        if ids.shape[1] != model.cfg.max_tokens:
            raise InputError(f"tokens have {ids.shape[1]} positions; the model takes {model.cfg.max_tokens}")
        vocab = model.text.config.vocab_size
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise InputError(f"token ids outside the model's vocabulary of {vocab}: were these latents tokenised "
                             "by another tokenizer?")
        return ids
    return empty_report(n, model.cfg.max_tokens, device)


def loss(model: LatentDiffusion, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    from cxrray.diffusion.schedule import make_scheduler

    z0 = batch_latents(model, batch)
    device = next(model.unet.parameters()).device
    z0 = z0.to(device)
    b = z0.shape[0]
    gen_device = generator.device if generator is not None else device
    sched = make_scheduler("ddpm", **model.schedule)
    t = torch.randint(0, model.cfg.timesteps, (b,), generator=generator, device=gen_device).to(device)
    noise = torch.randn(z0.shape, generator=generator, device=gen_device).to(device, z0.dtype)
    ids = batch_ids(model, batch, b, device)
    if ids is not None:
        drop = torch.rand(b, generator=generator, device=gen_device).to(device) < model.cfg.cond_drop
        ids = torch.where(drop[:, None], empty_report(b, ids.shape[1], device), ids)
    out = model(sched.add_noise(z0, noise, t), t, model.context(ids, b))
    target = noise if model.cfg.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
    per_row = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    if "weight" not in batch:
        return per_row.mean()
    # rows weighted (DreamBooth's prior preservation: instances 1, prior samples lambda): mean of w_i x MSE_i
    return (torch.as_tensor(batch["weight"]).to(device).float().reshape(b) * per_row).mean()


def prepare(cfg: LDMConfig, data_uri: str) -> LDMConfig:
    """The autoencoder's config from `vae_checkpoint`; from latent shards, the tokenizer (a report-
    conditioned model), checked to come from that same autoencoder."""
    from cxrray.data.report_tokens import load_tokenizer
    from cxrray.data.shards import read_manifest
    from cxrray.data.storage import Storage
    from cxrray.families.vae.task import frozen_config
    from cxrray.io.checkpoint import resolve_checkpoint

    if cfg.init_from:
        cfg = fine_tune_config(cfg.init_from)
    if not cfg.vae_checkpoint:
        raise InputError("model.vae_checkpoint is required: the autoencoder whose latents this model learns")
    vae_cfg = frozen_config(cfg.vae_checkpoint, "model.vae_checkpoint")
    manifest = read_manifest(data_uri)
    section = manifest.get("latents")
    ours = resolve_checkpoint(cfg.vae_checkpoint).uri  # absolute: workers resolve it in another directory
    update = {"image_size": vae_cfg.image_size, "latent_size": vae_cfg.latent_size,
              "latent_channels": vae_cfg.latent_channels, "in_channels": vae_cfg.in_channels, "vae_checkpoint": ours}
    if section:
        made_by = section["vae"]["checkpoint"]
        if made_by != ours:
            raise InputError(f"{data_uri} holds latents of the autoencoder {made_by}, not of model.vae_checkpoint "
                             f"{ours}: rerun `cxrray latents` or point at that autoencoder")
    if cfg.text:
        if cfg.init_from and section and section.get("tokenizer"):
            if Storage(data_uri).read_bytes(section["tokenizer"]).decode() != cfg.tokenizer:
                raise InputError(f"{data_uri} was tokenised by another tokenizer than model.init_from {cfg.init_from}'s: "
                                 "a fine-tune trains on ids of its base model's vocabulary")
        if not section or not section.get("tokenizer"):
            raise InputError(f"{data_uri}: a report-conditioned model trains on latent shards with tokenised reports "
                             "(`cxrray latents`); set model.text=false for an unconditional model")
        tokenizer = Storage(data_uri).read_bytes(section["tokenizer"]).decode()
        update.update(tokenizer=tokenizer, max_tokens=section["max_tokens"],
                      vocab_size=load_tokenizer(tokenizer, section["max_tokens"]).get_vocab_size())
    return LDMConfig(**{**cfg.model_dump(), **update, "vae": vae_cfg})


def fine_tune_config(init_from: str) -> LDMConfig:
    """The config of a fine-tune of the latent diffusion model at `init_from`: the base's own (architecture,
    schedule, autoencoder, tokenizer), `init_from` as an absolute URI (workers resolve it elsewhere)."""
    from cxrray.io.checkpoint import read_state, resolve_checkpoint

    uri = resolve_checkpoint(init_from).uri
    base = read_state(uri)["model"]
    if base.get("family") != "ldm":
        raise InputError(f"model.init_from {init_from} is a {base.get('family')!r} model, not a latent diffusion model")
    return LDMConfig(**{**base, "init_from": uri})


def initialise(model: LatentDiffusion) -> None:
    """A fresh start: every (EMA) weight of `init_from` (a fine-tune), else the frozen autoencoder's from
    `vae_checkpoint`."""
    from cxrray.io.checkpoint import read_weights

    if model.cfg.init_from:
        model.load_state_dict(read_weights(model.cfg.init_from))
    elif model.vae is not None and model.cfg.vae_checkpoint:
        model.vae.load_state_dict(read_weights(model.cfg.vae_checkpoint))


def prompt_ids(model: LatentDiffusion, prompts: list[str], device=None) -> torch.Tensor:
    """Report texts -> ids long [n, max_tokens] with the model's own tokenizer ("" = the empty report)."""
    from cxrray.data.report_tokens import encode_reports

    if not model.cfg.tokenizer:
        raise InputError("this model has no tokenizer: it was not trained on tokenised reports")
    return torch.as_tensor(encode_reports(model_tokenizer(model.cfg.tokenizer, model.cfg.max_tokens), prompts),
                           device=device).long()


@torch.no_grad()
def sample_latents(model: LatentDiffusion, ids: torch.Tensor | None, n: int, steps: int,
                   generator: torch.Generator, guidance: float = 1.0, sampler: str = "ddim",
                   progress=None) -> torch.Tensor:
    """n latents from z_T ~ N(0, I) under report ids (None: unconditional), DDIM (eta 0) or DDPM, with
    classifier-free guidance against the empty report; float32 [n, C, s, s]."""
    from cxrray.diffusion.ddim import walk

    device = next(model.unet.parameters()).device
    shape = (n, model.cfg.latent_channels, model.cfg.latent_size, model.cfg.latent_size)
    z_T = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
    context = model.context(ids, n)
    null = model.context(None, n) if guidance != 1.0 and model.cfg.text else None
    extra = {"eta": 0.0} if sampler == "ddim" else {}
    return walk(model, sampler, z_T, context, steps, progress, clip=False, guidance=guidance, null=null,
                 generator=generator, **extra)


@torch.no_grad()
def evaluate(model: LatentDiffusion, batch: dict, seed: int, steps: int) -> Evaluation:
    """Samples under the eval images' reports (DDIM), decoded, beside the real images at the autoencoder's size."""
    device = next(model.unet.parameters()).device
    n = batch["image"].shape[0] if "image" in batch else batch["latent"].shape[0]
    ids = batch_ids(model, {k: v for k, v in batch.items() if k == "tokens"}, n, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = sample_latents(model, ids, n, steps, generator)
    metrics = {"latent_mean": float(z.mean()), "latent_std": float(z.std())}
    if model.vae is None:
        return Evaluation(metrics)
    real = model.vae.fit(batch["image"].to(device).float()) if "image" in batch else model.decode(batch["latent"].to(device))
    samples = model.decode(z)
    metrics.update(sample_mean=float(samples.mean()), sample_std=float(samples.std()))
    return Evaluation(metrics, {"samples": [real, samples]})


def _request_ids(model: LatentDiffusion, request: GenerateRequest) -> tuple[torch.Tensor | None, str]:
    """The request's report ids (None: unconditional) and what they are, in words; refuses other conditions."""
    unknown = sorted(set(request.conditions) - ({"prompt"} if model.cfg.text else set()))
    if unknown:
        raise InputError(f"this model conditions on {['prompt'] if model.cfg.text else 'nothing'}; got {unknown}")
    if model.vae is None:
        raise InputError("this latent diffusion model has no autoencoder to decode with")
    prompt = request.conditions.get("prompt")
    if not model.cfg.text or prompt is None:
        return None, "unconditional"
    prompts = [prompt] * request.n if isinstance(prompt, str) else ["" if p is None else p for p in prompt]
    if len(prompts) != request.n:
        raise InputError(f"{len(prompts)} prompts for {request.n} images")
    ids = prompt_ids(model, prompts, next(model.unet.parameters()).device)
    return ids, "report-conditioned" if any(prompts) else "unconditional"


def _how(what: str, request: GenerateRequest) -> str:
    return (f"{what} latent diffusion, {request.sampler.upper()} {request.steps} steps, guidance "
            f"{request.guidance:g}, decoded by the model's autoencoder")


@torch.no_grad()
def request_latents(model: LatentDiffusion, request: GenerateRequest) -> tuple[torch.Tensor, str]:
    """The sampled latents float32 [n, C, s, s] of a generation request, and how they were made (provenance)."""
    ids, what = _request_ids(model, request)
    z = sample_latents(model, ids, request.n, request.steps, request.generator, request.guidance, request.sampler)
    return z, _how(what, request)


@torch.no_grad()
def generate(model: LatentDiffusion, request: GenerateRequest) -> Generated:
    """n images under one prompt or one per image (`conditions["prompt"]`; "", None or absent: unconditional)."""
    z, how = request_latents(model, request)
    return Generated(model.decode(z), how)


def latent_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel mask [B, 1, S, S] (1 = to generate) -> latent mask [B, 1, s, s]: a latent cell is generated
    when any of its pixels is (max-pooling, so a region's edge is never kept from the original)."""
    return F.adaptive_max_pool2d((mask.float() > 0.5).float(), size)


@torch.no_grad()
def inpaint(model: LatentDiffusion, images: torch.Tensor, mask: torch.Tensor, request: GenerateRequest) -> Generated:
    """Images [n, 1, S, S] in [-1, 1] with the region where mask [n, 1, S, S] is 1 generated anew (under the
    request's prompt, if any) and the rest kept: after each sampler step the kept latents are replaced by the
    original's latents noised to that step (Cheff / LDM inpainting). Outpainting is the inverted mask.
    The result is decoded whole, so kept pixels differ from the original by the autoencoder's error."""
    from cxrray.diffusion.ddim import walk

    if images.shape != mask.shape or images.shape[0] != request.n:
        raise InputError(f"mask {tuple(mask.shape)} must have the image's shape {tuple(images.shape)}, n = {request.n}")
    ids, what = _request_ids(model, request)
    device = next(model.unet.parameters()).device
    z0 = model.latents(images.to(device).float())
    keep = 1.0 - latent_mask(mask.to(device), z0.shape[-1])
    z_T = torch.randn(z0.shape, generator=request.generator, device=request.generator.device).to(device)
    null = model.context(None, request.n) if request.guidance != 1.0 and model.cfg.text else None
    extra = {"eta": 0.0} if request.sampler == "ddim" else {}
    z = walk(model, request.sampler, z_T, model.context(ids, request.n), request.steps, None, clip=False,
             guidance=request.guidance, null=null, generator=request.generator, known=(z0, keep), **extra)
    share = float(1.0 - keep.mean())
    return Generated(model.decode(z), _how(f"{what} inpainting ({share:.0%} of the latent generated)", request))


def export(model: LatentDiffusion, folder: Path) -> list[str]:
    """diffusers folders: `unet/`, `vae/`, `scheduler/` (DDIM under the model's schedule), and for a report-
    conditioned model `text_encoder/` (transformers BertModel) and `tokenizer/` (a fast tokenizer)."""
    from diffusers import DDIMScheduler

    from cxrray.families.vae.task import export as export_vae

    folder = Path(folder)
    notes = []
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(**model.schedule, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                  timestep_spacing="leading").save_pretrained(folder / "scheduler")
    if model.cfg.text:
        from transformers import PreTrainedTokenizerFast

        model.text.save_pretrained(folder / "text_encoder", safe_serialization=True)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=model_tokenizer(model.cfg.tokenizer, model.cfg.max_tokens),
                                            pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                            sep_token="[SEP]", mask_token="[MASK]",
                                            model_max_length=model.cfg.max_tokens) if model.cfg.tokenizer else None
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "tokenizer")
        notes.append("the U-Net cross-attends to text_encoder's last hidden states under the attention mask "
                     "(ids != [PAD]); an empty report ([CLS] [SEP]) is the unconditional input")
    else:
        notes.append("unconditional: the U-Net cross-attends to a learned constant [1, 1, text_width] "
                     "(null_context), which diffusers' classes do not hold")
    if model.vae is not None:
        notes += export_vae(model.vae, folder)
    return notes
