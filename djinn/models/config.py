"""One configuration type for every family; loaders translate checkpoint configs into it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" (Llama 2/3, Mistral, Qwen2) or "gpt2"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    max_seq_len: int
    d_head: int = 0  # 0: d_model // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = field(default=None, hash=False)  # {"rope_type": "llama3"|"linear", ...}
    sliding_window: Optional[int] = None  # attend to keys with q_pos - k_pos < sliding_window
    qkv_bias: bool = False
    o_bias: bool = False  # bias on the attention output projection (Llama's attention_bias covers q, k, v and o)
    mlp_bias: bool = False  # biases on the Llama MLP's gate, up and down projections
    tie_embeddings: bool = False  # lm_head shares the token embedding (GPT-2 checkpoints usually do)

    def __post_init__(self):
        if self.d_head == 0:
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.family not in ("llama", "gpt2"):
            raise ValueError(f"unknown model family {self.family!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
