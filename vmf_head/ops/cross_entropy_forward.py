"""Forward pass of the fused cross-entropy: four kernels and the host function that launches them.

1. ``_teacher_stats_kernel``: per teacher row, the online (max, sum of exp) of the logits of q (and
   of pbar = softmax(l_t) under probability centering), split over K for occupancy.
2. ``_center_stat_kernel``: column sums over the teacher rows of the raw output (logit centering) or
   of pbar (probability), for the center update; deterministic (no atomics).
3. ``_student_forward_kernel``: one program per (group, K split) holds the tile [views, BLOCK_K] of
   every view of the group, so the sum over teacher views of q is formed in registers; it
   accumulates the online (max, sum) of l_s, Qsum . l_s and sum(Qsum) per row.
4. ``_merge_kernel``: merges the K splits of 1 and 3 (one program, deterministic) and forms the loss.

With precomputed targets (the teacher rows hold q) only 3 and 4 run. Tiling and memory traffic:
``docs/fused_loss.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._cross_entropy_tiles import NEG_LARGE, centered, group_rows, online_lse, pair_tile, vmf_logits
from ._launch import split, target_programs

# Elements of one [rows, BLOCK_K] tile held in registers by a program, and warps per program.
# Chosen from ptxas's register report (benchmarks/kernel_registers.py), not from timings, which are
# still to be measured (docs/fused_loss.md): 2048 elements on 8 warps keep the student kernels at
# about 120 registers without spills on sm_90. The backward with 16-bit inputs (the gradient's
# conversion) and float64 arithmetic need twice the registers per element, so they get half a
# tile. Tests lower the tile to exercise many K blocks and splits.
TILE_ELEMENTS = 2048
NUM_WARPS = 8
# Rows per tile of the center-statistic kernel.
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
    center_shift_ptr,
    teacher_correction_ptr,
    inv_temps_ptr,
    q_max_ptr,
    q_sum_exp_ptr,
    pbar_max_ptr,
    pbar_sum_exp_ptr,
    split_stride,
    blocks_per_split,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row, split): online (max, sum exp) over its K range of the logits of q, and of
    l_t (pbar) when ``pbar_max_ptr`` is given (probability centering).

    Output element (split, row) is at split * split_stride + row; the splits are merged afterwards.
    """
    row = tl.program_id(0)
    part = tl.program_id(1)
    inv_teacher_temp = tl.load(inv_temps_ptr + 1)
    rows = row + tl.arange(0, 1)
    r_ok = rows < n_rows
    q_max = tl.full([1], NEG_LARGE, ACC)
    q_sum_exp = tl.zeros([1], ACC)
    pbar_max = tl.full([1], NEG_LARGE, ACC)
    pbar_sum_exp = tl.zeros([1], ACC)
    kb_end = tl.minimum((part + 1) * blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(part * blocks_per_split, kb_end):
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        ok = r_ok[:, None] & k_ok[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * t_stride + offs[None, :], mask=ok, other=0.0).to(ACC)
        l_t = vmf_logits(t, offs, k_ok, teacher_correction_ptr, inv_teacher_temp)
        q_max, q_sum_exp = online_lse(q_max, q_sum_exp, centered(l_t, offs, k_ok, center_shift_ptr), ok)
        if pbar_max_ptr is not None:
            pbar_max, pbar_sum_exp = online_lse(pbar_max, pbar_sum_exp, l_t, ok)
    out = part * split_stride + rows
    tl.store(q_max_ptr + out, q_max, mask=r_ok)
    tl.store(q_sum_exp_ptr + out, q_sum_exp, mask=r_ok)
    if pbar_max_ptr is not None:
        tl.store(pbar_max_ptr + out, pbar_max, mask=r_ok)
        tl.store(pbar_sum_exp_ptr + out, pbar_sum_exp, mask=r_ok)


@triton.jit
def _center_stat_kernel(
    t_ptr,
    t_stride,
    n_rows,
    K,
    teacher_correction_ptr,
    inv_temps_ptr,
    pbar_max_ptr,
    pbar_sum_exp_ptr,
    out_ptr,
    rows_per_chunk,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (K block, row chunk): sum over its teacher rows of pbar = exp(l_t - max) / sum when
    ``pbar_max_ptr`` is given (probability centering), else of the raw output (logit centering).
    Output [n_chunks, K]; the host adds the chunks.
    """
    kb = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_teacher_temp = tl.load(inv_temps_ptr + 1)
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
        if pbar_max_ptr is not None:
            l_t = vmf_logits(t, offs, k_ok, teacher_correction_ptr, inv_teacher_temp)
            # a missing row gets max = +inf, so its (discarded) exp underflows instead of overflowing
            pbar_max = tl.load(pbar_max_ptr + rows, mask=r_ok, other=float("inf"))
            inv_pbar_sum_exp = 1.0 / tl.load(pbar_sum_exp_ptr + rows, mask=r_ok, other=1.0)
            t = tl.where(ok, tl.exp(l_t - pbar_max[:, None]) * inv_pbar_sum_exp[:, None], 0.0)
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
    student_correction_ptr,
    center_shift_ptr,
    teacher_correction_ptr,
    q_max_ptr,
    q_sum_exp_ptr,
    inv_temps_ptr,
    s_max_ptr,
    s_sum_exp_ptr,
    dot_ptr,
    target_mass_ptr,
    blocks_per_split,
    PAIR_SELF: tl.constexpr,
    N_TEACHER_VIEWS: tl.constexpr,
    SKIP_SAME: tl.constexpr,
    ACC: tl.constexpr,
    VIEW_TILE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (group, split): per student row of the group, over its K range, the online
    (max, sum exp) of l_s, Qsum . l_s and sum(Qsum). Outputs [n_splits, n_rows].
    """
    g = tl.program_id(0)
    part = tl.program_id(1)
    inv_student_temp = tl.load(inv_temps_ptr)
    inv_teacher_temp = tl.load(inv_temps_ptr + 1)
    row0, rows, r_ok, s_ok, _w = group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEW_TILE)
    m = tl.full([VIEW_TILE], NEG_LARGE, ACC)
    sum_exp = tl.zeros([VIEW_TILE], ACC)
    dot = tl.zeros([VIEW_TILE], ACC)
    target_mass = tl.zeros([VIEW_TILE], ACC)
    kb_end = tl.minimum((part + 1) * blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(part * blocks_per_split, kb_end):
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        student_logits, paired_q, ok = pair_tile(
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
            student_correction_ptr,
            center_shift_ptr,
            teacher_correction_ptr,
            q_max_ptr,
            q_sum_exp_ptr,
            inv_student_temp,
            inv_teacher_temp,
            PAIR_SELF,
            N_TEACHER_VIEWS,
            SKIP_SAME,
            ACC,
            VIEW_TILE,
            BLOCK_K,
        )
        m, sum_exp = online_lse(m, sum_exp, student_logits, ok)
        dot += tl.sum(paired_q * tl.where(ok, student_logits, 0.0), axis=1)
        target_mass += tl.sum(paired_q, axis=1)
    out = part * n_rows + rows
    tl.store(s_max_ptr + out, m, mask=r_ok)
    tl.store(s_sum_exp_ptr + out, sum_exp, mask=r_ok)
    tl.store(dot_ptr + out, dot, mask=r_ok)
    tl.store(target_mass_ptr + out, target_mass, mask=r_ok)


@triton.jit
def _merge_kernel(
    m_ptr,
    sum_exp_ptr,
    dot_ptr,
    target_mass_ptr,
    w_ptr,
    n_splits,
    n_rows,
    m_out_ptr,
    sum_exp_out_ptr,
    target_mass_out_ptr,
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
        m = tl.full([BLOCK], NEG_LARGE, ACC)
        for s in range(n_splits):
            m = tl.maximum(m, tl.load(m_ptr + s * n_rows + rows, mask=ok, other=NEG_LARGE))
        sum_exp = tl.zeros([BLOCK], ACC)
        dot = tl.zeros([BLOCK], ACC)
        target_mass = tl.zeros([BLOCK], ACC)
        for s in range(n_splits):
            m_s = tl.load(m_ptr + s * n_rows + rows, mask=ok, other=NEG_LARGE)
            sum_exp += tl.load(sum_exp_ptr + s * n_rows + rows, mask=ok, other=0.0) * tl.exp(m_s - m)
            if loss_ptr is not None:
                dot += tl.load(dot_ptr + s * n_rows + rows, mask=ok, other=0.0)
                target_mass += tl.load(target_mass_ptr + s * n_rows + rows, mask=ok, other=0.0)
        tl.store(m_out_ptr + rows, m, mask=ok)
        tl.store(sum_exp_out_ptr + rows, sum_exp, mask=ok)
        if loss_ptr is not None:
            tl.store(target_mass_out_ptr + rows, target_mass, mask=ok)
            w = tl.load(w_ptr + rows, mask=ok, other=0.0)
            # rows of weight 0 were not read (sum exp = 0): they contribute nothing, and log(1) keeps
            # their discarded term finite
            active = w != 0.0
            lse = m + tl.log(tl.where(active, sum_exp, 1.0))
            total += tl.where(active, w * (target_mass * lse - dot), 0.0)
    if loss_ptr is not None:
        tl.store(loss_ptr, tl.sum(total, axis=0))


def _merge(m: torch.Tensor, sum_exp: torch.Tensor, n_splits: int, ACC) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split online log-sum-exp states (flat [n_splits, rows]) into (max, sum exp) per row."""
    if n_splits == 1:
        return m, sum_exp
    n_rows = m.numel() // n_splits
    m_out, sum_exp_out = m.new_empty(n_rows), sum_exp.new_empty(n_rows)
    _merge_kernel[(1,)](
        m_ptr=m,
        sum_exp_ptr=sum_exp,
        dot_ptr=None,
        target_mass_ptr=None,
        w_ptr=None,
        n_splits=n_splits,
        n_rows=n_rows,
        m_out_ptr=m_out,
        sum_exp_out_ptr=sum_exp_out,
        target_mass_out_ptr=None,
        loss_ptr=None,
        ACC=ACC,
        BLOCK=MERGE_ROWS,
        num_warps=MERGE_WARPS,
    )
    return m_out, sum_exp_out


class Inputs(NamedTuple):
    """What every launch of the fused cross-entropy reads (``cross_entropy.py`` builds it)."""

    student: torch.Tensor  # (rows, K) raw student outputs
    teacher: torch.Tensor  # (teacher rows, K) raw teacher outputs, or the targets q themselves
    weights: torch.Tensor  # (rows,) loss weight per student row, in the arithmetic dtype
    center_shift: torch.Tensor | None  # (K,) c / tau_t or log c (_cross_entropy_tiles); None: targets given
    student_correction: torch.Tensor | None  # (K,) shifted to a maximum of 0
    teacher_correction: torch.Tensor | None  # (K,) shifted to a maximum of 0
    inv_temps: torch.Tensor  # [1 / tau_s, 1 / tau_t] in the arithmetic dtype


class TeacherRowStats(NamedTuple):
    """Per teacher row, the online log-sum-exp state of the logits of q."""

    q_max: torch.Tensor
    q_sum_exp: torch.Tensor


class StudentRowStats(NamedTuple):
    """Per student row, what the backward recomputes the softmax and the targets' mass from."""

    s_max: torch.Tensor
    s_sum_exp: torch.Tensor
    target_mass: torch.Tensor  # sum_k of the paired targets (the number of paired views, up to rounding)


def teacher_statistics(x: Inputs, *, probability: bool, ACC) -> tuple[TeacherRowStats, torch.Tensor]:
    """Kernels 1 and 2: the (max, sum exp) of the logits of q per teacher row, and the (K,) center
    statistic (mean of pbar or of the raw output over the rows)."""
    n_trows, K = x.teacher.shape
    acc = dict(device=x.teacher.device, dtype=x.inv_temps.dtype)
    target = target_programs(x.teacher.device)
    bk_t = block_k(1, K)
    per_split, n_split = split(triton.cdiv(K, bk_t), triton.cdiv(target, n_trows))
    n_stats = (2 if probability else 1) * n_trows
    row_max = torch.empty(n_split * n_stats, **acc)
    row_sum_exp = torch.empty_like(row_max)
    _teacher_stats_kernel[(n_trows, n_split)](
        t_ptr=x.teacher,
        t_stride=x.teacher.stride(0),
        n_rows=n_trows,
        K=K,
        center_shift_ptr=x.center_shift,
        teacher_correction_ptr=x.teacher_correction,
        inv_temps_ptr=x.inv_temps,
        q_max_ptr=row_max,
        q_sum_exp_ptr=row_sum_exp,
        pbar_max_ptr=row_max[n_trows:] if probability else None,
        pbar_sum_exp_ptr=row_sum_exp[n_trows:] if probability else None,
        split_stride=n_stats,
        blocks_per_split=per_split,
        ACC=ACC,
        BLOCK_K=bk_t,
        num_warps=NUM_WARPS,
    )
    row_max, row_sum_exp = _merge(row_max, row_sum_exp, n_split, ACC)

    bk_c = block_k(STAT_ROWS, K)
    n_kb = triton.cdiv(K, bk_c)
    rows_per_chunk, _ = split(n_trows, triton.cdiv(target, n_kb))
    rows_per_chunk = triton.cdiv(rows_per_chunk, STAT_ROWS) * STAT_ROWS
    n_chunk = triton.cdiv(n_trows, rows_per_chunk)
    stat = torch.empty(n_chunk, K, **acc)
    _center_stat_kernel[(n_kb, n_chunk)](
        t_ptr=x.teacher,
        t_stride=x.teacher.stride(0),
        n_rows=n_trows,
        K=K,
        teacher_correction_ptr=x.teacher_correction,
        inv_temps_ptr=x.inv_temps,
        pbar_max_ptr=row_max[n_trows:] if probability else None,
        pbar_sum_exp_ptr=row_sum_exp[n_trows:] if probability else None,
        out_ptr=stat,
        rows_per_chunk=rows_per_chunk,
        ACC=ACC,
        ROWS=STAT_ROWS,
        BLOCK_K=bk_c,
        num_warps=NUM_WARPS,
    )
    return TeacherRowStats(row_max[:n_trows], row_sum_exp[:n_trows]), stat.sum(dim=0) / n_trows


def student_pass(x: Inputs, teacher_stats: TeacherRowStats | None, layout, ACC) -> tuple[torch.Tensor, StudentRowStats]:
    """Kernels 3 and 4: the loss and, per student row, the statistics the backward needs."""
    n_rows, K = x.student.shape
    acc = dict(device=x.student.device, dtype=x.weights.dtype)
    view_tile = triton.next_power_of_2(layout.n_views)
    bk_s = block_k(view_tile, K, half_tile=x.weights.dtype == torch.float64)
    per_split, n_split = split(triton.cdiv(K, bk_s), triton.cdiv(target_programs(x.student.device), layout.n_groups))
    part = torch.empty(4, n_split, n_rows, **acc)  # max, sum exp, Qsum . l_s, sum(Qsum)
    _student_forward_kernel[(layout.n_groups, n_split)](
        s_ptr=x.student,
        s_stride=x.student.stride(0),
        t_ptr=x.teacher,
        t_stride=x.teacher.stride(0),
        w_ptr=x.weights,
        n_rows=n_rows,
        K=K,
        n_views=layout.n_views,
        view_stride=layout.view_stride,
        group_stride=layout.group_stride,
        student_correction_ptr=x.student_correction,
        center_shift_ptr=x.center_shift,
        teacher_correction_ptr=x.teacher_correction,
        q_max_ptr=None if teacher_stats is None else teacher_stats.q_max,
        q_sum_exp_ptr=None if teacher_stats is None else teacher_stats.q_sum_exp,
        inv_temps_ptr=x.inv_temps,
        s_max_ptr=part[0],
        s_sum_exp_ptr=part[1],
        dot_ptr=part[2],
        target_mass_ptr=part[3],
        blocks_per_split=per_split,
        PAIR_SELF=layout.pair_self,
        N_TEACHER_VIEWS=layout.n_teacher_views,
        SKIP_SAME=layout.skip_same,
        ACC=ACC,
        VIEW_TILE=view_tile,
        BLOCK_K=bk_s,
        num_warps=NUM_WARPS,
    )
    loss = torch.empty((), **acc)
    stats = StudentRowStats(*(torch.empty(n_rows, **acc) for _ in StudentRowStats._fields))
    _merge_kernel[(1,)](
        m_ptr=part[0],
        sum_exp_ptr=part[1],
        dot_ptr=part[2],
        target_mass_ptr=part[3],
        w_ptr=x.weights,
        n_splits=n_split,
        n_rows=n_rows,
        m_out_ptr=stats.s_max,
        sum_exp_out_ptr=stats.s_sum_exp,
        target_mass_out_ptr=stats.target_mass,
        loss_ptr=loss,
        ACC=ACC,
        BLOCK=MERGE_ROWS,
        num_warps=MERGE_WARPS,
    )
    return loss, stats
