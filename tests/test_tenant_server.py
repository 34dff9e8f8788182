"""Two API keys on one loopback server, one of them hostile: its overflowing edits, NaN-producing
replacements and out-of-range parameters fail its own calls with typed errors while the other key's
concurrent, batched calls get exactly their solo tokens; it cannot hold the KV pool against the other key;
and a call that fits waits for memory instead of being refused."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

import djinn
from serverutil import WAIT, running_server

HOSTILE, VICTIM = "hostile-key", "victim-key"
PROMPTS = ["Once upon a time", "The dog ran", "She was happy and", "One day, a little girl", "Tom had a red"]
N_NEW = 16
SITE = "blocks.0.hook_resid_post"


def raw(srv, key: str, method: str, path: str, body=None) -> httpx.Response:
    return httpx.request(method, srv.url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=WAIT)


def hostile_bodies() -> list[dict]:
    """Generate bodies that each fail alone: in the engine's step (overflows) or before it (parameters)."""
    big = [3e38] * 64
    return [
        {"prompt": "Once upon", "max_new_tokens": 8,
         "interventions": [{"type": "scale", "site": SITE, "factor": 1e38}]},
        {"prompt": "Once upon", "max_new_tokens": 8,  # two finite steers whose sum is not: NaN downstream
         "interventions": [{"type": "steer", "site": "blocks.1.hook_attn_out", "vector": big},
                           {"type": "steer", "site": "blocks.1.hook_attn_out", "vector": big}]},
        {"prompt": "Once upon", "max_new_tokens": 8,
         "interventions": [{"type": "steer", "site": "ln_final.hook_out", "vector": big}]},
        {"prompt": "Once upon", "max_new_tokens": 8, "interventions": [
            {"type": "replace", "site": SITE, "tensor": [1e300] * 64}]},  # finite in JSON, not in float32
        {"prompt": "Once upon", "max_new_tokens": 8, "temperature": 1.0, "top_k": 2 ** 64 - 1},
        {"prompt": "Once upon", "max_new_tokens": 8, "temperature": 10 ** 400},
        {"prompt": "Once upon", "max_new_tokens": 8, "temperature": 0.5, "top_p": 0.0},
        {"prompt": "Once upon", "max_new_tokens": 8, "temperature": 0.5, "seed": 2 ** 80},
        {"prompt": "Once upon", "max_new_tokens": 8, "interventions": [
            {"type": "steer", "site": SITE, "vector": [1.0] * 64, "scale": 10 ** 400}]},
    ]


def test_a_hostile_key_cannot_change_another_keys_tokens(stories_path):
    with running_server(stories_path, api_keys=[HOSTILE, VICTIM]) as srv:
        victim = djinn.connect(srv.url, api_key=VICTIM)
        solo = {p: victim.session().generate(p, max_new_tokens=N_NEW).token_ids for p in PROMPTS}
        stop = threading.Event()
        hostile_codes: list[tuple[int, str]] = []

        def attack() -> None:
            sid = raw(srv, HOSTILE, "POST", "/api/sessions").json()["id"]
            bodies = hostile_bodies()
            i = 0
            while not stop.is_set() or i < len(bodies):
                r = raw(srv, HOSTILE, "POST", f"/api/sessions/{sid}/generate", bodies[i % len(bodies)])
                hostile_codes.append((r.status_code, r.json().get("error", {}).get("code", "ok")))
                i += 1

        got: dict[tuple[int, str], list[int]] = {}

        def victim_run(worker: int) -> None:
            client = djinn.connect(srv.url, api_key=VICTIM)
            for rnd in range(3):
                for p in PROMPTS:
                    s = client.session()
                    got[(worker * 10 + rnd, p)] = s.generate(p, max_new_tokens=N_NEW).token_ids
                    s.close()

        attackers = [threading.Thread(target=attack) for _ in range(2)]
        victims = [threading.Thread(target=victim_run, args=(w,)) for w in range(3)]
        for t in attackers + victims:
            t.start()
        for t in victims:
            t.join(timeout=WAIT)
        stop.set()
        for t in attackers:
            t.join(timeout=WAIT)

        compared = sum(len(v) for v in got.values())
        agree = sum(a == b for (_, p), v in got.items() for a, b in zip(v, solo[p]))
        assert len(got) == 3 * 3 * len(PROMPTS) and agree == compared, f"{agree}/{compared} tokens agree"
        assert hostile_codes and all(400 <= status < 500 for status, _ in hostile_codes), hostile_codes
        codes = {code for _, code in hostile_codes}
        assert {"non_finite", "invalid_tensor", "invalid_request"} <= codes, codes
        print(f"victim tokens agreeing with their solo runs: {agree}/{compared}; hostile calls: "
              f"{len(hostile_codes)}, codes {sorted(codes)}")
        # the hostile key's session is intact and usable with sane input
        sid = raw(srv, HOSTILE, "POST", "/api/sessions").json()["id"]
        ok = raw(srv, HOSTILE, "POST", f"/api/sessions/{sid}/generate", {"prompt": "Once upon", "max_new_tokens": 4})
        assert ok.status_code == 200 and len(ok.json()["token_ids"]) == 4


def test_one_key_cannot_lock_another_out_of_the_pool(stories_path):
    # 16 device + 16 host blocks, half of them each key's
    with running_server(stories_path, api_keys=[HOSTILE, VICTIM], kv_blocks=16, host_kv_blocks=16,
                        kv_share_per_key=0.5) as srv:
        hostile = djinn.connect(srv.url, api_key=HOSTILE)
        held = []
        with pytest.raises(djinn.LimitExceeded, match="of its 16"):
            for _ in range(32):  # idle sessions, each holding its blocks, until the key's share is used up
                s = hostile.session()
                s.generate("Once upon a time", max_new_tokens=40)
                held.append(s)
        per = {h.info()["n_device_blocks"] + h.info()["n_host_blocks"] for h in held}
        assert len(per) == 1 and len(held) == 16 // per.pop()  # as many as the share holds, not one more
        victim = djinn.connect(srv.url, api_key=VICTIM)
        outs = [victim.session().generate(p, max_new_tokens=40).token_ids for p in PROMPTS[:3]]
        assert all(len(o) == 40 for o in outs)


def test_a_call_that_fits_waits_for_memory_over_the_server(stories_path):
    # 4 device blocks, no host pool: a session paused on 48 tokens holds 3 and cannot be swapped out
    with running_server(stories_path, api_keys=[HOSTILE, VICTIM], kv_blocks=4, host_kv_blocks=0,
                        queue_timeout=60.0) as srv:
        victim = djinn.connect(srv.url, api_key=VICTIM)
        first = victim.session()
        expected = first.generate("Once upon a time", max_new_tokens=40).token_ids
        first.close()
        hostile = djinn.connect(srv.url, api_key=HOSTILE)
        holder = hostile.session()
        holder.generate("Once upon a time", max_new_tokens=40)
        stream = holder.stream(" and", max_new_tokens=2, breakpoints=[djinn.Breakpoint(SITE)])
        assert isinstance(next(iter(stream)), djinn.Paused)
        result: dict = {}
        waiter = victim.session()
        t = threading.Thread(target=lambda: result.setdefault(
            "ids", waiter.generate("Once upon a time", max_new_tokens=40).token_ids))
        t.start()
        deadline = time.monotonic() + WAIT
        while waiter.info().get("queue_position") != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert waiter.info()["queue_position"] == 1
        metrics = httpx.get(srv.url + "/metrics", timeout=WAIT).text
        assert 'djinn_requests_waiting{model="stories260K"} 1.0' in metrics
        holder.close()
        t.join(timeout=WAIT)
        assert result["ids"] == expected
