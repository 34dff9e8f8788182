"""One configuration type for every family; loaders translate checkpoint configs into it.

Two stacks: "gpt2" and "llama", the pre-norm rotary decoder that Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
OLMo 2, Mixtral and GPT-NeoX share. Where those families differ, the difference is a named choice here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

NORMS = ("rms", "layer")
MLP_ACTS = ("silu", "gelu_tanh", "gelu")
QK_NORMS = (None, "head", "all")


@dataclass(frozen=True)
class ModelConfig:
    family: str  # the stack: "llama" or "gpt2"
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
    rope_scaling: Optional[dict[str, Any]] = field(default=None, hash=False)  # {"rope_type": "llama3"|"linear"|...}
    sliding_window: Optional[int] = None  # attend to keys with q_pos - k_pos < sliding_window
    sliding_layers: Optional[tuple[bool, ...]] = None  # which layers slide (None: every layer, given a window)
    qkv_bias: bool = False
    o_bias: bool = False  # bias on the attention output projection (Llama's attention_bias covers q, k, v and o)
    mlp_bias: bool = False  # biases on the MLP's products
    tie_embeddings: bool = False  # lm_head shares the token embedding (GPT-2 checkpoints usually do)
    arch: str = ""  # the checkpoint's model type ("gemma2", "qwen3", ...); "" : the family
    # the decoder's named choices (defaults: Llama)
    norm: str = "rms"  # "rms" or "layer" (LayerNorm with a bias)
    norm_offset: float = 0.0  # norms scale by (offset + weight), in float32 (Gemma: 1)
    pre_norms: bool = True  # a norm before attention and before the MLP (OLMo 2: none)
    post_norms: bool = False  # a norm on the attention's and the MLP's outputs (Gemma 2/3, OLMo 2)
    qk_norm: Optional[str] = None  # RMSNorm of q and k before rotary: per head ("head") or over all heads ("all")
    attn_scale: float = 0.0  # scores are q.k * attn_scale (0: d_head ** -0.5)
    attn_softcap: float = 0.0  # scores through cap * tanh(score / cap) (0: none)
    final_softcap: float = 0.0  # logits through cap * tanh(logit / cap) (0: none)
    embed_scale: bool = False  # the embedding times sqrt(d_model), rounded to the model's dtype (Gemma)
    mlp_act: str = "silu"
    gated_mlp: bool = True  # act(gate) * up (else act(fc))
    parallel_residual: bool = False  # attention and MLP both read the block's input (GPT-NeoX)
    rotary_dim: int = 0  # leading dims of each head that rotate (0: all)
    rope_local_theta: Optional[float] = None  # sliding layers' rope base, unscaled (Gemma 3)
    n_experts: int = 0  # a sparse mixture of experts for the MLP (Mixtral), routing each token to
    experts_per_token: int = 0  # this many experts, weighted by their renormalised router softmax

    def __post_init__(self):
        if self.d_head == 0:
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.d_head)
        if not self.arch:
            object.__setattr__(self, "arch", self.family)
        if self.family not in ("llama", "gpt2"):
            raise ValueError(f"unknown model family {self.family!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.norm not in NORMS or self.mlp_act not in MLP_ACTS or self.qk_norm not in QK_NORMS:
            raise ValueError(f"unknown norm {self.norm!r}, MLP activation {self.mlp_act!r} or "
                             f"q/k norm {self.qk_norm!r}")
        if self.sliding_layers is not None:
            if len(self.sliding_layers) != self.n_layers:
                raise ValueError("sliding_layers needs one entry per layer")
            object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))
        if self.n_experts and not 0 < self.experts_per_token <= self.n_experts:
            raise ValueError("experts_per_token must be in 1..n_experts")
        if self.rotary_dim % 2 or self.rotary_dim > self.d_head:
            raise ValueError("rotary_dim must be even and at most d_head")

    def window(self, layer: int) -> int:
        """The sliding window of `layer` (0: it attends to the whole history)."""
        if self.sliding_window is None or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return 0
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
