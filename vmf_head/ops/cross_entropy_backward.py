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
from .cross_entropy_forward import NUM_WARPS, block_k


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
    scorr_ptr,
    center_ptr,
    tcorr_ptr,
    mq_ptr,
    lq_ptr,
    ms_ptr,
    ls_ptr,
    qs_ptr,
    grad_ptr,
    inv_temps_ptr,
    ds_ptr,
    ds_stride,
    dscorr_ptr,
    groups_per_chunk,
    PAIR_SELF: tl.constexpr,
    N_TEACHER: tl.constexpr,
    SKIP_SAME: tl.constexpr,
    ACC: tl.constexpr,
    VIEWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (K block, group chunk): for each group of the chunk, dl_s = grad w (qs p - Qsum) with
    p = exp(l_s - max) / sum; writes dl_s / tau_s (student dtype) when ``ds_ptr`` is given and sums
    dl_s over rows into ``dscorr_ptr`` [n_chunks, K] when that is given.
    """
    kb = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_ts = tl.load(inv_temps_ptr)
    inv_tt = tl.load(inv_temps_ptr + 1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs < K
    grad = tl.load(grad_ptr).to(ACC)
    acc = tl.zeros([BLOCK_K], ACC)
    g_end = tl.minimum((chunk + 1) * groups_per_chunk, n_groups)
    for g in range(chunk * groups_per_chunk, g_end):
        row0, rows, r_ok, s_ok, w = group_rows(g, n_rows, n_views, view_stride, group_stride, w_ptr, VIEWS)
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
        ms = tl.load(ms_ptr + rows, mask=s_ok, other=float("inf"))
        inv_ls = 1.0 / tl.load(ls_ptr + rows, mask=s_ok, other=1.0)
        qs = tl.load(qs_ptr + rows, mask=s_ok, other=0.0)
        p = tl.exp(ls - ms[:, None]) * inv_ls[:, None]
        dls = tl.where(ok, (w * grad)[:, None] * (qs[:, None] * p - qsum), 0.0)
        if ds_ptr is not None:
            # rows with zero weight get an explicit zero gradient
            tl.store(
                ds_ptr + rows[:, None] * ds_stride + offs[None, :],
                (dls * inv_ts).to(ds_ptr.dtype.element_ty),
                mask=r_ok[:, None] & k_ok[None, :],
            )
        if dscorr_ptr is not None:
            acc += tl.sum(dls, axis=0)
    if dscorr_ptr is not None:
        tl.store(dscorr_ptr + chunk * K + offs, acc, mask=k_ok)


def student_backward(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    center: torch.Tensor | None,
    scorr: torch.Tensor | None,
    tcorr: torch.Tensor | None,
    mq: torch.Tensor | None,
    lq: torch.Tensor | None,
    ms: torch.Tensor,
    ls: torch.Tensor,
    qs: torch.Tensor,
    inv_temps: torch.Tensor,
    layout,
    *,
    want_ds: bool,
    want_dscorr: bool,
    ACC,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(d loss / d student in the student's dtype, d loss / d scorr (K,))``, None where not wanted."""
    n_rows, K = student.shape
    views_p2 = triton.next_power_of_2(layout.n_views)
    half = student.element_size() == 2 or weights.dtype == torch.float64
    bk = block_k(views_p2, K, half_tile=half)
    n_kb = triton.cdiv(K, bk)
    per_chunk, n_chunk = split(layout.n_groups, triton.cdiv(target_programs(student.device), n_kb))
    ds = torch.empty_like(student) if want_ds else None
    dscorr = weights.new_empty(n_chunk, K) if want_dscorr else None
    _student_backward_kernel[(n_kb, n_chunk)](
        s_ptr=student,
        s_stride=student.stride(0),
        t_ptr=teacher,
        t_stride=teacher.stride(0),
        w_ptr=weights,
        n_rows=n_rows,
        K=K,
        n_groups=layout.n_groups,
        n_views=layout.n_views,
        view_stride=layout.view_stride,
        group_stride=layout.group_stride,
        scorr_ptr=scorr,
        center_ptr=center,
        tcorr_ptr=tcorr,
        mq_ptr=mq,
        lq_ptr=lq,
        ms_ptr=ms,
        ls_ptr=ls,
        qs_ptr=qs,
        grad_ptr=grad,
        inv_temps_ptr=inv_temps,
        ds_ptr=ds,
        ds_stride=ds.stride(0) if want_ds else 0,
        dscorr_ptr=dscorr,
        groups_per_chunk=per_chunk,
        PAIR_SELF=layout.pair_self,
        N_TEACHER=layout.n_teacher_views,
        SKIP_SAME=layout.skip_same,
        ACC=ACC,
        VIEWS=views_p2,
        BLOCK_K=bk,
        num_warps=NUM_WARPS,
    )
    return ds, dscorr.sum(dim=0) if want_dscorr else None
