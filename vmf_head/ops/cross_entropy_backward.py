"""Backward pass of the fused cross-entropy: one kernel and the host function that launches it.

    d L / d l_s_j[b, k] = grad w_j (qs_j softmax(l_s_j)[b, k] - Qsum_j[b, k])

with softmax(l_s_j) recomputed from the (max, sum) of the row saved by the forward and Qsum_j from
the teacher (the targets, or the raw outputs and the saved teacher row statistics). Nothing of size
B x K was saved: the kernel reads student and teacher once and writes the gradient once, in the
student's dtype; the student-correction gradient is summed over the rows in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cross_entropy_tiles import group_rows, pair_tile
from ._launch import split, target_programs
from .cross_entropy_forward import NUM_WARPS, Inputs, StudentRowStats, TeacherRowStats, block_k


@triton.jit
def _student_backward_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    w_ptr,
    n_rows,
    K,
    n_groups,
    n_views,
    view_stride,
    group_stride,
    student_correction_ptr,
    center_shift_ptr,
    teacher_correction_ptr,
    q_max_ptr,
    q_sum_exp_ptr,
    s_max_ptr,
    s_sum_exp_ptr,
    target_mass_ptr,
    grad_ptr,
    inv_temps_ptr,
    grad_student_ptr,
    grad_student_stride,
    grad_correction_ptr,
    groups_per_chunk,
    PAIR_SELF: tl.constexpr,
    N_TEACHER_VIEWS: tl.constexpr,
    SKIP_SAME: tl.constexpr,
    ACC: tl.constexpr,
    VIEW_TILE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (K block, group chunk): for each group of the chunk, dl_s = grad w (target_mass p - Qsum) with
    p = exp(l_s - max) / sum; writes dl_s / tau_s (student dtype) when ``grad_student_ptr`` is given and sums
    dl_s over rows into ``grad_correction_ptr`` [n_chunks, K] when that is given.
    """
    kb = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_student_temp = tl.load(inv_temps_ptr)
    inv_teacher_temp = tl.load(inv_temps_ptr + 1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs < K
    grad = tl.load(grad_ptr).to(ACC)
    acc = tl.zeros([BLOCK_K], ACC)
    g_end = tl.minimum((chunk + 1) * groups_per_chunk, n_groups)
    for g in range(chunk * groups_per_chunk, g_end):
        row0, rows, r_ok, s_ok, w = group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEW_TILE)
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
        s_max = tl.load(s_max_ptr + rows, mask=s_ok, other=float("inf"))
        inv_s_sum_exp = 1.0 / tl.load(s_sum_exp_ptr + rows, mask=s_ok, other=1.0)
        target_mass = tl.load(target_mass_ptr + rows, mask=s_ok, other=0.0)
        p = tl.exp(student_logits - s_max[:, None]) * inv_s_sum_exp[:, None]
        d_logits = tl.where(ok, (w * grad)[:, None] * (target_mass[:, None] * p - paired_q), 0.0)
        if grad_student_ptr is not None:
            # rows with zero weight get an explicit zero gradient
            tl.store(
                grad_student_ptr + rows[:, None] * grad_student_stride + offs[None, :],
                (d_logits * inv_student_temp).to(grad_student_ptr.dtype.element_ty),
                mask=r_ok[:, None] & k_ok[None, :],
            )
        if grad_correction_ptr is not None:
            acc += tl.sum(d_logits, axis=0)
    if grad_correction_ptr is not None:
        tl.store(grad_correction_ptr + chunk * K + offs, acc, mask=k_ok)


def student_backward(
    grad: torch.Tensor,
    x: Inputs,
    teacher_stats: TeacherRowStats | None,
    student_stats: StudentRowStats,
    layout,
    *,
    want_grad_student: bool,
    want_grad_correction: bool,
    ACC,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(d loss / d student in the student's dtype, d loss / d student_correction (K,))``, None where
    not wanted; ``grad`` is the 0-d gradient of the loss."""
    n_rows, K = x.student.shape
    view_tile = triton.next_power_of_2(layout.n_views)
    half = x.student.element_size() == 2 or x.weights.dtype == torch.float64
    bk = block_k(view_tile, K, half_tile=half)
    n_kb = triton.cdiv(K, bk)
    per_chunk, n_chunk = split(layout.n_groups, triton.cdiv(target_programs(x.student.device), n_kb))
    grad_student = torch.empty_like(x.student) if want_grad_student else None
    grad_correction = x.weights.new_empty(n_chunk, K) if want_grad_correction else None
    _student_backward_kernel[(n_kb, n_chunk)](
        s_ptr=x.student,
        s_stride=x.student.stride(0),
        t_ptr=x.teacher,
        t_stride=x.teacher.stride(0),
        w_ptr=x.weights,
        n_rows=n_rows,
        K=K,
        n_groups=layout.n_groups,
        n_views=layout.n_views,
        view_stride=layout.view_stride,
        group_stride=layout.group_stride,
        student_correction_ptr=x.student_correction,
        center_shift_ptr=x.center_shift,
        teacher_correction_ptr=x.teacher_correction,
        q_max_ptr=None if teacher_stats is None else teacher_stats.q_max,
        q_sum_exp_ptr=None if teacher_stats is None else teacher_stats.q_sum_exp,
        s_max_ptr=student_stats.s_max,
        s_sum_exp_ptr=student_stats.s_sum_exp,
        target_mass_ptr=student_stats.target_mass,
        grad_ptr=grad,
        inv_temps_ptr=x.inv_temps,
        grad_student_ptr=grad_student,
        grad_student_stride=grad_student.stride(0) if want_grad_student else 0,
        grad_correction_ptr=grad_correction,
        groups_per_chunk=per_chunk,
        PAIR_SELF=layout.pair_self,
        N_TEACHER_VIEWS=layout.n_teacher_views,
        SKIP_SAME=layout.skip_same,
        ACC=ACC,
        VIEW_TILE=view_tile,
        BLOCK_K=bk,
        num_warps=NUM_WARPS,
    )
    return grad_student, grad_correction.sum(dim=0) if want_grad_correction else None
