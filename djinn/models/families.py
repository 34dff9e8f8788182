"""Hugging Face checkpoints, family by family: each model type's config.json read into a ModelConfig (its
named choices) and its weight names mapped onto the stack's.

A family here is data: the choices its architecture makes (models/config.py) and where its checkpoint
keeps each weight. Anything a family would compute differently from what the stack computes (an
activation, a rope type, an attention scaling) is refused with the architecture named, never run wrong.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch

from ..errors import UnknownModel
from .config import ModelConfig

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}


def _unsupported(kind: str, what: str) -> UnknownModel:
    return UnknownModel(f"unsupported {kind} checkpoint: {what}")


# ---------------------------------------------------------------- reading a config


def _activation(hf: dict, kind: str, allowed: tuple[str, ...]) -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    act = ACTIVATIONS.get(name)
    if act not in allowed:
        names = ", ".join(k for k, v in ACTIVATIONS.items() if v in allowed)
        raise _unsupported(kind, f"activation {name!r} (supported: {names})")
    return act


def _rope_parameters(hf: dict, layer_type: str) -> dict:
    """The rope settings of one kind of layer: transformers 5 writes `rope_parameters` (per layer type where
    they differ, as Gemma 3's), transformers 4 `rope_theta` and `rope_scaling` at the top level."""
    params = dict(hf.get("rope_parameters") or {})
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    return {**(hf.get("rope_scaling") or {}), **params}


def _rope(hf: dict, kind: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(theta, scaling) of the full-attention layers."""
    rope = _rope_parameters(hf, "full_attention")
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = "longrope" if rope_type == "su" else rope_type
    if rope_type not in ROPE_TYPES:
        raise _unsupported(kind, f"rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = rope_type
    if rope_type == "longrope":
        scaling.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    return float(theta), scaling


def _rotary_dim(hf: dict, d_head: int) -> int:
    rope = _rope_parameters(hf, "full_attention")
    fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    return int(d_head * float(fraction))


def _sliding(hf: dict, kind: str) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """(window, which layers slide). `layer_types` (transformers 5) is trusted over any older pattern a saved
    config still carries."""
    window, n = hf.get("sliding_window"), hf["num_hidden_layers"]
    if hf.get("layer_types"):
        sliding = [t == "sliding_attention" for t in hf["layer_types"]]
    elif kind in ("qwen2", "qwen3"):  # older configs: layers from max_window_layers on slide, if enabled at all
        use = bool(hf.get("use_sliding_window", False)) and window is not None
        sliding = [use and i >= hf.get("max_window_layers", n) for i in range(n)]
    elif kind == "gemma2":  # even layers slide
        sliding = [i % 2 == 0 for i in range(n)]
    elif kind == "gemma3_text":  # every `pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        sliding = [(i + 1) % pattern != 0 for i in range(n)]
    else:  # every layer slides, given a window
        sliding = [window is not None] * n
    if not any(sliding):
        return None, None
    if window is None:
        raise _unsupported(kind, "layers ask for sliding attention but sliding_window is null")
    return int(window), None if all(sliding) else tuple(sliding)


def _decoder(hf: dict, kind: str, acts: tuple[str, ...] = ("silu",), **choices) -> ModelConfig:
    """The fields every decoder config spells alike, then the family's own choices (`acts`: the MLP
    activations it may name)."""
    n_heads = hf["num_attention_heads"]
    d_head = hf.get("head_dim") or hf["hidden_size"] // n_heads
    theta, scaling = _rope(hf, kind)
    window, sliding_layers = _sliding(hf, kind)
    attention_bias = bool(hf.get("attention_bias", False))
    fields = dict(
        family="llama", arch=kind, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_mlp=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"], d_head=d_head,
        norm_eps=hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        sliding_window=window, sliding_layers=sliding_layers, qkv_bias=attention_bias, o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rotary_dim=_rotary_dim(hf, d_head), mlp_act=_activation(hf, kind, acts))
    return ModelConfig(**{**fields, **choices})


def _gemma(hf: dict, kind: str, **choices) -> ModelConfig:
    return _decoder(hf, kind, norm_offset=1.0, post_norms=True, embed_scale=True,
                    attn_scale=float(hf.get("query_pre_attn_scalar") or hf["head_dim"]) ** -0.5,
                    acts=("gelu_tanh",), tie_embeddings=bool(hf.get("tie_word_embeddings", True)), **choices)


def _gemma3_local_theta(hf: dict) -> float:
    local = _rope_parameters(hf, "sliding_attention")
    if isinstance((hf.get("rope_parameters") or {}).get("sliding_attention"), dict):
        return float(local.get("rope_theta", 10000.0))
    return float(hf.get("rope_local_base_freq", 10000.0))


def _gpt2(hf: dict, kind: str) -> ModelConfig:
    d = hf["n_embd"]
    if ACTIVATIONS.get(hf.get("activation_function", "gelu_new")) != "gelu_tanh":
        raise _unsupported(kind, f"activation_function {hf.get('activation_function')!r} (supported: gelu_new, "
                                 "gelu_pytorch_tanh)")
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        raise _unsupported(kind, "attention scores must be scaled by 1/sqrt(d_head) only "
                                 "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
    return ModelConfig(
        family="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"], d_mlp=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _gpt_neox(hf: dict, kind: str) -> ModelConfig:
    bias = bool(hf.get("attention_bias", True))
    return _decoder(hf, kind, norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-5), gated_mlp=False,
                    acts=("gelu", "gelu_tanh"), qkv_bias=bias, o_bias=bias, mlp_bias=True,
                    parallel_residual=bool(hf.get("use_parallel_residual", True)))


# model type -> (the architectures it names, how its config reads)
CONFIGS: dict[str, tuple[tuple[str, ...], Callable[[dict, str], ModelConfig]]] = {
    "llama": (("LlamaForCausalLM",), lambda hf, k: _decoder(hf, k)),
    "mistral": (("MistralForCausalLM",), lambda hf, k: _decoder(hf, k)),
    "qwen2": (("Qwen2ForCausalLM",), lambda hf, k: _decoder(hf, k, qkv_bias=True, o_bias=False)),
    "qwen3": (("Qwen3ForCausalLM",), lambda hf, k: _decoder(hf, k, qk_norm="head")),
    "gemma2": (("Gemma2ForCausalLM",), lambda hf, k: _gemma(
        hf, k, attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0))),
    "gemma3_text": (("Gemma3ForCausalLM",), lambda hf, k: _gemma(
        hf, k, qk_norm="head", rope_local_theta=_gemma3_local_theta(hf),
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0))),
    "phi3": (("Phi3ForCausalLM",), lambda hf, k: _decoder(hf, k)),
    "olmo2": (("Olmo2ForCausalLM",), lambda hf, k: _decoder(hf, k, pre_norms=False, post_norms=True, qk_norm="all")),
    "mixtral": (("MixtralForCausalLM",), lambda hf, k: _decoder(
        hf, k, n_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"])),
    "gpt_neox": (("GPTNeoXForCausalLM",), _gpt_neox),
    "gpt2": (("GPT2LMHeadModel",), _gpt2),
}


def config_from_hf(hf: dict) -> ModelConfig:
    """Translate a Hugging Face config.json (transformers 4 or 5 spelling) into a ModelConfig."""
    kind = hf.get("model_type")
    if kind not in CONFIGS:
        archs = ", ".join(a for names, _ in CONFIGS.values() for a in names)
        raise UnknownModel(f"unsupported model_type {kind!r} (architectures {hf.get('architectures')}); Djinn "
                           f"serves {archs}")
    return CONFIGS[kind][1](hf, kind)


# ---------------------------------------------------------------- mapping weights

# Per layer, the checkpoint's names (after the layer prefix) -> the stack's; (name, i) marks part i of a
# product the stack runs fused (q, k, v -> qkv_proj; gate, up -> in_proj), joined in part order.
LLAMA_LAYER = {
    "input_layernorm": "ln1", "post_attention_layernorm": "ln2",
    "self_attn.q_proj": ("attn.qkv_proj", 0), "self_attn.k_proj": ("attn.qkv_proj", 1),
    "self_attn.v_proj": ("attn.qkv_proj", 2), "self_attn.qkv_proj": "attn.qkv_proj", "self_attn.o_proj": "attn.o_proj",
    "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": ("mlp.in_proj", 0), "mlp.up_proj": ("mlp.in_proj", 1), "mlp.gate_up_proj": "mlp.in_proj",
    "mlp.down_proj": "mlp.down_proj",
    # Mixtral: the router, and each expert's w1 (gate), w3 (up), w2 (down) stacked by the loader
    "block_sparse_moe.gate": "mlp.router", "mlp.gate": "mlp.router",
}
POST_NORMED_LAYER = {**LLAMA_LAYER, "post_attention_layernorm": "ln1_post", "pre_feedforward_layernorm": "ln2",
                     "post_feedforward_layernorm": "ln2_post"}
NEOX_LAYER = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2",
              "attention.query_key_value": "attn.qkv_proj", "attention.dense": "attn.o_proj",
              "mlp.dense_h_to_4h": "mlp.in_proj", "mlp.dense_4h_to_h": "mlp.down_proj"}
# checkpoint buffers that are not weights (old GPT-NeoX files keep their masks and rope frequencies)
NOT_WEIGHTS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")

LAYOUTS = {  # checkpoint layout -> (layer prefix, per-layer names, top-level names)
    "decoder": ("model.layers.", LLAMA_LAYER,
                {"model.embed_tokens": "embed", "model.norm": "ln_final", "lm_head": "lm_head"}),
    "post_normed": ("model.layers.", POST_NORMED_LAYER,
                    {"model.embed_tokens": "embed", "model.norm": "ln_final", "lm_head": "lm_head"}),
    "gpt_neox": ("gpt_neox.layers.", NEOX_LAYER,
                 {"gpt_neox.embed_in": "embed", "gpt_neox.final_layer_norm": "ln_final", "embed_out": "lm_head"}),
}
EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)$")


def _layout(cfg: ModelConfig) -> tuple[str, dict, dict]:
    if cfg.arch == "gpt_neox":
        return LAYOUTS["gpt_neox"]
    return LAYOUTS["post_normed" if cfg.post_norms else "decoder"]


def decoder_state(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's state dict from a checkpoint's: renamed, fused products joined, experts stacked."""
    prefix, layer_names, top = _layout(cfg)
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}  # layer -> (expert, w1|w2|w3) -> weight
    for key, tensor in hf_state.items():
        if key.endswith(NOT_WEIGHTS):
            continue
        module, _, kind = key.rpartition(".")
        if module in top:
            state[f"{top[module]}.{kind}"] = tensor
            continue
        if not module.startswith(prefix):
            state[key] = tensor  # unknown: reported by the loader as a weight with no place
            continue
        layer, _, local = module[len(prefix):].partition(".")
        expert = EXPERT.match(local)
        if expert:  # Mixtral's experts one by one
            experts.setdefault(int(layer), {})[int(expert.group(1)), expert.group(2)] = tensor
            continue
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):  # stacked already (in memory)
            state[f"blocks.{layer}.mlp.{'in_proj' if 'gate_up' in key else 'down_proj'}"] = tensor
            continue
        target = layer_names.get(local)
        if target is None:
            state[key] = tensor
        elif isinstance(target, tuple):
            parts.setdefault(f"blocks.{layer}.{target[0]}.{kind}", {})[target[1]] = tensor
        else:
            state[f"blocks.{layer}.{target}.{kind}"] = tensor
    for name, pieces in parts.items():
        state[name] = torch.cat([pieces[i] for i in sorted(pieces)])
    for layer, w in experts.items():  # w1 (gate) and w3 (up) make each expert's in_proj, w2 its down_proj
        n = len(w) // 3
        state[f"blocks.{layer}.mlp.in_proj"] = torch.stack([torch.cat([w[j, "w1"], w[j, "w3"]]) for j in range(n)])
        state[f"blocks.{layer}.mlp.down_proj"] = torch.stack([w[j, "w2"] for j in range(n)])
    if cfg.arch == "gpt_neox":
        _neox_qkv_in_blocks(cfg, state)
    return state


def _neox_qkv_in_blocks(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """GPT-NeoX interleaves q, k and v per head ([head, q|k|v, d_head] rows); the stack wants all q heads,
    then all k, then all v."""
    h, dh = cfg.n_heads, cfg.d_head
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv_proj.{kind}"
            if key in state:
                t = state[key]
                state[key] = t.view(h, 3, dh, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
