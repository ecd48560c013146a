"""Triton building blocks shared by the forward and backward kernels of the fused cross-entropy.

ACC is the arithmetic dtype (tl.float32, or tl.float64 for float64 logits). Temperatures arrive as
inverse temperatures in memory (``inv_temps_ptr``: [1/tau_s, 1/tau_t] in ACC), so a new temperature
is new data, never a new compilation, and float64 keeps all its digits. Kernels multiply by them (as
PyTorch does on CUDA for a division by a scalar; a true division costs a reciprocal on the
special-function units, which the exponentials already keep busy). An optional vector is ``None``
when absent (a compile-time constant in Triton), never a dummy pointer.

The centre enters the kernels as ``center_ptr``: the K values to subtract from the teacher's vMF
logits l_t = t / tau_t + tcorr, i.e. c / tau_t for logit centering and log c for probability
centering, so that both centerings share zq = l_t - center and softmax(zq) = q.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def vmf_logits(x, offs, k_ok, corr_ptr, inv_temp):
    """x / tau + correction on a tile [rows, BLOCK_K] (the correction is broadcast over rows)."""
    z = x * inv_temp
    if corr_ptr is not None:
        z = z + tl.load(corr_ptr + offs, mask=k_ok, other=0.0)[None, :]
    return z


@triton.jit
def centered(z, offs, k_ok, center_ptr):
    """The logits of q from the teacher's vMF logits z: z - center (see the module docstring)."""
    return z - tl.load(center_ptr + offs, mask=k_ok, other=0.0)[None, :]


@triton.jit
def online_lse(m, sum_exp, x, ok):
    """One step of the online (single-pass) log-sum-exp over axis 1 of x [rows, BLOCK_K].

    m, sum_exp [rows]: running max and sum of exp(x - m). m starts at a finite -3e38 instead of -inf so a
    row with nothing valid yet keeps exp(m - m_new) = 1 instead of NaN.
    """
    x = tl.where(ok, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    return m_new, sum_exp


@triton.jit
def group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEWS: tl.constexpr):
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
def teacher_q(
    t_ptr, t_stride, rows, t_ok, offs, k_ok, center_ptr, tcorr_ptr, mq_ptr, lq_ptr, inv_tt, ACC: tl.constexpr
):
    """q on the tile [len(rows), BLOCK_K] of teacher rows (0 where not t_ok).

    With ``center_ptr`` None the teacher rows hold the targets q themselves (precomputed by the
    caller); otherwise q = exp(zq - max) / sum from the raw outputs and the row statistics.
    """
    tile_ok = t_ok[:, None] & k_ok[None, :]
    t = tl.load(t_ptr + rows[:, None] * t_stride + offs[None, :], mask=tile_ok, other=0.0).to(ACC)
    if center_ptr is None:
        q = t
    else:
        zq = centered(vmf_logits(t, offs, k_ok, tcorr_ptr, inv_tt), offs, k_ok, center_ptr)
        # a missing row gets max = +inf, so its (discarded) exp underflows instead of overflowing
        mq = tl.load(mq_ptr + rows, mask=t_ok, other=float("inf"))
        inv_lq = 1.0 / tl.load(lq_ptr + rows, mask=t_ok, other=1.0)
        q = tl.where(tile_ok, tl.exp(zq - mq[:, None]) * inv_lq[:, None], 0.0)
    return q


@triton.jit
def pair_tile(
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
    PAIR_SELF: tl.constexpr,
    N_TEACHER: tl.constexpr,
    SKIP_SAME: tl.constexpr,
    ACC: tl.constexpr,
    VIEWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Student logits l_s and teacher weights Qsum on the tile [VIEWS, BLOCK_K] of one group.

    PAIR_SELF (iBOT patches, row-to-row targets): Qsum_j = q_j, teacher row = student row.
    Otherwise (DINO): Qsum_j = sum_i q_i over the N_TEACHER teacher views, without i = j when
    SKIP_SAME; each q_i is computed once on its own [1, BLOCK_K] row (not on the padded view tile: the
    exponentials are the expensive part). Returns (ls, qsum, ok); ls is only meaningful where ok,
    qsum is 0 elsewhere.
    """
    ok = s_ok[:, None] & k_ok[None, :]
    s = tl.load(s_ptr + rows[:, None] * s_stride + offs[None, :], mask=ok, other=0.0).to(ACC)
    ls = vmf_logits(s, offs, k_ok, scorr_ptr, inv_ts)
    if PAIR_SELF:
        qsum = teacher_q(t_ptr, t_stride, rows, s_ok, offs, k_ok, center_ptr, tcorr_ptr, mq_ptr, lq_ptr, inv_tt, ACC)
    else:
        j = tl.arange(0, VIEWS)
        one = tl.arange(0, 1)
        q_total = tl.zeros([1, BLOCK_K], ACC)
        q_self = tl.zeros([VIEWS, BLOCK_K], ACC)
        for i in tl.static_range(N_TEACHER):
            q_i = teacher_q(
                t_ptr,
                t_stride,
                row0 + i * view_stride + one,
                one == 0,
                offs,
                k_ok,
                center_ptr,
                tcorr_ptr,
                mq_ptr,
                lq_ptr,
                inv_tt,
                ACC,
            )
            q_total += q_i
            if SKIP_SAME:
                q_self += tl.where((j == i)[:, None], q_i, 0.0)
        qsum = tl.where(ok, q_total - q_self, 0.0)
    return ls, qsum, ok
