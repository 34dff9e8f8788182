"""`/v1/chat/completions` through the official `openai` client against a real loopback server running the
embedded default model (which ships a chat template) and stories260K (which has none): streamed equals
whole, both equal the Djinn client on the template's ids, steering and captures equal the Djinn client's,
sessions continue per key, and malformed bodies get 400s in OpenAI's error shape. Also the README's OpenAI
example, as written."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load as st_load

import djinn
from djinn.models.loading import load_model, load_models
from djinn.server.limits import Limits
from serverutil import WAIT, running_server

MODEL = "djinn-default"
SITE = "blocks.2.hook_resid_post"
ASK = [{"role": "system", "content": "You answer about Python."}, {"role": "user", "content": "What is a class?"}]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(stories_path):
    return [*load_models(None, "float32", "cpu"), load_model(str(stories_path), "float32", "cpu")]


@pytest.fixture(scope="module")
def server(models):
    with running_server(None, models=models, api_keys=["key-a", "key-b"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)


@pytest.fixture(scope="module")
def native(server):
    c = djinn.connect(server.url, api_key="key-a")
    yield c
    c.close()


@pytest.fixture(scope="module")
def ids(models):
    tok = models[0].tokenizer
    return tok.encode(tok.chat_template.render(ASK))


def streamed(oai, **kw):
    text, reasons, roles, lps = "", [], [], []
    for chunk in oai.chat.completions.create(stream=True, **kw):
        assert chunk.object == "chat.completion.chunk"
        for ch in chunk.choices:
            text += ch.delta.content or ""
            roles += [ch.delta.role] if ch.delta.role else []
            reasons += [ch.finish_reason] if ch.finish_reason else []
            lps += [e.logprob for e in ch.logprobs.content] if ch.logprobs else []
    return text, reasons, roles, lps


def test_chat_streamed_equals_whole_and_the_djinn_client(oai, native, ids):
    assert ids[0] == native.tokenize("x")[0] and ids.count(ids[0]) == 1  # the template's BOS, not doubled
    ref = native.session().generate(ids, max_new_tokens=24)
    whole = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.model == MODEL
    msg = whole.choices[0]
    assert msg.message.role == "assistant" and msg.message.content == ref.text and msg.finish_reason == "length"
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 24
    text, reasons, roles, _ = streamed(oai, model=MODEL, messages=ASK, max_completion_tokens=24, temperature=0)
    assert text == ref.text and reasons == ["length"] and roles == ["assistant"]

    kw = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=0.8, seed=7, n=2)
    a = oai.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1] and a.choices[0].message.content != a.choices[1].message.content
    assert oai.chat.completions.create(**kw).choices[1].message.content == a.choices[1].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "a class?"}]}]
    joined = [{"role": "user", "content": "What is\na class?"}]
    assert oai.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0).choices[0] \
        .message.content == oai.chat.completions.create(model=MODEL, messages=joined, max_tokens=8,
                                                        temperature=0).choices[0].message.content
    chunks = list(oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_stop_and_logprobs(oai, native, ids):
    ref = native.session().generate(ids, max_new_tokens=24, return_logits=True)
    stop = ref.text[8:11]
    out = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0, stop=stop)
    assert out.choices[0].message.content == ref.text[:ref.text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    lp = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                                     top_logprobs=4).choices[0].logprobs.content
    want = torch.log_softmax(ref.logits[:6], -1).gather(1, torch.tensor(ref.token_ids[:6])[:, None])[:, 0]
    assert torch.allclose(torch.tensor([e.logprob for e in lp]), want, atol=1e-5)
    assert "".join(e.token for e in lp) == ref.text[:len("".join(e.token for e in lp))]
    for e in lp:  # greedy: the chosen token is its position's best alternative, under the same text
        assert len(e.top_logprobs) == 4 and e.top_logprobs[0].token == e.token
        assert bytes(e.bytes) == e.token.encode()
    _, _, _, lps = streamed(oai, model=MODEL, messages=ASK, max_tokens=6, temperature=0, logprobs=True)
    assert torch.allclose(torch.tensor(lps), want, atol=1e-5)


def test_chat_steering_equals_the_djinn_client(oai, native, ids):
    vec = torch.randn(192, generator=torch.Generator().manual_seed(3))
    plain = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0)
    ext = {"djinn_interventions": [{"type": "steer", "site": SITE, "vector": vec.tolist(), "scale": 4.0}]}
    steered = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0, extra_body=ext)
    assert steered.choices[0].message.content != plain.choices[0].message.content
    same = native.session().generate(ids, max_new_tokens=16, interventions=[djinn.Steer(SITE, vec, scale=4.0)])
    assert steered.choices[0].message.content == same.text
    assert streamed(oai, model=MODEL, messages=ASK, max_tokens=16, temperature=0, extra_body=ext)[0] == same.text


def _captures(choice) -> dict:
    data = base64.b64decode(choice.model_extra["djinn_captures"]["safetensors_b64"])
    return {(k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): t for k, t in st_load(data).items()}


def test_captures_equal_the_embedded_ones(oai, ids):
    ext = {"djinn_captures": [SITE, "blocks.*.hook_mlp_out"]}
    out = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0, extra_body=ext)
    got = _captures(out.choices[0])
    local = djinn.connect()
    want = local.session().generate(ids, max_new_tokens=5, interventions=[djinn.Capture(SITE),
                                                                           djinn.Capture("blocks.*.hook_mlp_out")])
    local.close()
    assert set(got) == set(want.captures) and (SITE, 0) in got and ("blocks.3.hook_mlp_out", 4) in got
    for key, t in want.captures.items():
        assert torch.allclose(got[key], t, atol=1e-4), key
    last = [c for c in oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0,
                                                   stream=True, extra_body=ext) if c.choices][-1]
    assert last.choices[0].finish_reason and _captures(last.choices[0]).keys() == got.keys()


def test_captures_past_the_frame_limit_are_a_clear_400(models):
    with running_server(None, models=models[:1], limits=Limits(max_frame_bytes=4096)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=WAIT, json={
            "messages": ASK, "max_tokens": 4, "djinn_captures": ["blocks.*.hook_resid_post"]})
    assert r.status_code == 400 and "frame limit" in r.json()["error"]["message"]


def test_sessions_continue_and_belong_to_their_key(oai, server):
    mine = djinn.connect(server.url, api_key="key-a")
    sess = mine.session(MODEL)
    ext = {"djinn_session": sess.id}
    first = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, extra_body=ext)
    held = mine.session_by_id(sess.id).info()["n_tokens"]
    more = [{"role": "user", "content": "And a module?"}]
    second = oai.chat.completions.create(model=MODEL, messages=more, max_tokens=6, temperature=0, extra_body=ext)
    assert second.usage.prompt_tokens > 0 and second.choices[0].message.content
    assert held == first.usage.prompt_tokens + 6
    # the same call on the embedded engine, turn by turn
    tok = load_models(None, "float32", "cpu")[0].tokenizer
    local = djinn.connect()
    s = local.session()
    assert s.generate(tok.encode(tok.chat_template.render(ASK)), max_new_tokens=6).text == \
        first.choices[0].message.content
    assert s.generate(tok.encode(tok.chat_template.render(more))[1:], max_new_tokens=6).text == \
        second.choices[0].message.content
    local.close()

    other = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0)
    errors = []
    for sid in (sess.id, "no-such-session"):
        with pytest.raises(openai.NotFoundError) as info:
            other.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body={"djinn_session": sid})
        errors.append(info.value.body)
    assert errors[0]["code"] == errors[1]["code"] == "unknown_session"
    assert errors[0]["message"].replace(sess.id, "X") == errors[1]["message"].replace("no-such-session", "X")
    sess.close()
    mine.close()


def test_completions_take_sessions_and_captures(oai, server, native):
    sess = native.session(MODEL)
    ext = {"djinn_session": sess.id, "djinn_captures": [SITE]}
    a = oai.completions.create(model=MODEL, prompt="The module", max_tokens=4, temperature=0, extra_body=ext)
    b = oai.completions.create(model=MODEL, prompt=" and", max_tokens=4, temperature=0, extra_body=ext)
    ref = native.session(MODEL)
    assert ref.generate("The module", max_new_tokens=4).text == a.choices[0].text
    assert ref.generate(" and", max_new_tokens=4).text == b.choices[0].text
    assert (SITE, 0) in _captures(b.choices[0])
    c = oai.completions.create(model=MODEL, prompt=" then", max_tokens=3, temperature=0, echo=True, logprobs=2,
                               extra_body={"djinn_session": sess.id}).choices[0]
    lp = c.logprobs
    assert c.text == " then" + ref.generate(" then", max_new_tokens=3).text and "".join(lp.tokens) == c.text
    assert len(lp.tokens) == len(native.tokenize(" then", MODEL, prepend_bos=False)) + 3
    assert all(top and len(top) == 2 for top in lp.top_logprobs)  # the first prompt token's too: history before it
    sess.close()
    ref.close()


def test_a_model_without_a_template_is_a_clear_400(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="stories260K", messages=ASK, max_tokens=2)
    assert "chat template" in str(info.value) and info.value.body["param"] == "model"


BAD_BODIES = [
    ("no messages", {}),
    ("messages not a list", {"messages": "hi"}),
    ("empty messages", {"messages": []}),
    ("message not an object", {"messages": ["hi"]}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("tool role", {"messages": [{"role": "tool", "content": "hi"}]}),
    ("no content", {"messages": [{"role": "user"}]}),
    ("content a number", {"messages": [{"role": "user", "content": 3}]}),
    ("empty parts", {"messages": [{"role": "user", "content": []}]}),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("unknown message field", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}),
    ("lone surrogate", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("unknown field", {"tools": []}),
    ("temperature too high", {"temperature": 3}),
    ("top_p zero", {"top_p": 0}),
    ("negative max_tokens", {"max_tokens": -1}),
    ("max_tokens disagree", {"max_tokens": 3, "max_completion_tokens": 4}),
    ("max_completion_tokens past the limit", {"max_completion_tokens": 10 ** 9}),
    ("logprobs not a bool", {"logprobs": 3}),
    ("top_logprobs without logprobs", {"top_logprobs": 2}),
    ("top_logprobs too many", {"logprobs": True, "top_logprobs": 21}),
    ("n zero", {"n": 0}),
    ("stop too many", {"stop": ["a", "b", "c", "d", "e"]}),
    ("stream not a bool", {"stream": "yes"}),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}),
    ("penalty", {"frequency_penalty": 0.5}),
    ("logit_bias", {"logit_bias": {"5": 10}}),
    ("seed not an integer", {"seed": 1.5}),
    ("user not a string", {"user": 5}),
    ("bad intervention", {"djinn_interventions": [{"type": "explode", "site": SITE}]}),
    ("unknown site", {"djinn_interventions": [{"type": "scale", "site": "blocks.9.nope", "factor": 0.0}]}),
    ("captures not a list", {"djinn_captures": SITE}),
    ("unknown capture site", {"djinn_captures": ["nowhere"]}),
    ("session not a string", {"djinn_session": 5}),
    ("session with n", {"djinn_session": "x", "n": 2}),
    ("model without a template", {"model": "stories260K"}),
]


@pytest.mark.parametrize("name,fields", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_malformed_chat_bodies_get_openai_400s(server, oai, name, fields):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, **fields}
    if name == "no messages":
        del body["messages"]
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body).encode(), timeout=WAIT,
                   headers={"Authorization": "Bearer key-a", "Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert err["code"] in djinn.errors.ERRORS_BY_CODE
    # and the server carries on
    assert oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0).choices[0]


def test_readme_openai_example_runs_as_written(models):
    section = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(from openai import OpenAI\n.*?)```", section, re.S).group(1)
    with running_server(None, models=models[:1]) as srv:
        exec(code.replace("http://127.0.0.1:8421", srv.url), {})
        ids = [m.id for m in openai.OpenAI(base_url=srv.url + "/v1", api_key="unused").models.list()]
    assert ids == [MODEL] and f'model="{MODEL}"' in code


def test_serve_help_shows_every_default():
    from djinn.cli import _parser

    serve = next(a for a in _parser()._actions if a.dest == "command").choices["serve"]
    for action in serve._actions:
        if action.dest != "help":
            assert "(default: " in (action.help or ""), action.option_strings
    assert "default: 8421" in serve.format_help()
