"""Fused Triton kernels for the DINO-vMF multi-crop cross-entropy (and, through the same kernels,
iBOT-vMF's masked patch term in ``ops/ibot_patch_loss.py``).

Same contract as the plain-PyTorch reference ``vmf_head.functional.dino_loss.dino_vmf_loss``:

    l_s = student / tau_s + log C_p(||w_s|| / tau_s)                        (student vMF logits)
    logit centering:       q = softmax((teacher - c) / tau_t + log C_p(||w_t|| / tau_t))
    probability centering: l_t = teacher / tau_t + log C_p(||w_t|| / tau_t),
                           pbar = softmax(l_t),  q = softmax(l_t - log c)
    L = mean over pairs (i teacher view, j student view, i != j) of mean_b -q_i[b] . log_softmax(l_s_j[b])

(Govindarajan et al., "DINO as a von Mises-Fisher mixture model", ICLR 2023). Per student row the
kernels use ``sum_{i != j} -q_i . lsm_j = qs_j lse_j - Qsum_j . l_s_j`` with
``Qsum_j = sum_{i != j} q_i`` and ``qs_j = sum_k Qsum_j[k]`` (the number of teacher views paired
with j, up to rounding; the computed sum keeps the identity exact for the q actually used). So the
forward needs one online log-sum-exp and one dot product per student row, and the backward

    d L / d l_s_j[b, k] = w_j (qs_j softmax(l_s_j)[b, k] - Qsum_j[b, k])

recomputes softmax(l_s_j) from the saved (max, sum) of the row and Qsum_j from the teacher logits and
the saved teacher (max, sum). Nothing of size B x K is saved: the forward reads the student once and
the teacher three times (row statistics, centre statistic, the pass with the student), the backward
reads both once and writes the gradient once, in the input dtype. Kernels:

1. ``_teacher_stats_kernel``: per teacher row, the online (max, sum of exp) of the logits of q (and of
   pbar under probability centering), split over K for occupancy.
2. ``_center_stat_kernel``: column sums over the teacher rows of the raw output (logit centering) or
   of pbar (probability), for the centre update; deterministic (no atomics).
3. ``_student_forward_kernel``: one program per (image, K split) holds the tile [views, BLOCK_K] of
   every view of that image, so the sum over teacher views of q is formed in registers; it
   accumulates the online (max, sum) of l_s, Qsum . l_s and sum(Qsum) per row.
4. ``_merge_kernel``: merges the K splits of 1 and 3 (one program, deterministic) and forms the loss.
5. ``_student_backward_kernel``: one program per (K block, chunk of images) writes the gradient of
   the student tile and sums the student-correction gradient over its images in registers.

The forward and the backward are ``torch.library`` custom operators (``vmf_head::fused_cross_entropy``
and ``vmf_head::fused_cross_entropy_backward``) with fake implementations and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` keeps them as opaque nodes.

Arithmetic is float32 (float64 when an input is float64, as the reference). Design, tiling and
memory traffic: ``docs/fused_loss.md``. Sinkhorn centering stays on the reference path: its
iterations need whole-batch column sums between passes (all-reduced under torch.distributed), which
these row-parallel kernels cannot do in one launch; ``CENTERINGS`` lists what is fused.

Triton decides at import time whether it interprets kernels: set ``TRITON_INTERPRET=1`` before the
first import of this module to run it on CPU tensors (the tests do; it is slow).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..functional.centering import check_centering
from ..functional.dino_loss import check_dino_inputs
from ..functional.vmf import check_temperature, compute_dtype

__all__ = ["CENTERINGS", "PairLayout", "dino_vmf_loss", "fused_cross_entropy"]

CENTERINGS = ("logit", "probability")
"""Teacher centerings the fused kernels implement (``sinkhorn`` stays on the reference path)."""

# Elements of one [rows, BLOCK_K] tile held in registers by a program, and warps per program.
# Chosen from ptxas's register report for sm_90 (benchmarks/kernel_registers.py), not from
# timings, which are still to be measured (docs/fused_loss.md): 2048 elements on 8 warps keep the
# student kernels at about 120 registers without spills (two programs per SM). The backward with
# 16-bit inputs (the gradient's conversion) and float64 arithmetic need twice the registers per
# element, so they get half a tile. Tests lower the tile to exercise many K blocks and splits.
_TILE_ELEMENTS = 2048
_NUM_WARPS = 8
# Rows per tile of the centre-statistic kernel.
_STAT_ROWS = 4
# Programs per streaming multiprocessor that the grids aim for (enough to hide memory latency).
_PROGRAMS_PER_SM = 4
# Grid size aimed for when kernels run in the interpreter (CPU): small, but > 1 so splits are used.
_INTERPRETER_PROGRAMS = 4
# Rows per iteration and warps of the (single-program) merge kernel.
_MERGE_ROWS = 1024
_MERGE_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


# ----------------------------------------------------------------------------------------------
# Triton building blocks. ACC is the arithmetic dtype (tl.float32, or tl.float64 for float64
# inputs). Kernels multiply by inverse temperatures (as PyTorch does on CUDA for a division by a
# scalar; a true division costs a reciprocal on the special-function units, which the exponentials
# already keep busy). They arrive as float32 pairs hi + lo (Triton passes Python floats as float32),
# exact enough for float64 and equal to the float32 rounding in float32.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """hi + lo in the arithmetic dtype (a float64 constant passed as two float32 halves)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _corrected(x, offs, k_ok, tcorr_ptr, inv_tt, HAS_TCORR: tl.constexpr):
    """x / tau_t + teacher_correction on a tile [rows, BLOCK_K]."""
    z = x * inv_tt
    if HAS_TCORR:
        z = z + tl.load(tcorr_ptr + offs, mask=k_ok, other=0.0)[None, :]
    return z


@triton.jit
def _teacher_logits(t, offs, k_ok, center_ptr, log_center_ptr, tcorr_ptr, inv_tt,
                    PROBABILITY: tl.constexpr, HAS_TCORR: tl.constexpr):
    """Logits zq with softmax(zq) = q, on a tile t [rows, BLOCK_K] of raw teacher outputs."""
    if PROBABILITY:
        zq = _corrected(t, offs, k_ok, tcorr_ptr, inv_tt, HAS_TCORR) \
            - tl.load(log_center_ptr + offs, mask=k_ok, other=0.0)[None, :]
    else:
        zq = _corrected(t - tl.load(center_ptr + offs, mask=k_ok, other=0.0)[None, :], offs, k_ok,
                        tcorr_ptr, inv_tt, HAS_TCORR)
    return zq


@triton.jit
def _online_lse(m, l, x, ok):
    """One step of the online (single-pass) log-sum-exp over axis 1 of x [rows, BLOCK_K].

    m, l [rows]: running max and sum of exp(x - m). m starts at a finite -3e38 instead of -inf so a
    row with nothing valid yet keeps exp(m - m_new) = 1 instead of NaN.
    """
    x = tl.where(ok, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    return m_new, l


@triton.jit
def _group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEWS: tl.constexpr):
    """Rows of the views of group g (one image in DINO; VIEWS consecutive tokens in iBOT).

    Returns the first row g * group_stride (int64), rows [VIEWS] (int64), r_ok (row exists), s_ok
    (row exists and has a non-zero loss weight: only those read the student), w.
    """
    j = tl.arange(0, VIEWS)
    row0 = tl.cast(g, tl.int64) * group_stride
    rows = row0 + j * view_stride
    r_ok = (j < n_views) & (rows < n_rows)
    w = tl.load(w_ptr + rows, mask=r_ok, other=0.0)
    return row0, rows, r_ok, r_ok & (w != 0.0), w


@triton.jit
def _teacher_q(t_ptr, t_stride, rows, t_ok, offs, k_ok, center_ptr, log_center_ptr, tcorr_ptr,
               mq_ptr, lq_ptr, inv_tt, PROBABILITY: tl.constexpr, HAS_TCORR: tl.constexpr,
               ACC: tl.constexpr):
    """q = exp(zq - max) / sum on the tile [len(rows), BLOCK_K] of teacher rows (0 where not t_ok)."""
    tile_ok = t_ok[:, None] & k_ok[None, :]
    t = tl.load(t_ptr + rows[:, None] * t_stride + offs[None, :], mask=tile_ok, other=0.0).to(ACC)
    zq = _teacher_logits(t, offs, k_ok, center_ptr, log_center_ptr, tcorr_ptr, inv_tt, PROBABILITY, HAS_TCORR)
    # a missing row gets max = +inf, so its (discarded) exp underflows instead of overflowing
    mq = tl.load(mq_ptr + rows, mask=t_ok, other=float("inf"))
    inv_lq = 1.0 / tl.load(lq_ptr + rows, mask=t_ok, other=1.0)
    return tl.where(tile_ok, tl.exp(zq - mq[:, None]) * inv_lq[:, None], 0.0)


@triton.jit
def _pair_tile(s_ptr, s_stride, t_ptr, t_stride, row0, rows, s_ok, view_stride, offs, k_ok,
               scorr_ptr, center_ptr, log_center_ptr, tcorr_ptr, mq_ptr, lq_ptr, inv_ts, inv_tt,
               PAIR_SELF: tl.constexpr, N_TEACHER: tl.constexpr, PROBABILITY: tl.constexpr,
               HAS_SCORR: tl.constexpr, HAS_TCORR: tl.constexpr, ACC: tl.constexpr,
               VIEWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Student logits l_s and teacher weights Qsum on the tile [VIEWS, BLOCK_K] of one group.

    PAIR_SELF (iBOT patches): Qsum_j = q_j, teacher row = student row. Otherwise (DINO):
    Qsum_j = sum_{i != j} q_i over the N_TEACHER teacher views, each computed once on its own
    [1, BLOCK_K] row (not on the padded view tile: the exponentials are the expensive part).
    Returns (ls, qsum, ok); ls is only meaningful where ok, qsum is 0 elsewhere.
    """
    ok = s_ok[:, None] & k_ok[None, :]
    s = tl.load(s_ptr + rows[:, None] * s_stride + offs[None, :], mask=ok, other=0.0).to(ACC)
    ls = s * inv_ts
    if HAS_SCORR:
        ls = ls + tl.load(scorr_ptr + offs, mask=k_ok, other=0.0)[None, :]
    if PAIR_SELF:
        qsum = _teacher_q(t_ptr, t_stride, rows, s_ok, offs, k_ok, center_ptr, log_center_ptr, tcorr_ptr,
                          mq_ptr, lq_ptr, inv_tt, PROBABILITY, HAS_TCORR, ACC)
    else:
        j = tl.arange(0, VIEWS)
        one = tl.arange(0, 1)
        q_total = tl.zeros([1, BLOCK_K], ACC)
        q_self = tl.zeros([VIEWS, BLOCK_K], ACC)
        for i in tl.static_range(N_TEACHER):
            q_i = _teacher_q(t_ptr, t_stride, row0 + i * view_stride + one, one == 0, offs, k_ok, center_ptr,
                             log_center_ptr, tcorr_ptr, mq_ptr, lq_ptr, inv_tt, PROBABILITY, HAS_TCORR, ACC)
            q_total += q_i
            q_self += tl.where((j == i)[:, None], q_i, 0.0)
        qsum = tl.where(ok, q_total - q_self, 0.0)
    return ls, qsum, ok


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _teacher_stats_kernel(t_ptr, t_stride, n_rows, K, center_ptr, log_center_ptr, tcorr_ptr,
                          tt_hi, tt_lo, mq_ptr, lq_ptr, mp_ptr, lp_ptr, split_stride, blocks_per_split,
                          PROBABILITY: tl.constexpr, HAS_TCORR: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row, split): online (max, sum exp) over its K range of the logits of q (and pbar).

    Output element (split, row) is at split * split_stride + row; the splits are merged afterwards.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    inv_tt = _scalar(tt_hi, tt_lo, ACC)
    rows = row + tl.arange(0, 1)
    r_ok = rows < n_rows
    mq = tl.full([1], -3.0e38, ACC)
    lq = tl.zeros([1], ACC)
    mp = tl.full([1], -3.0e38, ACC)
    lp = tl.zeros([1], ACC)
    kb_end = tl.minimum((split + 1) * blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(split * blocks_per_split, kb_end):
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        ok = r_ok[:, None] & k_ok[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * t_stride + offs[None, :], mask=ok,
                    other=0.0).to(ACC)
        zq = _teacher_logits(t, offs, k_ok, center_ptr, log_center_ptr, tcorr_ptr, inv_tt,
                             PROBABILITY, HAS_TCORR)
        mq, lq = _online_lse(mq, lq, zq, ok)
        if PROBABILITY:
            mp, lp = _online_lse(mp, lp, _corrected(t, offs, k_ok, tcorr_ptr, inv_tt, HAS_TCORR), ok)
    out = split * split_stride + rows
    tl.store(mq_ptr + out, mq, mask=r_ok)
    tl.store(lq_ptr + out, lq, mask=r_ok)
    if PROBABILITY:
        tl.store(mp_ptr + out, mp, mask=r_ok)
        tl.store(lp_ptr + out, lp, mask=r_ok)


@triton.jit
def _center_stat_kernel(t_ptr, t_stride, n_rows, K, tcorr_ptr, tt_hi, tt_lo, mp_ptr, lp_ptr,
                        out_ptr, rows_per_chunk,
                        PROBABILITY: tl.constexpr, HAS_TCORR: tl.constexpr, ACC: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (K block, row chunk): sum over its teacher rows of the raw output (logit centering)
    or of pbar = exp(l_t - max) / sum (probability). Output [n_chunks, K]; the host adds the chunks.
    """
    kb = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_tt = _scalar(tt_hi, tt_lo, ACC)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs < K
    acc = tl.zeros([BLOCK_K], ACC)
    r_begin = chunk * rows_per_chunk
    r_end = tl.minimum(r_begin + rows_per_chunk, n_rows)
    for r0 in range(r_begin, r_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r_ok = rows < r_end
        ok = r_ok[:, None] & k_ok[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * t_stride + offs[None, :], mask=ok,
                    other=0.0).to(ACC)
        if PROBABILITY:
            zp = _corrected(t, offs, k_ok, tcorr_ptr, inv_tt, HAS_TCORR)
            # a missing row gets max = +inf, so its (discarded) exp underflows instead of overflowing
            mp = tl.load(mp_ptr + rows, mask=r_ok, other=float("inf"))
            inv_lp = 1.0 / tl.load(lp_ptr + rows, mask=r_ok, other=1.0)
            t = tl.where(ok, tl.exp(zp - mp[:, None]) * inv_lp[:, None], 0.0)
        acc += tl.sum(t, axis=0)
    tl.store(out_ptr + chunk * K + offs, acc, mask=k_ok)


@triton.jit
def _student_forward_kernel(s_ptr, s_stride, t_ptr, t_stride, w_ptr, n_rows, K,
                            n_views, view_stride, group_stride,
                            scorr_ptr, center_ptr, log_center_ptr, tcorr_ptr, mq_ptr, lq_ptr,
                            ts_hi, ts_lo, tt_hi, tt_lo,
                            ms_ptr, ls_ptr, dot_ptr, qs_ptr, blocks_per_split,
                            PAIR_SELF: tl.constexpr, N_TEACHER: tl.constexpr, PROBABILITY: tl.constexpr,
                            HAS_SCORR: tl.constexpr, HAS_TCORR: tl.constexpr, ACC: tl.constexpr,
                            VIEWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (group, split): per student row of the group, over its K range, the online
    (max, sum exp) of l_s, Qsum . l_s and sum(Qsum). Outputs [n_splits, n_rows].
    """
    g = tl.program_id(0)
    split = tl.program_id(1)
    inv_ts = _scalar(ts_hi, ts_lo, ACC)
    inv_tt = _scalar(tt_hi, tt_lo, ACC)
    row0, rows, r_ok, s_ok, w = _group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEWS)
    m = tl.full([VIEWS], -3.0e38, ACC)
    l = tl.zeros([VIEWS], ACC)
    dot = tl.zeros([VIEWS], ACC)
    qs = tl.zeros([VIEWS], ACC)
    kb_end = tl.minimum((split + 1) * blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(split * blocks_per_split, kb_end):
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        ls, qsum, ok = _pair_tile(s_ptr, s_stride, t_ptr, t_stride, row0, rows, s_ok, view_stride, offs, k_ok,
                                  scorr_ptr, center_ptr, log_center_ptr, tcorr_ptr, mq_ptr, lq_ptr, inv_ts, inv_tt,
                                  PAIR_SELF, N_TEACHER, PROBABILITY, HAS_SCORR, HAS_TCORR, ACC, VIEWS, BLOCK_K)
        m, l = _online_lse(m, l, ls, ok)
        dot += tl.sum(qsum * tl.where(ok, ls, 0.0), axis=1)
        qs += tl.sum(qsum, axis=1)
    out = split * n_rows + rows
    tl.store(ms_ptr + out, m, mask=r_ok)
    tl.store(ls_ptr + out, l, mask=r_ok)
    tl.store(dot_ptr + out, dot, mask=r_ok)
    tl.store(qs_ptr + out, qs, mask=r_ok)


@triton.jit
def _student_backward_kernel(s_ptr, s_stride, t_ptr, t_stride, w_ptr, n_rows, K, n_groups,
                             n_views, view_stride, group_stride,
                             scorr_ptr, center_ptr, log_center_ptr, tcorr_ptr, mq_ptr, lq_ptr,
                             ms_ptr, ls_ptr, qs_ptr, grad_ptr, ts_hi, ts_lo, tt_hi, tt_lo,
                             ds_ptr, ds_stride, dscorr_ptr, groups_per_chunk,
                             PAIR_SELF: tl.constexpr, N_TEACHER: tl.constexpr, PROBABILITY: tl.constexpr,
                             HAS_SCORR: tl.constexpr, HAS_TCORR: tl.constexpr,
                             WRITE_DS: tl.constexpr, WRITE_DSCORR: tl.constexpr, ACC: tl.constexpr,
                             VIEWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (K block, group chunk): for each group of the chunk, dl_s = grad w (qs p - Qsum) with
    p = exp(l_s - max) / sum; writes dl_s / tau_s (input dtype) and sums dl_s over rows for the
    student-correction gradient, output [n_chunks, K].
    """
    kb = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_ts = _scalar(ts_hi, ts_lo, ACC)
    inv_tt = _scalar(tt_hi, tt_lo, ACC)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs < K
    grad = tl.load(grad_ptr).to(ACC)
    acc = tl.zeros([BLOCK_K], ACC)
    g_end = tl.minimum((chunk + 1) * groups_per_chunk, n_groups)
    for g in range(chunk * groups_per_chunk, g_end):
        row0, rows, r_ok, s_ok, w = _group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEWS)
        ls, qsum, ok = _pair_tile(s_ptr, s_stride, t_ptr, t_stride, row0, rows, s_ok, view_stride, offs, k_ok,
                                  scorr_ptr, center_ptr, log_center_ptr, tcorr_ptr, mq_ptr, lq_ptr, inv_ts, inv_tt,
                                  PAIR_SELF, N_TEACHER, PROBABILITY, HAS_SCORR, HAS_TCORR, ACC, VIEWS, BLOCK_K)
        ms = tl.load(ms_ptr + rows, mask=s_ok, other=float("inf"))
        inv_ls = 1.0 / tl.load(ls_ptr + rows, mask=s_ok, other=1.0)
        qs = tl.load(qs_ptr + rows, mask=s_ok, other=0.0)
        p = tl.exp(ls - ms[:, None]) * inv_ls[:, None]
        dls = tl.where(ok, (w * grad)[:, None] * (qs[:, None] * p - qsum), 0.0)
        if WRITE_DS:
            # rows with zero weight get an explicit zero gradient
            tl.store(ds_ptr + rows[:, None] * ds_stride + offs[None, :],
                     (dls * inv_ts).to(ds_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & k_ok[None, :])
        if WRITE_DSCORR:
            acc += tl.sum(dls, axis=0)
    if WRITE_DSCORR:
        tl.store(dscorr_ptr + chunk * K + offs, acc, mask=k_ok)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, dot_ptr, qs_ptr, w_ptr, n_splits, n_rows,
                  m_out_ptr, l_out_ptr, qs_out_ptr, loss_ptr,
                  WITH_LOSS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: merge the per-split states [n_splits, n_rows] of the row kernels into the
    (max, sum exp) of each row; WITH_LOSS also sums Qsum . l_s and sum(Qsum) over the splits and
    writes the loss, sum_r w_r (qs_r lse_r - dot_r) over rows of non-zero weight (deterministic)."""
    total = tl.zeros([BLOCK], ACC)
    for r0 in range(0, n_rows, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        ok = rows < n_rows
        m = tl.full([BLOCK], -3.0e38, ACC)
        for s in range(n_splits):
            m = tl.maximum(m, tl.load(m_ptr + s * n_rows + rows, mask=ok, other=-3.0e38))
        l = tl.zeros([BLOCK], ACC)
        dot = tl.zeros([BLOCK], ACC)
        qs = tl.zeros([BLOCK], ACC)
        for s in range(n_splits):
            m_s = tl.load(m_ptr + s * n_rows + rows, mask=ok, other=-3.0e38)
            l += tl.load(l_ptr + s * n_rows + rows, mask=ok, other=0.0) * tl.exp(m_s - m)
            if WITH_LOSS:
                dot += tl.load(dot_ptr + s * n_rows + rows, mask=ok, other=0.0)
                qs += tl.load(qs_ptr + s * n_rows + rows, mask=ok, other=0.0)
        tl.store(m_out_ptr + rows, m, mask=ok)
        tl.store(l_out_ptr + rows, l, mask=ok)
        if WITH_LOSS:
            tl.store(qs_out_ptr + rows, qs, mask=ok)
            w = tl.load(w_ptr + rows, mask=ok, other=0.0)
            # rows of weight 0 were not read (sum exp = 0): they contribute nothing, and log(1) keeps
            # their discarded term finite
            active = w != 0.0
            lse = m + tl.log(tl.where(active, l, 1.0))
            total += tl.where(active, w * (qs * lse - dot), 0.0)
    if WITH_LOSS:
        tl.store(loss_ptr, tl.sum(total, axis=0))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairLayout:
    """Which student rows pair with which teacher rows.

    Student row of view j of group g: ``g * group_stride + j * view_stride`` for j < n_views; the
    teacher row of view j < n_teacher_views has the same index in the teacher tensor.

    * DINO (``pair_self=False``): group = image b, ``view_stride = B``, ``group_stride = 1``;
      student view j pairs with every teacher view i != j.
    * iBOT patches (``pair_self=True``): rows are tokens, each paired with its own teacher token only;
      a group is ``n_views`` consecutive tokens (``view_stride = 1``, ``group_stride = n_views``,
      ``n_teacher_views = n_views``), just a tile of independent rows.
    """

    n_groups: int
    n_views: int
    n_teacher_views: int
    view_stride: int
    group_stride: int
    pair_self: bool


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def _split(n_items: int, n_wanted: int) -> tuple[int, int]:
    """Cut n_items into at most n_wanted (>= 1) contiguous pieces: (items per piece, pieces)."""
    per = triton.cdiv(n_items, max(1, min(n_wanted, n_items)))
    return per, triton.cdiv(n_items, per)


def _block_k(rows_per_tile: int, K: int, half_tile: bool = False) -> int:
    """BLOCK_K of a [rows_per_tile, BLOCK_K] tile: a power of 2, no wider than K needs."""
    tile = _TILE_ELEMENTS // 2 if half_tile else _TILE_ELEMENTS
    return max(1, min(tile // rows_per_tile, triton.next_power_of_2(K)))


def _hi_lo(x: float) -> tuple[float, float]:
    """x as float32 hi + lo (see ``_scalar``)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _merge(m: torch.Tensor, l: torch.Tensor, n_splits: int, ACC) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split online log-sum-exp states (flat [n_splits, rows]) into (max, sum exp) per row."""
    if n_splits == 1:
        return m, l
    n_rows = m.numel() // n_splits
    m_out, l_out = m.new_empty(n_rows), l.new_empty(n_rows)
    _merge_kernel[(1,)](m, l, m, m, m, n_splits, n_rows, m_out, l_out, m_out, m_out,
                        WITH_LOSS=False, ACC=ACC, BLOCK=_MERGE_ROWS, num_warps=_MERGE_WARPS)
    return m_out, l_out


def _shifted(correction: torch.Tensor | None, dtype: torch.dtype, detach: bool = False) -> torch.Tensor | None:
    """correction - max(correction) in dtype, on the device (no host synchronisation).

    Softmaxes, the loss and its gradients do not change when a constant is added to a row of
    logits. Shifting a correction by its max keeps the logits near 0 (log C_p is ~340 at p = 256),
    where float32 resolves them 100x finer, and the dot Qsum . l_s loses no digits to the offset. The
    max is a constant for autograd, so the gradient passes through unchanged.
    """
    if correction is None:
        return None
    c = correction.reshape(-1).to(dtype)
    if detach:
        c = c.detach()
    return (c - c.detach().max()).contiguous()



def _layout_ints(layout: PairLayout) -> list[int]:
    return [layout.n_groups, layout.n_views, layout.n_teacher_views, layout.view_stride, layout.group_stride,
            int(layout.pair_self)]


# The forward and the backward are torch.library custom operators with fake (meta) implementations,
# so torch.compile treats them as opaque nodes instead of tracing Triton launches and host logic.
# `layout` is ``_layout_ints(PairLayout)``; `temps` is (student_temp, teacher_temp).


@torch.library.custom_op("vmf_head::fused_cross_entropy", mutates_args=())
def _forward_op(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, center: torch.Tensor,
    log_center: torch.Tensor, scorr: torch.Tensor | None, tcorr: torch.Tensor | None,
    layout: list[int], temps: list[float], probability: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, stat, m_t, l_t, ms, ls, qs): the loss, the centre statistic (K,), the teacher
    rows' (max, sum exp) of q's logits (then pbar's), and per student row (max, sum exp, qs)."""
    with _on_device(student.device):
        n_groups, n_views, n_teacher_views, view_stride, group_stride, pair_self = layout
        n_rows, K = student.shape
        n_trows = teacher.shape[0]
        acc = dict(device=student.device, dtype=weights.dtype)
        dummy = center  # stands for absent optional vectors; never read (constexpr flags)
        ts, tt = _hi_lo(1.0 / temps[0]), _hi_lo(1.0 / temps[1])
        target = _target_programs(student.device)
        ACC = _TL_DTYPES[weights.dtype]

        # 1. teacher row statistics: the (max, sum) of q's logits for every row, then pbar's
        bk_t = _block_k(1, K)
        per_split, n_split = _split(triton.cdiv(K, bk_t), triton.cdiv(target, n_trows))
        n_stats = (2 if probability else 1) * n_trows
        m_t = torch.empty(n_split * n_stats, **acc)
        l_t = torch.empty_like(m_t)
        _teacher_stats_kernel[(n_trows, n_split)](
            teacher, teacher.stride(0), n_trows, K, center, log_center,
            dummy if tcorr is None else tcorr, *tt, m_t, l_t, m_t[n_trows:], l_t[n_trows:],
            n_stats, per_split,
            PROBABILITY=probability, HAS_TCORR=tcorr is not None, ACC=ACC, BLOCK_K=bk_t, num_warps=_NUM_WARPS)
        m_t, l_t = _merge(m_t, l_t, n_split, ACC)
        mq, lq, mp, lp = m_t[:n_trows], l_t[:n_trows], m_t[n_trows:], l_t[n_trows:]

        # 2. centre statistic: mean over teacher rows of the raw output (logit) or of pbar
        bk_c = _block_k(_STAT_ROWS, K)
        n_kb = triton.cdiv(K, bk_c)
        rows_per_chunk, _ = _split(n_trows, triton.cdiv(target, n_kb))
        rows_per_chunk = triton.cdiv(rows_per_chunk, _STAT_ROWS) * _STAT_ROWS
        n_chunk = triton.cdiv(n_trows, rows_per_chunk)
        stat = torch.empty(n_chunk, K, **acc)
        _center_stat_kernel[(n_kb, n_chunk)](
            teacher, teacher.stride(0), n_trows, K, dummy if tcorr is None else tcorr, *tt,
            mp, lp, stat, rows_per_chunk,
            PROBABILITY=probability, HAS_TCORR=tcorr is not None, ACC=ACC, ROWS=_STAT_ROWS,
            BLOCK_K=bk_c, num_warps=_NUM_WARPS)
        stat = stat.sum(dim=0) / n_trows

        # 3. student pass: online lse of l_s, Qsum . l_s, sum(Qsum) per student row and K split
        views_p2 = triton.next_power_of_2(n_views)
        bk_s = _block_k(views_p2, K, half_tile=weights.dtype == torch.float64)
        per_split, n_split = _split(triton.cdiv(K, bk_s), triton.cdiv(target, n_groups))
        part = torch.empty(4, n_split, n_rows, **acc)  # max, sum exp, Qsum . l_s, sum(Qsum)
        _student_forward_kernel[(n_groups, n_split)](
            student, student.stride(0), teacher, teacher.stride(0), weights, n_rows, K,
            n_views, view_stride, group_stride,
            dummy if scorr is None else scorr, center, log_center, dummy if tcorr is None else tcorr,
            mq, lq, *ts, *tt, part[0], part[1], part[2], part[3], per_split,
            PAIR_SELF=bool(pair_self), N_TEACHER=n_teacher_views, PROBABILITY=probability,
            HAS_SCORR=scorr is not None,
            HAS_TCORR=tcorr is not None, ACC=ACC, VIEWS=views_p2, BLOCK_K=bk_s, num_warps=_NUM_WARPS)

        # 4. merge the splits, keep (max, sum exp, qs) per row for the backward, form the loss
        loss = torch.empty((), **acc)
        ms, ls, qs = torch.empty(n_rows, **acc), torch.empty(n_rows, **acc), torch.empty(n_rows, **acc)
        _merge_kernel[(1,)](part[0], part[1], part[2], part[3], weights, n_split, n_rows, ms, ls, qs, loss,
                            WITH_LOSS=True, ACC=ACC, BLOCK=_MERGE_ROWS, num_warps=_MERGE_WARPS)
        return loss, stat, m_t, l_t, ms, ls, qs


@_forward_op.register_fake
def _(student, teacher, weights, center, log_center, scorr, tcorr, layout, temps, probability):
    n_stats = (2 if probability else 1) * teacher.shape[0]
    n_rows, K = student.shape
    vec = weights.new_empty
    return vec(()), vec(K), vec(n_stats), vec(n_stats), vec(n_rows), vec(n_rows), vec(n_rows)


@torch.library.custom_op("vmf_head::fused_cross_entropy_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, center: torch.Tensor,
    log_center: torch.Tensor, scorr: torch.Tensor | None, tcorr: torch.Tensor | None, mq: torch.Tensor,
    lq: torch.Tensor, ms: torch.Tensor, ls: torch.Tensor, qs: torch.Tensor,
    layout: list[int], temps: list[float], probability: bool, want_ds: bool, want_dscorr: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d student in the student's dtype, d loss / d scorr (K,)); one not wanted is empty."""
    with _on_device(student.device):
        n_groups, n_views, n_teacher_views, view_stride, group_stride, pair_self = layout
        n_rows, K = student.shape
        views_p2 = triton.next_power_of_2(n_views)
        bk = _block_k(views_p2, K, half_tile=student.element_size() == 2 or weights.dtype == torch.float64)
        n_kb = triton.cdiv(K, bk)
        per_chunk, n_chunk = _split(n_groups, triton.cdiv(_target_programs(student.device), n_kb))
        ds = torch.empty_like(student) if want_ds else student.new_empty(0)
        dscorr = weights.new_empty(n_chunk, K) if want_dscorr else weights.new_empty(0)
        dummy = center
        _student_backward_kernel[(n_kb, n_chunk)](
            student, student.stride(0), teacher, teacher.stride(0), weights, n_rows, K, n_groups,
            n_views, view_stride, group_stride,
            dummy if scorr is None else scorr, center, log_center, dummy if tcorr is None else tcorr,
            mq, lq, ms, ls, qs, grad, *_hi_lo(1.0 / temps[0]), *_hi_lo(1.0 / temps[1]),
            ds, ds.stride(0) if want_ds else 0, dscorr, per_chunk,
            PAIR_SELF=bool(pair_self), N_TEACHER=n_teacher_views, PROBABILITY=probability,
            HAS_SCORR=scorr is not None,
            HAS_TCORR=tcorr is not None, WRITE_DS=want_ds, WRITE_DSCORR=want_dscorr,
            ACC=_TL_DTYPES[weights.dtype], VIEWS=views_p2, BLOCK_K=bk, num_warps=_NUM_WARPS)
        return ds, dscorr.sum(dim=0) if want_dscorr else dscorr


@_backward_op.register_fake
def _(grad, student, teacher, weights, center, log_center, scorr, tcorr, mq, lq, ms, ls, qs, layout, temps,
      probability, want_ds, want_dscorr):
    return (torch.empty_like(student) if want_ds else student.new_empty(0),
            weights.new_empty(student.shape[1]) if want_dscorr else weights.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, weights, center, log_center, scorr, tcorr, layout, temps, probability = inputs
    _, stat, m_t, l_t, ms, ls, qs = output
    n_trows = teacher.shape[0]
    ctx.save_for_backward(student, teacher, weights, center, log_center, scorr, tcorr, m_t[:n_trows],
                          l_t[:n_trows], ms, ls, qs)
    ctx.layout, ctx.temps, ctx.probability = layout, temps, probability
    ctx.mark_non_differentiable(stat, m_t, l_t, ms, ls, qs)


def _backward(ctx, grad_loss, *grads_of_statistics):
    want_ds, want_dscorr = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    grads = [None] * 10
    if want_ds or want_dscorr:
        saved = ctx.saved_tensors
        ds, dscorr = _backward_op(grad_loss.to(saved[2].dtype).contiguous(), *saved, ctx.layout, ctx.temps,
                                  ctx.probability, want_ds, want_dscorr)
        grads[0] = ds if want_ds else None
        grads[5] = dscorr if want_dscorr else None
    return tuple(grads)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fused_cross_entropy(
    student: torch.Tensor,
    student_correction: torch.Tensor | None,
    teacher: torch.Tensor,
    teacher_correction: torch.Tensor | None,
    center: torch.Tensor,
    weights: torch.Tensor,
    layout: PairLayout,
    *,
    student_temp: float,
    teacher_temp: float,
    centering: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel family's common entry: the sum over student rows r of
    ``weights[r] * sum_{teacher rows i paired with r by layout} -q_i . log_softmax(l_s_r)``.

    Args:
        student: (rows, K) raw student outputs, any float dtype.
        student_correction: (K,) or None; receives a gradient.
        teacher: (teacher rows, K) raw teacher outputs; no gradient.
        teacher_correction: (K,) or None; no gradient.
        center: K values (logit or probability centre).
        weights: (rows,) loss weight per student row, in the arithmetic dtype (float32, or float64
            for float64 inputs); rows with weight 0 are not read.
        layout: the pairing of rows (``PairLayout``).
        student_temp, teacher_temp: positive temperatures.
        centering: ``"logit"`` or ``"probability"``.

    Returns:
        (loss, batch_stat): the scalar loss and the (K,) mean over teacher rows of the raw teacher
        output (logit) or of pbar (probability), not differentiable; both in the weights' dtype.
    """
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher.detach()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    acc_dtype = weights.dtype
    probability = centering == "probability"
    # a copy: the module updates its centre buffer in place after the forward, the backward needs it
    center = center.detach().reshape(-1).to(acc_dtype, copy=True)
    # as the reference: a centre entry that underflowed gets the smallest normal number
    log_center = center.clamp_min(torch.finfo(acc_dtype).tiny).log() if probability else center
    loss, stat, *_ = _forward_op(
        student, teacher, weights.contiguous(), center, log_center,
        _shifted(student_correction, acc_dtype), _shifted(teacher_correction, acc_dtype, detach=True),
        _layout_ints(layout), [float(student_temp), float(teacher_temp)], probability)
    return loss, stat



def check_fused_arguments(
    tensors: dict[str, torch.Tensor | None], K: int, center_shape: tuple[int, ...],
    student_temp: object, teacher_temp: object, centering: object,
) -> None:
    """Checks shared by the fused ops beyond the reference's shape checks: temperatures, a centering
    with a kernel, the centre's and the corrections' shapes, one device that can run Triton."""
    check_temperature("student_temp", student_temp)
    check_temperature("teacher_temp", teacher_temp)
    check_centering(centering)
    if centering not in CENTERINGS:
        raise ValueError(
            f"the fused loss supports centering in {CENTERINGS}, got {centering!r} (Sinkhorn needs "
            "whole-batch column sums between its iterations); use the reference for it"
        )
    center = tensors["center"]
    if not isinstance(center, torch.Tensor) or tuple(center.shape) != center_shape:
        raise ValueError(f"center must be a tensor of shape {center_shape}, got {getattr(center, 'shape', center)!r}")
    for name in ("student_correction", "teacher_correction"):
        c = tensors[name]
        if c is not None and (not isinstance(c, torch.Tensor) or tuple(c.shape) != (K,)):
            raise ValueError(f"{name} must have shape (K,) = ({K},), got {getattr(c, 'shape', c)!r}")
    present = [t for t in tensors.values() if t is not None]
    device = present[0].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, the other inputs on {device}")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the fused Triton loss needs CUDA tensors, got {device}; use backend='reference', or set "
            "TRITON_INTERPRET=1 before importing vmf_head.ops to run its kernels in Triton's interpreter"
        )


def dino_vmf_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    *,
    n_views: int,
    n_global: int = 2,
    student_temp: float,
    teacher_temp: float,
    student_correction: torch.Tensor | None = None,
    teacher_correction: torch.Tensor | None = None,
    centering: str = "probability",
    sinkhorn_iterations: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO-vMF multi-crop loss, fused (the contract of ``vmf_head.functional.dino_vmf_loss``).

        l_s = student_output / student_temp + student_correction
        q   = softmax((teacher_output - center) / teacher_temp + teacher_correction)       (logit)
            = softmax(teacher_output / teacher_temp + teacher_correction - log center)    (probability)
        loss = mean over pairs (i < n_global, j < n_views, i != j) of
               mean_b -q_i[b] . log_softmax(l_s_j[b])

    Args:
        student_output: (n_views * B, K) raw student head outputs, views stacked, any float dtype.
        teacher_output: (n_global * B, K) raw teacher outputs of the global views; no gradient.
        center: (1, K) logit centre or probability centre.
        n_views: student views (DINO's ncrops), >= 2. n_global: teacher views, 1 <= n_global <= n_views.
        student_temp, teacher_temp: temperatures (teacher_temp already scheduled).
        student_correction: (K,) log C_p(||w_s|| / student_temp), receives a gradient; or None.
        teacher_correction: (K,) log C_p(||w_t|| / teacher_temp), constant; or None.
        centering: ``"logit"`` or ``"probability"`` (``"sinkhorn"``: ValueError, reference only).
        sinkhorn_iterations: accepted for the shared signature; unused (no Sinkhorn here).

    Returns:
        (loss, batch_stat): the scalar local-batch loss and the (1, K) mean over the local teacher
        rows of teacher_output (logit) or of softmax(l_t) (probability), both float32 (float64 when
        an input is float64). Gradients flow to student_output (in its dtype) and student_correction.
    """
    batch, K = check_dino_inputs(student_output, teacher_output, n_views=n_views, n_global=n_global)
    check_fused_arguments(
        dict(student_output=student_output, teacher_output=teacher_output, center=center,
             student_correction=student_correction, teacher_correction=teacher_correction),
        K, (1, K), student_temp, teacher_temp, centering)
    if batch == 0:
        raise ValueError("student_output has no rows")
    dtype = compute_dtype(student_output, teacher_output, student_correction, teacher_correction)
    n_pairs = n_global * n_views - n_global  # n_global <= n_views: each teacher view skips itself once
    weights = torch.full((n_views * batch,), 1.0 / (n_pairs * batch), device=student_output.device, dtype=dtype)
    layout = PairLayout(n_groups=batch, n_views=n_views, n_teacher_views=n_global,
                        view_stride=batch, group_stride=1, pair_self=False)
    loss, stat = fused_cross_entropy(
        student_output, student_correction, teacher_output.detach(), teacher_correction, center, weights,
        layout, student_temp=student_temp, teacher_temp=teacher_temp, centering=centering)
    return loss, stat.reshape(1, K)
