"""Server-side interventions equal the same edit made with a plain PyTorch forward hook on the
Hugging Face model; captures return what the hooked model sees."""
import pytest
import torch
import transformers

import djinn

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]
N_NEW = 10


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.08) + (1.0 if p.dim() == 1 else 0.0))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def client(hf_llama):
    c = djinn.connect(model=str(hf_llama[1]))
    yield c
    c.close()


def hf_greedy(model, hooks):
    """Greedy decoding with full recomputation, so a hook sees every position at every step."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        ids, logits = list(PROMPT), []
        with torch.no_grad():
            for _ in range(N_NEW):
                out = model(torch.tensor([ids])).logits[0, -1]
                logits.append(out)
                ids.append(int(out.argmax()))
        return ids[len(PROMPT):], torch.stack(logits)
    finally:
        for h in handles:
            h.remove()


def edit_output(fn):
    """A forward hook that edits a module's output (the first element when it returns a tuple)."""
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)
    return hook


def djinn_greedy(client, interventions):
    out = client.session().generate(PROMPT, max_new_tokens=N_NEW, return_logits=True, stop_tokens=[],
                                    interventions=interventions)
    return out.token_ids, out.logits


def check_same(client, model, interventions, hooks):
    ref_tokens, ref_logits = hf_greedy(model, hooks)
    tokens, logits = djinn_greedy(client, interventions)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    plain_tokens, plain_logits = djinn_greedy(client, [])
    assert (plain_logits - logits).abs().max().item() > 1e-3, "the intervention should change the logits"


def test_steer_equals_a_forward_hook(client, hf_llama):
    model, _ = hf_llama
    vec = torch.randn(64)
    check_same(client, model, [djinn.Steer("blocks.1.hook_resid_post", vec, scale=4.0)],
               [(model.model.layers[1], edit_output(lambda h: h + 4.0 * vec))])


def test_steer_per_position_equals_a_forward_hook(client, hf_llama):
    model, _ = hf_llama
    vecs = torch.randn(2, 64)

    def fn(h):
        h = h.clone()
        h[0, [2, 5]] += 3.0 * vecs
        return h
    check_same(client, model, [djinn.Steer("blocks.2.hook_resid_pre", vecs, scale=3.0, positions=[2, 5])],
               [(model.model.layers[1], edit_output(fn))])


def test_scale_ablates_like_a_forward_hook(client, hf_llama):
    model, _ = hf_llama
    check_same(client, model, [djinn.Scale("blocks.0.hook_mlp_out", 0.0)],
               [(model.model.layers[0].mlp, edit_output(lambda h: h * 0.0))])
    check_same(client, model, [djinn.Scale("blocks.2.hook_mlp_out", 2.5)],
               [(model.model.layers[2].mlp, edit_output(lambda h: h * 2.5))])


def test_replace_at_positions_equals_a_forward_hook(client, hf_llama):
    model, _ = hf_llama
    patch = torch.randn(1, 64)

    def fn(h):
        h = h.clone()
        h[0, 3] = patch[0]
        return h
    check_same(client, model, [djinn.Replace("blocks.0.hook_resid_post", patch, positions=[3])],
               [(model.model.layers[0], edit_output(fn))])


def test_ablate_attention_equals_a_forward_hook(client, hf_llama):
    model, _ = hf_llama
    mean = torch.randn(64)
    check_same(client, model, [djinn.Ablate("blocks.1.hook_attn_out")],
               [(model.model.layers[1].self_attn, edit_output(torch.zeros_like))])
    check_same(client, model, [djinn.Ablate("blocks.1.hook_attn_out", mean=mean)],
               [(model.model.layers[1].self_attn, edit_output(lambda h: mean.expand_as(h).clone()))])


def test_per_head_edit_at_hook_z_equals_a_pre_hook_on_o_proj(client, hf_llama):
    model, _ = hf_llama
    head_mask = torch.ones(4, 16)
    head_mask[2] = 0.0  # ablate head 2 of layer 1

    def pre_hook(module, args):
        z = args[0]
        return (z * head_mask.flatten(),)
    ref_tokens, ref_logits = None, None
    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(pre_hook)
    try:
        ref_tokens, ref_logits = hf_greedy(model, [])
    finally:
        handle.remove()
    tokens, logits = djinn_greedy(client, [djinn.Scale("blocks.1.attn.hook_z", head_mask)])
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-4


def test_interventions_compose_in_order(client, hf_llama):
    model, _ = hf_llama
    vec = torch.randn(64)
    check_same(client, model,
               [djinn.Scale("blocks.1.hook_resid_post", 0.5), djinn.Steer("blocks.1.hook_resid_post", vec)],
               [(model.model.layers[1], edit_output(lambda h: h * 0.5 + vec))])


def test_capture_returns_what_the_hooked_model_sees(client, hf_llama):
    model, _ = hf_llama
    seen = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(f"blocks.{i}.hook_resid_post", o[0] if isinstance(o, tuple) else o))
        for i in range(3)]
    hooks.append(model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("blocks.1.attn.hook_z", a[0])))
    hooks.append(model.model.layers[2].mlp.register_forward_hook(
        lambda m, a, o: seen.__setitem__("blocks.2.hook_mlp_out", o)))
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    out = client.session().generate(PROMPT, max_new_tokens=3, interventions=[
        djinn.Capture("blocks.*.hook_resid_post", steps=[0]), djinn.Capture("blocks.1.attn.hook_z"),
        djinn.Capture("blocks.2.hook_mlp_out", steps="all")])
    for i in range(3):
        got = out.captures[(f"blocks.{i}.hook_resid_post", 0)]
        assert got.shape == (len(PROMPT), 64)
        assert (got - seen[f"blocks.{i}.hook_resid_post"][0]).abs().max() <= 1e-4
    z = out.captures[("blocks.1.attn.hook_z", 0)]
    assert z.shape == (len(PROMPT), 4, 16)
    assert (z.flatten(1) - seen["blocks.1.attn.hook_z"][0]).abs().max() <= 1e-4
    assert (out.captures[("blocks.2.hook_mlp_out", 0)] - seen["blocks.2.hook_mlp_out"][0]).abs().max() <= 1e-4
    assert sorted(k[1] for k in out.captures if k[0] == "blocks.2.hook_mlp_out") == [0, 1, 2]
    assert ("blocks.0.hook_resid_post", 1) not in out.captures


def test_steps_limit_an_edit_to_chosen_forward_passes(client, hf_llama):
    vec = torch.randn(64) * 5
    plain = djinn_greedy(client, [])[1]
    later = djinn_greedy(client, [djinn.Steer("blocks.1.hook_resid_post", vec, steps=[4])])[1]
    assert torch.equal(later[:4], plain[:4])  # untouched before step 4
    assert not torch.equal(later[4], plain[4])


def test_persistent_interventions_apply_to_every_call(client, hf_llama):
    model, _ = hf_llama
    vec = torch.randn(64)
    ref_tokens, ref_logits = hf_greedy(model, [(model.model.layers[1], edit_output(lambda h: h + 2.0 * vec))])
    s = client.session()
    s.set_interventions([djinn.Steer("blocks.1.hook_resid_post", vec, scale=2.0)])
    out = s.generate(PROMPT, max_new_tokens=N_NEW, return_logits=True, stop_tokens=[])
    assert out.token_ids == ref_tokens
    assert (out.logits - ref_logits).abs().max() <= 1e-4
    assert s.info()["interventions"] == 1
    s.set_interventions([])
    assert s.info()["interventions"] == 0
