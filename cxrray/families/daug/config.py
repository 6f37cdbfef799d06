"""DAug's downstream model as typed data: one network for retrieval and classification, its input the image
stacked with DAug's heatmaps (Jin et al.), trained with the image–report + image–class hybrid contrastive loss.

Torch-free, so `cxrray.config` can compose it. The input has `1 + len(heatmaps)` channels (3 with DAug's two
heatmaps, to fit pretrained backbones) in one of three arms: `heatmaps` [x, h_1, h_2] (DAug), `image`
[x, x, x] (the baseline at the same width) and `shuffled` [x, heatmaps of other images] (the control: same
channels and statistics, no information about this image). `text_weight=0` is the no-text-loss ablation.

`prepare` fills `label_vocabulary` (the shards' labels, from which the super-classes follow) and, where the
training reports allow, `tokenizer` / `vocab_size`, so everything is saved with the model.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrray.families.daug.superclasses import super_class_names


class DAugConfig(BaseModel):
    """Architecture, input arm and loss weights of the downstream model; saved beside the weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: Literal["daug"] = "daug"
    image_size: int = Field(256, ge=16, le=4096)
    channels: Literal["heatmaps", "image", "shuffled"] = "heatmaps"
    heatmaps: tuple[str, ...] = Field(("cardiac", "pleural"), min_length=1)  # members heatmap_<class>.png
    # image encoder: `blocks` conv blocks (conv-GN-SiLU x 2, max-pool), widths width * 2^b, global average
    width: int = Field(32, ge=4)
    blocks: int = Field(4, ge=1, le=8)
    embed_dim: int = Field(128, ge=8)  # the shared retrieval space (unit vectors)
    # the hybrid contrastive loss: class_weight * image-class (sigmoid, multi-label) + text_weight * image-report
    # (symmetric InfoNCE); both temperatures learned from `temperature`
    class_weight: float = Field(1.0, ge=0)
    text_weight: float = Field(1.0, ge=0)
    temperature: float = Field(0.07, gt=0, le=1)
    # report encoder: a BertModel built from this config (no download), trained with the image encoder
    text_width: int = Field(256, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_tokens: int = Field(128, ge=4, le=512)
    tokenizer_vocab: int = Field(2000, ge=50)  # WordPiece pieces trained on the training reports (prepare)
    min_patients: int = Field(5, ge=1)  # a word enters the vocabulary only if this many patients use it
    vocab_size: int | None = Field(None, ge=8)
    tokenizer: str | None = None  # the `tokenizers` JSON (prepare); None: no reports, the text term is off
    label_vocabulary: tuple[str, ...] = ()  # the shards' label names (prepare)

    @model_validator(mode="after")
    def _consistent(self) -> "DAugConfig":
        if self.image_size % 2 ** self.blocks:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^blocks ({2 ** self.blocks})")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_heads {self.text_heads} must divide text_width {self.text_width}")
        if self.class_weight == 0 and self.text_weight == 0:
            raise ValueError("class_weight and text_weight are both 0: nothing to train")
        return self

    @property
    def super_classes(self) -> list[str]:
        """The super-classes the labels give (DAug's grouping); the classification head has one logit each."""
        return super_class_names(list(self.label_vocabulary))

    @property
    def in_channels(self) -> int:
        return 1 + len(self.heatmaps)


PRESETS: dict[str, dict[str, Any]] = {
    # this machine: 64² phantoms, a 3-block encoder and a 1-layer report encoder
    "tiny": {"image_size": 64, "width": 16, "blocks": 3, "embed_dim": 64, "text_width": 64, "text_layers": 1,
             "text_heads": 2, "max_tokens": 48, "tokenizer_vocab": 300, "min_patients": 3},
    "small": {"image_size": 256, "width": 32, "blocks": 5, "embed_dim": 128},
    # DAug fine-tunes pretrained backbones at 224-256²; none can be downloaded here, so the encoder is ours, wider
    "paper": {"image_size": 256, "width": 64, "blocks": 5, "embed_dim": 256, "text_width": 512, "text_layers": 4,
              "text_heads": 8, "max_tokens": 150, "tokenizer_vocab": 8000},
}
