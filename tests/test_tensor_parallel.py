"""Tensor parallelism over 2 CPU ranks (gloo): the same logits, captures, pauses, edits, checkpoints and
forks as one process, and a lost rank fails the next call with a typed error instead of hanging."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import djinn
from djinn.errors import InvalidRequest, RankFailed
from djinn.models.config import ModelConfig
from djinn.models.loading import load_random
from djinn.parallel.shard import check_shardable

TOL = 1e-5
PROMPT = [3, 17, 42, 5, 99, 7, 21, 64, 8, 130, 11]
CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=200, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_mlp=128,
                        max_seq_len=128, tie_embeddings=True, norm="layer", gated_mlp=False, mlp_act="gelu_tanh"),
    "llama-gqa": ModelConfig(family="llama", vocab_size=200, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_mlp=96, max_seq_len=128, qkv_bias=True),
    "mixtral": ModelConfig(family="llama", vocab_size=200, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64,
                           max_seq_len=128, n_experts=4, experts_per_token=2, arch="mixtral"),
}


def _model(name: str):
    # weights larger than load_random's (std 0.02) so that greedy decoding moves between tokens
    m = load_random(CONFIGS[name], torch.float32, torch.device("cpu"), seed=7, name=name)
    with torch.no_grad():
        for p in m.model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return m


# (first: one process holds one tensor-parallel group at a time, and the module's pairs hold one each)

def test_swapped_session_comes_back_on_every_rank():
    """A pool of few blocks swaps sessions out and in: every rank's shard moves with them."""
    results = []
    for tp in (1, 2):
        c = djinn.connect(model=_model("llama-gqa"), kv_blocks=4, host_kv_blocks=16, block_size=8,
                          tensor_parallel=tp, queue_timeout=10)
        try:
            a, b = c.session(), c.session()
            a.generate(PROMPT, max_new_tokens=4)
            b.generate(PROMPT[::-1], max_new_tokens=12)  # needs the blocks a holds: a goes to the host
            ck = a.checkpoint()  # of a swapped session: host to host
            results.append([a.generate([5], max_new_tokens=8, return_logits=True),
                            ck.restore().generate([5], max_new_tokens=8, return_logits=True)])
        finally:
            c.close()
    (a1, r1), (a2, r2) = results
    assert a1.token_ids == r1.token_ids == a2.token_ids == r2.token_ids
    _close(a1.logits, a2.logits)
    _close(r1.logits, r2.logits)


def test_experts_split_by_columns_match_one_process():
    caps = [djinn.Capture("blocks.0.mlp.hook_expert_weights"), djinn.Capture("blocks.1.hook_mlp_out")]
    knock_out = djinn.Replace("blocks.1.mlp.hook_expert_weights", torch.tensor([0.5, 0.5, 0.0, 0.0]))
    results = []
    for tp in (1, 2):
        c = djinn.connect(model=_model("mixtral"), kv_blocks=32, tensor_parallel=tp)
        try:
            s = c.session()
            results.append([s.generate(PROMPT, max_new_tokens=12, return_logits=True, interventions=caps),
                            c.session().generate(PROMPT, max_new_tokens=4, return_logits=True,
                                                 interventions=[knock_out])])
        finally:
            c.close()
    for a, b in zip(*results):
        assert a.token_ids == b.token_ids
        _close(a.logits, b.logits)
        for key in a.captures:
            _close(a.captures[key], b.captures[key])


def test_unshardable_model_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="n_kv_heads divisible by 4"):
        check_shardable(CONFIGS["llama-gqa"], 4)


def test_a_lost_rank_fails_the_next_call_with_a_typed_error():
    c = djinn.connect(model=_model("gpt2"), kv_blocks=16, tensor_parallel=2)
    try:
        s = c.session()
        s.generate(PROMPT, max_new_tokens=2)
        leader = c._backend.service.engine.workers["gpt2"].model.tp.leader
        os.kill(leader.processes[0].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RankFailed, match="rank 1"):
            s.generate(PROMPT, max_new_tokens=2)
        with pytest.raises(RankFailed):
            c.session().generate(PROMPT, max_new_tokens=2)
        assert time.monotonic() - started < 10
    finally:
        c.close()


@pytest.fixture(scope="module", params=[("gpt2", False), ("llama-gqa", False), ("gpt2", True), ("llama-gqa", True)],
                ids=["gpt2", "llama-gqa", "gpt2-graphs", "llama-gqa-graphs"])
def pair(request):
    """(single-process client, 2-rank client) over the same weights; with graphs, both step through the CUDA
    graphs' executor (without a GPU nothing is captured: its bookkeeping, cuts and collectives run as on one)."""
    name, graphs = request.param
    one = djinn.connect(model=_model(name), kv_blocks=64, cuda_graphs=graphs)
    two = djinn.connect(model=_model(name), kv_blocks=64, tensor_parallel=2, cuda_graphs=graphs)
    yield one, two
    two.close()
    one.close()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    a, b = a.float(), b.float()
    assert torch.equal(torch.isinf(a), torch.isinf(b))  # masked scores are -inf alike
    assert (a - b).nan_to_num(0.0).abs().max().item() <= TOL


def _worker(client):
    (worker,) = client._backend.service.engine.workers.values()
    return worker


def test_logits_match_one_process_over_prefill_and_32_decode_steps(pair):
    one, two = pair
    graphs = _worker(two).runner.graphs
    recorded = graphs and len(graphs._graphs)
    a = one.session().generate(PROMPT, max_new_tokens=33, return_logits=True)
    b = two.session().generate(PROMPT, max_new_tokens=33, return_logits=True)
    assert a.token_ids == b.token_ids
    assert len(set(a.token_ids)) > 3  # the model decodes more than one token over and over
    _close(a.logits, b.logits)
    if graphs is not None:  # the prompt's step went through the graphs' executor: its segment was recorded
        assert len(graphs._graphs) > recorded


def test_captures_at_every_site_match_one_process(pair):
    one, two = pair
    names = [s.name for s in one.models()[0].sites]
    assert [s.name for s in two.models()[0].sites] == names
    kinds = {"attn.hook_q", "attn.hook_k", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "mlp.hook_post",
             "hook_resid_post", "ln1.hook_scale"}
    assert all(any(n.endswith(k) for n in names) for k in kinds)
    caps = [djinn.Capture(n, steps=[0, 2]) for n in names]
    a = one.session().generate(PROMPT, max_new_tokens=3, interventions=caps)
    b = two.session().generate(PROMPT, max_new_tokens=3, interventions=caps)
    assert a.captures.keys() == b.captures.keys() and len(a.captures) == 2 * len(names)
    for key in a.captures:
        _close(a.captures[key], b.captures[key])


def test_weights_read_whole(pair):
    one, two = pair
    for name in ("blocks.0.attn.W_Q", "blocks.1.attn.W_K", "blocks.0.attn.W_O", "blocks.1.mlp.W_out", "W_U"):
        assert torch.equal(one.weight(name), two.weight(name))


def _stream(sess, breakpoints, edit=None, **params):
    pauses, result = [], None
    for ev in sess.stream(PROMPT, max_new_tokens=6, return_logits=True, breakpoints=breakpoints, **params):
        if isinstance(ev, djinn.Paused):
            pauses.append(ev)
            ev.resume(None if edit is None else edit(ev))
        elif isinstance(ev, djinn.Done):
            result = ev.result
    return result, pauses


@pytest.mark.parametrize("site", ["blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_post",
                                  "blocks.1.hook_resid_mid", "blocks.0.attn.hook_q"])
def test_unmodified_pause_is_bit_identical_to_no_pause(pair, site):
    one, two = pair
    plain = two.session().generate(PROMPT, max_new_tokens=6, return_logits=True)
    paused, pauses = _stream(two.session(), [djinn.Breakpoint(site, steps=[0, 1, 4])])
    assert [p.step for p in pauses] == [0, 1, 4]
    assert paused.token_ids == plain.token_ids
    assert torch.equal(paused.logits, plain.logits)
    # and the paused value is the whole one, as one process shows it
    _, ref = _stream(one.session(), [djinn.Breakpoint(site, steps=[0])])
    _close(pauses[0].activation, ref[0].activation)


def _head_mask(shape: tuple, head: int, factor: float) -> torch.Tensor:
    mask = torch.ones(shape)
    mask[head] = factor
    return mask


@pytest.mark.parametrize("edit", ["scale_z", "replace_pattern", "resume_z", "resume_pattern", "resume_post"])
def test_edited_per_head_and_neuron_values_match_one_process(pair, edit):
    one, two = pair
    cfg = one.models()[0]
    results = []
    for client in pair:
        s = client.session()
        if edit == "scale_z":  # knock out the last head (held by rank 1)
            out = s.generate(PROMPT, max_new_tokens=5, return_logits=True, interventions=[
                djinn.Scale("blocks.0.attn.hook_z", _head_mask((cfg.n_heads, cfg.d_head), cfg.n_heads - 1, 0.0))])
        elif edit == "replace_pattern":  # every query of the prompt attends to the first position only
            pattern = torch.zeros(cfg.n_heads, len(PROMPT))
            pattern[:, 0] = 1.0
            out = s.generate(PROMPT, max_new_tokens=5, return_logits=True, interventions=[
                djinn.Replace("blocks.1.attn.hook_pattern", pattern, steps=[0])])
        else:
            site = {"resume_z": "blocks.1.attn.hook_z", "resume_pattern": "blocks.0.attn.hook_pattern",
                    "resume_post": "blocks.1.mlp.hook_post"}[edit]
            out, _ = _stream(s, [djinn.Breakpoint(site, steps=[0, 2])], edit=lambda ev: ev.activation.flip(-1) * 0.5)
        results.append(out)
    a, b = results
    assert a.token_ids == b.token_ids
    _close(a.logits, b.logits)
    plain = one.session().generate(PROMPT, max_new_tokens=5, return_logits=True)
    assert not torch.allclose(plain.logits[:1], a.logits[:1])  # the edit did something


def test_checkpoint_restore_and_fork_continue_as_one_process(pair):
    outs = []
    for client in pair:
        s = client.session()
        s.generate(PROMPT, max_new_tokens=4)
        ck = s.checkpoint()
        f = s.fork()
        first = s.generate([9, 4], max_new_tokens=6, return_logits=True)
        restored = ck.restore().generate([9, 4], max_new_tokens=6, return_logits=True)
        forked = f.generate([9, 4], max_new_tokens=6, return_logits=True)
        assert restored.token_ids == first.token_ids == forked.token_ids
        assert torch.equal(restored.logits, first.logits) and torch.equal(forked.logits, first.logits)
        outs.append(first)
    _close(outs[0].logits, outs[1].logits)
