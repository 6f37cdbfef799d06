"""A BERT-style WordPiece tokenizer for radiology reports, trained here on de-identified training reports.

`tokenizers` does the training and encoding (BERT normaliser: lower case, accents stripped; BERT
pre-tokeniser; `[CLS] ... [SEP]` template; `[PAD]` = id 0). One guard is ours: a word enters the
tokenizer's training text only if the reports of at least `min_patients` different patients use it, so a
rare string that de-identification missed (a name, an ID) can never become a vocabulary entry; at
encoding time such a word still splits into known pieces or `[UNK]`. (`tokenizers` counts occurrences,
not people: one patient's fifty reports would make their name frequent.)

Token ids are int32 [max_tokens], padded with 0; `attention_mask(ids) = ids != 0`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

import numpy as np

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID = 0
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def shared_words(reports: Iterable[tuple[str, str]], min_patients: int) -> set[str]:
    """Lower-cased words (and punctuation marks) used by at least `min_patients` distinct patients;
    `reports` yields (patient, text)."""
    patients: dict[str, set[str]] = defaultdict(set)
    for patient, text in reports:
        for word in set(_WORD.findall(text.lower())):
            patients[word].add(patient)
    return {w for w, who in patients.items() if len(who) >= min_patients}


def train_tokenizer(reports: list[tuple[str, str]], *, vocab_size: int, min_patients: int, max_tokens: int):
    """A `tokenizers.Tokenizer` trained on the words of `reports` ((patient, de-identified text)) that at
    least `min_patients` patients share; encodes to `max_tokens` ids with truncation and padding."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    keep = shared_words(reports, min_patients)
    corpus = [" ".join(w for w in _WORD.findall(text.lower()) if w in keep) for _, text in reports]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL),
                                        show_progress=False)
    tokenizer.train_from_iterator([c for c in corpus if c], trainer=trainer)
    return configure(tokenizer, max_tokens)


def configure(tokenizer, max_tokens: int):
    """Apply the `[CLS] text [SEP]` template, truncation and padding to `max_tokens` (also after loading)."""
    from tokenizers import processors

    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=max_tokens)
    if tokenizer.token_to_id("[PAD]") != PAD_ID:
        raise ValueError("tokenizer: [PAD] must be id 0")
    return tokenizer


def load_tokenizer(json_text: str, max_tokens: int):
    from tokenizers import Tokenizer

    return configure(Tokenizer.from_str(json_text), max_tokens)


def encode_reports(tokenizer, texts: list[str]) -> np.ndarray:
    """Texts ("" = no report) -> int32 [N, max_tokens]; an empty text is `[CLS] [SEP]` + padding."""
    return np.asarray([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=np.int32)


def attention_mask(ids: np.ndarray) -> np.ndarray:
    return ids != PAD_ID
