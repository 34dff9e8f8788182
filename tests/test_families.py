"""The families beyond Llama and GPT-2, each against transformers' own class on the same weights (float32,
CPU): Gemma 2 and 3, Qwen3, Qwen2 with mixed sliding/full layers, Pythia (GPT-NeoX, parallel and
sequential), Phi-3 (fused checkpoints, longrope), OLMo 2 and Mixtral (4 experts, top 2).

Each is a tiny random config (windows shorter than the test sequence, every norm weight and bias random,
soft-caps small enough to bind), saved with `save_pretrained` and loaded through Djinn's loader:
- logits over the prefill and 32 decode steps within 1e-4, identical greedy tokens over 64 steps;
- every hook site the family has, at the prefill and at decode steps, equal to transformers' value (its
  modules' inputs and outputs through forward hooks, its attention weights; norm scales, rotary q/k and
  masked scores by TransformerLens's definitions from those);
- an unmodified pause is bit-identical to an uninterrupted run; a Steer equals the same edit made by a
  forward hook in transformers.
"""
from __future__ import annotations

import sys

import pytest
import torch

import djinn
from djinn.errors import UnknownModel
from djinn.models.loading import config_from_hf

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig,  # noqa: E402
                          MixtralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config)

# the prompt (12 tokens: longer than every window here) and steps the shared checks compare
from test_hook_sites import NEW, PROMPT, graphs_work_inside_ops_as_eagerly, worst_differences  # noqa: E402
from test_parity_hf import _check_parity  # noqa: E402

TOL = 1e-4
WINDOW = 5
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
FULL, SLIDING = "full_attention", "sliding_attention"


def _hf_config(family: str):
    if family == "gemma2":  # soft-caps that bind, a scalar that is not d_head, alternating windows
        return Gemma2Config(**{**COMMON, "tie_word_embeddings": True}, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=6.0,
                            rms_norm_eps=1e-6)
    if family == "gemma3":  # q/k norms, local and global rope bases (the global one scaled), 2 local : 1 global
        return Gemma3TextConfig(**{**COMMON, "tie_word_embeddings": True}, head_dim=16, query_pre_attn_scalar=24,
                                sliding_window=WINDOW, layer_types=[SLIDING, SLIDING, FULL],
                                rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                                 FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    if family == "qwen3":  # per-head q/k norms, a head_dim that is not d_model / n_heads
        return Qwen3Config(**COMMON, head_dim=24)
    if family == "qwen2-mixed":  # layer 0 attends to everything, layers 1 and 2 slide
        return Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "pythia":  # parallel residual, a quarter of each head rotates, LayerNorm with bias
        return GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"},
                             use_parallel_residual=True, layer_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25})
    if family == "neox-sequential":
        return GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"},
                             use_parallel_residual=False, hidden_act="gelu_new",
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})
    if family == "phi3":  # fused qkv and gate_up, a sliding window, longrope (below its original context)
        half = 8
        return Phi3Config(**{**COMMON, "max_position_embeddings": 192}, sliding_window=WINDOW,
                          original_max_position_embeddings=96,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                           "long_factor": [2.0 + 0.3 * i for i in range(half)]})
    if family == "olmo2":  # no pre-norms: post-norms and q/k norms over all heads
        return Olmo2Config(**COMMON)
    if family == "mixtral":  # 4 experts, top 2
        return MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    raise ValueError(family)


FAMILIES = ["gemma2", "gemma3", "qwen3", "qwen2-mixed", "pythia", "neox-sequential", "phi3", "olmo2", "mixtral"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, each matrix scaled by its true fan-in (its last dim: a router scaled by a
    smaller one saturates its softmax); norm gains around one (Gemma's around zero: it scales by 1 + w); the
    embedding small where it is tied and scaled by sqrt(d_model), or greedy decoding repeats one token."""
    gen = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            elif "embed" in name or "lm_head" in name:
                p.copy_((0.3 / model.config.hidden_size ** 0.5 if gemma else 0.3) * noise)
            else:
                p.copy_(1.5 * noise / p.shape[-1] ** 0.5)


def _build(name: str, folder):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config(name), attn_implementation="eager", dtype=torch.float32)
    _randomize(hf, 1)
    hf.eval().save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, _build(request.param, folder), folder


@pytest.fixture(scope="module")
def family(checkpoint):
    name, hf, folder = checkpoint
    client = djinn.connect(model=str(folder), dtype="float32", device="cpu")
    yield name, hf, client
    client.close()


def test_logits_and_greedy_tokens_equal_transformers(checkpoint):
    name, hf, folder = checkpoint
    _check_parity(hf, folder, PROMPT)


# ---------------------------------------------------------------- the reference values of every site


def _modules(hf):
    """(decoder layers, final norm, rotary embedding, the model's modeling module) of a transformers model."""
    base = hf.gpt_neox if hasattr(hf, "gpt_neox") else hf.model
    norm = base.final_layer_norm if hasattr(hf, "gpt_neox") else base.norm
    return base.layers, norm, base.rotary_emb, sys.modules[type(hf).__module__]


@torch.no_grad()
def hf_sites(hf, ids: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every site's value over one causal forward of `ids` ([T, ...]; patterns and scores [n_heads, T, T]),
    and the logits."""
    cfg, T = hf.config, len(ids)
    kind = cfg.model_type
    neox = kind == "gpt_neox"
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers, final, rotary, modeling = _modules(hf)
    vals: dict[str, torch.Tensor] = {}
    handles = []

    def out_hook(module, fn):  # fn only reads: the hook returns None, leaving the output as it is
        handles.append(module.register_forward_hook(lambda m, a, o: [fn(o[0] if isinstance(o, tuple) else o), None][1]))

    def in_hook(module, fn):
        handles.append(module.register_forward_pre_hook(lambda m, a: fn(a[0])))

    def norm(site, module):
        layer_norm = isinstance(module, torch.nn.LayerNorm)
        eps = module.eps if layer_norm else getattr(module, "eps", getattr(module, "variance_epsilon", None))

        def pre(x):
            h = x[0].float()
            h = h - h.mean(-1, keepdim=True) if layer_norm else h
            scale = (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            vals[f"{site}.hook_scale"], vals[f"{site}.hook_normalized"] = scale, h / scale
        in_hook(module, pre)

    q_size, kv_size = n_heads * d_head, n_kv * d_head
    for i, layer in enumerate(layers):
        b = f"blocks.{i}"
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, b=b: vals.__setitem__(f"{b}.hook_resid_pre", (a[0] if a else k["hidden_states"])[0]),
            with_kwargs=True))
        out_hook(layer, lambda o, b=b: vals.__setitem__(f"{b}.hook_resid_post", o[0]))
        if neox:
            attn, mlp = layer.attention, layer.mlp
            norm(f"{b}.ln1", layer.input_layernorm)
            norm(f"{b}.ln2", layer.post_attention_layernorm)
            out_hook(attn.query_key_value, lambda o, b=b: [
                vals.__setitem__(f"{b}.attn.hook_{n}", t[:, :, 0])
                for n, t in zip("qkv", o[0].view(T, n_heads, 3, d_head).split(1, 2))])
            in_hook(attn.dense, lambda x, b=b: vals.__setitem__(f"{b}.attn.hook_z", x[0].view(T, n_heads, d_head)))
            out_hook(attn.dense, lambda o, b=b: vals.__setitem__(f"{b}.hook_attn_out", o[0]))
            out_hook(mlp.dense_h_to_4h, lambda o, b=b: vals.__setitem__(f"{b}.mlp.hook_pre", o[0]))
            in_hook(mlp.dense_4h_to_h, lambda x, b=b: vals.__setitem__(f"{b}.mlp.hook_post", x[0]))
            out_hook(mlp, lambda o, b=b: vals.__setitem__(f"{b}.hook_mlp_out", o[0]))
            continue
        attn, mlp = layer.self_attn, layer.mlp
        post_normed = hasattr(layer, "post_feedforward_layernorm")
        if hasattr(layer, "input_layernorm"):
            norm(f"{b}.ln1", layer.input_layernorm)
        if post_normed:
            norm(f"{b}.ln1_post", layer.post_attention_layernorm)
            norm(f"{b}.ln2_post", layer.post_feedforward_layernorm)
            out_hook(layer.post_attention_layernorm, lambda o, b=b: vals.__setitem__(f"{b}.hook_attn_out", o[0]))
            out_hook(layer.post_feedforward_layernorm, lambda o, b=b: vals.__setitem__(f"{b}.hook_mlp_out", o[0]))
            if hasattr(layer, "pre_feedforward_layernorm"):
                norm(f"{b}.ln2", layer.pre_feedforward_layernorm)
        else:
            norm(f"{b}.ln2", layer.post_attention_layernorm)
            out_hook(attn.o_proj, lambda o, b=b: vals.__setitem__(f"{b}.hook_attn_out", o[0]))
            out_hook(mlp, lambda o, b=b: vals.__setitem__(f"{b}.hook_mlp_out", o[0]))
        if hasattr(attn, "qkv_proj"):  # Phi-3
            out_hook(attn.qkv_proj, lambda o, b=b: [vals.__setitem__(f"{b}.attn.hook_{n}", t.reshape(T, -1, d_head))
                                                    for n, t in zip("qkv", o[0].split([q_size, kv_size, kv_size], -1))])
        else:
            for n in "qkv":
                out_hook(getattr(attn, f"{n}_proj"),
                         lambda o, b=b, n=n: vals.__setitem__(f"{b}.attn.hook_{n}", o[0].view(T, -1, d_head)))
        for n in "qk":
            if hasattr(attn, f"{n}_norm"):  # what rotary turns: the normed q and k ([T, H*D], [T, H, D] or [H, T, D])
                out_hook(getattr(attn, f"{n}_norm"), lambda o, b=b, n=n: vals.__setitem__(
                    f"_{b}.{n}_normed", (o[0] if o.dim() < 4 or o.shape[1] == T else o[0].transpose(0, 1))
                    .reshape(T, -1, d_head)))
        in_hook(attn.o_proj, lambda x, b=b: vals.__setitem__(f"{b}.attn.hook_z", x[0].view(T, n_heads, d_head)))
        if hasattr(mlp, "experts"):  # Mixtral's router, and every expert's neurons at every token
            def routed(o, b=b):
                logits, top, chosen = o
                vals[f"{b}.mlp.hook_router_logits"] = logits.float()
                vals[f"{b}.mlp.hook_expert_weights"] = torch.zeros_like(logits.float()).scatter(-1, chosen, top)

            def neurons(x, b=b, experts=mlp.experts):
                for j in range(experts.gate_up_proj.shape[0]):
                    gate, up = (x[0] @ experts.gate_up_proj[j].T).chunk(2, -1)
                    vals[f"{b}.mlp.experts.{j}.hook_pre"], vals[f"{b}.mlp.experts.{j}.hook_pre_linear"] = gate, up
                    vals[f"{b}.mlp.experts.{j}.hook_post"] = experts.act_fn(gate) * up
            handles.append(mlp.gate.register_forward_hook(lambda m, a, o, f=routed: f(o)))
            in_hook(mlp, neurons)
        elif hasattr(mlp, "gate_up_proj"):  # Phi-3
            out_hook(mlp.gate_up_proj, lambda o, b=b: [vals.__setitem__(f"{b}.mlp.hook_{n}", t) for n, t in
                                                       zip(("pre", "pre_linear"), o[0].chunk(2, -1))])
        else:
            out_hook(mlp.gate_proj, lambda o, b=b: vals.__setitem__(f"{b}.mlp.hook_pre", o[0]))
            out_hook(mlp.up_proj, lambda o, b=b: vals.__setitem__(f"{b}.mlp.hook_pre_linear", o[0]))
        if not hasattr(mlp, "experts"):
            in_hook(mlp.down_proj, lambda x, b=b: vals.__setitem__(f"{b}.mlp.hook_post", x[0]))
    norm("ln_final", final)
    out_hook(final, lambda o: vals.__setitem__("ln_final.hook_out", o[0]))
    try:
        out = hf(torch.tensor([ids]), use_cache=False, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    vals["hook_embed"] = vals["blocks.0.hook_resid_pre"]
    layer_types = getattr(cfg, "layer_types", None) or \
        [SLIDING if getattr(cfg, "sliding_window", None) else FULL] * cfg.num_hidden_layers
    pos = torch.arange(T)
    for i in range(cfg.num_hidden_layers):
        b = f"blocks.{i}"
        if not (neox and cfg.use_parallel_residual):
            vals[f"{b}.hook_resid_mid"] = vals[f"{b}.hook_resid_pre"] + vals[f"{b}.hook_attn_out"]
        q = vals.pop(f"_{b}.q_normed", vals[f"{b}.attn.hook_q"])
        k = vals.pop(f"_{b}.k_normed", vals[f"{b}.attn.hook_k"])
        args = (layer_types[i],) if kind == "gemma3_text" else ()
        cos, sin = rotary(q[None], pos[None], *args)
        rq, rk = modeling.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        rq, rk = rq[0].transpose(0, 1), rk[0].transpose(0, 1)
        vals[f"{b}.attn.hook_rot_q"], vals[f"{b}.attn.hook_rot_k"] = rq, rk
        scale = (getattr(cfg, "query_pre_attn_scalar", None) or d_head) ** -0.5
        scores = torch.einsum("qhd,khd->hqk", rq, rk.repeat_interleave(n_heads // n_kv, 1)) * scale
        cap = getattr(cfg, "attn_logit_softcapping", None)
        if cap:
            scores = torch.tanh(scores / cap) * cap
        seen = pos[None, :] <= pos[:, None]
        if layer_types[i] == SLIDING:
            seen &= pos[:, None] - pos[None, :] < cfg.sliding_window
        vals[f"{b}.attn.hook_attn_scores"] = scores.masked_fill(~seen, float("-inf"))
        vals[f"{b}.attn.hook_pattern"] = out.attentions[i][0]
        o_proj = layers[i].attention.dense if neox else layers[i].self_attn.o_proj
        w = o_proj.weight.view(-1, n_heads, d_head)
        vals[f"{b}.attn.hook_result"] = torch.einsum("thd,mhd->thm", vals[f"{b}.attn.hook_z"], w)
    return vals, out.logits[0]


def test_every_site_equals_transformers_at_the_prefill_and_decode_steps(family):
    name, hf, client = family
    info = client.models()[0]
    sites = [s.name for s in info.sites]
    out = client.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], interventions=[djinn.Capture("*")])
    ref, logits = hf_sites(hf, PROMPT + out.token_ids[:-1])
    assert out.token_ids == logits[len(PROMPT) - 1:].argmax(-1).tolist()
    missing = set(sites) - set(ref)
    assert not missing, f"sites without a reference: {sorted(missing)}"
    bad = {s: d for s, d in worst_differences(out, ref, sites).items() if d > TOL}
    assert not bad, f"sites that differ from transformers by more than {TOL}: {bad}"


def test_the_family_has_the_sites_its_architecture_has(family):
    name, hf, client = family
    sites = {s.name for s in client.models()[0].sites}
    assert ("blocks.0.hook_resid_mid" in sites) == (name != "pythia")  # a parallel block has none
    assert ("blocks.0.ln1_post.hook_scale" in sites) == (name in ("gemma2", "gemma3", "olmo2"))
    assert ("blocks.0.ln1.hook_scale" in sites) == (name != "olmo2")
    assert ("blocks.0.mlp.hook_router_logits" in sites) == (name == "mixtral")
    assert ("blocks.1.mlp.experts.3.hook_post" in sites) == (name == "mixtral")
    assert ("blocks.0.mlp.hook_pre_linear" in sites) == (name not in ("pythia", "neox-sequential", "mixtral"))


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_mid", "blocks.1.attn.hook_pattern", "blocks.2.mlp.hook_post",
                                  "blocks.0.attn.hook_rot_k", "blocks.2.hook_mlp_out"])
def test_an_unmodified_pause_is_bit_identical(family, site):
    name, hf, client = family
    if site not in {s.name for s in client.models()[0].sites}:
        site = "blocks.1.hook_attn_out"  # the family has no such site (a parallel block's resid_mid, MoE neurons)
    plain = client.session().generate(PROMPT, max_new_tokens=6, stop_tokens=[], return_logits=True)
    seen = []
    for ev in client.session().stream(PROMPT, max_new_tokens=6, stop_tokens=[], return_logits=True,
                                      breakpoints=[djinn.Breakpoint(site, steps=[0, 2])]):
        if isinstance(ev, djinn.Paused):
            seen.append(ev.step)
            ev.resume()
        elif isinstance(ev, djinn.Done):
            out = ev.result
    assert seen == [0, 2]
    assert out.token_ids == plain.token_ids and torch.equal(out.logits, plain.logits)


def test_steer_equals_the_same_edit_by_a_forward_hook(family):
    name, hf, client = family
    layers = _modules(hf)[0]
    vector = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(5))
    out = client.session().generate(PROMPT, max_new_tokens=0, return_logits="all",
                                    interventions=[djinn.Steer("blocks.1.hook_resid_post", vector, scale=2.0)])

    def add(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + 2.0 * vector,) + output[1:]
        return output + 2.0 * vector

    want = _hooked_logits(hf, layers[1], add)
    assert (out.logits.float() - want).abs().max().item() <= TOL


@torch.no_grad()
def _hooked_logits(hf, module: torch.nn.Module, hook) -> torch.Tensor:
    """transformers' logits over PROMPT with `hook` on `module`'s output, as a forward hook edits it."""
    handle = module.register_forward_hook(hook)
    try:
        return hf(torch.tensor([PROMPT]), use_cache=False).logits[0]
    finally:
        handle.remove()


def test_edits_of_the_expert_weights_re_mix_the_experts(tmp_path):
    """Mixtral: zeroing an expert's weight at every token, or its neurons, equals transformers with that expert
    knocked out."""
    hf = _build("mixtral", tmp_path)
    client = djinn.connect(model=str(tmp_path), dtype="float32", device="cpu")
    try:
        knock = torch.ones(4)
        knock[1] = 0.0
        out = client.session().generate(PROMPT, max_new_tokens=0, return_logits="all",
                                        interventions=[djinn.Scale("blocks.0.mlp.hook_expert_weights", knock)])
        gate = _modules(hf)[0][0].mlp.gate

        def without_expert_1(module, args, output):
            logits, top, chosen = output
            return logits, top.masked_fill(chosen == 1, 0.0), chosen

        want = _hooked_logits(hf, gate, without_expert_1)
        assert (out.logits.float() - want).abs().max().item() <= TOL
        neurons_off = client.session().generate(PROMPT, max_new_tokens=0, return_logits="all", interventions=[
            djinn.Ablate("blocks.0.mlp.experts.1.hook_post")])  # the expert's neurons, not its weight
        assert (neurons_off.logits.float() - want).abs().max().item() <= TOL
        plain = client.session().generate(PROMPT, max_new_tokens=0, return_logits="all")
        assert (plain.logits - out.logits).abs().max() > 1e-3  # the knock-out changed something
    finally:
        client.close()


def test_unsupported_architectures_are_named():
    with pytest.raises(UnknownModel, match="falcon.*Gemma2ForCausalLM"):
        config_from_hf({"model_type": "falcon", "architectures": ["FalconForCausalLM"]})


def test_a_text_prompt_starts_with_bos_where_the_tokenizer_files_say(tmp_path):
    """tokenizer_config.json's add_bos_token where it is set; else the tokenizer's own post-processor (Llama
    and Gemma files prepend BOS there, GPT-NeoX and Qwen files do not)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from djinn.models.tokenizer import load_tokenizer

    for name, template, config, adds in (("template", True, {}, True), ("plain", False, {}, False),
                                         ("said-no", True, {"add_bos_token": False}, False),
                                         ("said-yes", False, {"add_bos_token": True}, True)):
        tok = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2}, unk_token="a"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if template:
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        folder = tmp_path / name
        folder.mkdir()
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", **config}))
        assert load_tokenizer(folder).add_bos is adds, name


def test_generation_ends_at_the_turn_ends_generation_config_names(tmp_path):
    """A chat model's generation_config.json lists its ends of turn (Gemma's <end_of_turn>, Llama 3's
    <|eot_id|>) beside the end of text: a generation with the default stop tokens ends at any of them."""
    import json
    import shutil

    from djinn.models.loading import DEFAULT_MODEL_DIR

    folder = tmp_path / "chat"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    client = djinn.connect(model=str(folder))
    free = client.session().generate("def main(", max_new_tokens=12, stop_tokens=[]).token_ids
    client.close()
    turn_end = free[4]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, turn_end]}))
    client = djinn.connect(model=str(folder))
    try:
        out = client.session().generate("def main(", max_new_tokens=12)
        assert out.token_ids == free[:free.index(turn_end) + 1]
    finally:
        client.close()


def test_work_inside_a_parallel_mlp_runs_at_cuts_of_the_graphs_as_the_eager_path(tmp_path, monkeypatch):
    """Pythia: a parallel block's MLP reads the block's input, which the graph executor keeps at the cut after
    the attention output; edits, captures and pauses inside that MLP run there (no step falls back to the eager
    runner) with the eager path's values, and an unmodified pause there is bit-identical."""
    _build("pythia", tmp_path)
    items = [djinn.Capture("blocks.1.mlp.hook_post"), djinn.Capture("blocks.2.ln2.hook_normalized"),
             djinn.Scale("blocks.0.mlp.hook_pre", 0.5), djinn.Ablate("blocks.2.mlp.hook_post", steps=[0, 2])]
    with djinn.connect(model=str(tmp_path), dtype="float32", device="cpu") as eager:
        graphs_work_inside_ops_as_eagerly(tmp_path, eager, items, ["blocks.1.mlp.hook_pre", "blocks.2.ln2.hook_scale"],
                                          monkeypatch)
