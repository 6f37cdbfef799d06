"""Parts more than one family is built from, written once: the report encoder (a transformers `BertModel` from
a config, never downloaded: the latent model's conditioning and DAug's image-report term), the cached
tokenizer of a model's saved `tokenizers` JSON, and the multi-label loss over known labels only."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from cxrray.data.report_tokens import PAD_ID, SPECIAL


def report_encoder(vocab_size: int | None, width: int, layers: int, heads: int, max_tokens: int) -> nn.Module:
    """A BERT over WordPiece ids [B, L] (L <= max_tokens) -> hidden states [B, L, width]; no pooling layer."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=vocab_size or len(SPECIAL), hidden_size=width, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=4 * width,
                                max_position_embeddings=max_tokens, pad_token_id=PAD_ID), add_pooling_layer=False)


@lru_cache(maxsize=8)
def model_tokenizer(json_text: str, max_tokens: int):
    """The `tokenizers` Tokenizer a model saved as JSON, padded / truncated to max_tokens (parsed once)."""
    from cxrray.data.report_tokens import load_tokenizer

    return load_tokenizer(json_text, max_tokens)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the known entries of targets [B, K] (NaN = unknown); with none known, a zero
    that keeps every logit in the graph (DDP's reducer needs each parameter's gradient)."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
