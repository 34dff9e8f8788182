"""Sampling options (seeded temperature, top-k, top-p, stop tokens, max tokens) and loading by repo id from
the local Hugging Face cache."""
import shutil

import pytest
import torch

import djinn
from djinn.engine.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def client(stories_path):
    c = djinn.connect(model=str(stories_path))
    yield c
    c.close()


def test_seeded_sampling_is_reproducible_and_seed_dependent(client):
    runs = [client.session().generate("Once", max_new_tokens=30, temperature=1.0, seed=s).token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    greedy = client.session().generate("Once", max_new_tokens=30).token_ids
    assert runs[0] != greedy


def test_top_k_one_and_tiny_top_p_are_greedy(client):
    greedy = client.session().generate("Once", max_new_tokens=20).token_ids
    assert client.session().generate("Once", max_new_tokens=20, temperature=1.5, top_k=1, seed=3).token_ids == greedy
    assert client.session().generate("Once", max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=3).token_ids == greedy


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20000, 1)
    n = logits.shape[0]
    freq = torch.bincount(sample(logits, [SamplingParams(1.0, seed=i) for i in range(n)], [0] * n)[0], minlength=4) / n
    assert (freq - probs).abs().max() < 0.015
    # top-k 2 renormalises over the two most likely tokens; top-p 0.7 keeps exactly {0, 1} too
    for params in (SamplingParams(1.0, top_k=2), SamplingParams(1.0, top_p=0.7)):
        ps = [SamplingParams(params.temperature, params.top_k, params.top_p, seed=i) for i in range(n)]
        freq = torch.bincount(sample(logits, ps, [0] * n)[0], minlength=4) / n
        assert freq[2:].sum() == 0
        assert abs(freq[0] - 0.5 / 0.8) < 0.015
    # a low temperature sharpens
    freq = torch.bincount(sample(logits, [SamplingParams(0.25, seed=i) for i in range(n)], [0] * n)[0], minlength=4) / n
    assert freq[0] > 0.85


def test_stop_tokens_and_max_tokens(client):
    free = client.session().generate("Once", max_new_tokens=12, stop_tokens=[])
    stop_at = free.token_ids[5]
    out = client.session().generate("Once", max_new_tokens=12, stop_tokens=[stop_at])
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.token_ids) == 12


def test_max_new_tokens_zero_runs_the_prompt_only(client):
    s = client.session()
    out = s.generate("Once upon a time", max_new_tokens=0, interventions=[djinn.Capture("hook_embed")])
    assert out.token_ids == [] and out.captures[("hook_embed", 0)].shape[0] == s.info()["n_tokens"]
    assert s.info()["kv_len"] == s.info()["n_tokens"]
    with pytest.raises(djinn.InvalidRequest, match="nothing to continue"):
        s.generate([], max_new_tokens=5)  # no pending token and no prompt: nothing to predict from
    ids = client.tokenize(" there", prepend_bos=False)
    whole = client.session().generate(client.tokenize("Once upon a time") + ids, max_new_tokens=5)
    assert s.generate(ids, max_new_tokens=5).token_ids == whole.token_ids


def test_context_end_finishes_with_reason_context(client):
    out = client.session().generate([1] * 500, max_new_tokens=50, stop_tokens=[])
    assert out.finish_reason == "context" and len(out.token_ids) == 512 - 500 + 1  # the last predicts position 512


def test_load_by_repo_id_from_the_local_cache(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="transformers builds the checkpoint to cache")
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    snap = tmp_path / "hub" / "models--acme--tiny-gpt2" / "snapshots" / "abc123"
    model.save_pretrained(snap)
    (tmp_path / "hub" / "models--acme--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with djinn.connect(model="acme/tiny-gpt2") as c:
        assert c.models()[0].name == "acme/tiny-gpt2"
        out = c.session().generate([1, 2, 3], max_new_tokens=4, return_logits=True, stop_tokens=[])
    with torch.no_grad():
        ref = model(torch.tensor([[1, 2, 3]])).logits[0, -1]
    assert (out.logits[0] - ref).abs().max() < 1e-4
    shutil.rmtree(tmp_path / "hub")
    with pytest.raises(djinn.UnknownModel):
        djinn.connect(model="acme/tiny-gpt2")


def test_token_texts_join_into_the_full_text(client, stories_path):
    from djinn.models.tokenizer import IncrementalDecoder, load_tokenizer

    deltas, full = [], None
    for ev in client.session().stream("The", max_new_tokens=150, temperature=1.3, seed=5):
        if isinstance(ev, djinn.Token):
            deltas.append(ev.text)
        elif isinstance(ev, djinn.Done):
            full = ev.result.text
    assert "".join(deltas) == full
    # multi-byte characters arrive as several byte tokens: nothing is emitted until a character is whole
    tok = load_tokenizer(stories_path)
    text = "Once upon a time — café, naïve, 😀 ok"
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    parts = [dec.push(i) for i in ids]
    assert "".join(parts) == tok.decode(ids) and not any("\ufffd" in p for p in parts)


def test_one_engine_serves_several_models(stories_path):
    from conftest import shared_model

    with djinn.connect(model=[str(stories_path), str(shared_model("llama2xs"))]) as c:
        names = [m.name for m in c.models()]
        assert names == ["stories260K", "llama2xs"]
        a, b = c.session("stories260K"), c.session("llama2xs")
        default = c.session()  # no name: the first model
        out_a = a.generate("", max_new_tokens=12, return_logits=True)
        assert torch.equal(default.generate("", max_new_tokens=12, return_logits=True).logits, out_a.logits)
        out_b = b.generate("", max_new_tokens=12, return_logits=True)  # both tell stories; their weights differ
        assert (out_b.logits - out_a.logits).abs().max() > 0.1
        assert {s["model"] for s in c.sessions()} == {"stories260K", "llama2xs"}
