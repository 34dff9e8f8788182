"""Paged attention for a flat varlen batch, in Triton.

Keys are split into fixed chunks of absolute positions (CHUNK). For each (query token, KV head) up to
PROGRAMS programs share out the token's chunks, each streaming its own; each chunk gets all the query heads
that share the KV head (GQA) over its keys with an online softmax. The chunks' results are then merged one
chunk at a time in order of position: by the one program itself when it has every chunk, else by whichever
of the token's programs finishes last (an arrival tally tells it, djinn/kernels/tallies.py), in the same
launch. The arithmetic depends only on positions, never on the batch, the grid or who merges, so a token's
result is the same bits whether it runs eagerly or inside a CUDA graph, alone or with others. All metadata
lives in device tensors, so the kernels can be captured.

Steps with prompts give each program several consecutive tokens instead (prefill_query_tile), which read
each key tile once for all of their row's tokens among them; a second kernel merges each token's chunks with
the same arithmetic. A token's result stays independent of the grid and of eager vs graph; a decode token
computed in a step that also holds a prompt takes this kernel, and up to PREFILL_QUERY_ROWS query rows its
sums are the decode kernel's bits (measured, see below).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import dependent_launch, tallies
from .dependent_launch import wait_for_inputs
from .fused import rope_tables, rotate, write_kv

# Defaults from benchmarks/tune_attention.py on an H200 (timed inside CUDA graphs; see benchmarks/results).
CHUNK = 64  # key positions per partial result
BLOCK_N = 64  # keys per inner iteration
NUM_WARPS = 4
NUM_STAGES = 1  # tiles in flight per program of the prompt kernel
# Programs per (token, KV head) and chunks in flight per program of the decode kernel, for big batches and
# small ones (the bits are the same whatever they are). On an H200 (tune_attention_programs_h200.txt) one
# program streaming a token's chunks three at a time was fastest past SMALL (Mistral shape, 64 x 260: 33.2
# -> 29.8 us against 8 programs one chunk at a time); small batches need the programs spread wide.
PROGRAMS, CHUNK_STAGES = 1, 3
PROGRAMS_SMALL, CHUNK_STAGES_SMALL = 16, 1
SMALL = 256  # (token, KV head) pairs up to which a batch counts as small
# Programs per (query tile, KV head) of the prompt kernel past SMALL (PROGRAMS_SMALL below it). On an H200
# (tune_attention_prompts_h200.txt, 1-16 swept over five prompt shapes) 2 was fastest in sum: 938 us against
# 964 for 1 and 1095 for 8; a 2048-token Mistral prompt 842 -> 738 us against 8.
PROMPT_PROGRAMS = 2
# Query rows (a prompt's consecutive tokens x the query heads of one KV head) a program of the prompt kernel
# holds, sharing its key reads, and at most PREFILL_QUERY_TOKENS tokens; 1 row turns the prompt kernel off.
# On an H200 (benchmarks/results/tune_attention_prompts_h200.txt) up to 32 rows gave the decode kernel's bits,
# at 64 Triton chose another matrix instruction and sums rounded differently; 16 tokens were GPT-2's fastest
# (4.5x one at a time for a 512-token prompt), 8 Mistral's within the 32 rows (1.9x).
PREFILL_QUERY_ROWS = 32
PREFILL_QUERY_TOKENS = 16
MERGE_WARPS = 1  # warps of the prompt steps' merge kernel


@triton.jit
def _first_key(pos, window):
    """The first position a query at `pos` attends to (sliding window; 0 without one)."""
    first = pos * 0
    if window > 0:
        first = tl.maximum(pos - window + 1, 0)
    return first


@triton.jit
def _attend_tile(q, k_ptrs, stride_kv, kv_mask, valid, scale, softcap, m, denom, acc, SOFTCAP: tl.constexpr):
    """One tile of keys (values `stride_kv` past them) into each query row's online softmax: the rows' running
    max, denominator and weighted sum of values; `valid` says which keys each row may see. Also returns the
    tile's scores (scaled, soft-capped with SOFTCAP: softcap * tanh(s / softcap), -inf where not valid)."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # tanh, which Triton's core lacks
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep everything at 0
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    denom = denom * alpha + tl.sum(p, axis=1)
    v = tl.load(k_ptrs + stride_kv, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, denom, acc, s


@triton.jit
def _merge_step(m_all, denom_all, acc_all, m, denom, acc):
    """Fold one chunk's online-softmax state (m, denom, acc) into the running one, per query row. Every
    operation is per element, so the bits are the same in any kernel and any layout."""
    m_new = tl.maximum(m_all, m)  # a chunk always holds a key the row sees: m is finite
    a, w = tl.exp(m_all - m_new), tl.exp(m - m_new)
    return m_new, denom_all * a + denom * w, acc_all * a[:, None] + acc * w[:, None]


@triton.jit
def _merge_stored(acc_ptr, ml_ptr, out_ptr, tok, heads, head_mask, d, d_mask, stride_on, stride_oh, first_chunk,
                  last_chunk, n_heads, n_chunks, D_P: tl.constexpr, ROWS: tl.constexpr):
    """The attention output of `heads` of token `tok`: its stored chunk results merged in order of position."""
    m_all = tl.full([ROWS], float("-inf"), tl.float32)
    denom = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_P], tl.float32)
    for c in range(first_chunk, last_chunk + 1):
        slot = (tok * n_heads + heads) * n_chunks + c
        # volatile: another program of this launch wrote them, after this one's L1 may have seen the lines
        m = tl.load(ml_ptr + slot * 2, mask=head_mask, other=0.0, volatile=True)
        l = tl.load(ml_ptr + slot * 2 + 1, mask=head_mask, other=0.0, volatile=True)
        part = tl.load(acc_ptr + slot[:, None] * D_P + d[None, :], mask=head_mask[:, None], other=0.0,
                       volatile=True)
        m_all, denom, acc = _merge_step(m_all, denom, acc, m, l, part)
    out = acc / denom[:, None]
    tl.store(out_ptr + tok * stride_on + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & d_mask[None, :])


@triton.jit
def _chunk_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, acc_ptr, ml_ptr, out_ptr, tally_ptr, tables_ptr, rows_ptr, pos_ptr,
    write_blocks_ptr, write_offsets_ptr, cos_ptr, sin_ptr, scores_ptr, score_slot_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_blk, stride_kv, stride_tok, stride_head, stride_table, stride_ss, stride_sh, scale, softcap, window,
    n_heads, n_kv_heads, n_chunks,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_SIZE: tl.constexpr, CHUNK_STAGES: tl.constexpr,
    SOLO: tl.constexpr, WRITE: tl.constexpr, ROPE: tl.constexpr, SCORES: tl.constexpr, DEPENDENT: tl.constexpr,
    SOFTCAP: tl.constexpr, R: tl.constexpr,
):
    """Decode attention: programs share out each (token, KV head)'s chunks; with SOLO (one program each) the
    program merges its chunks as it goes, else every program stores its chunks' results and the last of the
    token's programs to finish merges them. With WRITE (one token a row) the kernel first rotates q and k
    (ROPE) and writes the token's key and value into its cache slot, as the rotary + KV write kernel would:
    the program whose chunks hold the token's own position writes them, and only it reads them. With SCORES,
    a token whose score slot is >= 0 also stores its scores (scaled, over its keys) in that slot's rows."""
    wait_for_inputs(DEPENDENT)
    tok = tl.program_id(0).to(tl.int64)
    score_slot = -1
    if SCORES:
        score_slot = tl.load(score_slot_ptr + tok).to(tl.int64)
    kv_head = tl.program_id(1)
    pos = tl.load(pos_ptr + tok).to(tl.int32)
    first = _first_key(pos, window)
    row = tl.load(rows_ptr + tok).to(tl.int64)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D_P)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    d_mask = d < D
    qd_mask = head_mask[:, None] & d_mask[None, :]
    q_src = q_ptr + tok * stride_qn + heads[:, None] * stride_qh
    q = tl.load(q_src + d[None, :], mask=qd_mask, other=0.0)
    # Program p of a token takes its chunks p, p + P, ...: each chunk's result is the same whatever P is. A
    # counted loop lets Triton load the next chunks' tiles while one computes (CHUNK_STAGES in flight).
    step = tl.num_programs(2)
    if WRITE:
        if ROPE:
            partner, sign, cos, sin = rope_tables(cos_ptr, sin_ptr, pos.to(tl.int64), d, d_mask, R)
            q = rotate(q, tl.load(q_src + partner[None, :], mask=qd_mask, other=0.0), sign[None, :], cos[None, :],
                       sin[None, :]).to(q.dtype)
        if tl.program_id(2) == (pos // CHUNK_SIZE - first // CHUNK_SIZE) % step:
            k_src = k_ptr + tok * stride_kn + kv_head * stride_kh
            if ROPE:
                k = rotate(tl.load(k_src + d, mask=d_mask, other=0.0), tl.load(k_src + partner, mask=d_mask, other=0.0),
                           sign, cos, sin)
            else:
                k = tl.load(k_src + d, mask=d_mask, other=0.0)
            write_kv(kv_ptr, write_blocks_ptr, write_offsets_ptr, tok, kv_head, k,
                     v_ptr + tok * stride_vn + kv_head * stride_vh, d, d_mask, stride_blk, stride_kv, stride_tok,
                     stride_head)
        tl.debug_barrier()  # the program's threads see the slot written before any reads it
    first_chunk = first // CHUNK_SIZE + tl.program_id(2)
    m_all = tl.full([GROUP_P], float("-inf"), tl.float32)
    denom_all = tl.zeros([GROUP_P], tl.float32)
    acc_all = tl.zeros([GROUP_P, D_P], tl.float32)
    for i in tl.range(0, tl.cdiv(pos // CHUNK_SIZE + 1 - first_chunk, step), num_stages=CHUNK_STAGES):
        chunk = first_chunk + i * step
        lo = chunk * CHUNK_SIZE
        hi = tl.minimum(lo + CHUNK_SIZE, pos + 1)
        m = tl.full([GROUP_P], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, D_P], tl.float32)
        # Tiles outside [first, hi) are masked: they load nothing and leave m, denom and acc exactly as they were.
        for t in tl.static_range(CHUNK_SIZE // BLOCK_N):
            kp = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = (kp < hi) & (kp >= first)
            block = tl.load(tables_ptr + row * stride_table + kp // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            base = block * stride_blk + (kp % BLOCK_SIZE) * stride_tok + kv_head * stride_head
            kv_mask = valid[:, None] & d_mask[None, :]
            m, denom, acc, scores = _attend_tile(q, kv_ptr + base[:, None] + d[None, :], stride_kv, kv_mask,
                                                 valid[None, :], scale, softcap, m, denom, acc, SOFTCAP)
            if SCORES:
                if score_slot >= 0:
                    tl.store(scores_ptr + score_slot * stride_ss + heads[:, None] * stride_sh + kp[None, :], scores,
                             mask=head_mask[:, None] & valid[None, :])
        if SOLO:
            m_all, denom_all, acc_all = _merge_step(m_all, denom_all, acc_all, m, denom, acc)
        else:
            slot = (tok * n_heads + heads) * n_chunks + chunk  # [GROUP_P]
            tl.store(acc_ptr + slot[:, None] * D_P + d[None, :], acc, mask=head_mask[:, None])
            tl.store(ml_ptr + slot * 2, m, mask=head_mask)
            tl.store(ml_ptr + slot * 2 + 1, denom, mask=head_mask)
    if SOLO:
        out = acc_all / denom_all[:, None]
        tl.store(out_ptr + tok * stride_on + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qd_mask)
    else:
        # release this program's chunks (every thread's stores, hence the barrier before the one atomic); the
        # token's last program acquires every one of them
        tl.debug_barrier()
        tally = tally_ptr + tok * n_kv_heads + kv_head
        if tl.atomic_add(tally, 1, sem="acq_rel") == step - 1:
            _merge_stored(acc_ptr, ml_ptr, out_ptr, tok, heads, head_mask, d, d_mask, stride_on, stride_oh,
                          first // CHUNK_SIZE, pos // CHUNK_SIZE, n_heads, n_chunks, D_P, GROUP_P)
            tl.atomic_xchg(tally, 0)


@triton.jit
def _tile_chunk_kernel(
    q_ptr, kv_ptr, acc_ptr, ml_ptr, tables_ptr, rows_ptr, pos_ptr,
    stride_qn, stride_qh, stride_blk, stride_kv, stride_tok, stride_head, stride_table,
    scale, softcap, window, n_heads, n_chunks, n_tokens,
    QT: tl.constexpr, GROUP: tl.constexpr, ROWS_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_SIZE: tl.constexpr, NUM_STAGES: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """The chunk kernel for prompts: a program takes QT consecutive tokens and, for each run of them in one
    row, reads each key tile once for all of the run's queries (QT x GROUP rows of one product) instead of
    once per token. Each row's masks and online softmax are its own, and a chunk's result is written only
    for the tokens whose range holds it, in the layout the merge kernel reads."""
    t0 = tl.program_id(0).to(tl.int64) * QT
    kv_head = tl.program_id(1)
    r = tl.arange(0, ROWS_P)
    d = tl.arange(0, D_P)
    tok = t0 + r // GROUP  # each product row: (token, query head of this KV head)
    heads = kv_head * GROUP + r % GROUP
    live = (r < QT * GROUP) & (tok < n_tokens)
    row = tl.load(rows_ptr + tok, mask=live, other=-1).to(tl.int64)
    pos = tl.load(pos_ptr + tok, mask=live, other=0).to(tl.int32)
    first = _first_key(pos, window)
    q = tl.load(q_ptr + tok[:, None] * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=live[:, None] & (d < D)[None, :], other=0.0)
    for sub in range(QT):  # each run of the tile's tokens that share a row
        lead = t0 + sub
        lead_row = tl.load(rows_ptr + lead, mask=lead < n_tokens, other=-1).to(tl.int64)
        prev_row = tl.load(rows_ptr + lead - 1, mask=(sub > 0) & (lead < n_tokens), other=-1).to(tl.int64)
        if (lead < n_tokens) & ((sub == 0) | (prev_row != lead_row)):
            run = live & (row == lead_row)
            lo_key = tl.min(tl.where(run, first, 2147483647), axis=0)
            hi_pos = tl.max(tl.where(run, pos, -1), axis=0)
            chunk = lo_key // CHUNK_SIZE + tl.program_id(2)
            while chunk <= hi_pos // CHUNK_SIZE:
                lo = chunk * CHUNK_SIZE
                m = tl.full([ROWS_P], float("-inf"), tl.float32)
                denom = tl.zeros([ROWS_P], tl.float32)
                acc = tl.zeros([ROWS_P, D_P], tl.float32)
                for t in tl.range(0, CHUNK_SIZE // BLOCK_N, num_stages=NUM_STAGES):
                    kp = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
                    any_key = (kp <= hi_pos) & (kp >= lo_key)
                    block = tl.load(tables_ptr + lead_row * stride_table + kp // BLOCK_SIZE, mask=any_key,
                                    other=0).to(tl.int64)
                    base = block * stride_blk + (kp % BLOCK_SIZE) * stride_tok + kv_head * stride_head
                    kv_mask = any_key[:, None] & (d < D)[None, :]
                    valid = run[:, None] & (kp[None, :] <= pos[:, None]) & (kp[None, :] >= first[:, None])
                    m, denom, acc, _ = _attend_tile(q, kv_ptr + base[:, None] + d[None, :], stride_kv, kv_mask,
                                                    valid, scale, softcap, m, denom, acc, SOFTCAP)
                mine = run & (chunk >= first // CHUNK_SIZE) & (chunk <= pos // CHUNK_SIZE)
                slot = (tok * n_heads + heads) * n_chunks + chunk
                tl.store(acc_ptr + slot[:, None] * D_P + d[None, :], acc, mask=mine[:, None])
                tl.store(ml_ptr + slot * 2, m, mask=mine)
                tl.store(ml_ptr + slot * 2 + 1, denom, mask=mine)
                chunk += tl.num_programs(2)


@triton.jit
def _merge_kernel(
    acc_ptr, ml_ptr, out_ptr, pos_ptr, stride_on, stride_oh, window, n_heads, n_chunks,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    DEPENDENT: tl.constexpr,
):
    """The prompt kernel's chunk results merged, per (token, KV head), as the decode kernel merges them."""
    wait_for_inputs(DEPENDENT)
    tok = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D_P)
    pos = tl.load(pos_ptr + tok).to(tl.int32)
    first = _first_key(pos, window)
    _merge_stored(acc_ptr, ml_ptr, out_ptr, tok, tl.program_id(1) * GROUP + g, g < GROUP, d, d < D, stride_on,
                  stride_oh, first // CHUNK_SIZE, pos // CHUNK_SIZE, n_heads, n_chunks, D_P, GROUP_P)


@dataclass
class NewKeys:
    """A one-token step's keys and values for the attention kernel to write into their cache slots itself,
    rotated by position first when `rope` holds the model's cos/sin tables."""

    k: torch.Tensor  # [N, n_kv_heads, d_head]
    v: torch.Tensor
    write_blocks: torch.Tensor  # [N] block of each token's slot
    write_offsets: torch.Tensor  # [N] offset inside that block
    rope: Optional[object] = None


def partials_bytes(n_tokens: int, n_heads: int, d_head: int, max_context: int) -> int:
    """Device memory the kernels' partial results take for a call."""
    n_chunks = max(1, -(-max_context // CHUNK))
    return n_tokens * n_heads * n_chunks * (max(16, triton.next_power_of_2(d_head)) + 2) * 4


def prefill_query_tile(n_heads: int, n_kv_heads: int) -> int:
    """Consecutive tokens a program of the prompt kernel takes for this head layout (1: each token alone)."""
    return max(1, min(PREFILL_QUERY_TOKENS, PREFILL_QUERY_ROWS // triton.next_power_of_2(n_heads // n_kv_heads)))


def paged_attention_triton(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           token_row: torch.Tensor, token_pos: torch.Tensor, scale: float, window: int,
                           max_context: int, query_tile: int = 1, tally_slots: Optional[torch.Tensor] = None,
                           new_keys: Optional[NewKeys] = None,
                           scores: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                           softcap: float = 0.0) -> torch.Tensor:
    """q: [N, n_heads, d_head]; kv_layer: [n_blocks, 2, block_size, n_kv_heads, d_head] (any strides with a
    contiguous last dim); block_tables: [B, max_blocks]; token_row, token_pos: [N]; max_context bounds every
    token's position + 1 (it sizes the grid only); query_tile > 1: programs take that many consecutive
    tokens, sharing key reads within a row (for prompts); tally_slots: zeroed arrival tallies, at least
    N x n_kv_heads (djinn/kernels/tallies.py; None: a fresh buffer); new_keys: this step's keys and values,
    which the kernel rotates and writes itself, q unrotated (one token a row, query_tile 1); scores: (slots
    [N], buffer [n_slots, n_heads, max_keys] float32), each token with a slot >= 0 stores its scores over keys
    first..its position there (query_tile 1); softcap > 0: scores through softcap * tanh(score / softcap)
    (Gemma 2). Returns [N, n_heads, d_head]."""
    n, n_heads, d_head = q.shape
    n_kv = kv_layer.shape[3]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    if n == 0:
        return out
    d_p = max(16, triton.next_power_of_2(d_head))
    n_chunks = max(1, -(-max_context // CHUNK))
    small = n * n_kv <= SMALL
    strides = (kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), block_tables.stride(0))
    common = dict(GROUP=group, D=d_head, D_P=d_p, BLOCK_SIZE=kv_layer.shape[2], BLOCK_N=BLOCK_N, CHUNK_SIZE=CHUNK,
                  SOFTCAP=softcap > 0, num_warps=NUM_WARPS)
    if new_keys is not None and query_tile != 1:
        raise ValueError("the attention kernel writes keys itself only for one token a row")
    if query_tile == 1:
        programs, stages = (PROGRAMS_SMALL, CHUNK_STAGES_SMALL) if small else (PROGRAMS, CHUNK_STAGES)
        programs = min(n_chunks, programs)
        solo = programs == 1  # merged in registers: no partial results, no tallies
        acc = ml = tally = out
        if not solo:
            acc, ml = _partials(n, n_heads, n_chunks, d_p, q.device)
            tally = tallies.slots(tally_slots, n * n_kv, q.device)
        new = new_keys or NewKeys(q, q, token_pos, token_pos)  # without: unused
        rope = new.rope is not None
        cos, sin = (new.rope.cos, new.rope.sin) if rope else (q, q)
        slots, buf = scores if scores is not None else (token_pos, out)
        _chunk_kernel[(n, n_kv, programs)](
            q, new.k, new.v, kv_layer, acc, ml, out, tally, block_tables, token_row, token_pos, new.write_blocks,
            new.write_offsets, cos, sin, buf, slots, q.stride(0), q.stride(1), new.k.stride(0), new.k.stride(1),
            new.v.stride(0), new.v.stride(1), out.stride(0), out.stride(1), *strides, buf.stride(0), buf.stride(1),
            scale, softcap, window, n_heads, n_kv, n_chunks, GROUP_P=max(16, triton.next_power_of_2(group)),
            CHUNK_STAGES=stages, SOLO=solo, WRITE=new_keys is not None, ROPE=rope, SCORES=scores is not None,
            R=new.rope.dim if rope else d_head,
            **common, **dependent_launch.options())
        return out
    acc, ml = _partials(n, n_heads, n_chunks, d_p, q.device)
    programs = PROGRAMS_SMALL if small else PROMPT_PROGRAMS
    _tile_chunk_kernel[(triton.cdiv(n, query_tile), n_kv, min(n_chunks, programs))](
        q, kv_layer, acc, ml, block_tables, token_row, token_pos, q.stride(0), q.stride(1), *strides, scale,
        softcap, window, n_heads, n_chunks, n, QT=query_tile,
        ROWS_P=max(16, triton.next_power_of_2(query_tile * group)),
        NUM_STAGES=NUM_STAGES, **common)
    _merge_kernel[(n, n_kv)](acc, ml, out, token_pos, out.stride(0), out.stride(1), window, n_heads, n_chunks,
                             GROUP=group, GROUP_P=triton.next_power_of_2(group), D=d_head, D_P=d_p, CHUNK_SIZE=CHUNK,
                             num_warps=MERGE_WARPS, **dependent_launch.options())
    return out


def _partials(n: int, n_heads: int, n_chunks: int, d_p: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (token, head, chunk)'s weighted sum of values [.., d_p], and its running max and denominator."""
    return (torch.empty((n, n_heads, n_chunks, d_p), dtype=torch.float32, device=device),
            torch.empty((n, n_heads, n_chunks, 2), dtype=torch.float32, device=device))
