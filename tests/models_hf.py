"""A real third-party model: Hugging Face BERT built from a config (no download)."""

from __future__ import annotations

import torch


def bert():
    transformers = __import__("pytest").importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (8, 16), generator=g)
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[0, 10:] = 0  # padding in one sequence
    labels = torch.randint(0, 3, (8,), generator=g)
    return model, {"input_ids": ids, "attention_mask": mask}, labels
