"""Every hook site against transformers on the same weights (float32, CPU): GPT-2 (learned positions,
LayerNorm), Llama (GQA, rotary) and Mistral (GQA, rotary, a sliding window shorter than the sequence).

The reference values come from transformers' own forward with hooks on its modules (norm inputs, the q/k/v
projections, o_proj's and down_proj's inputs, the MLP activation) and its eager attention weights
(`output_attentions`); where transformers keeps a value inside a function, the test derives it from the
hooked values by TransformerLens's definition (norm scales, rotary q/k, masked scores, per-head results).
Each site is captured at the prefill and at decode steps, and compared to <= 1e-4.

Then, at the detail sites (values the fused kernels never materialise): edits equal the same edit made by a
forward hook in transformers; an unmodified pause is bit-identical to an uninterrupted run; a pause resumed
with a new value equals a Replace of that value; bad edits get typed errors and lose nothing.
"""
from __future__ import annotations

import threading

import pytest
import torch

import djinn
from djinn.sites import DETAIL

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from test_parity_hf import _make_hf, _save  # noqa: E402

TOL = 1e-4
PROMPT = [5, 17, 33, 2, 250, 9, 41, 77, 123, 8, 60, 199]  # 12 tokens: longer than Mistral's window of 8
NEW = 4  # greedy tokens: the prefill and decode steps 1..3 are compared
FAMILIES = ["gpt2", "llama", "mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    hf = _make_hf(request.param, seed=3)
    return request.param, hf, _save(hf, tmp_path_factory.mktemp(request.param), "safetensors")


@pytest.fixture(scope="module")
def family(checkpoint):
    name, hf, folder = checkpoint
    client = djinn.connect(model=str(folder), dtype="float32", device="cpu")
    yield name, hf, client
    client.close()


def _layers(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


@torch.no_grad()
def hf_sites(name: str, hf, ids: list[int], edit=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every site's value over one causal forward of `ids` ([T, ...]; patterns and scores [n_heads, T, T]),
    and the logits. `edit`: (site, fn) changes that site's value in the forward, as a hook would."""
    gpt2, cfg = name == "gpt2", hf.config
    n_heads = cfg.n_head if gpt2 else cfg.num_attention_heads
    n_kv = n_heads if gpt2 else cfg.num_key_value_heads
    d_model = cfg.n_embd if gpt2 else cfg.hidden_size
    d_head, eps = d_model // n_heads, (cfg.layer_norm_epsilon if gpt2 else cfg.rms_norm_eps)
    T = len(ids)
    vals: dict[str, torch.Tensor] = {}
    handles = []

    def keep(site, value):
        if edit is not None and edit[0] == site:
            value = edit[1](value)
        vals[site] = value
        return value

    def on_input(site, module, reshape=None):
        def pre(mod, args):
            x = args[0][0]
            kept = keep(site, x if reshape is None else x.view(T, *reshape))
            return (kept.reshape(1, *x.shape),) + tuple(args[1:])
        handles.append(module.register_forward_pre_hook(pre))

    def on_output(site, module, reshape=None, part=None):
        def post(mod, args, out):
            y = out[0] if part is None else out[0][..., part]
            kept = keep(site, y if reshape is None else y.view(T, *reshape))
            if part is None:
                return kept.reshape(1, *out.shape[1:])
            new = out.clone()
            new[0][..., part] = kept.reshape(T, -1)
            return new
        handles.append(module.register_forward_hook(post))

    def norm(site, module, rms):
        def pre(mod, args):  # scale, then normalized from the (edited) scale, then the weight and bias
            x = args[0][0]
            h = x if rms else x - x.mean(-1, keepdim=True)
            scale = keep(f"{site}.hook_scale", (h.pow(2).mean(-1, keepdim=True) + eps).sqrt())
            normalized = keep(f"{site}.hook_normalized", h / scale)
            bias = getattr(mod, "bias", None)
            vals[f"_{site}_out"] = normalized * mod.weight + (0 if bias is None else bias)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(lambda mod, args, out: vals.pop(f"_{site}_out")[None]))

    q_size = n_heads * d_head
    for i, layer in enumerate(_layers(hf)):
        b = f"blocks.{i}"
        if gpt2:
            norm(f"{b}.ln1", layer.ln_1, False)
            on_output(f"{b}.attn.hook_q", layer.attn.c_attn, (n_heads, d_head), slice(0, q_size))
            on_output(f"{b}.attn.hook_k", layer.attn.c_attn, (n_heads, d_head), slice(q_size, 2 * q_size))
            on_output(f"{b}.attn.hook_v", layer.attn.c_attn, (n_heads, d_head), slice(2 * q_size, 3 * q_size))
            on_input(f"{b}.attn.hook_z", layer.attn.c_proj, (n_heads, d_head))
            norm(f"{b}.ln2", layer.ln_2, False)
            on_output(f"{b}.mlp.hook_pre", layer.mlp.c_fc)
            on_output(f"{b}.mlp.hook_post", layer.mlp.act)
            out_proj, mlp_out = layer.attn.c_proj, layer.mlp
        else:
            norm(f"{b}.ln1", layer.input_layernorm, True)
            on_output(f"{b}.attn.hook_q", layer.self_attn.q_proj, (n_heads, d_head))
            on_output(f"{b}.attn.hook_k", layer.self_attn.k_proj, (n_kv, d_head))
            on_output(f"{b}.attn.hook_v", layer.self_attn.v_proj, (n_kv, d_head))
            on_input(f"{b}.attn.hook_z", layer.self_attn.o_proj, (n_heads, d_head))
            norm(f"{b}.ln2", layer.post_attention_layernorm, True)
            on_output(f"{b}.mlp.hook_pre", layer.mlp.gate_proj)
            on_output(f"{b}.mlp.hook_pre_linear", layer.mlp.up_proj)
            on_input(f"{b}.mlp.hook_post", layer.mlp.down_proj)
            out_proj, mlp_out = layer.self_attn.o_proj, layer.mlp
        handles.append(out_proj.register_forward_hook(
            lambda m, a, o, b=b: vals.__setitem__(f"{b}.hook_attn_out", o[0])))
        handles.append(mlp_out.register_forward_hook(lambda m, a, o, b=b: vals.__setitem__(f"{b}.hook_mlp_out", o[0])))
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, b=b: vals.__setitem__(f"{b}.hook_resid_pre", (a[0] if a else k["hidden_states"])[0]),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, k, o, b=b: vals.__setitem__(f"{b}.hook_resid_post", (o[0] if isinstance(o, tuple) else o)[0]),
            with_kwargs=True))
    final = hf.transformer.ln_f if gpt2 else hf.model.norm
    norm("ln_final", final, not gpt2)
    handles.append(final.register_forward_hook(lambda m, a, o: vals.__setitem__("ln_final.hook_out", o[0])))
    if gpt2:
        on_output("hook_embed", hf.transformer.wte)
        on_output("hook_pos_embed", hf.transformer.wpe)
    try:
        out = hf(torch.tensor([ids]), use_cache=False, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    if not gpt2:
        vals["hook_embed"] = vals["blocks.0.hook_resid_pre"]
    cos, sin = (None, None) if gpt2 else hf.model.rotary_emb(vals["hook_embed"][None], torch.arange(T)[None])
    window = getattr(cfg, "sliding_window", None)
    for i, layer in enumerate(_layers(hf)):
        b = f"blocks.{i}"
        vals[f"{b}.hook_resid_mid"] = vals[f"{b}.hook_resid_pre"] + vals[f"{b}.hook_attn_out"]
        q, k = vals[f"{b}.attn.hook_q"], vals[f"{b}.attn.hook_k"]
        if not gpt2:
            rq, rk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
            q, k = vals[f"{b}.attn.hook_rot_q"], vals[f"{b}.attn.hook_rot_k"] = rq[0].transpose(0, 1), rk[0].transpose(0, 1)
        keys = k.repeat_interleave(n_heads // n_kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) / d_head ** 0.5
        pos = torch.arange(T)
        seen = pos[None, :] <= pos[:, None]
        if window:
            seen &= pos[:, None] - pos[None, :] < window
        vals[f"{b}.attn.hook_attn_scores"] = scores.masked_fill(~seen, float("-inf"))
        vals[f"{b}.attn.hook_pattern"] = out.attentions[i][0]
        w = (layer.attn.c_proj.weight.T if gpt2 else layer.self_attn.o_proj.weight).view(d_model, n_heads, d_head)
        vals[f"{b}.attn.hook_result"] = torch.einsum("thd,mhd->thm", vals[f"{b}.attn.hook_z"], w)
    return vals, out.logits[0]


def _step_value(site: str, hf_value: torch.Tensor, positions: slice) -> torch.Tensor:
    """The reference of one step's capture: its query positions (and keys up to the last of them)."""
    if site.endswith(("hook_pattern", "hook_attn_scores")):
        return hf_value[:, positions, : positions.stop]
    return hf_value[positions]


def worst_differences(out, ref: dict[str, torch.Tensor], sites: list[str]) -> dict[str, float]:
    """Each site's largest |difference| between the captures of a PROMPT + NEW generation and the reference's
    values over one forward, at every step (shapes and where values are infinite must agree)."""
    worst = {}
    for site in sites:
        for step in range(NEW):
            got = out.captures[(site, step)].float()
            lo = 0 if step == 0 else len(PROMPT) + step - 1
            want = _step_value(site, ref[site], slice(lo, len(PROMPT) + step))
            assert got.shape == want.shape, (site, step, got.shape, want.shape)
            finite = torch.isfinite(want)
            assert (torch.isfinite(got) == finite).all(), (site, step)
            worst[site] = max(worst.get(site, 0.0), (got[finite] - want[finite]).abs().max().item())
    return worst


def test_every_site_equals_transformers_at_the_prefill_and_decode_steps(family):
    name, hf, client = family
    sites = [s.name for s in client.models()[0].sites]
    out = client.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[],
                                    interventions=[djinn.Capture("*")])
    ref, logits = hf_sites(name, hf, PROMPT + out.token_ids[:-1])
    assert out.token_ids == logits[len(PROMPT) - 1:].argmax(-1).tolist()
    assert set(sites) <= set(ref)
    bad = {s: d for s, d in worst_differences(out, ref, sites).items() if d > TOL}
    assert not bad, f"sites that differ from transformers by more than {TOL}: {bad}"
    # the detail sites are all there, and in forward order
    detail = [s.name for s in client.models()[0].sites if s.kind == DETAIL]
    assert "blocks.0.attn.hook_pattern" in detail and "blocks.1.mlp.hook_post" in detail
    assert ("blocks.0.attn.hook_rot_q" in detail) == (name != "gpt2")
    assert sites.index("blocks.0.ln1.hook_scale") < sites.index("blocks.0.attn.hook_q") \
        < sites.index("blocks.0.attn.hook_pattern") < sites.index("blocks.0.attn.hook_z") \
        < sites.index("blocks.0.attn.hook_result") < sites.index("blocks.0.hook_attn_out")


EDITS = [  # (site, a djinn edit, the same edit on the reference's [T, ...] value)
    ("blocks.0.mlp.hook_post", djinn.Ablate("blocks.0.mlp.hook_post"), lambda x: torch.zeros_like(x)),
    ("blocks.1.mlp.hook_pre", djinn.Scale("blocks.1.mlp.hook_pre", 1.5), lambda x: x * 1.5),
    ("blocks.1.attn.hook_v", djinn.Scale("blocks.1.attn.hook_v", 3.0), lambda x: x * 3.0),
    ("blocks.0.attn.hook_k", djinn.Scale("blocks.0.attn.hook_k", -1.0), lambda x: -x),
    ("blocks.0.ln1.hook_scale", djinn.Scale("blocks.0.ln1.hook_scale", 2.0), lambda x: x * 2.0),
    ("blocks.1.ln2.hook_normalized", djinn.Scale("blocks.1.ln2.hook_normalized", 0.5), lambda x: x * 0.5),
    ("ln_final.hook_scale", djinn.Scale("ln_final.hook_scale", 0.5), lambda x: x * 0.5),
]


@pytest.mark.parametrize("site, edit, fn", EDITS, ids=[e[0] for e in EDITS])
def test_edits_inside_an_op_equal_the_same_edit_by_a_forward_hook(family, site, edit, fn):
    """At every step, prefill and decode (so the edited keys and values were cached as the hook's were)."""
    name, hf, client = family
    out = client.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], return_logits=True,
                                    interventions=[edit])
    ids = PROMPT + out.token_ids[:-1]
    _, logits = hf_sites(name, hf, ids, edit=(site, fn))
    _, plain = hf_sites(name, hf, ids)
    want = logits[len(PROMPT) - 1:]
    diff = (out.logits.float() - want).abs().max().item()
    assert diff <= TOL, f"{site}: logits differ from the hooked forward by {diff:.3g}"
    assert (want - plain[len(PROMPT) - 1:]).abs().max() > 1e-3  # the edit does something


def test_knocking_out_a_key_position_in_the_pattern_changes_what_attention_computes(family):
    """A per-head, per-key Scale of the pattern at the prefill: z becomes the edited pattern times v, and the
    rest of the forward follows from that z."""
    name, hf, client = family
    T, n_heads = len(PROMPT), client.models()[0].n_heads
    factor = torch.ones(n_heads, T)
    factor[1, 0] = 0.0  # head 1 no longer reads position 0
    site = "blocks.1.attn.hook_pattern"
    out = client.session().generate(PROMPT, max_new_tokens=1, stop_tokens=[], return_logits=True,
                                    interventions=[djinn.Scale(site, factor, steps=[0]), djinn.Capture(site),
                                                   djinn.Capture("blocks.1.attn.hook_z")])
    ref, _ = hf_sites(name, hf, PROMPT)
    v = ref["blocks.1.attn.hook_v"]
    v = v.repeat_interleave(n_heads // v.shape[1], 1)
    z = torch.einsum("hqk,khd->qhd", ref[site] * factor[:, None, :], v)
    _, logits = hf_sites(name, hf, PROMPT, edit=("blocks.1.attn.hook_z", lambda _: z))
    assert (out.captures[(site, 0)][1, :, 0] == 0).all()
    assert (out.captures[("blocks.1.attn.hook_z", 0)] - z).abs().max() <= TOL
    assert (out.logits[0] - logits[-1]).abs().max() <= TOL


@pytest.mark.parametrize("site", ["blocks.1.ln1.hook_normalized", "blocks.0.attn.hook_k", "blocks.1.attn.hook_pattern",
                                  "blocks.0.attn.hook_result", "blocks.1.mlp.hook_post", "ln_final.hook_scale"])
def test_an_unmodified_pause_inside_an_op_is_bit_identical(family, site):
    name, hf, client = family
    plain = client.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], return_logits=True)
    s = client.session()
    seen = []
    for ev in s.stream(PROMPT, max_new_tokens=NEW, stop_tokens=[], return_logits=True,
                       breakpoints=[djinn.Breakpoint(site, steps=[0, 2])]):
        if isinstance(ev, djinn.Paused):
            seen.append((ev.site, ev.step, tuple(ev.activation.shape)))
            ev.resume()
        elif isinstance(ev, djinn.Done):
            result = ev.result
    assert [x[:2] for x in seen] == [(site, 0), (site, 2)]
    assert result.token_ids == plain.token_ids and torch.equal(result.logits, plain.logits)


@pytest.mark.parametrize("site", ["blocks.0.attn.hook_q", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_pre",
                                  "blocks.1.attn.hook_result"])
def test_a_pause_resumed_with_a_new_value_equals_replacing_it(family, site):
    name, hf, client = family
    s = client.session()
    got = None
    for ev in s.stream(PROMPT, max_new_tokens=2, stop_tokens=[], return_logits=True,
                       breakpoints=[djinn.Breakpoint(site, steps=[1])],
                       interventions=[djinn.Capture(site, steps=[1])]):
        if isinstance(ev, djinn.Paused):
            new = ev.activation * 0.5
            ev.resume(new)
        elif isinstance(ev, djinn.Done):
            got = ev.result
    replaced = client.session().generate(PROMPT, max_new_tokens=2, stop_tokens=[], return_logits=True,
                                         interventions=[djinn.Scale(site, 0.5, steps=[1])])
    assert got.token_ids[0] == replaced.token_ids[0]
    assert (got.logits - replaced.logits).abs().max() <= TOL
    plain = client.session().generate(PROMPT, max_new_tokens=2, stop_tokens=[], return_logits=True)
    assert (got.logits[1] - plain.logits[1]).abs().max() > 1e-4


def test_two_pauses_inside_one_op_and_the_captures_after_them(family):
    name, hf, client = family
    sites = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_pattern"]
    plain = client.session().generate(PROMPT, max_new_tokens=2, stop_tokens=[], return_logits=True,
                                      interventions=[djinn.Capture("blocks.1.attn.*")])
    seen, result = [], None
    for ev in client.session().stream(PROMPT, max_new_tokens=2, stop_tokens=[], return_logits=True,
                                      breakpoints=[djinn.Breakpoint(s, steps=[1]) for s in sites],
                                      interventions=[djinn.Capture("blocks.1.attn.*")]):
        if isinstance(ev, djinn.Paused):
            seen.append(ev.site)
            ev.resume()
        elif isinstance(ev, djinn.Done):
            result = ev.result
    assert seen == sites
    assert torch.equal(result.logits, plain.logits)
    assert sorted(result.captures) == sorted(plain.captures)
    for key, value in plain.captures.items():
        assert torch.allclose(result.captures[key], value, rtol=0, atol=TOL), key  # -inf (masked scores) included


def test_bad_edits_inside_an_op_get_typed_errors_and_lose_nothing(family):
    name, hf, client = family
    s = client.session()
    before = s.generate(PROMPT, max_new_tokens=2, stop_tokens=[]).token_ids
    info = client.models()[0]
    with pytest.raises(djinn.InvalidTensor):  # a head count that is not the model's
        s.set_interventions([djinn.Scale("blocks.0.attn.hook_pattern", torch.ones(info.n_heads + 1, 3))])
    with pytest.raises(djinn.InvalidTensor):  # the history's length is known in the step: the row fails alone
        s.generate([1, 2], max_new_tokens=1, interventions=[
            djinn.Scale("blocks.0.attn.hook_pattern", torch.ones(info.n_heads, 7))])
    with pytest.raises(djinn.UnknownSite):
        s.generate([1], max_new_tokens=1, interventions=[djinn.Capture("blocks.0.attn.hook_nope")])
    assert s.generate([3], max_new_tokens=2, stop_tokens=[]).token_ids  # the session carries on
    again = client.session().generate(PROMPT, max_new_tokens=2, stop_tokens=[]).token_ids
    assert again == before


def test_decode_steps_from_graphs_keep_patterns_and_scores_as_the_eager_path(checkpoint, family, monkeypatch):
    """A row reading patterns and scores at every layer stays in the graphs' decode steps (the kernel keeps
    its scores), with the eager path's values; a row beside it reading nothing gets its solo tokens."""
    name, hf, folder = checkpoint
    eager = family[2]
    with djinn.connect(model=str(folder), dtype="float32", device="cpu", cuda_graphs=True) as graphs:
        keeper = next(iter(graphs._backend.service.engine.workers.values())).runner.graphs
        served = []
        real = keeper._take_scores
        monkeypatch.setattr(keeper, "_take_scores", lambda plan, out: (served.append(len(plan.rows)),
                                                                       real(plan, out)))
        solo = graphs.session().generate(PROMPT[::-1], max_new_tokens=24, stop_tokens=[], return_logits=True)
        items = [djinn.Capture("blocks.*.attn.hook_pattern"), djinn.Capture("blocks.*.attn.hook_attn_scores",
                                                                            steps=[1, 3])]
        beside, decoding = {}, threading.Event()

        def other():  # decodes all through the reading row's steps
            for ev in graphs.session().stream(PROMPT[::-1], max_new_tokens=24, stop_tokens=[], return_logits=True):
                decoding.set()
                if isinstance(ev, djinn.Done):
                    beside["out"] = ev.result

        thread = threading.Thread(target=other)
        thread.start()
        decoding.wait(60)
        out = graphs.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], interventions=items)
        thread.join()
    ref = eager.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], interventions=items)
    assert out.token_ids == ref.token_ids
    assert sorted(out.captures) == sorted(ref.captures)
    for key, want in ref.captures.items():
        torch.testing.assert_close(out.captures[key], want, rtol=0, atol=TOL, msg=lambda m: f"{key}: {m}")
    assert len(served) >= NEW - 1 and max(served) == 2  # its decode steps, shared, came from the graphs
    # (on the CPU a batch's products round differently by its size: bits are the GPU smoke test's to check)
    assert beside["out"].token_ids == solo.token_ids
    torch.testing.assert_close(beside["out"].logits, solo.logits, rtol=0, atol=1e-4)


def test_work_inside_ops_runs_at_cuts_of_the_graphs_as_the_eager_path(checkpoint, family, monkeypatch):
    """Edits, captures and pauses inside ops, at the prefill and decode steps, run on the graph executor (the
    host works at a cut after the op's site; no step falls back to the eager runner), with the eager path's
    values; an unmodified pause there is bit-identical to the uninterrupted graph run."""
    items = [djinn.Capture("blocks.1.mlp.hook_post"), djinn.Capture("blocks.0.attn.hook_result"),
             djinn.Scale("blocks.1.attn.hook_v", 0.5), djinn.Ablate("blocks.0.mlp.hook_post", steps=[0, 2])]
    sites = ["blocks.0.attn.hook_q", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_pre", "ln_final.hook_scale"]
    graphs_work_inside_ops_as_eagerly(checkpoint[2], family[2], items, sites, monkeypatch)


def graphs_work_inside_ops_as_eagerly(folder, eager, items: list, sites: list[str], monkeypatch) -> None:
    """`items` through the graph executor (with no step sent to the eager runner) equal them through the eager
    client `eager`; breakpoints at `sites`, resumed unchanged, are bit-identical to an uninterrupted run."""
    with djinn.connect(model=str(folder), dtype="float32", device="cpu", cuda_graphs=True) as graphs:
        runner = next(iter(graphs._backend.service.engine.workers.values())).runner
        eager_steps = []
        real = runner._run_eagerly
        monkeypatch.setattr(runner, "_run_eagerly", lambda plan, out: (eager_steps.append(plan), real(plan, out)))
        out = graphs.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], interventions=items,
                                        return_logits=True)
        plain = graphs.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], return_logits=True)
        seen, paused = [], None
        for ev in graphs.session().stream(PROMPT, max_new_tokens=NEW, stop_tokens=[], return_logits=True,
                                          breakpoints=[djinn.Breakpoint(s, steps=[0, 2]) for s in sites]):
            if isinstance(ev, djinn.Paused):
                seen.append((ev.site, ev.step))
                ev.resume()
            elif isinstance(ev, djinn.Done):
                paused = ev.result
    assert not eager_steps
    ref = eager.session().generate(PROMPT, max_new_tokens=NEW, stop_tokens=[], interventions=items,
                                   return_logits=True)
    assert out.token_ids == ref.token_ids
    assert (out.logits - ref.logits).abs().max() <= TOL
    assert sorted(out.captures) == sorted(ref.captures)
    for key, want in ref.captures.items():
        assert (out.captures[key] - want).abs().max() <= TOL, key
    assert seen == [(s, step) for step in (0, 2) for s in sites]
    assert paused.token_ids == plain.token_ids and torch.equal(paused.logits, plain.logits)
