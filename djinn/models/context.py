"""What one engine step hands to the model besides the activations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .attention import AttentionMetadata


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [N] absolute position of each token
    attention: AttentionMetadata
    kv: torch.Tensor  # the pool: [n_blocks, n_layers, 2, block_size, n_kv_heads, d_head]
    rope: Optional[object] = None  # the model's Rotary tables, for families with rotary embeddings
    rope_local: Optional[object] = None  # the sliding layers' own tables, where they differ (Gemma 3)
