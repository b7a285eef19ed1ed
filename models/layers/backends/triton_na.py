"""Triton neighborhood attention: fused 2-D NA forward and backward with a trainable RPB.

FlashAttention-2 structure, in the coordinates of one dilation group (positions `g, g+d, g+2d, ...`
of each axis, where every window is a plain run of k positions, clamped inside the group):

* forward: a program takes a `BH x BW` tile of queries of one group, walks the union of their
  windows (its halo, `BH + k - 1` key rows of `KW >= BW + k - 1` columns) `KROWS` key rows at a
  time (32 keys a step: two rows for k <= 9), with `tl.dot` logits, each query's own window as a
  mask, the RPB gathered per (query, key) from the `(2k-1)^2` table, and an online softmax; it keeps
  the logsumexp for the backward.
* backward, query-major (dq and the RPB gradient): the same walk recomputes P from the logsumexp;
  `dS = P * (dP - rowsum(dO * O))` (the row sum computed here, stored for the next pass) gives dq
  and, per key row, the RPB gradient: within one key row the table row depends on the query alone
  and the column on (query, key), so a `tl.gather` shifts each query's dS into table columns and a
  one-hot `tl.dot` sums them into table rows. Each program writes its partial `(2k-1)^2` table to
  its own slot; one `sum` reduces them (no atomics).
* backward, key-major (dk, dv): a program takes a tile of keys and walks the queries whose windows
  contain them (the inverse neighbourhood, wider than k at borders), one query row at a time; each
  key's gradient is owned by one program (no atomics).

Inputs in float16/bfloat16/float32 (float64 too: handy for exact tests) in any strides; softmax,
logsumexp and gradients accumulate in float32 (float64 for float64). float32 logits follow torch's
float32 matmul precision (`fp32_matmul_uses_tf32`). On CPU tensors it runs only under
`TRITON_INTERPRET=1` (Triton's interpreter, for tests), set before Triton is imported (torch imports
it): Triton's own library functions are decorated then, compiled or interpreted (tests/conftest.py
sets it).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import math
import os
import re
import struct

import torch

from .double_backward import refuse_double_backward

try:
    import triton
    import triton.language as tl
except ImportError:  # checks.py says so; the kernels below are decorated on first use only
    triton = tl = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Query tile (rows, cols) of the forward and dq passes and key tile of the dk/dv pass, in group
# coordinates; 8x8 = 64 rows for tl.dot. Not tuned on a GPU yet (none was lent): scripts/gpu_check.py.
DEFAULT_TILE = (8, 8)
# (num_warps, num_stages) per kernel (forward, query-major, key-major) that the autotuner times on
# its first launch for each key (`_kernels`). From offline compiles with Triton 3.8's ptxas for
# sm_80/86/90 (docs/benchmarks.md, "GPU"; tests/test_triton_na.py): with Triton's default 4 warps
# bf16 spilled from head dim 64 on sm_80; 8 warps and 1 stage spill nothing in bf16 up to head dim 64,
# except the query-major kernel (it alone holds the RPB-gradient table), which needs 3 stages at
# k = 13 on sm_80 but 1 on sm_86; (8, 2) and (4, 1) spill least in some head-dim-128 cases. A config
# that runs out of shared memory (the query-major kernel's 3 stages in fp32 head dim 128 on sm_86) is
# skipped by the autotuner. Not yet timed on a GPU.
LAUNCH_CONFIGS = (((8, 1), (4, 1), (8, 2)), ((8, 3), (8, 1), (4, 1)), ((8, 1), (4, 1), (8, 2)))
# Queries per step of the dk/dv walk (QW): 32 (the halo at k >= 11) spilled in bf16 at k = 13 head dim
# 64 (sm_80) and passed sm_86's shared memory in fp32 at head dim 128.
QUERY_CHUNK = 16
# Keys per step of the forward and query-major walks: whole halo rows (KW keys each, 16 at k <= 9,
# 32 at k 11 and 13) up to this many, where the offline compiles keep the registers
# (`key_rows_per_step`).
KEYS_PER_STEP = 32


def triton_error() -> str | None:
    """None when Triton can run here, else why not."""
    if triton is None:
        return "Triton is not importable (pip install triton; torch's CUDA wheels bring it)"
    return None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every dim >= 16


# Device functions shared by the kernels (decorated in `_kernels`, before them; Triton inlines them).


def _program_tile(heads, height, width, tiles_h, tiles_w, DIL: tl.constexpr):
    """This program's id, (batch * heads) index, batch, head, dilation group (gi, gj), tile (ta, tb)
    and the group's lengths (len_h, len_w)."""
    pid = tl.program_id(0)  # one axis: (batch * heads) * tiles can pass the 65535 of axes 1 and 2
    tile = pid % (DIL * DIL * tiles_h * tiles_w)
    bh = pid // (DIL * DIL * tiles_h * tiles_w)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    group = tile // (tiles_h * tiles_w)
    gi = group // DIL
    gj = group % DIL
    ta = (tile % (tiles_h * tiles_w)) // tiles_w
    tb = tile % tiles_w
    len_h = (height - gi + DIL - 1) // DIL
    len_w = (width - gj + DIL - 1) // DIL
    return pid, bh, b, h, gi, gj, ta, tb, len_h, len_w


def _query_tile(ta, tb, len_h, len_w, KS: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """The query tile (ta, tb) in group coordinates (qa, qb), which slots are real queries, their window
    starts (sa, sb), and the tile's halo: key rows ha0..ha1 - 1, key columns from hb0 (KW of them)."""
    # Slots past the group's end repeat its last query (stores masked).
    m = tl.arange(0, BH * BW)
    qa = ta * BH + m // BW
    qb = tb * BW + m % BW
    q_valid = (qa < len_h) & (qb < len_w)
    qa = tl.minimum(qa, len_h - 1)
    qb = tl.minimum(qb, len_w - 1)
    sa = tl.minimum(tl.maximum(qa - KS // 2, 0), len_h - KS)  # window starts
    sb = tl.minimum(tl.maximum(qb - KS // 2, 0), len_w - KS)
    # Halo: the first query's window start to the last one's end.
    ha0 = tl.minimum(tl.maximum(tl.minimum(ta * BH, len_h - 1) - KS // 2, 0), len_h - KS)
    ha1 = tl.minimum(tl.maximum(tl.minimum(ta * BH + BH - 1, len_h - 1) - KS // 2, 0), len_h - KS) + KS
    hb0 = tl.minimum(tl.maximum(tl.minimum(tb * BW, len_w - 1) - KS // 2, 0), len_w - KS)
    return qa, qb, q_valid, sa, sb, ha0, ha1, hb0


def _rows(base, first_row, rows, s_row):
    """`base` (one batch and head) moved to map row(s) `rows` (one row or a column of them), at least
    `first_row` and within one tile of it: that row's offset in int64 (row * row stride passes 2**31
    for packed-qkv views of large maps, 1024^2 with C >= 683), the rest in int32 (int64 row vectors
    held through the loops made bf16 k = 13 head dim 64 spill on sm_80)."""
    return base + first_row.to(tl.int64) * s_row + (rows - first_row) * s_row


def _load_rows(row_base, cols, d, s_col, s_d, mask, DOT_DTYPE: tl.constexpr):
    """The (len(cols), BLOCK_D) vectors at `cols` of the row(s) at `row_base` (one pointer, or a
    column of them, one per col), in tl.dot's operand dtype."""
    pointers = row_base + cols[:, None] * s_col + d[None, :] * s_d
    return tl.load(pointers, mask=mask, other=0.0).to(DOT_DTYPE)


def _key_tile(hb0, KW: tl.constexpr, KROWS: tl.constexpr):
    """A step's tile of keys, `KROWS` halo rows of `KW` columns: each key's row offset in the step
    (0 .. KROWS - 1) and its column (from the halo's first, `hb0`)."""
    n = tl.arange(0, KROWS * KW)
    return n // KW, hb0 + n % KW


def _key_step(
    K, V, ka0, row_step, kc, ha1, len_w, gi, gj, d, d_ok, skh, skw, skd, svh, svw, svd,
    DIL: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """One step of the forward and query-major walks: its keys' rows (`ka`, one per key) and the k, v
    tiles (`K`, `V`: one batch and head) of halo rows ka0 .. ka0 + KROWS - 1 at columns `kc`. Rows
    past the halo (its last step) lie in no window: their loads are masked."""
    ka = ka0 + row_step
    key_ok = ((kc < len_w) & (ka < ha1))[:, None] & d_ok[None, :]
    row_k0 = gi + DIL * ka0
    rows_k = (gi + DIL * ka)[:, None]
    cols_k = gj + DIL * kc
    k = _load_rows(_rows(K, row_k0, rows_k, skh), cols_k, d, skw, skd, key_ok, DOT_DTYPE)
    v = _load_rows(_rows(V, row_k0, rows_k, svh), cols_k, d, svw, svd, key_ok, DOT_DTYPE)
    return ka, k, v


def _exact_scale(hi, lo, IS_FP64: tl.constexpr):
    """A scale passed as two float32 arguments (the compiled launcher types Python floats float32):
    their sum keeps 48 bits for float64 inputs; float32 and narrower need only `hi`."""
    if IS_FP64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return hi


def _window_logits(
    q, k, RPB, h, ka, qa, qb, kb, sa, col_in, qk_scale,
    KS: tl.constexpr, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits (log2 units) of the query tile against a tile of keys (key rows `ka`, columns `kb`, one
    per key), with the RPB, and which of them lie in each query's window (`col_in`: the key columns
    that do)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    SPAN: tl.constexpr = 2 * KS - 1
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    inside = col_in & ((ka[None, :] >= sa[:, None]) & (ka[None, :] < sa[:, None] + KS))
    if HAS_RPB:
        bias_index = (
            h * SPAN * SPAN
            + (ka[None, :] - qa[:, None] + KS - 1) * SPAN
            + (kb[None, :] - qb[:, None] + KS - 1)
        )
        s += tl.load(RPB + bias_index, mask=inside, other=0.0) * LOG2E
    return s, inside


_DEVICE_FUNCTIONS = (
    "_program_tile", "_query_tile", "_key_tile", "_rows", "_load_rows", "_key_step", "_exact_scale",
    "_window_logits",
)  # fmt: skip


def _na2d_forward_kernel(
    Q, K, V, RPB, OUT, LSE,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod,
    heads, height, width, head_dim, tiles_h, tiles_w, qk_scale_hi, qk_scale_lo,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    KW: tl.constexpr, KROWS: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    pid, bh, b, h, gi, gj, ta, tb, len_h, len_w = _program_tile(heads, height, width, tiles_h, tiles_w, DIL)
    qa, qb, q_valid, sa, sb, ha0, ha1, hb0 = _query_tile(ta, tb, len_h, len_w, KS, BH, BW)
    qk_scale = _exact_scale(qk_scale_hi, qk_scale_lo, IS_FP64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row0 = gi + DIL * ta * BH  # the tile's first map row
    rows_q = gi + DIL * qa
    cols_q = gj + DIL * qb
    q = _load_rows(
        _rows(Q + b * sqb + h * sqn, row0, rows_q[:, None], sqh),
        cols_q,
        d,
        sqw,
        sqd,
        d_ok[None, :],
        DOT_DTYPE,
    )
    row_step, kc = _key_tile(hb0, KW, KROWS)
    col_in = (kc[None, :] >= sb[:, None]) & (kc[None, :] < sb[:, None] + KS)
    if IS_FP64:
        acc = tl.zeros([BH * BW, BLOCK_D], dtype=tl.float64)
        l_i = tl.zeros([BH * BW], dtype=tl.float64)
    else:
        acc = tl.zeros([BH * BW, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BH * BW], dtype=tl.float32)
    m_i = l_i - 1e30  # finite: a key row outside every window of a query leaves alpha = 1
    for ka0 in range(ha0, ha1, KROWS):
        ka, k, v = _key_step(
            K + b * skb + h * skn, V + b * svb + h * svn, ka0, row_step, kc, ha1, len_w, gi, gj, d, d_ok,
            skh, skw, skd, svh, svw, svd, DIL, DOT_DTYPE,
        )  # fmt: skip
        s, inside = _window_logits(q, k, RPB, h, ka, qa, qb, kc, sa, col_in, qk_scale, KS, HAS_RPB, PRECISION)
        s = tl.where(inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(Q.dtype.element_ty).to(DOT_DTYPE), v, input_precision=PRECISION
        )
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        _rows(OUT + b * sob + h * son, row0, rows_q[:, None], soh) + cols_q[:, None] * sow + d[None, :] * sod,
        out.to(OUT.dtype.element_ty),
        mask=q_valid[:, None] & d_ok[None, :],
    )
    tl.store(
        LSE + bh.to(tl.int64) * height * width + rows_q * width + cols_q, m_i + tl.log2(l_i), mask=q_valid
    )


def _na2d_backward_query_kernel(
    Q, K, V, RPB, OUT, DO, LSE, DELTA, DQ, DRPB_PARTS,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod,
    sdb, sdh, sdw, sdn, sdd,
    sgb, sgh, sgw, sgn, sgd,
    heads, height, width, head_dim, tiles_h, tiles_w, qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, BH: tl.constexpr,
    BW: tl.constexpr, KW: tl.constexpr, KROWS: tl.constexpr, BLOCK_D: tl.constexpr, SPAN_P: tl.constexpr,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    SPAN: tl.constexpr = 2 * KS - 1
    pid, bh, b, h, gi, gj, ta, tb, len_h, len_w = _program_tile(heads, height, width, tiles_h, tiles_w, DIL)
    qa, qb, q_valid, sa, sb, ha0, ha1, hb0 = _query_tile(ta, tb, len_h, len_w, KS, BH, BW)
    qk_scale = _exact_scale(qk_scale_hi, qk_scale_lo, IS_FP64)
    scale = _exact_scale(scale_hi, scale_lo, IS_FP64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row0 = gi + DIL * ta * BH  # the tile's first map row
    rows_q = gi + DIL * qa
    cols_q = gj + DIL * qb
    q = _load_rows(
        _rows(Q + b * sqb + h * sqn, row0, rows_q[:, None], sqh),
        cols_q,
        d,
        sqw,
        sqd,
        d_ok[None, :],
        DOT_DTYPE,
    )
    do = _load_rows(
        _rows(DO + b * sdb + h * sdn, row0, rows_q[:, None], sdh),
        cols_q,
        d,
        sdw,
        sdd,
        d_ok[None, :],
        DOT_DTYPE,
    )
    stat_index = bh.to(tl.int64) * height * width + rows_q * width + cols_q
    lse = tl.load(LSE + stat_index)
    # rowsum(dO * O), the softmax backward's correction; stored for the key-major pass (launched next)
    out_rows = _rows(OUT + b * sob + h * son, row0, rows_q[:, None], soh)
    out = tl.load(out_rows + cols_q[:, None] * sow + d[None, :] * sod, mask=d_ok[None, :], other=0.0)
    delta = tl.sum(do.to(lse.dtype) * out.to(lse.dtype), 1)
    tl.store(DELTA + stat_index, delta, mask=q_valid)
    row_step, kc = _key_tile(hb0, KW, KROWS)
    col_in = (kc[None, :] >= sb[:, None]) & (kc[None, :] < sb[:, None] + KS)
    # RPB gradient: in key row ka, query m's dS at key column n goes to table column
    # c = (hb0 + n) - qb[m] + k - 1; `gather_n[m, c]` is that n (masked where outside the key row), in
    # the step's first key row; the r-th row's keys are KW further on.
    c = tl.arange(0, SPAN_P)
    gather_n = c[None, :] - (KS - 1) + qb[:, None] - hb0
    gather_ok = (gather_n >= 0) & (gather_n < KW) & (c[None, :] < SPAN)
    gather_n = tl.minimum(tl.maximum(gather_n, 0), KW - 1)
    if IS_FP64:
        dq = tl.zeros([BH * BW, BLOCK_D], dtype=tl.float64)
        table = tl.zeros([SPAN_P, SPAN_P], dtype=tl.float64)
    else:
        dq = tl.zeros([BH * BW, BLOCK_D], dtype=tl.float32)
        table = tl.zeros([SPAN_P, SPAN_P], dtype=tl.float32)
    for ka0 in range(ha0, ha1, KROWS):
        ka, k, v = _key_step(
            K + b * skb + h * skn, V + b * svb + h * svn, ka0, row_step, kc, ha1, len_w, gi, gj, d, d_ok,
            skh, skw, skd, svh, svw, svd, DIL, DOT_DTYPE,
        )  # fmt: skip
        s, inside = _window_logits(q, k, RPB, h, ka, qa, qb, kc, sa, col_in, qk_scale, KS, HAS_RPB, PRECISION)
        p = tl.where(inside, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(q_valid[:, None], p * (dp - delta[:, None]), 0.0)  # repeated queries count once
        dq += tl.dot(ds.to(Q.dtype.element_ty).to(DOT_DTYPE), k, input_precision=PRECISION)
        if RPB_GRAD:
            for r in tl.static_range(KROWS):  # one table row per (query, key row)
                by_column = tl.where(
                    gather_ok, tl.gather(ds, gather_n + r * KW, 1), 0.0
                )  # (queries, columns)
                row_hot = ((ka0 + r - qa + KS - 1)[None, :] == c[:, None]).to(ds.dtype)  # (rows, queries)
                table += tl.dot(row_hot, by_column, input_precision="ieee")
    tl.store(
        _rows(DQ + b * sgb + h * sgn, row0, rows_q[:, None], sgh) + cols_q[:, None] * sgw + d[None, :] * sgd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_valid[:, None] & d_ok[None, :],
    )
    if RPB_GRAD:
        slot = DRPB_PARTS + pid.to(tl.int64) * SPAN * SPAN  # = (b, h, tile): parts' layout
        tl.store(slot + c[:, None] * SPAN + c[None, :], table, mask=(c[:, None] < SPAN) & (c[None, :] < SPAN))


def _na2d_backward_key_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sdb, sdh, sdw, sdn, sdd,
    sgb, sgh, sgw, sgn, sgd,
    heads, height, width, head_dim, tiles_h, tiles_w, qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, KH: tl.constexpr, KWT: tl.constexpr,
    QW: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    LOG2E: tl.constexpr = 1.4426950408889634
    SPAN: tl.constexpr = 2 * KS - 1
    pid, bh, b, h, gi, gj, ta, tb, len_h, len_w = _program_tile(heads, height, width, tiles_h, tiles_w, DIL)
    n = tl.arange(0, KH * KWT)
    ka = ta * KH + n // KWT
    kb = tb * KWT + n % KWT
    k_valid = (ka < len_h) & (kb < len_w)
    ka = tl.minimum(ka, len_h - 1)
    kb = tl.minimum(kb, len_w - 1)
    qk_scale = _exact_scale(qk_scale_hi, qk_scale_lo, IS_FP64)
    scale = _exact_scale(scale_hi, scale_lo, IS_FP64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row0 = gi + DIL * ta * KH  # the tile's first map row
    rows_k = gi + DIL * ka
    cols_k = gj + DIL * kb
    k = _load_rows(
        _rows(K + b * skb + h * skn, row0, rows_k[:, None], skh),
        cols_k,
        d,
        skw,
        skd,
        d_ok[None, :],
        DOT_DTYPE,
    )
    v = _load_rows(
        _rows(V + b * svb + h * svn, row0, rows_k[:, None], svh),
        cols_k,
        d,
        svw,
        svd,
        d_ok[None, :],
        DOT_DTYPE,
    )
    # Queries whose windows can hold a key of the tile: window starts are monotone in the query,
    # so the first query whose window ends at/after the first key row to the last whose window
    # starts at/before the last key row (near borders that is wider than k).
    first_a = tl.minimum(ta * KH, len_h - 1)
    last_a = tl.minimum(ta * KH + KH - 1, len_h - 1)
    qa_lo = tl.where(first_a <= KS - 1, 0, first_a - KS + 1 + KS // 2)
    qa_hi = tl.where(last_a >= len_h - KS, len_h - 1, last_a + KS // 2)
    first_b = tl.minimum(tb * KWT, len_w - 1)
    last_b = tl.minimum(tb * KWT + KWT - 1, len_w - 1)
    qb_lo = tl.where(first_b <= KS - 1, 0, first_b - KS + 1 + KS // 2)
    qb_hi = tl.where(last_b >= len_w - KS, len_w - 1, last_b + KS // 2)
    if IS_FP64:
        dk = tl.zeros([KH * KWT, BLOCK_D], dtype=tl.float64)
        dv = tl.zeros([KH * KWT, BLOCK_D], dtype=tl.float64)
    else:
        dk = tl.zeros([KH * KWT, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([KH * KWT, BLOCK_D], dtype=tl.float32)
    for qa in range(qa_lo, qa_hi + 1):
        sa = tl.minimum(tl.maximum(qa - KS // 2, 0), len_h - KS)
        row_in = (ka >= sa) & (ka < sa + KS)
        row_q = gi + DIL * qa
        for qb0 in range(qb_lo, qb_hi + 1, QW):
            qb = qb0 + tl.arange(0, QW)
            q_ok = qb <= qb_hi
            qb = tl.minimum(qb, qb_hi)
            sb = tl.minimum(tl.maximum(qb - KS // 2, 0), len_w - KS)
            inside = row_in[:, None] & (kb[:, None] >= sb[None, :]) & (kb[:, None] < sb[None, :] + KS)
            inside = inside & q_ok[None, :]
            cols_q = gj + DIL * qb
            q_row = _rows(Q + b * sqb + h * sqn, row_q, row_q, sqh)
            q = _load_rows(q_row, cols_q, d, sqw, sqd, d_ok[None, :], DOT_DTYPE)
            do_row = _rows(DO + b * sdb + h * sdn, row_q, row_q, sdh)
            do = _load_rows(do_row, cols_q, d, sdw, sdd, d_ok[None, :], DOT_DTYPE)
            stat_index = bh.to(tl.int64) * height * width + row_q * width + cols_q
            lse = tl.load(LSE + stat_index)
            delta = tl.load(DELTA + stat_index)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (keys, queries)
            if HAS_RPB:
                bias_index = (
                    h * SPAN * SPAN
                    + (ka[:, None] - qa + KS - 1) * SPAN
                    + (kb[:, None] - qb[None, :] + KS - 1)
                )
                st += tl.load(RPB + bias_index, mask=inside, other=0.0) * LOG2E
            pt = tl.where(inside, tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(Q.dtype.element_ty).to(DOT_DTYPE), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(Q.dtype.element_ty).to(DOT_DTYPE), q, input_precision=PRECISION)
    store_mask = k_valid[:, None] & d_ok[None, :]
    out_offset = cols_k[:, None] * sgw + d[None, :] * sgd
    out_rows = _rows(b * sgb + h * sgn, row0, rows_k[:, None], sgh)  # DK and DV share strides
    tl.store(DK + out_rows + out_offset, (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + out_rows + out_offset, dv.to(DV.dtype.element_ty), mask=store_mask)


@functools.cache
def jit_kernels() -> tuple:
    """The kernels, decorated on first use (Triton picks compiled or interpreted at decoration).

    The device functions they call are decorated first and rebound under their names, where the
    kernels look them up."""
    globals().update({name: triton.jit(globals()[name]) for name in _DEVICE_FUNCTIONS})
    return tuple(triton.jit(fn) for fn in KERNELS)


KERNELS = (_na2d_forward_kernel, _na2d_backward_query_kernel, _na2d_backward_key_kernel)


def autotune_key(kernel) -> list[str]:
    """What one tuning of `kernel` (one of `KERNELS`) holds for: head dim, map size and every
    constexpr (kernel size, dilation, tiles, RPB and its gradient, precision: each value compiles its
    own variant, so a key without them handed one variant's launch settings to the next, e.g. each
    tile of gpu_check's tile sweep the default tile's). Triton adds the tensors' dtypes itself."""
    params = inspect.signature(kernel).parameters.values()
    return [
        "head_dim",
        "height",
        "width",
        *(p.name for p in params if p.annotation in (tl.constexpr, "tl.constexpr")),
    ]


@functools.cache
def _kernels() -> tuple:
    """What the launches call: on a GPU each kernel autotuned over `LAUNCH_CONFIGS`, once per
    `autotune_key`; in the interpreter, where launch settings mean nothing, the plain kernels."""
    if triton_interpreting():
        return jit_kernels()
    # Configs that run out of shared memory or registers are timed as infinitely slow, not raised.
    return tuple(
        triton.autotune(
            [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in configs],
            key=autotune_key(source),
        )(kernel)
        for source, kernel, configs in zip(KERNELS, jit_kernels(), LAUNCH_CONFIGS, strict=True)
    )


def fp32_matmul_uses_tf32() -> bool:
    """Whether float32 matmuls may use TF32, read through torch's new per-backend setting, which also
    reflects the legacy `allow_tf32` flag (reading that flag raises once the new API has been used)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: the legacy flag only
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and fp32_matmul_uses_tf32():
        return "tf32"
    return "ieee"  # ignored for 16-bit inputs (their products are exact in the fp32 accumulator)


def _dot_dtype(dtype: torch.dtype):
    """What tl.dot multiplies: the input dtype, but float32 for bfloat16 under the interpreter, whose
    dot multiplies bfloat16's raw 16-bit patterns (triton 3.8). Operands are rounded to bfloat16
    first, so the products are those of the GPU's bfloat16 dot (exact in float32)."""
    if dtype == torch.bfloat16 and triton_interpreting():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}.get(
        dtype, tl.float64
    )


def _fp32_pair(x: float) -> tuple[float, float]:
    """`x` as hi + lo, both float32 values: what survives the compiled launcher (see `_exact_scale`)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _group_tiles(height: int, width: int, dilation: int, tile: tuple[int, int]) -> tuple[int, int]:
    """Tiles per axis of the longest dilation group (group 0); shorter groups mask their tail."""
    return math.ceil(math.ceil(height / dilation) / tile[0]), math.ceil(math.ceil(width / dilation) / tile[1])


def key_rows_per_step(key_width: int, head_dim: int, dtype: torch.dtype, query_major: bool) -> int:
    """Halo rows the forward or query-major kernel takes per step: enough for a `tl.dot` 32 keys
    wide (finding 4 of issue 28: one 16-key row per step, at k <= 9, gave half-width dots and twice
    the steps, each with its online-softmax rescale), where the offline compiles (docs/benchmarks.md)
    showed no new spills: the forward up to head dim 64; the query-major kernel, which also holds
    dq and the RPB-gradient table, up to 64 in 16-bit types and 32 otherwise (two rows spilled
    48-56 B in fp32 at head dim 64 on sm_80/86)."""
    widest = 64 if not query_major or dtype.itemsize <= 2 else 32
    return max(1, KEYS_PER_STEP // key_width) if head_dim <= widest else 1


def kernel_constants(
    dtype: torch.dtype, kernel_size: int, dilation: int, head_dim: int, tile: tuple[int, int], has_rpb: bool,
    rpb_grad: bool = False,
) -> tuple[dict, dict, dict]:  # fmt: skip
    """The compile-time constants of the forward, query-major and key-major kernels for a call."""
    common = dict(
        KS=kernel_size,
        DIL=dilation,
        HAS_RPB=has_rpb,
        BLOCK_D=_pow2(head_dim),
        IS_FP64=dtype == torch.float64,
        PRECISION=_precision(dtype),
        DOT_DTYPE=_dot_dtype(dtype),
    )
    key_width = _pow2(tile[1] + kernel_size - 1)
    rows = functools.partial(key_rows_per_step, key_width, head_dim, dtype)
    forward = dict(common, BH=tile[0], BW=tile[1], KW=key_width, KROWS=rows(query_major=False))
    query = dict(forward, KROWS=rows(query_major=True), RPB_GRAD=rpb_grad, SPAN_P=_pow2(2 * kernel_size - 1))
    key = dict(common, KH=tile[0], KWT=tile[1], QW=QUERY_CHUNK)
    return forward, query, key


def _geometry(q: torch.Tensor, dilation: int, tile: tuple[int, int]) -> tuple[int, tuple]:
    """Programs per (batch, head) and the kernels' shape arguments."""
    B, H, W, heads, dim = q.shape
    tiles_h, tiles_w = _group_tiles(H, W, dilation, tile)
    return dilation * dilation * tiles_h * tiles_w, (heads, H, W, dim, tiles_h, tiles_w)


def _forward(q, k, v, rpb, kernel_size, dilation, scale, tile):
    forward_kernel, _, _ = _kernels()
    B, H, W, heads, dim = q.shape
    n_tiles, shape = _geometry(q, dilation, tile)
    constants, _, _ = kernel_constants(q.dtype, kernel_size, dilation, dim, tile, rpb is not None)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((B, heads, H, W), dtype=stat_dtype, device=q.device)
    forward_kernel[(B * heads * n_tiles,)](
        q, k, v, rpb if rpb is not None else q, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *shape, *_fp32_pair(scale * math.log2(math.e)), **constants,
    )  # fmt: skip
    return out, lse


def _backward(q, k, v, rpb, out, lse, grad_out, kernel_size, dilation, scale, tile, rpb_grad: bool):
    _, query_kernel, key_kernel = _kernels()
    B, H, W, heads, dim = q.shape
    n_tiles, shape = _geometry(q, dilation, tile)
    _, query_constants, key_constants = kernel_constants(
        q.dtype, kernel_size, dilation, dim, tile, rpb is not None, rpb_grad
    )
    delta = torch.empty_like(lse)  # written by the query-major pass
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    span = 2 * kernel_size - 1
    parts = (
        torch.empty((B, heads, n_tiles, span, span), dtype=lse.dtype, device=q.device) if rpb_grad else lse
    )
    common = (*shape, *_fp32_pair(scale * math.log2(math.e)), *_fp32_pair(scale))
    query_kernel[(B * heads * n_tiles,)](
        q, k, v, rpb if rpb is not None else q, out, grad_out, lse, delta, dq, parts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(), *common,
        **query_constants,
    )  # fmt: skip
    key_kernel[(B * heads * n_tiles,)](
        q, k, v, rpb if rpb is not None else q, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *common,
        **key_constants,
    )  # fmt: skip
    return dq, dk, dv, parts.sum((0, 2)) if rpb_grad else None


_POINTER_ARGS = ("Q", "K", "V", "DO", "OUT", "DQ", "DK", "DV")  # in the inputs' dtype; the rest: stats
_SCALE_ARGS = ("qk_scale_hi", "qk_scale_lo", "scale_hi", "scale_lo")


def compile_offline(
    arch: int, dtype: torch.dtype, kernel_size: int, head_dim: int, shared_limit: int,
    dilation: int = 1, tile: tuple[int, int] = DEFAULT_TILE,
) -> dict[str, dict | None]:  # fmt: skip
    """Compile the three kernels (with RPB and its gradient) for `sm_<arch>` without a GPU, through
    Triton's NVIDIA back end and its bundled ptxas, each in its `LAUNCH_CONFIGS` in turn until one
    fits `shared_limit` bytes of shared memory and spills no registers: {kernel: {config, registers,
    spills (bytes), shared}} of that config, else of the fitting one that spills least, None where
    none fits. float32 compiles its TF32 dots (the fast path). Needs Triton compiled, not interpreted
    (a process without TRITON_INTERPRET=1)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton_interpreting():
        raise RuntimeError("compile_offline needs TRITON_INTERPRET unset (Triton compiled, not interpreted)")
    type_names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    stat_type = "fp64" if dtype == torch.float64 else "fp32"
    all_constants = kernel_constants(dtype, kernel_size, dilation, head_dim, tile, True, True)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spill stores
    knobs.compilation.always_compile = True  # a cached kernel prints no ptxas log
    stats = {}
    for jit, constants, configs in zip(jit_kernels(), all_constants, LAUNCH_CONFIGS, strict=True):
        if dtype == torch.float32:
            constants = dict(constants, PRECISION="tf32")
        names = list(inspect.signature(jit.fn).parameters)
        signature = {name: "constexpr" for name in constants}
        for name in names:
            if name in _POINTER_ARGS:
                signature[name] = "*" + type_names[dtype]
            elif name.isupper() and name not in constants:  # RPB, LSE, DELTA, DRPB_PARTS
                signature[name] = "*" + stat_type
            elif name not in constants:
                signature[name] = "fp32" if name in _SCALE_ARGS else "i32"
        source = ASTSource(jit, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
        stats[jit.fn.__name__] = None
        for warps, stages in configs:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    source,
                    target=GPUTarget("cuda", arch, 32),
                    options=dict(num_warps=warps, num_stages=stages),
                )
            if compiled.metadata.shared > shared_limit:
                continue
            text = log.getvalue()
            used = dict(
                config=(warps, stages),
                registers=int(re.search(r"Used (\d+) registers", text).group(1)),
                spills=int(re.search(r"(\d+) bytes spill stores", text).group(1)),
                shared=compiled.metadata.shared,
            )
            best = stats[jit.fn.__name__]
            if best is None or used["spills"] < best["spills"]:
                stats[jit.fn.__name__] = used
            if used["spills"] == 0:
                break
    return stats


# The kernels as two torch custom ops (forward; backward) with an autograd formula: torch.compile sees
# each as one opaque op with a known output shape (no graph break, nothing traced into the launches).


def _on_device(q: torch.Tensor):
    """Triton launches on the current device; make it q's (autograd's engine does for the backward)."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("nat::na2d_triton_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
    kernel_size: int, dilation: int, scale: float, tile_h: int, tile_w: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    with _on_device(q):
        return _forward(q, k, v, bias, kernel_size, dilation, scale, (tile_h, tile_w))


@_forward_op.register_fake
def _forward_shapes(q, k, v, bias, kernel_size, dilation, scale, tile_h, tile_w):
    B, H, W, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, heads, H, W), dtype=_stat_dtype(q.dtype))


@torch.library.custom_op("nat::na2d_triton_backward", mutates_args=())
def _backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor, grad_out: torch.Tensor, kernel_size: int, dilation: int, scale: float,
    tile_h: int, tile_w: int, rpb_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dq, dk, dv and the RPB gradient (empty when not asked for: an op returns tensors only)."""
    with _on_device(q):
        dq, dk, dv, drpb = _backward(
            q, k, v, bias, out, lse, grad_out, kernel_size, dilation, scale, (tile_h, tile_w), rpb_grad
        )
    return dq, dk, dv, drpb if drpb is not None else lse.new_empty(0)


@_backward_op.register_fake
def _backward_shapes(
    q, k, v, bias, out, lse, grad_out, kernel_size, dilation, scale, tile_h, tile_w, rpb_grad
):
    grads = tuple(q.new_empty(q.shape) for _ in range(3))
    return *grads, bias.new_empty(bias.shape) if rpb_grad else lse.new_empty(0)


def _save_for_backward(ctx, inputs, output):
    q, k, v, bias, kernel_size, dilation, scale, tile_h, tile_w = inputs
    ctx.save_for_backward(q, k, v, bias, *output)
    ctx.geometry = (kernel_size, dilation, scale, tile_h, tile_w)


def _gradients(ctx, grad_out, grad_lse):
    refuse_double_backward("triton")
    q, k, v, bias, out, lse = ctx.saved_tensors
    rpb_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, drpb = _backward_op(q, k, v, bias, out, lse, grad_out, *ctx.geometry, rpb_grad)
    return dq, dk, dv, drpb if rpb_grad else None, None, None, None, None, None


_forward_op.register_autograd(_gradients, setup_context=_save_for_backward)


def na2d_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
    attn_drop: float,
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    tile = tile or DEFAULT_TILE
    if max(t.stride(1) for t in (q, k, v)) * dilation * tile[0] >= 2**31:  # see `_rows`
        raise ValueError(
            f"row strides {q.stride(1)}, {k.stride(1)}, {v.stride(1)} (elements) are too large for the "
            "'triton' backend's in-tile int32 offsets; pass contiguous q, k, v or use backend='torch'"
        )
    # The kernels read the table in their accumulation dtype (an fp32 parameter as it is); autograd
    # casts its gradient back.
    bias = None if rpb is None else rpb.to(_stat_dtype(q.dtype)).contiguous()
    out, _ = _forward_op(q, k, v, bias, kernel_size, dilation, float(scale), *tile)
    return out
