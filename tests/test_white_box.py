"""The white-box surface beyond hook sites, against transformers on the same weights (float32, CPU), embedded
and over a loopback server: weights by TransformerLens name, site lists, prompt logits and log-probs, top-k
log-probs, the server-side logit lens; tokens and positions that cannot mislead; typed errors that lose nothing.
"""
from __future__ import annotations

import httpx
import pytest
import torch

import djinn
from djinn.models.loading import load_model

transformers = pytest.importorskip("transformers")

from serverutil import WAIT, running_server  # noqa: E402
from test_parity_hf import _make_hf, _save  # noqa: E402

TOL = 1e-4
PROMPT = [5, 17, 33, 2, 250, 9, 41, 77, 123, 8, 60, 199]
NEW = 5


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, tmp_path_factory):
    """(name, the transformers model, an embedded client, a remote client of a loopback server), same weights."""
    hf = _make_hf(request.param, seed=5)
    folder = _save(hf, tmp_path_factory.mktemp(request.param), "safetensors")
    embedded = djinn.connect(model=str(folder), dtype="float32", device="cpu")
    with running_server(None, models=[load_model(str(folder), "float32", "cpu")]) as srv:
        remote = djinn.connect(srv.url)
        yield request.param, hf, embedded, remote, srv.url
        remote.close()
    embedded.close()


def clients(family):
    return {"embedded": family[2], "remote": family[3]}


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0]


def hf_weights(name: str, hf) -> dict[str, torch.Tensor]:
    """TransformerLens's names and layout, from transformers' state, written out independently of Djinn's."""
    cfg = hf.config
    out = {}
    if name == "gpt2":
        d, h = cfg.n_embd, cfg.n_head
        dh = d // h
        t = hf.transformer
        out["W_E"], out["W_pos"] = t.wte.weight, t.wpe.weight
        for i, b in enumerate(t.h):
            p = f"blocks.{i}."
            out[p + "ln1.w"], out[p + "ln1.b"] = b.ln_1.weight, b.ln_1.bias
            out[p + "ln2.w"], out[p + "ln2.b"] = b.ln_2.weight, b.ln_2.bias
            w, bias = b.attn.c_attn.weight, b.attn.c_attn.bias  # Conv1D: [d_in, d_out]
            for k, part in enumerate("QKV"):
                out[p + f"attn.W_{part}"] = w[:, k * d:(k + 1) * d].reshape(d, h, dh).permute(1, 0, 2)
                out[p + f"attn.b_{part}"] = bias[k * d:(k + 1) * d].reshape(h, dh)
            out[p + "attn.W_O"] = b.attn.c_proj.weight.reshape(h, dh, d)
            out[p + "attn.b_O"] = b.attn.c_proj.bias
            out[p + "mlp.W_in"], out[p + "mlp.b_in"] = b.mlp.c_fc.weight, b.mlp.c_fc.bias
            out[p + "mlp.W_out"], out[p + "mlp.b_out"] = b.mlp.c_proj.weight, b.mlp.c_proj.bias
        out["ln_final.w"], out["ln_final.b"] = t.ln_f.weight, t.ln_f.bias
    else:
        d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        dh = d // h
        m = hf.model
        out["W_E"] = m.embed_tokens.weight
        for i, b in enumerate(m.layers):
            p, a = f"blocks.{i}.", b.self_attn
            out[p + "ln1.w"], out[p + "ln2.w"] = b.input_layernorm.weight, b.post_attention_layernorm.weight
            out[p + "attn.W_Q"] = a.q_proj.weight.reshape(h, dh, d).transpose(1, 2)
            out[p + "attn.W_K"] = a.k_proj.weight.reshape(kv, dh, d).transpose(1, 2)
            out[p + "attn.W_V"] = a.v_proj.weight.reshape(kv, dh, d).transpose(1, 2)
            out[p + "attn.W_O"] = a.o_proj.weight.T.reshape(h, dh, d)
            out[p + "mlp.W_gate"], out[p + "mlp.W_in"] = b.mlp.gate_proj.weight.T, b.mlp.up_proj.weight.T
            out[p + "mlp.W_out"] = b.mlp.down_proj.weight.T
        out["ln_final.w"] = m.norm.weight
    out["W_U"] = hf.lm_head.weight.T
    return out


# ---------------------------------------------------------------- weights and site lists

def test_weights_equal_transformers_by_tl_name(family):
    name, hf = family[0], family[1]
    want = hf_weights(name, hf)
    for where, client in clients(family).items():
        info = client.models()[0]
        assert {p.name for p in info.parameters} == set(want), where
        for p in info.parameters:
            got = client.weight(p.name)
            assert tuple(got.shape) == p.shape == tuple(want[p.name].shape), (where, p.name)
            assert torch.equal(got, want[p.name].detach()), (where, p.name)
    if name == "llama":  # GQA: k/v have n_kv_heads
        assert family[2].weight("blocks.0.attn.W_K").shape[0] == hf.config.num_key_value_heads


def test_weight_is_a_copy_and_large_ones_come_in_parts(family, monkeypatch):
    name, hf, embedded, remote = family[:4]
    w = embedded.weight("W_E")
    w.zero_()  # a copy: the model is unchanged
    assert torch.equal(embedded.weight("W_E"), hf_weights(name, hf)["W_E"].detach())
    sent = []
    real = remote._backend.call

    def spy(method, *args):
        if method == "weight":
            sent.append(args)
        return real(method, *args)

    monkeypatch.setattr("djinn.client.api.WEIGHT_PART_BYTES", 1000)
    monkeypatch.setattr(remote._backend, "call", spy)
    got = remote.weight("W_U")
    assert torch.equal(got, hf_weights(name, hf)["W_U"].detach())
    d_model = got.shape[0]
    assert len(sent) > 1 and all(hi - lo <= max(1, 1000 // (got.shape[1] * 4)) for _, _, lo, hi in sent)
    assert sent[-1][3] == d_model


def test_sites_and_weights_over_rest(family):
    name, hf, _, remote, url = family
    info = remote.models()[0]
    with httpx.Client(base_url=url, timeout=WAIT) as http:
        sites = http.get(f"/api/models/{info.name}/sites").json()
        assert [s["name"] for s in sites] == [s.name for s in info.sites] == [s.name for s in remote.sites()]
        assert [tuple(s["shape"]) for s in sites] == [s.shape for s in info.sites]
        w = http.get(f"/api/models/{info.name}/weights/blocks.0.attn.W_Q").json()["tensor"]
        want = hf_weights(name, hf)["blocks.0.attn.W_Q"].detach()
        assert torch.allclose(torch.tensor(w["data"]).reshape(w["shape"]), want)
        part = http.get(f"/api/models/{info.name}/weights/W_E", params={"start": 3, "stop": 5}).json()["tensor"]
        assert part["shape"] == [2, info.d_model]
        r = http.get(f"/api/models/{info.name}/weights/W_nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_parameter"
        r = http.get(f"/api/models/{info.name}/weights/W_E", params={"start": 5, "stop": 3})
        assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
        r = http.get(f"/api/models/{info.name}/weights/W_E", params={"rows": 3})
        assert r.status_code == 400 and "unknown field" in r.json()["error"]["message"]


def test_sites_list_every_public_site_in_forward_order(family):
    info = family[3].models()[0]
    names = [s.name for s in info.sites]
    assert len(names) == len(set(names))
    block = [n.removeprefix("blocks.1.") for n in names if n.startswith("blocks.1.")]
    order = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
             "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out",
             "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
             "hook_mlp_out", "hook_resid_post"]
    assert [n for n in block if n in order] == order
    assert names[-3:] == ["ln_final.hook_scale", "ln_final.hook_normalized", "ln_final.hook_out"]
    pattern = next(s for s in info.sites if s.name == "blocks.0.attn.hook_pattern")
    assert pattern.shape == (info.n_heads, "tokens", "keys")


# ---------------------------------------------------------------- prompt logits and log-probs

def test_every_position_logits_and_logprobs_equal_transformers(family):
    hf = family[1]
    for where, client in clients(family).items():
        out = client.session().generate(PROMPT, max_new_tokens=NEW, return_logits="all", logprobs=True,
                                        top_logprobs=4, stop_tokens=[])
        ids = PROMPT + out.token_ids
        ref = hf_logits(hf, ids)
        assert out.logits.shape == (len(ids), hf.config.vocab_size), where
        assert (out.logits - ref).abs().max() <= TOL, where
        lsm = torch.log_softmax(ref, dim=-1)
        want = torch.tensor([float("nan")] + [lsm[i, ids[i + 1]].item() for i in range(len(ids) - 1)])
        assert out.logprobs.shape == (len(ids),) and torch.isnan(out.logprobs[0]), where
        assert (out.logprobs[1:] - want[1:]).abs().max() <= TOL, where
        top = lsm[len(PROMPT) - 1:len(ids) - 1].topk(4)
        assert torch.equal(out.top_logprobs.ids, top.indices), where
        assert (out.top_logprobs.logprobs - top.values).abs().max() <= TOL, where
        assert out.top_logprobs.ids[:, 0].tolist() == out.token_ids  # greedy: the best token


def test_prompt_only_scores_and_continuing_calls(family):
    """max_new_tokens=0 gives TransformerLens's model(tokens): a row per prompt token; a later call's first
    token is scored from the token before it, which that call feeds."""
    hf = family[1]
    client = family[2]
    s = client.session()
    out = s.generate(PROMPT, max_new_tokens=0, return_logits="all", logprobs=True)
    ref = hf_logits(hf, PROMPT)
    assert out.token_ids == [] and out.logits.shape[0] == len(PROMPT)
    assert (out.logits - ref).abs().max() <= TOL
    s2 = client.session()
    first = s2.generate(PROMPT, max_new_tokens=3, stop_tokens=[])
    more = [7, 8, 9]
    out = s2.generate(more, max_new_tokens=2, logprobs=True, return_logits=True, stop_tokens=[])
    ids = PROMPT + first.token_ids + more + out.token_ids
    lsm = torch.log_softmax(hf_logits(hf, ids), dim=-1)
    start = len(PROMPT) + len(first.token_ids)
    want = torch.tensor([lsm[p - 1, ids[p]].item() for p in range(start, len(ids))])
    assert out.logprobs.shape == (len(more) + 2,) and (out.logprobs - want).abs().max() <= TOL
    assert out.logits.shape == (2, hf.config.vocab_size)  # return_logits=True: the new tokens' distributions


def test_scores_do_not_change_tokens_or_other_rows(family):
    client = family[2]
    plain = client.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], return_logits=True)
    scored = client.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], return_logits=True,
                                       logprobs=True, top_logprobs=2)
    assert scored.token_ids == plain.token_ids and torch.equal(scored.logits, plain.logits)


# ---------------------------------------------------------------- the logit lens

def test_logit_lens_equals_final_norm_and_unembedding_of_the_residual(family):
    name, hf = family[0], family[1]
    n_layers = hf.config.num_hidden_layers
    with torch.no_grad():
        hidden = hf(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
        norm = hf.transformer.ln_f if name == "gpt2" else hf.model.norm
    for where, client in clients(family).items():
        out = client.session().generate(PROMPT, max_new_tokens=2, stop_tokens=[], interventions=[
            djinn.LogitLens("blocks.*.hook_resid_post", top_k=5)])
        assert sorted(out.lens) == sorted((f"blocks.{i}.hook_resid_post", s) for i in range(n_layers) for s in (0, 1))
        for layer in range(n_layers - 1):  # transformers' last hidden state is after its final norm
            with torch.no_grad():
                want = torch.log_softmax(hf.lm_head(norm(hidden[layer + 1][0])), dim=-1).topk(5)
            got = out.lens[(f"blocks.{layer}.hook_resid_post", 0)]
            assert got.ids.shape == (len(PROMPT), 5), where
            assert torch.equal(got.ids, want.indices), (where, layer)
            assert (got.logprobs - want.values).abs().max() <= TOL, (where, layer)
        last = out.lens[(f"blocks.{n_layers - 1}.hook_resid_post", 1)]
        assert last.ids[0, 0].item() == out.token_ids[1]  # the last layer's lens is the model's own prediction


def test_logit_lens_at_positions_and_per_head(family):
    client = family[2]
    n = len(PROMPT)
    out = client.session().generate(PROMPT, max_new_tokens=2, stop_tokens=[], interventions=[
        djinn.LogitLens("blocks.0.hook_resid_post", top_k=3, positions=[2, n]),
        djinn.LogitLens("blocks.0.attn.hook_result", top_k=2, steps=[0]),
        djinn.Capture("blocks.0.hook_resid_post")])
    assert out.lens[("blocks.0.hook_resid_post", 0)].ids.shape == (1, 3)  # position 2 of the prefill
    assert out.lens[("blocks.0.hook_resid_post", 1)].ids.shape == (1, 3)  # position n: the first decode step
    assert ("blocks.0.hook_resid_post", 2) not in out.lens
    full = client.session().generate(PROMPT, max_new_tokens=0, interventions=[
        djinn.LogitLens("blocks.0.hook_resid_post", top_k=3)]).lens[("blocks.0.hook_resid_post", 0)]
    assert torch.equal(out.lens[("blocks.0.hook_resid_post", 0)].ids[0], full.ids[2])
    heads = out.lens[("blocks.0.attn.hook_result", 0)]
    assert heads.ids.shape == (n, family[1].config.num_attention_heads, 2)


# ---------------------------------------------------------------- bad input: typed, and nothing is lost

def test_bad_white_box_input_is_typed_and_loses_nothing(family):
    for where, client in clients(family).items():
        s = client.session()
        before = s.generate(PROMPT, max_new_tokens=3, stop_tokens=[])
        info = s.info()
        n, d_model = info["n_tokens"], client.models()[0].d_model
        bad = [
            (djinn.UnknownParameter, lambda: client.weight("blocks.0.attn.W_Nope")),
            (djinn.UnknownParameter, lambda: client.weight("blocks.99.attn.W_Q")),
            (djinn.InvalidRequest, lambda: s.generate([1], max_new_tokens=2, interventions=[
                djinn.Scale("blocks.0.hook_resid_post", 0.0, positions=[2])])),  # computed by an earlier call
            (djinn.InvalidRequest, lambda: s.generate([1], max_new_tokens=2, interventions=[
                djinn.Replace("blocks.0.hook_mlp_out", torch.zeros(d_model), positions=[n + 50])])),
            (djinn.InvalidRequest, lambda: s.generate([1], max_new_tokens=1, interventions=[
                djinn.LogitLens("blocks.0.hook_resid_post", positions=[10_000])])),
            (djinn.InvalidRequest, lambda: s.generate([1], interventions=[djinn.LogitLens("blocks.0.attn.hook_z")])),
            (djinn.InvalidRequest, lambda: s.generate([1], interventions=[djinn.LogitLens("hook_embed", top_k=0)])),
            (djinn.InvalidRequest, lambda: s.generate([1], interventions=[
                djinn.LogitLens("blocks.0.hook_resid_post"), djinn.LogitLens("blocks.*.hook_resid_post")])),
            (djinn.InvalidTensor, lambda: s.generate([1], interventions=[
                djinn.Replace("blocks.0.attn.hook_pattern", torch.zeros(3, 3))])),
            (djinn.InvalidRequest, lambda: s.generate([1], return_logits="every")),
            (djinn.InvalidRequest, lambda: s.generate([1], top_logprobs=-1)),
        ]
        for kind, call in bad:
            with pytest.raises(kind):
                call()
            assert s.info() == info, where
        again = client.session().generate(PROMPT, max_new_tokens=3, stop_tokens=[])
        assert again.token_ids == before.token_ids, where


# ---------------------------------------------------------------- tokens and text

def test_tokenize_is_what_a_text_prompt_is_fed_as(stories_path):
    with djinn.connect(model=str(stories_path), dtype="float32", device="cpu") as client:
        text = "Once upon a time"
        ids = client.tokenize(text)
        s = client.session()
        out = s.generate(text, max_new_tokens=0, interventions=[djinn.Capture("hook_embed")])
        assert out.captures[("hook_embed", 0)].shape[0] == len(ids) == s.info()["n_tokens"]
        assert ids[0] == 1 and client.tokenize(text, prepend_bos=False) == ids[1:]
        assert client.session().generate(ids, max_new_tokens=6).token_ids == client.session().generate(
            text, max_new_tokens=6).token_ids
        later = client.tokenize(" and then", prepend_bos=False)
        s.generate(" and then", max_new_tokens=0)
        assert s.info()["n_tokens"] == len(ids) + len(later)  # a later prompt gets no BOS
        pieces = client.to_str_tokens(text)
        assert len(pieces) == len(ids) and "".join(pieces[1:]) == text and pieces[1:][2].startswith(" ")
        assert client.to_str_tokens(ids) == pieces


def test_decoded_text_keeps_its_spaces(stories_path):
    with djinn.connect(model=str(stories_path), dtype="float32", device="cpu") as client:
        s = client.session()
        prompt = "Once upon a time,"
        out = s.generate(prompt, max_new_tokens=12, stop_tokens=[])
        ids = client.tokenize(prompt, prepend_bos=False) + out.token_ids
        assert prompt + out.text == client.detokenize(ids)
        assert out.text.startswith(" ")  # the word after the comma keeps its space
        assert not client.detokenize(out.token_ids).startswith(" ")  # which decoding it alone drops
        more = s.generate(" and", max_new_tokens=8, stop_tokens=[])
        streamed = "".join(ev.text for ev in client.session().stream(prompt, max_new_tokens=12, stop_tokens=[])
                           if isinstance(ev, djinn.Token))
        assert streamed == out.text and more.text.startswith(" ")
