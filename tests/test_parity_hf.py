"""Fidelity: Djinn's model stacks and loaders against Hugging Face transformers on the same weights.

Every family is built as a tiny random Hugging Face model (every parameter randomised, norms and biases
included), saved to disk in one of the checkpoint layouts Djinn reads, loaded back through `djinn.connect`, and
compared with transformers (eager attention, float32, CPU):

- logits of the prefill's last position and of 32 decode steps, max |diff| <= 1e-4;
- the final-norm hidden state at every prompt position (Capture of `ln_final.hook_out`) and at every
  decode step, max |diff| <= 1e-4;
- identical greedy tokens over 64 steps on a fresh session.

stories260K (the real llama2.c checkpoint) must reproduce llama2.c's greedy story from BOS, and its logits
must match the same weights converted into transformers' LlamaForCausalLM by the test's own conversion.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import djinn
from djinn.models.config import ModelConfig
from djinn.models.loading import config_from_hf, load_random

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

TOL = 1e-4
PROMPT_LEN = 20
LOGIT_STEPS = 33  # new tokens whose logits are compared: the prefill's last position + 32 decode steps
GREEDY_STEPS = 64
SITE = "ln_final.hook_out"
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big,")

# Tiny shapes shared by the random families: d_model 64, 4 query heads of 16, vocab 300, 128 positions.
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _hf_config(family: str):
    if family == "gpt2":
        return GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=128, layer_norm_epsilon=1e-5,
                          bos_token_id=None, eos_token_id=None)
    if family == "gpt2-untied":  # a separate lm_head
        return GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, layer_norm_epsilon=1e-5,
                          bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                          activation_function="gelu_pytorch_tanh")
    if family == "llama":  # GQA, untied head
        return LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "llama-bias":  # attention_bias (q, k, v and o) and mlp_bias, plain multi-head attention
        return LlamaConfig(**{**COMMON, "num_hidden_layers": 2}, num_key_value_heads=4, tie_word_embeddings=False,
                           attention_bias=True, mlp_bias=True)
    if family == "llama3":  # Llama-3 rope scaling, GQA, tied head
        return LlamaConfig(**COMMON, num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    if family == "mistral":  # sliding window much shorter than the sequence, GQA, untied head
        return MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)
    if family == "qwen2":  # qkv bias, GQA, tied head
        return Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen2-sliding":  # every layer slides (max_window_layers 0), untied head
        return Qwen2Config(**{**COMMON, "num_hidden_layers": 2}, num_key_value_heads=2, tie_word_embeddings=False,
                           use_sliding_window=True, sliding_window=8, max_window_layers=0)
    raise ValueError(family)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norm gains around one, small biases, matrices a little larger than unit-gain so
    that greedy decoding wanders over many tokens instead of locking onto one; logits of a few units."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm gains
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:  # biases (attention, MLP, LayerNorm)
                p.copy_(0.1 * noise)
            elif "wte" in name or "wpe" in name or "embed" in name or "lm_head" in name:
                p.copy_(0.3 * noise)
            else:
                p.copy_(1.5 * noise / min(p.shape) ** 0.5)


def _make_hf(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(family), attn_implementation="eager", dtype=torch.float32)
    _randomize(model, seed)
    return model.eval()


def _save(model: torch.nn.Module, folder: Path, layout: str) -> Path:
    if layout == "safetensors":
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").exists()
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (folder / "model.safetensors").exists()
    elif layout == "bin":
        # transformers 5 writes safetensors only; a pytorch_model.bin is what older versions wrote with
        # safe_serialization=False: the model's state dict, pickled by torch.save.
        model.save_pretrained(folder)
        for f in folder.glob("*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    elif layout == "bin-sharded":  # what transformers 4 wrote for large models with safe_serialization=False
        model.save_pretrained(folder)
        for f in folder.glob("*.safetensors*"):
            f.unlink()
        state = model.state_dict()
        keys = list(state)
        shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for i, part in enumerate(shards, 1):
            name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save({k: state[k] for k in part}, folder / name)
            weight_map.update({k: name for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(layout)
    return folder


def _final_norm_module(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.final_layer_norm
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


@torch.no_grad()
def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache, no stop token."""
    out = model(torch.tensor([prompt]), use_cache=True)
    cache, tokens = out.past_key_values, []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
        cache = out.past_key_values
    return tokens


@torch.no_grad()
def _hf_forward(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, vocab] and final-norm hidden states [T, d_model] of one causal forward over `ids`."""
    seen = {}
    handle = _final_norm_module(model).register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    try:
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        handle.remove()
    return logits, seen["h"][0]


def _check_parity(hf_model: torch.nn.Module, folder: Path, prompt: list[int]) -> None:
    n_prompt = len(prompt)
    hf_tokens = _hf_greedy(hf_model, prompt, GREEDY_STEPS)
    # Causality: one forward over prompt + greedy tokens holds the logits of every greedy step.
    hf_logits, hf_normed = _hf_forward(hf_model, prompt + hf_tokens)
    step_logits = hf_logits[n_prompt - 1:n_prompt - 1 + GREEDY_STEPS]
    assert hf_tokens == step_logits.argmax(-1).tolist()  # transformers' cached and uncached paths agree

    client = djinn.connect(model=str(folder), dtype="float32", device="cpu")
    try:
        sess = client.session()
        out = sess.generate(prompt, max_new_tokens=LOGIT_STEPS, return_logits=True, stop_tokens=[],
                            interventions=[djinn.Capture(SITE)])
        assert list(out.token_ids) == hf_tokens[:LOGIT_STEPS]
        logits = out.logits.float()
        assert logits.shape == (LOGIT_STEPS, hf_model.config.vocab_size)
        diff = (logits - step_logits[:LOGIT_STEPS]).abs().max().item()
        assert diff <= TOL, f"logits differ from transformers by {diff:.3g}"

        prefill = out.captures[(SITE, 0)].float()
        assert prefill.shape == (n_prompt, hf_model.config.hidden_size if hasattr(hf_model.config, "hidden_size")
                                 else hf_model.config.n_embd)
        diff = (prefill - hf_normed[:n_prompt]).abs().max().item()
        assert diff <= TOL, f"final-norm states of the prompt differ from transformers by {diff:.3g}"
        # Decode step k feeds the (k-1)-th new token, at position n_prompt + k - 1.
        decode = torch.cat([out.captures[(SITE, k)].float() for k in range(1, LOGIT_STEPS)])
        diff = (decode - hf_normed[n_prompt:n_prompt + LOGIT_STEPS - 1]).abs().max().item()
        assert diff <= TOL, f"final-norm states of decode steps differ from transformers by {diff:.3g}"
        sess.close()

        fresh = client.session()
        out64 = fresh.generate(prompt, max_new_tokens=GREEDY_STEPS, stop_tokens=[])
        assert list(out64.token_ids) == hf_tokens
    finally:
        client.close()


CASES = [  # family, checkpoint layout, seed
    ("gpt2", "bin", 11),
    ("gpt2-untied", "safetensors", 16),
    ("llama", "safetensors", 12),
    ("llama-bias", "bin-sharded", 17),
    ("llama3", "safetensors", 13),
    ("mistral", "sharded", 14),
    ("qwen2", "safetensors", 15),
    ("qwen2-sliding", "safetensors", 18),
]


@pytest.mark.parametrize("family,layout,seed", CASES, ids=[c[0] for c in CASES])
def test_family_matches_transformers(family: str, layout: str, seed: int, tmp_path: Path):
    hf_model = _make_hf(family, seed)
    folder = _save(hf_model, tmp_path / family, layout)
    prompt = torch.randint(0, hf_model.config.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(seed + 100)).tolist()
    _check_parity(hf_model, folder, prompt)


def test_configs_read_as_intended(tmp_path: Path):
    """The saved config.json files (transformers 5 writes `rope_parameters`) translate to the intended shapes,
    and the cases above really exercise GQA, tied and untied heads, qkv bias, a short sliding window and Llama-3
    frequencies that differ from the unscaled ones."""
    got = {}
    for family in ("gpt2", "llama", "llama3", "mistral", "qwen2"):
        hf = _make_hf(family, 0)
        hf.save_pretrained(tmp_path / family)
        got[family] = config_from_hf(json.loads((tmp_path / family / "config.json").read_text()))
    assert got["gpt2"].family == "gpt2" and got["gpt2"].tie_embeddings
    assert got["llama"].n_kv_heads == 2 and not got["llama"].tie_embeddings and got["llama"].rope_scaling is None
    assert got["llama3"].n_kv_heads == 1 and got["llama3"].tie_embeddings and got["llama3"].rope_theta == 500000.0
    assert got["llama3"].rope_scaling["rope_type"] == "llama3"
    assert got["mistral"].sliding_window == 8 and got["mistral"].sliding_window < PROMPT_LEN + LOGIT_STEPS
    assert got["qwen2"].qkv_bias and got["qwen2"].sliding_window is None and got["qwen2"].tie_embeddings

    from djinn.models.layers import rope_inv_freq

    scaled = rope_inv_freq(16, 500000.0, got["llama3"].rope_scaling)
    plain = rope_inv_freq(16, 500000.0, None)
    hf3 = _make_hf("llama3", 0)
    torch.testing.assert_close(scaled, hf3.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)
    changed = (scaled != plain)
    assert changed.any() and not changed.all()  # low frequencies scaled, the highest kept
    # The scaled frequencies turn by a visibly different angle within the test's sequence length.
    assert ((plain - scaled) * (PROMPT_LEN + GREEDY_STEPS)).abs().max() > 1.0


def test_legacy_rope_config_keys():
    """Configs written by transformers 4 keep `rope_theta` at the top level and scaling in `rope_scaling`."""
    base = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 112,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5}
    cfg = config_from_hf({**base, "rope_theta": 500000.0,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["factor"] == 8.0
    cfg = config_from_hf({**base, "rope_theta": 1e6, "rope_scaling": None})
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    cfg = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}})
    assert cfg.rope_theta == 20000.0 and cfg.rope_scaling is None


def test_sliding_window_layouts_and_refusals(tmp_path: Path):
    """Windows per layer as the config spells them; configs the stack would run wrongly are refused clearly."""
    from djinn.errors import UnknownModel
    from djinn.models.layers import rope_inv_freq

    def saved(hf_cfg) -> dict:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        hf_cfg.save_pretrained(d)
        return json.loads((d / "config.json").read_text())

    small = {**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 2}
    assert config_from_hf(saved(Qwen2Config(**small, use_sliding_window=True, sliding_window=8,
                                            max_window_layers=0))).sliding_window == 8
    assert config_from_hf(saved(Qwen2Config(**small, use_sliding_window=False, sliding_window=8))).sliding_window \
        is None
    mixed = saved(Qwen2Config(**small, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert mixed["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    legacy = {k: v for k, v in mixed.items() if k != "layer_types"}  # transformers 4 spelling of the same
    for spelling in (mixed, legacy):  # a window per layer: the first attends to everything
        cfg = config_from_hf(spelling)
        assert [cfg.window(i) for i in range(3)] == [0, 8, 8]
    stale = {**mixed, "layer_types": ["sliding_attention", "full_attention", "full_attention"], "max_window_layers": 1}
    assert [config_from_hf(stale).window(i) for i in range(3)] == [8, 0, 0]  # layer_types wins
    assert config_from_hf({**legacy, "max_window_layers": 0}).sliding_window == 8
    assert config_from_hf({**legacy, "use_sliding_window": False}).sliding_window is None

    llama = saved(LlamaConfig(**COMMON))
    with pytest.raises(UnknownModel, match="activation"):
        config_from_hf({**llama, "hidden_act": "gelu"})
    with pytest.raises(UnknownModel, match="rope type"):
        config_from_hf({**llama, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    gpt2 = saved(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    with pytest.raises(UnknownModel, match="activation_function"):
        config_from_hf({**gpt2, "activation_function": "relu"})
    with pytest.raises(UnknownModel, match="inverse_layer_idx"):
        config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True})

    # Linear rope scaling: the same frequencies as transformers.
    linear = LlamaConfig(**COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    cfg = config_from_hf(saved(linear))
    hf_freq = AutoModelForCausalLM.from_config(linear).model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(rope_inv_freq(cfg.d_head, cfg.rope_theta, cfg.rope_scaling), hf_freq, rtol=1e-6,
                               atol=0)


def test_checkpoint_weights_without_a_place_are_refused(tmp_path: Path):
    """A weight the config gives no place to (here o_proj biases under a config that says attention_bias=False)
    must not be dropped silently: that would be a different model."""
    from djinn.errors import UnknownModel

    hf_model = _make_hf("llama-bias", 0)
    folder = _save(hf_model, tmp_path / "m", "safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "attention_bias": False, "mlp_bias": False}))
    with pytest.raises(UnknownModel, match="no place for"):
        djinn.connect(model=str(folder), dtype="float32", device="cpu")


# ---------------------------------------------------------------- stories260K (llama2.c)

def _llama2c_to_hf(path: Path) -> LlamaForCausalLM:
    """The llama2.c checkpoint as a transformers LlamaForCausalLM: wq/wk rows permuted from llama2.c's
    interleaved rope pairs to the rotate-half layout (the permutation of transformers' Llama converter)."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    assert vocab > 0  # shared classifier
    assert (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) == (64, 172, 5, 8, 4, 512, 512)
    floats = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    head, kv_dim, pos = dim // n_heads, n_kv * (dim // n_heads), 0

    def take(*shape):
        nonlocal pos
        n = int(torch.tensor(shape).prod())
        t = floats[pos:pos + n].view(shape).clone()
        pos += n
        return t

    def permute(w, heads):
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    emb = take(vocab, dim)
    rms_att, wq, wk, wv = take(n_layers, dim), take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(
        n_layers, kv_dim, dim)
    wo, rms_ffn = take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    pos += seq_len * head  # freq_cis_real and freq_cis_imag: seq_len * head/2 floats each
    assert pos == floats.numel()

    config = LlamaConfig(hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv, vocab_size=vocab,
                         max_position_embeddings=seq_len, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = LlamaForCausalLM(config).float().eval()
    state = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final, "lm_head.weight": emb}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": rms_att[i], p + "post_attention_layernorm.weight": rms_ffn[i],
            p + "self_attn.q_proj.weight": permute(wq[i], n_heads),
            p + "self_attn.k_proj.weight": permute(wk[i], n_kv),
            p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
            p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i], p + "mlp.up_proj.weight": w3[i],
        })
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def test_stories260k_story_and_transformers_parity(stories_path: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(stories_path / "tok512.model"))
    hf_model = _llama2c_to_hf(stories_path / "stories260K.bin")
    hf_tokens = _hf_greedy(hf_model, [1], GREEDY_STEPS)
    assert sp.decode(hf_tokens).startswith(STORY)  # the conversion itself reproduces llama2.c
    hf_logits, hf_normed = _hf_forward(hf_model, [1] + hf_tokens)

    client = djinn.connect(model=str(stories_path), dtype="float32", device="cpu")
    try:
        out = client.session().generate("", max_new_tokens=GREEDY_STEPS, stop_tokens=[])  # BOS added
        assert out.text.startswith(STORY), out.text
        assert list(out.token_ids) == hf_tokens

        prompt = [1] + hf_tokens[:7]  # "<s>Once upon a time," as token ids: a multi-token prefill
        out = client.session().generate(prompt, max_new_tokens=LOGIT_STEPS, return_logits=True, stop_tokens=[],
                                        interventions=[djinn.Capture(SITE, steps=[0])])
        assert list(out.token_ids) == hf_tokens[7:7 + LOGIT_STEPS]
        ref = hf_logits[len(prompt) - 1:len(prompt) - 1 + LOGIT_STEPS]
        diff = (out.logits.float() - ref).abs().max().item()
        assert diff <= TOL, f"stories260K logits differ from transformers by {diff:.3g}"
        diff = (out.captures[(SITE, 0)].float() - hf_normed[:len(prompt)]).abs().max().item()
        assert diff <= TOL, f"stories260K final-norm states differ from transformers by {diff:.3g}"
    finally:
        client.close()


# ---------------------------------------------------------------- random initialisation

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_random_generates(family: str):
    cfg = ModelConfig(family=family, vocab_size=300, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2 if family == "llama" else 4, d_mlp=128, max_seq_len=128,
                      tie_embeddings=family == "gpt2")
    loaded = load_random(cfg, torch.float32, torch.device("cpu"))
    again = load_random(cfg, torch.float32, torch.device("cpu"))
    for (k, a), (_, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), f"load_random is not deterministic for {k}"
    assert loaded.tokenizer is None and loaded.config == cfg

    client = djinn.connect(model=loaded)
    try:
        info = client.models()
        assert len(info) == 1 and info[0].vocab_size == 300 and info[0].n_layers == 2
        out = client.session().generate([5, 17, 42], max_new_tokens=8, return_logits=True, stop_tokens=[])
        assert len(out.token_ids) == 8 and all(0 <= t < 300 for t in out.token_ids)
        assert out.logits.shape == (8, 300) and torch.isfinite(out.logits).all()
        assert out.token_ids == out.logits.argmax(-1).tolist()
    finally:
        client.close()
