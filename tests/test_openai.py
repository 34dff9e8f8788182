"""The OpenAI-compatible routes through the official `openai` client: streamed and non-streamed completions
agree (and agree with the Djinn client), echo returns the prompt (scored with logprobs), log-probability keys
keep their spaces, steering through the `djinn_interventions` extension field changes the output, and
unknown fields and bad values are rejected with clear 400 errors."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

import djinn
from serverutil import WAIT, running_server

MODEL = "stories260K"
STORY = "Once upon a time"
SITE = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def server(stories_path):
    with running_server(stories_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def native(server):
    c = djinn.connect(server.url)
    yield c
    c.close()


def streamed(oai, **kw):
    text, reasons, lps = "", [], []
    for chunk in oai.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
            if ch.logprobs and ch.logprobs.token_logprobs:
                lps += ch.logprobs.token_logprobs
    return text, reasons, lps


def test_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["stories260K", "tiny-bf16"]


def test_streamed_and_plain_agree(oai, native):
    ref = native.session().generate(STORY, max_new_tokens=24)
    plain = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0)
    assert plain.object == "text_completion" and plain.model == MODEL
    assert plain.choices[0].text == ref.text
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 24 and plain.usage.prompt_tokens == len(native.tokenize(STORY))
    text, reasons, _ = streamed(oai, model=MODEL, prompt=STORY, max_tokens=24, temperature=0)
    assert text == ref.text and reasons == ["length"]

    # sampling with a seed: the same stream and non-stream
    kw = dict(model=MODEL, prompt=STORY, max_tokens=20, temperature=0.9, top_p=0.9, seed=1234)
    a = oai.completions.create(**kw).choices[0].text
    assert streamed(oai, **kw)[0] == a
    assert oai.completions.create(**{**kw, "seed": 99}).choices[0].text != a

    # token ids as the prompt
    ids = native.tokenize(STORY)
    assert oai.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0).choices[0].text == ref.text

    # several prompts, and usage in the stream
    many = oai.completions.create(model=MODEL, prompt=[STORY, "The dog"], max_tokens=8, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == ref.text[:len(many.choices[0].text)]
    chunks = list(oai.completions.create(model=MODEL, prompt=STORY, max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5


def test_stop_and_logprobs(oai, native):
    ref = native.session().generate(STORY, max_new_tokens=24, return_logits=True)
    stop = " named"
    assert stop in ref.text
    out = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == ref.text[:ref.text.index(stop)] and out.choices[0].finish_reason == "stop"
    text, reasons, _ = streamed(oai, model=MODEL, prompt=STORY, max_tokens=24, temperature=0, stop=stop)
    assert text == out.choices[0].text and reasons == ["stop"]

    lp = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=6, temperature=0, logprobs=3).choices[0]
    want = torch.log_softmax(ref.logits[:6], -1).gather(1, torch.tensor(ref.token_ids[:6])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.logprobs.token_logprobs), want, atol=1e-5)
    assert all(len(t) == 3 for t in lp.logprobs.top_logprobs)
    # greedy: each token is its position's best alternative, under the same text (its leading space kept)
    assert all(max(top, key=top.get) == tok for tok, top in zip(lp.logprobs.tokens, lp.logprobs.top_logprobs))
    assert any(tok.startswith(" ") for tok in lp.logprobs.tokens)
    assert "".join(lp.logprobs.tokens) == lp.text
    _, _, lps = streamed(oai, model=MODEL, prompt=STORY, max_tokens=6, temperature=0, logprobs=1)
    assert torch.allclose(torch.tensor(lps), want, atol=1e-5)


def test_echo_returns_the_prompt_and_its_scores(oai, native):
    ref = native.session().generate(STORY, max_new_tokens=6, logprobs=True)
    out = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=6, temperature=0, echo=True).choices[0]
    assert out.text == STORY + ref.text
    assert streamed(oai, model=MODEL, prompt=STORY, max_tokens=6, temperature=0, echo=True)[0] == out.text
    ids = native.tokenize(STORY)  # BOS first: it is no part of what the caller wrote, so echo leaves it out
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=STORY, max_tokens=6, temperature=0, echo=True, logprobs=2)
        if stream:
            parts = [c.choices[0] for c in oai.completions.create(stream=True, **kw)]
            text = "".join(p.text for p in parts)
            lp = [x for p in parts if p.logprobs for x in zip(p.logprobs.tokens, p.logprobs.token_logprobs,
                                                               p.logprobs.top_logprobs, p.logprobs.text_offset)]
        else:
            c = oai.completions.create(**kw).choices[0]
            text, lp = c.text, list(zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs,
                                        c.logprobs.text_offset))
        assert text == STORY + ref.text and len(lp) == len(ids) - 1 + 6
        tokens, logprobs, tops, offsets = zip(*lp)
        assert "".join(tokens) == text and [text[o:o + len(t)] for t, o in zip(tokens, offsets)] == list(tokens)
        assert torch.allclose(torch.tensor(logprobs), ref.logprobs[1:], atol=1e-4)
        for tok, l, top in zip(tokens, logprobs, tops):  # the lens's alternatives are the model's own
            assert len(top) == 2 and max(top.values()) >= l - 1e-4
    ids_out = oai.completions.create(model=MODEL, prompt=ids[1:], max_tokens=0, echo=True).choices[0]
    assert ids_out.text == native.detokenize(ids[1:])


def test_top_logprobs_keys_keep_their_spaces(oai):
    c = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=8, temperature=0, logprobs=5).choices[0]
    keys = [k for top in c.logprobs.top_logprobs for k in top]
    assert any(k.startswith(" ") for k in keys) and all(tok in top for tok, top in zip(c.logprobs.tokens,
                                                                                        c.logprobs.top_logprobs))


def test_steering_through_the_extension_field(oai, native):
    vec = torch.randn(64, generator=torch.Generator().manual_seed(3))
    plain = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=16, temperature=0).choices[0].text
    ext = {"djinn_interventions": [{"type": "steer", "site": SITE, "vector": vec.tolist(), "scale": 4.0}]}
    steered = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=16, temperature=0,
                                     extra_body=ext).choices[0].text
    assert steered != plain
    same = native.session().generate(STORY, max_new_tokens=16, interventions=[djinn.Steer(SITE, vec, scale=4.0)])
    assert steered == same.text
    text, _, _ = streamed(oai, model=MODEL, prompt=STORY, max_tokens=16, temperature=0, extra_body=ext)
    assert text == steered
    ablate = {"djinn_interventions": [{"type": "scale", "site": "blocks.*.hook_mlp_out", "factor": 0.0}]}
    assert oai.completions.create(model=MODEL, prompt=STORY, max_tokens=16, temperature=0,
                                  extra_body=ablate).choices[0].text != plain


BAD = [
    ("unknown field", {"extra_body": {"foo": 1}}, openai.BadRequestError, "foo"),
    ("negative temperature", {"temperature": -1}, openai.BadRequestError, "temperature"),
    ("max_tokens not a number", {"max_tokens": "lots"}, openai.BadRequestError, "max_tokens"),
    ("negative max_tokens", {"max_tokens": -3}, openai.BadRequestError, "max_tokens"),
    ("top_p zero", {"top_p": 0}, openai.BadRequestError, "top_p"),
    ("logprobs too many", {"logprobs": 50}, openai.BadRequestError, "logprobs"),
    ("n zero", {"n": 0}, openai.BadRequestError, "'n'"),
    ("echo not a bool", {"echo": "yes"}, openai.BadRequestError, "echo"),
    ("penalty", {"presence_penalty": 1.0}, openai.BadRequestError, "presence_penalty"),
    ("stop list too long", {"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
    ("bad prompt", {"prompt": [1.5, 2]}, openai.BadRequestError, "prompt"),
    ("token out of range", {"prompt": [1, 100000]}, openai.BadRequestError, "token_out_of_range"),
    ("unknown model", {"model": "gpt-4"}, openai.NotFoundError, "unknown_model"),
    ("unknown site", {"extra_body": {"djinn_interventions": [{"type": "steer", "site": "blocks.9.nope",
                                                              "vector": [0.0] * 64}]}},
     openai.BadRequestError, "unknown_site"),
    ("wrong vector shape", {"extra_body": {"djinn_interventions": [{"type": "steer", "site": SITE,
                                                                    "vector": [1.0] * 3}]}},
     openai.BadRequestError, "invalid_tensor"),
    ("vector of strings", {"extra_body": {"djinn_interventions": [{"type": "steer", "site": SITE,
                                                                   "vector": ["a"] * 64}]}},
     openai.BadRequestError, "invalid_tensor"),
    ("unknown intervention type", {"extra_body": {"djinn_interventions": [{"type": "explode", "site": SITE}]}},
     openai.BadRequestError, "explode"),
    ("unknown intervention field", {"extra_body": {"djinn_interventions": [
        {"type": "scale", "site": SITE, "factor": 2.0, "code": "import os"}]}}, openai.BadRequestError, "code"),
    ("capture is not for completions", {"extra_body": {"djinn_interventions": [{"type": "capture",
                                                                                "site": SITE}]}},
     openai.BadRequestError, "capture"),
]


@pytest.mark.parametrize("name,kw,error,text", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_rejected_clearly(oai, name, kw, error, text):
    args = dict(model=MODEL, prompt=STORY, max_tokens=4)
    args.update(kw)
    for stream in (False, True):
        with pytest.raises(error) as info:
            out = oai.completions.create(stream=stream, **args)
            if stream:
                list(out)
        e = info.value
        assert e.status_code in (400, 404)
        assert text in str(e) or text == e.code, f"{text!r} not in {str(e)!r} (code {e.code!r})"
        assert e.code in djinn.errors.ERRORS_BY_CODE and "Traceback" not in str(e)
    # and the server carries on
    assert oai.completions.create(model=MODEL, prompt=STORY, max_tokens=2, temperature=0).choices[0].text


def test_nan_and_non_json_bodies(server):
    url = server.url + "/v1/completions"
    r = httpx.post(url, content=b'{"model": "stories260K", "prompt": "x", "djinn_interventions": [{"type": "steer", '
                                b'"site": "blocks.2.hook_resid_post", "vector": [NaN' + b', 0.0' * 63 + b']}]}',
                   headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tensor" and "NaN" in r.text
    r = httpx.post(url, content=b"\x00\xffnot json", headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_frame"
    r = httpx.post(url, json=["a", "list"], timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_frame"
    r = httpx.post(url, json={"model": MODEL}, timeout=WAIT)
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
