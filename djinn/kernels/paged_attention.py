"""Paged attention for a flat varlen batch, in Triton.

Keys are split into fixed chunks of absolute positions (CHUNK). For each (query token, KV head) up to
PROGRAMS programs share out the token's chunks, each streaming its own; each chunk gets all the query heads
that share the KV head (GQA) over its keys with an online softmax, and a second kernel merges the chunks of
each token, MERGE at a time, in order. The arithmetic depends only on positions, never on the batch or the
grid, so a token's result is the same bits whether it runs eagerly or inside a CUDA graph, alone or with
others. All metadata lives in device tensors, so both kernels can be captured.

Steps with prompts give each program several consecutive tokens instead (prefill_query_tile), which read
each key tile once for all of their row's tokens among them. A token's result stays independent of the grid
and of eager vs graph; a decode token computed in a step that also holds a prompt takes this kernel, and up
to PREFILL_QUERY_ROWS query rows its sums are the decode kernel's bits (measured, see below).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dependent_launch
from .dependent_launch import wait_for_inputs

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
MERGE = 8  # partial results merged per iteration
# Query rows (a prompt's consecutive tokens x the query heads of one KV head) a program of the prompt kernel
# holds, sharing its key reads, and at most PREFILL_QUERY_TOKENS tokens; 1 row turns the prompt kernel off.
# On an H200 (benchmarks/results/tune_attention_prompts_h200.txt) up to 32 rows gave the decode kernel's bits,
# at 64 Triton chose another matrix instruction and sums rounded differently; 16 tokens were GPT-2's fastest
# (4.5x one at a time for a 512-token prompt), 8 Mistral's within the 32 rows (1.9x).
PREFILL_QUERY_ROWS = 32
PREFILL_QUERY_TOKENS = 16
MERGE_WARPS = 1


@triton.jit
def _first_key(pos, window):
    """The first position a query at `pos` attends to (sliding window; 0 without one)."""
    first = pos * 0
    if window > 0:
        first = tl.maximum(pos - window + 1, 0)
    return first


@triton.jit
def _attend_tile(q, k_ptrs, stride_kv, kv_mask, valid, scale, m, denom, acc):
    """One tile of keys (values `stride_kv` past them) into each query row's online softmax: the rows' running
    max, denominator and weighted sum of values; `valid` says which keys each row may see."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep everything at 0
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    denom = denom * alpha + tl.sum(p, axis=1)
    v = tl.load(k_ptrs + stride_kv, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, denom, acc


@triton.jit
def _chunk_kernel(
    q_ptr, kv_ptr, acc_ptr, ml_ptr, tables_ptr, rows_ptr, pos_ptr,
    stride_qn, stride_qh, stride_blk, stride_kv, stride_tok, stride_head, stride_table,
    scale, window, n_heads, n_chunks,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_SIZE: tl.constexpr, CHUNK_STAGES: tl.constexpr,
    DEPENDENT: tl.constexpr,
):
    wait_for_inputs(DEPENDENT)
    tok = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    pos = tl.load(pos_ptr + tok).to(tl.int32)
    first = _first_key(pos, window)
    row = tl.load(rows_ptr + tok).to(tl.int64)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D_P)
    heads = kv_head * GROUP + g
    qd_mask = (g < GROUP)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + tok * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=qd_mask, other=0.0)
    # Program p of a token takes its chunks p, p + P, ...: each chunk's result is the same whatever P is. A
    # counted loop lets Triton load the next chunks' tiles while one computes (CHUNK_STAGES in flight).
    step = tl.num_programs(2)
    first_chunk = first // CHUNK_SIZE + tl.program_id(2)
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
            kv_mask = valid[:, None] & (d < D)[None, :]
            m, denom, acc = _attend_tile(q, kv_ptr + base[:, None] + d[None, :], stride_kv, kv_mask,
                                         valid[None, :], scale, m, denom, acc)
        slot = (tok * n_heads + heads) * n_chunks + chunk  # [GROUP_P]
        tl.store(acc_ptr + slot[:, None] * D_P + d[None, :], acc, mask=(g < GROUP)[:, None])
        tl.store(ml_ptr + slot * 2, m, mask=g < GROUP)
        tl.store(ml_ptr + slot * 2 + 1, denom, mask=g < GROUP)


@triton.jit
def _tile_chunk_kernel(
    q_ptr, kv_ptr, acc_ptr, ml_ptr, tables_ptr, rows_ptr, pos_ptr,
    stride_qn, stride_qh, stride_blk, stride_kv, stride_tok, stride_head, stride_table,
    scale, window, n_heads, n_chunks, n_tokens,
    QT: tl.constexpr, GROUP: tl.constexpr, ROWS_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_SIZE: tl.constexpr, NUM_STAGES: tl.constexpr,
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
                    m, denom, acc = _attend_tile(q, kv_ptr + base[:, None] + d[None, :], stride_kv, kv_mask,
                                                 valid, scale, m, denom, acc)
                mine = run & (chunk >= first // CHUNK_SIZE) & (chunk <= pos // CHUNK_SIZE)
                slot = (tok * n_heads + heads) * n_chunks + chunk
                tl.store(acc_ptr + slot[:, None] * D_P + d[None, :], acc, mask=mine[:, None])
                tl.store(ml_ptr + slot * 2, m, mask=mine)
                tl.store(ml_ptr + slot * 2 + 1, denom, mask=mine)
                chunk += tl.num_programs(2)


@triton.jit
def _merge_kernel(
    acc_ptr, ml_ptr, out_ptr, pos_ptr, stride_on, stride_oh, window, n_heads, n_chunks,
    D: tl.constexpr, D_P: tl.constexpr, CHUNK_SIZE: tl.constexpr, MERGE: tl.constexpr, DEPENDENT: tl.constexpr,
):
    wait_for_inputs(DEPENDENT)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + tok).to(tl.int32)
    first = _first_key(pos, window)
    d = tl.arange(0, D_P)
    m_all = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([D_P], tl.float32)
    # MERGE chunks at a time, groups aligned to the token's first chunk and taken in order: the same
    # arithmetic for a token wherever and however it runs
    c = first // CHUNK_SIZE
    while c <= pos // CHUNK_SIZE:
        cs = c + tl.arange(0, MERGE)
        valid = cs <= pos // CHUNK_SIZE
        slot = (tok * n_heads + head) * n_chunks + cs
        m = tl.load(ml_ptr + slot * 2, mask=valid, other=float("-inf"))
        l = tl.load(ml_ptr + slot * 2 + 1, mask=valid, other=0.0)
        part = tl.load(acc_ptr + slot[:, None] * D_P + d[None, :], mask=valid[:, None], other=0.0)
        m_new = tl.maximum(m_all, tl.max(m, axis=0))  # every valid chunk holds a key: finite
        a, w = tl.exp(m_all - m_new), tl.exp(m - m_new)
        denom = denom * a + tl.sum(l * w, axis=0)
        acc = acc * a + tl.sum(part * w[:, None], axis=0)
        m_all = m_new
        c += MERGE
    out = acc / denom
    tl.store(out_ptr + tok * stride_on + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def partials_bytes(n_tokens: int, n_heads: int, d_head: int, max_context: int) -> int:
    """Device memory the kernels' partial results take for a call."""
    n_chunks = max(1, -(-max_context // CHUNK))
    return n_tokens * n_heads * n_chunks * (max(16, triton.next_power_of_2(d_head)) + 2) * 4


def prefill_query_tile(n_heads: int, n_kv_heads: int) -> int:
    """Consecutive tokens a program of the prompt kernel takes for this head layout (1: each token alone)."""
    return max(1, min(PREFILL_QUERY_TOKENS, PREFILL_QUERY_ROWS // triton.next_power_of_2(n_heads // n_kv_heads)))


def paged_attention_triton(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           token_row: torch.Tensor, token_pos: torch.Tensor, scale: float, window: int,
                           max_context: int, query_tile: int = 1) -> torch.Tensor:
    """q: [N, n_heads, d_head]; kv_layer: [n_blocks, 2, block_size, n_kv_heads, d_head] (any strides with a
    contiguous last dim); block_tables: [B, max_blocks]; token_row, token_pos: [N]; max_context bounds every
    token's position + 1 (it sizes the grid only); query_tile > 1: programs take that many consecutive
    tokens, sharing key reads within a row (for prompts). Returns [N, n_heads, d_head]."""
    n, n_heads, d_head = q.shape
    n_kv = kv_layer.shape[3]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    if n == 0:
        return out
    d_p = max(16, triton.next_power_of_2(d_head))
    group_p = max(16, triton.next_power_of_2(group))
    n_chunks = max(1, -(-max_context // CHUNK))
    acc = torch.empty((n, n_heads, n_chunks, d_p), dtype=torch.float32, device=q.device)
    ml = torch.empty((n, n_heads, n_chunks, 2), dtype=torch.float32, device=q.device)
    small = n * n_kv <= SMALL
    strides = (q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
               kv_layer.stride(3), block_tables.stride(0))
    common = dict(D=d_head, D_P=d_p, BLOCK_SIZE=kv_layer.shape[2], BLOCK_N=BLOCK_N, CHUNK_SIZE=CHUNK,
                  num_warps=NUM_WARPS)
    if query_tile == 1:
        programs, stages = (PROGRAMS_SMALL, CHUNK_STAGES_SMALL) if small else (PROGRAMS, CHUNK_STAGES)
        _chunk_kernel[(n, n_kv, min(n_chunks, programs))](
            q, kv_layer, acc, ml, block_tables, token_row, token_pos, *strides, scale, window, n_heads, n_chunks,
            GROUP=group, GROUP_P=group_p, CHUNK_STAGES=stages, **common, **dependent_launch.options())
    else:
        programs = PROGRAMS_SMALL if small else PROMPT_PROGRAMS
        _tile_chunk_kernel[(triton.cdiv(n, query_tile), n_kv, min(n_chunks, programs))](
            q, kv_layer, acc, ml, block_tables, token_row, token_pos, *strides, scale, window, n_heads, n_chunks,
            n, QT=query_tile, GROUP=group, ROWS_P=max(16, triton.next_power_of_2(query_tile * group)),
            NUM_STAGES=NUM_STAGES, **common)
    _merge_kernel[(n, n_heads)](acc, ml, out, token_pos, out.stride(0), out.stride(1), window, n_heads, n_chunks,
                                D=d_head, D_P=d_p, CHUNK_SIZE=CHUNK, MERGE=MERGE, num_warps=MERGE_WARPS,
                                **dependent_launch.options())
    return out
