"""Request statistics: the one function trainer, plugins and demo use to describe a prompt.

One implementation on purpose: a statistic computed differently at training and at serving time
silently breaks the adapters. Pad-aware; prompt tokens only (the scored continuation never leaks in).
"""

from __future__ import annotations

import torch

MEAN_INPUT_EMBEDDING = "mean_input_embedding"
SUPPORTED_KINDS = (MEAN_INPUT_EMBEDDING,)


def mean_input_embedding(
    embedding: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalised mean of the input-token embeddings of each prompt, pads excluded -> [N, D] fp32.

    `embedding` is the model's input embedding table [vocab, D]; works for left or right padding.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [N, T], got {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("attention_mask: every row needs at least one prompt token")
    with torch.no_grad():
        vectors = embedding[input_ids].to(torch.float32)
        mean = (vectors * mask).sum(dim=1) / counts
        return torch.nn.functional.normalize(mean, dim=-1)
