"""Loaders: Hugging Face checkpoint folders (safetensors, sharded or single, or pytorch_model.bin), a
Hugging Face cache entry by repo id (offline), llama2.c `.bin` files, and random initialisation."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..errors import UnknownModel
from . import build_model
from .config import ModelConfig
from .families import config_from_hf, decoder_state
from .tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: Optional[Tokenizer]


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ---------------------------------------------------------------- Hugging Face checkpoints

def _gpt2_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"wte.weight": "embed.weight", "wpe.weight": "pos_embed.weight",
             "ln_f.weight": "ln_final.weight", "ln_f.bias": "ln_final.bias"}
    for i in range(cfg.n_layers):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for a, b in [("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                     ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")]:
            for t in ("weight", "bias"):
                names[f"{src}{a}.{t}"] = f"{dst}{b}.{t}"
    return {**names, **{"transformer." + k: v for k, v in names.items()}, "lm_head.weight": "lm_head.weight"}


def _read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for b in bins:
            state.update(torch.load(b, map_location="cpu", weights_only=True))
        return state
    raise UnknownModel(f"no weights in {folder} (expected model.safetensors, an index of shards, or pytorch_model.bin)")


def _to_djinn_state(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if cfg.family == "gpt2":
        names, state = _gpt2_names(cfg), {}
        for key, tensor in hf_state.items():
            if key in names:
                # GPT-2 stores its linear layers as Conv1D: [in, out].
                conv1d = key.endswith(".weight") and tensor.dim() == 2 and (".attn." in key or ".mlp." in key)
                state[names[key]] = tensor.t() if conv1d else tensor
    else:
        state = decoder_state(cfg, hf_state)
    if cfg.tie_embeddings or "lm_head.weight" not in state:
        state.pop("lm_head.weight", None)
    return state


def load_hf_folder(folder: Union[str, Path], dtype: torch.dtype, device: torch.device,
                   name: Optional[str] = None) -> LoadedModel:
    folder = Path(folder)
    hf_cfg = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(hf_cfg)
    state = _to_djinn_state(cfg, _read_hf_state_dict(folder))
    if "lm_head.weight" not in state and not cfg.tie_embeddings:  # no separate head saved: it is the embedding
        cfg = ModelConfig(**{**cfg.to_dict(), "tie_embeddings": True})
    model = _materialize(cfg, state, dtype, device)
    return LoadedModel(name or folder.name, cfg, model, load_tokenizer(folder))


def _materialize(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k for k in own if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing = expected - set(state)
    if missing:
        raise UnknownModel(f"checkpoint is missing weights: {sorted(missing)[:6]}")
    unused = set(state) - set(own)  # e.g. biases the config does not declare: dropping them would change the model
    if unused:
        raise UnknownModel(f"checkpoint has weights this {cfg.family} config has no place for: {sorted(unused)[:6]}")
    wrong = [k for k, t in state.items() if tuple(t.shape) != own[k]]
    if wrong:
        k = wrong[0]
        raise UnknownModel(f"weight {k} has shape {tuple(state[k].shape)}, the config implies {own[k]}")
    model.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if cfg.family == "llama":  # non-persistent rope tables are not in the state dict: rebuild them
        model.build_rotary(device)
    return model.to(dtype).eval().requires_grad_(False)


def hf_cache_folder(repo_id: str) -> Optional[Path]:
    """The snapshot folder of `repo_id` in the local Hugging Face cache (no network)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    entry = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    ref = entry / "refs" / "main"
    if ref.exists():
        snap = entry / "snapshots" / ref.read_text().strip()
        if snap.exists():
            return snap
    snaps = sorted((entry / "snapshots").glob("*")) if (entry / "snapshots").exists() else []
    return snaps[-1] if snaps else None


# ---------------------------------------------------------------- llama2.c

def _permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c rotates interleaved pairs (0,1),(2,3)...; reorder each head's rows so that rotating halves
    computes the same thing (evens first, then odds)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_llama2c(path: Union[str, Path], dtype: torch.dtype, device: torch.device,
                 name: Optional[str] = None) -> LoadedModel:
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 28:
        raise UnknownModel(f"{path} is too short to be a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    sizes_ok = min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) > 0 and dim % n_heads == 0 \
        and n_heads % n_kv == 0
    if sizes_ok:
        d_head = dim // n_heads
        n_floats = (vocab * dim * (1 if shared else 2) + n_layers * (2 * dim + 2 * dim * dim + 2 * n_kv * d_head * dim
                    + 3 * dim * hidden) + dim + seq_len * d_head)
        sizes_ok = len(raw) - 28 == 4 * n_floats
    if not sizes_ok:
        raise UnknownModel(f"{path} is not a llama2.c checkpoint (its header and size do not agree); Hugging Face "
                           f"checkpoints load from their folder")
    cfg = ModelConfig(family="llama", vocab_size=vocab, d_model=dim, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv, d_mlp=hidden, max_seq_len=seq_len, norm_eps=1e-5, tie_embeddings=shared)
    data = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    d_head, kv_dim = dim // n_heads, n_kv * (dim // n_heads)
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        n = 1
        for s in shape:
            n *= s
        t = data[offset:offset + n].view(*shape).clone()
        offset += n
        return t

    embed = take(vocab, dim)
    rms_att, wq = take(n_layers, dim), take(n_layers, dim, dim)
    wk, wv = take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim)
    wo, rms_ffn = take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, d_head // 2)  # freq_cis_real: recomputed from theta
    take(seq_len, d_head // 2)  # freq_cis_imag
    state = {"embed.weight": embed, "ln_final.weight": rms_final}
    if not shared:
        state["lm_head.weight"] = take(vocab, dim)
    for i in range(n_layers):
        b = f"blocks.{i}."
        state.update({
            b + "ln1.weight": rms_att[i], b + "ln2.weight": rms_ffn[i],
            b + "attn.qkv_proj.weight": torch.cat([_permute_for_rotate_half(wq[i], n_heads),
                                                   _permute_for_rotate_half(wk[i], n_kv), wv[i]]),
            b + "attn.o_proj.weight": wo[i],
            b + "mlp.in_proj.weight": torch.cat([w1[i], w3[i]]), b + "mlp.down_proj.weight": w2[i],
        })
    model = _materialize(cfg, state, dtype, device)
    return LoadedModel(name or path.stem, cfg, model, load_tokenizer(path.parent))


# ---------------------------------------------------------------- random weights and dispatch

def load_random(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0,
                name: str = "random") -> LoadedModel:
    """Random weights (normal, std 0.02; norms at one) for tests and benchmarks of a given shape."""
    gen = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        model = build_model(cfg)
    state = {}
    for key, p in model.state_dict().items():
        if key.endswith("bias"):
            state[key] = torch.zeros(p.shape, device=device, dtype=dtype)
        elif p.dim() == 1:  # norm gains at one (Gemma's norms scale by 1 + weight)
            state[key] = torch.full(p.shape, 1.0 - cfg.norm_offset, device=device, dtype=dtype)
        else:  # generated in chunks of rows to keep float32 temporaries small for 7B-sized layers
            state[key] = torch.empty(p.shape, device=device, dtype=dtype)
            for rows in state[key].split(4096):
                rows.copy_(torch.randn(rows.shape, generator=gen, device=device) * 0.02)
    return LoadedModel(name, cfg, _materialize(cfg, state, dtype, device), None)


def load_model(spec: str, dtype: Union[str, torch.dtype] = "float32", device: Union[str, torch.device] = "cpu",
               name: Optional[str] = None) -> LoadedModel:
    """Load by path (HF folder, llama2.c .bin, or a folder holding one) or by HF repo id from the local cache."""
    dt, dev = parse_dtype(dtype), torch.device(device)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".bin":
        return load_llama2c(path, dt, dev, name)
    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf_folder(path, dt, dev, name)
        bins = [p for p in sorted(path.glob("*.bin")) if p.name not in ("tok512.bin", "tokenizer.bin")]
        if bins:
            return load_llama2c(bins[0], dt, dev, name or path.name)
        raise UnknownModel(f"{path} holds neither config.json nor a llama2.c .bin file")
    cached = hf_cache_folder(spec) if "/" in spec else None
    if cached is not None:
        return load_hf_folder(cached, dt, dev, name or spec)
    raise UnknownModel(f"no model at {spec!r}: not a file or folder, and not in the local Hugging Face cache")


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
ModelSpec = Union[str, LoadedModel]


def load_models(model: Union[None, ModelSpec, Sequence[ModelSpec]], dtype: str, device: str) -> list[LoadedModel]:
    """Models by path or repo id (or already loaded); None means the small model shipped with Djinn."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise UnknownModel(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}")
        return [load_model(str(DEFAULT_MODEL_DIR), dtype, device, name="djinn-default")]
    specs = [model] if isinstance(model, (str, LoadedModel)) else list(model)
    return [m if isinstance(m, LoadedModel) else load_model(m, dtype, device) for m in specs]
