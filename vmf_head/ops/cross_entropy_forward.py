"""Forward pass of the fused cross-entropy: four kernels and the host function that launches them.

1. ``_teacher_stats_kernel``: per teacher row, the online (max, sum of exp) of the logits of q (and
   of pbar = softmax(l_t) under probability centering), split over K for occupancy.
2. ``_center_stat_kernel``: column sums over the teacher rows of the raw output (logit centering) or
   of pbar (probability), for the centre update; deterministic (no atomics).
3. ``_student_forward_kernel``: one program per (group, K split) holds the tile [views, BLOCK_K] of
   every view of the group, so the sum over teacher views of q is formed in registers; it
   accumulates the online (max, sum) of l_s, Qsum . l_s and sum(Qsum) per row.
4. ``_merge_kernel``: merges the K splits of 1 and 3 (one program, deterministic) and forms the loss.

With precomputed targets (the teacher rows hold q) only 3 and 4 run. Tiling and memory traffic:
``docs/fused_loss.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cross_entropy_tiles import centered, group_rows, online_lse, pair_tile, vmf_logits
from ._launch import split, target_programs

# Elements of one [rows, BLOCK_K] tile held in registers by a program, and warps per program.
# Chosen from ptxas's register report (benchmarks/kernel_registers.py), not from timings, which are
# still to be measured (docs/fused_loss.md): 2048 elements on 8 warps keep the student kernels at
# about 120 registers without spills on sm_90. The backward with 16-bit inputs (the gradient's
# conversion) and float64 arithmetic need twice the registers per element, so they get half a
# tile. Tests lower the tile to exercise many K blocks and splits.
TILE_ELEMENTS = 2048
NUM_WARPS = 8
# Rows per tile of the centre-statistic kernel.
STAT_ROWS = 4
# Rows per iteration and warps of the (single-program) merge kernel.
MERGE_ROWS = 1024
MERGE_WARPS = 4


def block_k(rows_per_tile: int, K: int, half_tile: bool = False) -> int:
    """BLOCK_K of a [rows_per_tile, BLOCK_K] tile: a power of 2, no wider than K needs."""
    tile = TILE_ELEMENTS // 2 if half_tile else TILE_ELEMENTS
    return max(1, min(tile // rows_per_tile, triton.next_power_of_2(K)))


@triton.jit
def _teacher_stats_kernel(
    t_ptr,
    t_stride,
    n_rows,
    K,
    center_ptr,
    tcorr_ptr,
    inv_temps_ptr,
    mq_ptr,
    lq_ptr,
    mp_ptr,
    lp_ptr,
    split_stride,
    blocks_per_split,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row, split): online (max, sum exp) over its K range of the logits of q, and of
    l_t (pbar) when ``mp_ptr`` is given (probability centering).

    Output element (split, row) is at split * split_stride + row; the splits are merged afterwards.
    """
    row = tl.program_id(0)
    part = tl.program_id(1)
    inv_tt = tl.load(inv_temps_ptr + 1)
    rows = row + tl.arange(0, 1)
    r_ok = rows < n_rows
    mq = tl.full([1], -3.0e38, ACC)
    lq = tl.zeros([1], ACC)
    mp = tl.full([1], -3.0e38, ACC)
    lp = tl.zeros([1], ACC)
    kb_end = tl.minimum((part + 1) * blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(part * blocks_per_split, kb_end):
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        ok = r_ok[:, None] & k_ok[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * t_stride + offs[None, :], mask=ok, other=0.0).to(ACC)
        zp = vmf_logits(t, offs, k_ok, tcorr_ptr, inv_tt)
        mq, lq = online_lse(mq, lq, centered(zp, offs, k_ok, center_ptr), ok)
        if mp_ptr is not None:
            mp, lp = online_lse(mp, lp, zp, ok)
    out = part * split_stride + rows
    tl.store(mq_ptr + out, mq, mask=r_ok)
    tl.store(lq_ptr + out, lq, mask=r_ok)
    if mp_ptr is not None:
        tl.store(mp_ptr + out, mp, mask=r_ok)
        tl.store(lp_ptr + out, lp, mask=r_ok)


@triton.jit
def _center_stat_kernel(
    t_ptr,
    t_stride,
    n_rows,
    K,
    tcorr_ptr,
    inv_temps_ptr,
    mp_ptr,
    lp_ptr,
    out_ptr,
    rows_per_chunk,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (K block, row chunk): sum over its teacher rows of pbar = exp(l_t - max) / sum when
    ``mp_ptr`` is given (probability centering), else of the raw output (logit centering).
    Output [n_chunks, K]; the host adds the chunks.
    """
    kb = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_tt = tl.load(inv_temps_ptr + 1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs < K
    acc = tl.zeros([BLOCK_K], ACC)
    r_begin = chunk * rows_per_chunk
    r_end = tl.minimum(r_begin + rows_per_chunk, n_rows)
    for r0 in range(r_begin, r_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r_ok = rows < r_end
        ok = r_ok[:, None] & k_ok[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * t_stride + offs[None, :], mask=ok, other=0.0).to(ACC)
        if mp_ptr is not None:
            zp = vmf_logits(t, offs, k_ok, tcorr_ptr, inv_tt)
            # a missing row gets max = +inf, so its (discarded) exp underflows instead of overflowing
            mp = tl.load(mp_ptr + rows, mask=r_ok, other=float("inf"))
            inv_lp = 1.0 / tl.load(lp_ptr + rows, mask=r_ok, other=1.0)
            t = tl.where(ok, tl.exp(zp - mp[:, None]) * inv_lp[:, None], 0.0)
        acc += tl.sum(t, axis=0)
    tl.store(out_ptr + chunk * K + offs, acc, mask=k_ok)


@triton.jit
def _student_forward_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    w_ptr,
    n_rows,
    K,
    n_views,
    view_stride,
    group_stride,
    scorr_ptr,
    center_ptr,
    tcorr_ptr,
    mq_ptr,
    lq_ptr,
    inv_temps_ptr,
    ms_ptr,
    ls_ptr,
    dot_ptr,
    qs_ptr,
    blocks_per_split,
    PAIR_SELF: tl.constexpr,
    N_TEACHER: tl.constexpr,
    SKIP_SAME: tl.constexpr,
    ACC: tl.constexpr,
    VIEWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (group, split): per student row of the group, over its K range, the online
    (max, sum exp) of l_s, Qsum . l_s and sum(Qsum). Outputs [n_splits, n_rows].
    """
    g = tl.program_id(0)
    part = tl.program_id(1)
    inv_ts = tl.load(inv_temps_ptr)
    inv_tt = tl.load(inv_temps_ptr + 1)
    row0, rows, r_ok, s_ok, _w = group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEWS)
    m = tl.full([VIEWS], -3.0e38, ACC)
    sum_exp = tl.zeros([VIEWS], ACC)
    dot = tl.zeros([VIEWS], ACC)
    qs = tl.zeros([VIEWS], ACC)
    kb_end = tl.minimum((part + 1) * blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(part * blocks_per_split, kb_end):
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        ls, qsum, ok = pair_tile(
            s_ptr,
            s_stride,
            t_ptr,
            t_stride,
            row0,
            rows,
            s_ok,
            view_stride,
            offs,
            k_ok,
            scorr_ptr,
            center_ptr,
            tcorr_ptr,
            mq_ptr,
            lq_ptr,
            inv_ts,
            inv_tt,
            PAIR_SELF,
            N_TEACHER,
            SKIP_SAME,
            ACC,
            VIEWS,
            BLOCK_K,
        )
        m, sum_exp = online_lse(m, sum_exp, ls, ok)
        dot += tl.sum(qsum * tl.where(ok, ls, 0.0), axis=1)
        qs += tl.sum(qsum, axis=1)
    out = part * n_rows + rows
    tl.store(ms_ptr + out, m, mask=r_ok)
    tl.store(ls_ptr + out, sum_exp, mask=r_ok)
    tl.store(dot_ptr + out, dot, mask=r_ok)
    tl.store(qs_ptr + out, qs, mask=r_ok)


@triton.jit
def _merge_kernel(
    m_ptr,
    l_ptr,
    dot_ptr,
    qs_ptr,
    w_ptr,
    n_splits,
    n_rows,
    m_out_ptr,
    l_out_ptr,
    qs_out_ptr,
    loss_ptr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: merge the per-split states [n_splits, n_rows] of the row kernels into the
    (max, sum exp) of each row. With ``loss_ptr`` it also sums Qsum . l_s and sum(Qsum) over the
    splits and writes the loss, sum_r w_r (qs_r lse_r - dot_r) over rows of non-zero weight
    (deterministic)."""
    total = tl.zeros([BLOCK], ACC)
    for r0 in range(0, n_rows, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        ok = rows < n_rows
        m = tl.full([BLOCK], -3.0e38, ACC)
        for s in range(n_splits):
            m = tl.maximum(m, tl.load(m_ptr + s * n_rows + rows, mask=ok, other=-3.0e38))
        sum_exp = tl.zeros([BLOCK], ACC)
        dot = tl.zeros([BLOCK], ACC)
        qs = tl.zeros([BLOCK], ACC)
        for s in range(n_splits):
            m_s = tl.load(m_ptr + s * n_rows + rows, mask=ok, other=-3.0e38)
            sum_exp += tl.load(l_ptr + s * n_rows + rows, mask=ok, other=0.0) * tl.exp(m_s - m)
            if loss_ptr is not None:
                dot += tl.load(dot_ptr + s * n_rows + rows, mask=ok, other=0.0)
                qs += tl.load(qs_ptr + s * n_rows + rows, mask=ok, other=0.0)
        tl.store(m_out_ptr + rows, m, mask=ok)
        tl.store(l_out_ptr + rows, sum_exp, mask=ok)
        if loss_ptr is not None:
            tl.store(qs_out_ptr + rows, qs, mask=ok)
            w = tl.load(w_ptr + rows, mask=ok, other=0.0)
            # rows of weight 0 were not read (sum exp = 0): they contribute nothing, and log(1) keeps
            # their discarded term finite
            active = w != 0.0
            lse = m + tl.log(tl.where(active, sum_exp, 1.0))
            total += tl.where(active, w * (qs * lse - dot), 0.0)
    if loss_ptr is not None:
        tl.store(loss_ptr, tl.sum(total, axis=0))


def _merge(m: torch.Tensor, sum_exp: torch.Tensor, n_splits: int, ACC) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split online log-sum-exp states (flat [n_splits, rows]) into (max, sum exp) per row."""
    if n_splits == 1:
        return m, sum_exp
    n_rows = m.numel() // n_splits
    m_out, l_out = m.new_empty(n_rows), sum_exp.new_empty(n_rows)
    _merge_kernel[(1,)](
        m_ptr=m,
        l_ptr=sum_exp,
        dot_ptr=None,
        qs_ptr=None,
        w_ptr=None,
        n_splits=n_splits,
        n_rows=n_rows,
        m_out_ptr=m_out,
        l_out_ptr=l_out,
        qs_out_ptr=None,
        loss_ptr=None,
        ACC=ACC,
        BLOCK=MERGE_ROWS,
        num_warps=MERGE_WARPS,
    )
    return m_out, l_out


def teacher_statistics(
    teacher: torch.Tensor,
    center: torch.Tensor,
    tcorr: torch.Tensor | None,
    inv_temps: torch.Tensor,
    *,
    probability: bool,
    ACC,
) -> tuple[torch.Tensor, ...]:
    """Kernels 1 and 2: ``(mq, lq, stat)``, the (max, sum exp) of the logits of q per teacher row and
    the (K,) centre statistic (mean of pbar or of the raw output over the rows)."""
    n_trows, K = teacher.shape
    acc = dict(device=teacher.device, dtype=inv_temps.dtype)
    target = target_programs(teacher.device)
    bk_t = block_k(1, K)
    per_split, n_split = split(triton.cdiv(K, bk_t), triton.cdiv(target, n_trows))
    n_stats = (2 if probability else 1) * n_trows
    m_t = torch.empty(n_split * n_stats, **acc)
    l_t = torch.empty_like(m_t)
    _teacher_stats_kernel[(n_trows, n_split)](
        t_ptr=teacher,
        t_stride=teacher.stride(0),
        n_rows=n_trows,
        K=K,
        center_ptr=center,
        tcorr_ptr=tcorr,
        inv_temps_ptr=inv_temps,
        mq_ptr=m_t,
        lq_ptr=l_t,
        mp_ptr=m_t[n_trows:] if probability else None,
        lp_ptr=l_t[n_trows:] if probability else None,
        split_stride=n_stats,
        blocks_per_split=per_split,
        ACC=ACC,
        BLOCK_K=bk_t,
        num_warps=NUM_WARPS,
    )
    m_t, l_t = _merge(m_t, l_t, n_split, ACC)

    bk_c = block_k(STAT_ROWS, K)
    n_kb = triton.cdiv(K, bk_c)
    rows_per_chunk, _ = split(n_trows, triton.cdiv(target, n_kb))
    rows_per_chunk = triton.cdiv(rows_per_chunk, STAT_ROWS) * STAT_ROWS
    n_chunk = triton.cdiv(n_trows, rows_per_chunk)
    stat = torch.empty(n_chunk, K, **acc)
    _center_stat_kernel[(n_kb, n_chunk)](
        t_ptr=teacher,
        t_stride=teacher.stride(0),
        n_rows=n_trows,
        K=K,
        tcorr_ptr=tcorr,
        inv_temps_ptr=inv_temps,
        mp_ptr=m_t[n_trows:] if probability else None,
        lp_ptr=l_t[n_trows:] if probability else None,
        out_ptr=stat,
        rows_per_chunk=rows_per_chunk,
        ACC=ACC,
        ROWS=STAT_ROWS,
        BLOCK_K=bk_c,
        num_warps=NUM_WARPS,
    )
    return m_t[:n_trows], l_t[:n_trows], stat.sum(dim=0) / n_trows


def student_pass(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    center: torch.Tensor | None,
    scorr: torch.Tensor | None,
    tcorr: torch.Tensor | None,
    mq: torch.Tensor | None,
    lq: torch.Tensor | None,
    inv_temps: torch.Tensor,
    layout,
    ACC,
) -> tuple[torch.Tensor, ...]:
    """Kernels 3 and 4: ``(loss, ms, ls, qs)``, the loss and per student row the (max, sum exp) of
    l_s and sum_k Qsum (kept for the backward)."""
    n_rows, K = student.shape
    acc = dict(device=student.device, dtype=weights.dtype)
    views_p2 = triton.next_power_of_2(layout.n_views)
    bk_s = block_k(views_p2, K, half_tile=weights.dtype == torch.float64)
    per_split, n_split = split(triton.cdiv(K, bk_s), triton.cdiv(target_programs(student.device), layout.n_groups))
    part = torch.empty(4, n_split, n_rows, **acc)  # max, sum exp, Qsum . l_s, sum(Qsum)
    _student_forward_kernel[(layout.n_groups, n_split)](
        s_ptr=student,
        s_stride=student.stride(0),
        t_ptr=teacher,
        t_stride=teacher.stride(0),
        w_ptr=weights,
        n_rows=n_rows,
        K=K,
        n_views=layout.n_views,
        view_stride=layout.view_stride,
        group_stride=layout.group_stride,
        scorr_ptr=scorr,
        center_ptr=center,
        tcorr_ptr=tcorr,
        mq_ptr=mq,
        lq_ptr=lq,
        inv_temps_ptr=inv_temps,
        ms_ptr=part[0],
        ls_ptr=part[1],
        dot_ptr=part[2],
        qs_ptr=part[3],
        blocks_per_split=per_split,
        PAIR_SELF=layout.pair_self,
        N_TEACHER=layout.n_teacher_views,
        SKIP_SAME=layout.skip_same,
        ACC=ACC,
        VIEWS=views_p2,
        BLOCK_K=bk_s,
        num_warps=NUM_WARPS,
    )
    loss = torch.empty((), **acc)
    ms, ls, qs = torch.empty(n_rows, **acc), torch.empty(n_rows, **acc), torch.empty(n_rows, **acc)
    _merge_kernel[(1,)](
        m_ptr=part[0],
        l_ptr=part[1],
        dot_ptr=part[2],
        qs_ptr=part[3],
        w_ptr=weights,
        n_splits=n_split,
        n_rows=n_rows,
        m_out_ptr=ms,
        l_out_ptr=ls,
        qs_out_ptr=qs,
        loss_ptr=loss,
        ACC=ACC,
        BLOCK=MERGE_ROWS,
        num_warps=MERGE_WARPS,
    )
    return loss, ms, ls, qs
