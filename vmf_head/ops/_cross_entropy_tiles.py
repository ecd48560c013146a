"""Triton building blocks shared by the forward and backward kernels of the fused cross-entropy.

ACC is the arithmetic dtype (tl.float32, or tl.float64 for float64 logits). Temperatures arrive as
inverse temperatures in memory (``inv_temps_ptr``: [1/tau_s, 1/tau_t] in ACC), so a new temperature
is new data, never a new compilation, and float64 keeps all its digits. Kernels multiply by them (as
PyTorch does on CUDA for a division by a scalar; a true division costs a reciprocal on the
special-function units, which the exponentials already keep busy). An optional vector is ``None``
when absent (a compile-time constant in Triton), never a dummy pointer.

The center enters the kernels as ``center_shift_ptr``: the K values to subtract from the teacher's vMF
logits l_t = t / tau_t + teacher_correction, i.e. c / tau_t for logit centering and log c for probability
centering, so that both centerings share q_logits = l_t - center_shift and softmax(q_logits) = q.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Start of a running maximum: finite, so that exp(m - m_new) of a row with nothing valid yet is 1, not NaN.
NEG_LARGE = tl.constexpr(-3.0e38)


@triton.jit
def vmf_logits(x, offs, k_ok, correction_ptr, inv_temp):
    """x / tau + correction on a tile [rows, BLOCK_K] (the correction is broadcast over rows)."""
    z = x * inv_temp
    if correction_ptr is not None:
        z = z + tl.load(correction_ptr + offs, mask=k_ok, other=0.0)[None, :]
    return z


@triton.jit
def centered(z, offs, k_ok, center_shift_ptr):
    """The logits of q from the teacher's vMF logits z: z - center_shift (see the module docstring)."""
    return z - tl.load(center_shift_ptr + offs, mask=k_ok, other=0.0)[None, :]


@triton.jit
def online_lse(m, sum_exp, x, ok):
    """One step of the online (single-pass) log-sum-exp over axis 1 of x [rows, BLOCK_K].

    m, sum_exp [rows]: running max (starting at NEG_LARGE) and sum of exp(x - m).
    """
    x = tl.where(ok, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    return m_new, sum_exp


@triton.jit
def group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEW_TILE: tl.constexpr):
    """Rows of the views of group g (one image in DINO; VIEW_TILE consecutive tokens in iBOT).

    Returns the first row g * group_stride (int64), rows [VIEW_TILE] (int64), r_ok (row exists), s_ok
    (row exists and has a non-zero loss weight: only those read the student), w.
    """
    j = tl.arange(0, VIEW_TILE)
    row0 = tl.cast(g, tl.int64) * group_stride
    rows = row0 + j * view_stride
    r_ok = (j < n_views) & (rows < n_rows)
    w = tl.load(w_ptr + rows, mask=r_ok, other=0.0)
    return row0, rows, r_ok, r_ok & (w != 0.0), w


@triton.jit
def teacher_q(
    t_ptr,
    t_stride,
    rows,
    t_ok,
    offs,
    k_ok,
    center_shift_ptr,
    teacher_correction_ptr,
    q_max_ptr,
    q_sum_exp_ptr,
    inv_teacher_temp,
    ACC: tl.constexpr,
):
    """q on the tile [len(rows), BLOCK_K] of teacher rows (0 where not t_ok).

    With ``center_shift_ptr`` None the teacher rows hold the targets q themselves (precomputed by the
    caller); otherwise q = exp(q_logits - max) / sum from the raw outputs and the row statistics.
    """
    tile_ok = t_ok[:, None] & k_ok[None, :]
    t = tl.load(t_ptr + rows[:, None] * t_stride + offs[None, :], mask=tile_ok, other=0.0).to(ACC)
    if center_shift_ptr is None:
        q = t
    else:
        q_logits = centered(
            vmf_logits(t, offs, k_ok, teacher_correction_ptr, inv_teacher_temp), offs, k_ok, center_shift_ptr
        )
        # a missing row gets max = +inf, so its (discarded) exp underflows instead of overflowing
        q_max = tl.load(q_max_ptr + rows, mask=t_ok, other=float("inf"))
        inv_q_sum_exp = 1.0 / tl.load(q_sum_exp_ptr + rows, mask=t_ok, other=1.0)
        q = tl.where(tile_ok, tl.exp(q_logits - q_max[:, None]) * inv_q_sum_exp[:, None], 0.0)
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
    student_correction_ptr,
    center_shift_ptr,
    teacher_correction_ptr,
    q_max_ptr,
    q_sum_exp_ptr,
    inv_student_temp,
    inv_teacher_temp,
    PAIR_SELF: tl.constexpr,
    N_TEACHER_VIEWS: tl.constexpr,
    SKIP_SAME: tl.constexpr,
    ACC: tl.constexpr,
    VIEW_TILE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Student logits l_s and teacher weights Qsum on the tile [VIEW_TILE, BLOCK_K] of one group.

    PAIR_SELF (iBOT patches, row-to-row targets): Qsum_j = q_j, teacher row = student row.
    Otherwise (DINO): Qsum_j = sum_i q_i over the N_TEACHER_VIEWS teacher views, without i = j when
    SKIP_SAME; each q_i is computed once on its own [1, BLOCK_K] row (not on the padded view tile: the
    exponentials are the expensive part). Returns (student_logits, paired_q, ok); student_logits is only
    meaningful where ok, paired_q is 0 elsewhere.
    """
    ok = s_ok[:, None] & k_ok[None, :]
    s = tl.load(s_ptr + rows[:, None] * s_stride + offs[None, :], mask=ok, other=0.0).to(ACC)
    student_logits = vmf_logits(s, offs, k_ok, student_correction_ptr, inv_student_temp)
    if PAIR_SELF:
        paired_q = teacher_q(
            t_ptr,
            t_stride,
            rows,
            s_ok,
            offs,
            k_ok,
            center_shift_ptr,
            teacher_correction_ptr,
            q_max_ptr,
            q_sum_exp_ptr,
            inv_teacher_temp,
            ACC,
        )
    else:
        j = tl.arange(0, VIEW_TILE)
        one = tl.arange(0, 1)
        q_total = tl.zeros([1, BLOCK_K], ACC)
        q_self = tl.zeros([VIEW_TILE, BLOCK_K], ACC)
        for i in tl.static_range(N_TEACHER_VIEWS):
            q_i = teacher_q(
                t_ptr,
                t_stride,
                row0 + i * view_stride + one,
                one == 0,
                offs,
                k_ok,
                center_shift_ptr,
                teacher_correction_ptr,
                q_max_ptr,
                q_sum_exp_ptr,
                inv_teacher_temp,
                ACC,
            )
            q_total += q_i
            if SKIP_SAME:
                q_self += tl.where((j == i)[:, None], q_i, 0.0)
        paired_q = tl.where(ok, q_total - q_self, 0.0)
    return student_logits, paired_q, ok
