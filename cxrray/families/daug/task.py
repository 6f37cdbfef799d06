"""DAug's downstream model: the input arm, the hybrid contrastive loss, preparation from the shards, export.

The loss is DAug's image–text–class hybrid: class_weight x an image–class term plus text_weight x an image–
report term. Image–class: cosine similarity to each super-class prototype, scaled, as a sigmoid contrastive
(multi-label) loss — the classification head is the same similarity; unknown labels are masked. Image–report:
the symmetric InfoNCE of CLIP over the rows of the batch that have a report, both directions averaged.
Heatmap members are the raw 16-bit PNGs `cxrray augment` writes ([0, 65535] -> [-1, 1]).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cxrray.families.base import Evaluation
from cxrray.families.daug.config import DAugConfig
from cxrray.families.daug.network import HybridEncoder
from cxrray.families.daug.superclasses import super_labels
from cxrray.families.parts import masked_bce, model_tokenizer


def heatmap_member(name: str) -> str:
    return f"heatmap_{name}"


def stack(model: HybridEncoder, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """The arm's input [B, 1 + H, S, S]: [x, x, ...] (image), [x, h_1, ...] (heatmaps), or [x, heatmaps of
    other images] (shuffled: a random derangement of the batch, drawn from `generator`)."""
    cfg = model.cfg
    x = batch["image"].float()
    if cfg.channels == "image":
        return x.repeat(1, cfg.in_channels, 1, 1)
    missing = [heatmap_member(c) for c in cfg.heatmaps if heatmap_member(c) not in batch]
    if missing:
        raise ValueError(f"the batch has no {missing}: train the {cfg.channels!r} arm on `cxrray augment` shards")
    maps = torch.stack([batch[heatmap_member(c)].to(x.device).float() for c in cfg.heatmaps], 1) / 65535 * 2 - 1
    if cfg.channels == "shuffled":
        if len(x) < 2:
            raise ValueError("the shuffled arm needs batches of at least 2 images (a batch of 1 keeps its own heatmaps)")
        order = torch.randperm(len(x), generator=generator).to(x.device)
        maps[order] = maps[order.roll(1)].clone()  # image order[i] gets the heatmaps of order[i - 1], never its own
    return torch.cat([x, maps], 1)


def class_targets(model: HybridEncoder, labels: torch.Tensor) -> torch.Tensor:
    """Labels [B, F] (NaN unknown) -> super-class targets [B, K] in {0, 1, NaN}."""
    y, _ = super_labels(labels.detach().cpu().numpy(), list(model.cfg.label_vocabulary))
    return torch.as_tensor(y, device=labels.device)


def report_ids(model: HybridEncoder, reports: list[str], device=None) -> torch.Tensor:
    from cxrray.data.report_tokens import encode_reports

    ids = encode_reports(model_tokenizer(model.cfg.tokenizer, model.cfg.max_tokens), reports)
    return torch.as_tensor(ids, dtype=torch.long, device=device)


def report_loss(model: HybridEncoder, images: torch.Tensor, reports: list[str]) -> torch.Tensor | None:
    """Symmetric InfoNCE between image embeddings [B, D] and their reports; None with fewer than 2 reports."""
    have = [i for i, r in enumerate(reports) if r]
    if model.text is None or len(have) < 2:
        return None
    texts = model.embed_reports(report_ids(model, [reports[i] for i in have], images.device))
    logits = model.text_scale.exp().clamp(max=100) * images[have] @ texts.T
    target = torch.arange(len(have), device=images.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def terms(model: HybridEncoder, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The loss's terms by name (class, report: where the batch has reports and the model a report encoder)."""
    emb = model.embed(stack(model, batch, generator))
    out = {"class": masked_bce(model.class_logits(emb), class_targets(model, batch["labels"]))}
    text = report_loss(model, emb, list(batch.get("report") or []))
    if text is not None:
        out["report"] = text
    return out


def loss(model: HybridEncoder, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    parts = terms(model, batch, generator)
    total = model.cfg.class_weight * parts["class"]
    if "report" in parts and model.cfg.text_weight:
        total = total + model.cfg.text_weight * parts["report"]
    elif model.text is not None:  # a batch without 2 reports: every parameter still in the graph (DDP's reducer)
        text = [*model.text.parameters(), *model.text_proj.parameters(), model.text_scale]
        total = total + 0.0 * sum(p.sum() for p in text)
    return total


@torch.no_grad()
def evaluate(model: HybridEncoder, batch: dict, seed: int, steps: int) -> Evaluation:
    """Each term of the loss on the eval batch (no images: this model generates none)."""
    parts = terms(model.eval(), batch, torch.Generator().manual_seed(seed))
    return Evaluation({f"{k}_loss": float(v) for k, v in parts.items()})


def _reports(data_uri: str, split: str) -> list[tuple[str, str]]:
    """(patient, report) of every `split` sample with a report, shard by shard."""
    from cxrray.data.shards import read_manifest, read_tar
    from cxrray.data.storage import Storage

    store = Storage(data_uri)
    return [(meta["patient"], meta["report"]) for shard in read_manifest(store)["shards"] if shard["splits"].get(split)
            for _, _, meta in read_tar(store.read_bytes(shard["name"]), shard["name"])
            if meta.get("split") == split and meta.get("report")]


def prepare(cfg: DAugConfig, data_uri: str) -> DAugConfig:
    """The label vocabulary from the manifest; a check that the arm's heatmaps are in the shards; the report
    tokenizer trained on the train split's reports unless the config has one (`tokenizers` may break ties
    differently run to run, so a caller that trains several arms fits it once and passes it to all)."""
    from cxrray.data.report_tokens import train_tokenizer
    from cxrray.data.shards import read_manifest
    from cxrray.errors import InputError

    manifest = read_manifest(data_uri)
    update: dict = {"label_vocabulary": tuple(manifest["label_vocabulary"])}
    if cfg.channels != "image":
        missing = sorted({f"{heatmap_member(c)}.png" for c in cfg.heatmaps} - set(manifest.get("members", ())))
        if missing:
            raise InputError(f"{data_uri} has no {missing} members: the {cfg.channels!r} arm trains on the "
                             f"shards `cxrray augment` writes (augment.classes must include {list(cfg.heatmaps)})")
    if cfg.text_weight and cfg.tokenizer is None:
        reports = _reports(data_uri, "train")
        if reports:
            tokenizer = train_tokenizer(reports, vocab_size=cfg.tokenizer_vocab, min_patients=cfg.min_patients,
                                        max_tokens=cfg.max_tokens)
            update.update(tokenizer=tokenizer.to_str(), vocab_size=tokenizer.get_vocab_size())
    prepared = DAugConfig.model_validate({**cfg.model_dump(), **update})
    if not prepared.super_classes:
        raise InputError(f"{data_uri}: labels {manifest['label_vocabulary']} fall in none of DAug's super-classes")
    return prepared


def export(model: HybridEncoder, folder: Path) -> list[str]:
    """The report encoder as a transformers `BertModel` folder (`text_encoder/`) with its fast tokenizer
    (`tokenizer/`); the image encoder and the class prototypes as safetensors beside them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("text.")}
    save_file(image, str(folder / "image_encoder.safetensors"))
    if model.text is not None:
        from transformers import PreTrainedTokenizerFast

        model.text.save_pretrained(folder / "text_encoder", safe_serialization=True)
        PreTrainedTokenizerFast(tokenizer_object=model_tokenizer(model.cfg.tokenizer, model.cfg.max_tokens),
                                pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                mask_token="[MASK]", model_max_length=model.cfg.max_tokens).save_pretrained(folder / "tokenizer")
    return ["image encoder, projections and class prototypes: no diffusers or transformers class holds them "
            "(image_encoder.safetensors, with the config in the checkpoint's state.json)"]
