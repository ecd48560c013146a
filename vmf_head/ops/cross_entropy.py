"""Fused Triton cross-entropy between teacher targets and student vMF logits: the DINO-vMF multi-crop
loss, iBOT-vMF's masked patch term, and the cross-entropy with precomputed targets (DINOv2, DINOv3).

Same contracts as the plain-PyTorch reference (``vmf_head.functional.cross_entropy`` for the
cross-entropy and its derivation, ``vmf_head.functional.centering`` for the targets):

    l_s = student / tau_s + log C_p(||w_s|| / tau_s)                        (student vMF logits)
    logit centering:       q = softmax((teacher - c) / tau_t + log C_p(||w_t|| / tau_t))
    probability centering: l_t = teacher / tau_t + log C_p(||w_t|| / tau_t),
                           pbar = softmax(l_t),  q = softmax(l_t - log c)
    precomputed targets:   q = the teacher rows themselves

Per student row the kernels form ``target_mass lse - Q . l_s`` with one online log-sum-exp and one
dot product, and the backward recomputes softmax(l_s) and Q instead of saving anything of size
B x K: the forward reads the student once and the teacher three times (row statistics, center
statistic, the pass with the student; once with targets), the backward reads both once and writes
the gradient once. Kernels by pass: ``cross_entropy_forward.py``, ``cross_entropy_backward.py``,
their shared tiles ``_cross_entropy_tiles.py``; design, tiling and memory traffic: ``docs/fused_loss.md``.

The forward and the backward are ``torch.library`` custom operators (``vmf_head::fused_cross_entropy``
and ``vmf_head::fused_cross_entropy_backward``) with fake implementations and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` keeps them as opaque nodes. Temperatures reach them as
a tensor (``inv_temps``), so a temperature schedule never recompiles a graph, and nothing here reads
device data on the host. Arithmetic is float32, float64 only when the logits (or targets) are
float64: a float64 K-vector (a correction, the center) is cast after its own arithmetic. Sinkhorn
centering stays on the reference path: its iterations need whole-batch column sums between passes
(all-reduced under torch.distributed), which these row-parallel kernels cannot do in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._validation import temperature_tensor
from ..functional.cross_entropy import Pairing
from ..functional.vmf import compute_dtype, shifted
from ._launch import is_interpreted, on_device
from .cross_entropy_backward import student_backward
from .cross_entropy_forward import (
    Inputs,
    StudentRowStats,
    TeacherRowStats,
    _student_forward_kernel,
    student_pass,
    teacher_statistics,
)

__all__ = ["INTERPRETED", "PairLayout", "fused_cross_entropy"]

INTERPRETED: bool = is_interpreted(_student_forward_kernel)
"""True when the kernels were built under ``TRITON_INTERPRET=1``: they then run on CPU tensors."""

# Independent tokens per [tokens, BLOCK_K] tile of a row-to-row pairing (iBOT patches; not tuned on
# a GPU yet, see docs/fused_loss.md).
TOKENS_PER_TILE = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@dataclass(frozen=True)
class PairLayout:
    """Which student rows pair with which teacher rows, in the kernels' terms.

    Student row of view j of group g: ``g * group_stride + j * view_stride`` for j < n_views; the
    teacher row of view i < n_teacher_views has the same index in the teacher tensor.

    * Multi-crop (``pair_self=False``): group = image b, ``view_stride = B``, ``group_stride = 1``;
      student view j pairs with every teacher view i (i != j when ``skip_same``).
    * Row to row (``pair_self=True``: iBOT patches, one student view against one target view): each
      row pairs with the teacher row of the same index only; a group is ``TOKENS_PER_TILE``
      consecutive rows, just a tile.
    """

    n_groups: int
    n_views: int
    n_teacher_views: int
    view_stride: int
    group_stride: int
    pair_self: bool
    skip_same: bool = True

    @staticmethod
    def of(pairing: Pairing, rows: int) -> PairLayout:
        """The layout of ``pairing`` for ``rows`` student rows."""
        if pairing.n_views == 1 and pairing.n_teacher_views == 1 and not pairing.skip_same:
            return PairLayout(
                n_groups=triton.cdiv(rows, TOKENS_PER_TILE),
                n_views=TOKENS_PER_TILE,
                n_teacher_views=TOKENS_PER_TILE,
                view_stride=1,
                group_stride=TOKENS_PER_TILE,
                pair_self=True,
                skip_same=False,
            )
        batch = rows // pairing.n_views
        return PairLayout(
            n_groups=batch,
            n_views=pairing.n_views,
            n_teacher_views=pairing.n_teacher_views,
            view_stride=batch,
            group_stride=1,
            pair_self=False,
            skip_same=pairing.skip_same,
        )

    def ints(self) -> list[int]:
        """The layout as the custom operators take it (they accept no dataclasses)."""
        return [*(getattr(self, f) for f in ("n_groups", "n_views", "n_teacher_views", "view_stride", "group_stride")),
                int(self.pair_self), int(self.skip_same)]  # fmt: skip

    @staticmethod
    def from_ints(ints: list[int]) -> PairLayout:
        *sizes, pair_self, skip_same = ints
        return PairLayout(*sizes, pair_self=bool(pair_self), skip_same=bool(skip_same))


class ForwardResult(NamedTuple):
    """The forward operator's outputs: the loss, the (K,) center statistic, and the row statistics
    the backward reads (teacher ones and the statistic empty with given targets)."""

    loss: torch.Tensor
    center_stat: torch.Tensor
    q_max: torch.Tensor
    q_sum_exp: torch.Tensor
    s_max: torch.Tensor
    s_sum_exp: torch.Tensor
    target_mass: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Custom operators. ``center_shift`` None means the teacher rows are the targets q; ``layout`` is
# ``PairLayout.ints()``; ``inv_temps`` = [1/tau_s, 1/tau_t] in the arithmetic dtype.


@torch.library.custom_op("vmf_head::fused_cross_entropy", mutates_args=())
def _forward_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    center_shift: torch.Tensor | None,
    student_correction: torch.Tensor | None,
    teacher_correction: torch.Tensor | None,
    inv_temps: torch.Tensor,
    layout: list[int],
    probability: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`ForwardResult` as a tuple."""
    x = Inputs(student, teacher, weights, center_shift, student_correction, teacher_correction, inv_temps)
    acc = _TL_DTYPES[weights.dtype]
    with on_device(student.device):
        if center_shift is None:
            teacher_stats = None
            center_stat, q_max, q_sum_exp = (weights.new_empty(0) for _ in range(3))  # outputs must not alias
        else:
            teacher_stats, center_stat = teacher_statistics(x, probability=probability, ACC=acc)
            q_max, q_sum_exp = teacher_stats
        loss, student_stats = student_pass(x, teacher_stats, PairLayout.from_ints(layout), acc)
        return ForwardResult(loss, center_stat, q_max, q_sum_exp, *student_stats)


@_forward_op.register_fake
def _(student, teacher, weights, center_shift, student_correction, teacher_correction, inv_temps, layout, probability):
    n_rows, k = student.shape
    n_teacher_rows = 0 if center_shift is None else teacher.shape[0]
    vec = weights.new_empty
    teacher_rows = (vec(n_teacher_rows), vec(n_teacher_rows))
    return ForwardResult(vec(()), vec(0 if center_shift is None else k), *teacher_rows, vec(n_rows), vec(n_rows),
                         vec(n_rows))  # fmt: skip


@torch.library.custom_op("vmf_head::fused_cross_entropy_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    center_shift: torch.Tensor | None,
    student_correction: torch.Tensor | None,
    teacher_correction: torch.Tensor | None,
    inv_temps: torch.Tensor,
    q_max: torch.Tensor,
    q_sum_exp: torch.Tensor,
    s_max: torch.Tensor,
    s_sum_exp: torch.Tensor,
    target_mass: torch.Tensor,
    layout: list[int],
    want_grad_student: bool,
    want_grad_correction: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d student in the student's dtype, d loss / d student_correction (K,)); one not
    wanted is empty."""
    x = Inputs(student, teacher, weights, center_shift, student_correction, teacher_correction, inv_temps)
    teacher_stats = None if center_shift is None else TeacherRowStats(q_max, q_sum_exp)
    with on_device(student.device):
        grad_student, grad_correction = student_backward(
            grad,
            x,
            teacher_stats,
            StudentRowStats(s_max, s_sum_exp, target_mass),
            PairLayout.from_ints(layout),
            want_grad_student=want_grad_student,
            want_grad_correction=want_grad_correction,
            ACC=_TL_DTYPES[weights.dtype],
        )
    return (
        student.new_empty(0) if grad_student is None else grad_student,
        weights.new_empty(0) if grad_correction is None else grad_correction,
    )


@_backward_op.register_fake
def _(grad, student, *rest):
    weights = rest[1]
    want_grad_student, want_grad_correction = rest[-2:]
    return (
        torch.empty_like(student) if want_grad_student else student.new_empty(0),
        weights.new_empty(student.shape[1]) if want_grad_correction else weights.new_empty(0),
    )


class _Saved(NamedTuple):
    """What the backward reads: the forward's tensor inputs and the row statistics it wrote."""

    student: torch.Tensor
    teacher: torch.Tensor
    weights: torch.Tensor
    center_shift: torch.Tensor | None
    student_correction: torch.Tensor | None
    teacher_correction: torch.Tensor | None
    inv_temps: torch.Tensor
    q_max: torch.Tensor
    q_sum_exp: torch.Tensor
    s_max: torch.Tensor
    s_sum_exp: torch.Tensor
    target_mass: torch.Tensor


# Positions of the differentiable inputs of _forward_op.
_STUDENT, _STUDENT_CORRECTION = 0, 4


def _setup_context(ctx, inputs, output) -> None:
    *tensors, layout, _probability = inputs
    result = ForwardResult(*output)
    ctx.save_for_backward(*tensors, result.q_max, result.q_sum_exp, result.s_max, result.s_sum_exp, result.target_mass)
    ctx.layout = layout
    ctx.mark_non_differentiable(*result[1:])


def _backward(ctx, grad_loss, *grads_of_statistics):
    want_grad_student = ctx.needs_input_grad[_STUDENT]
    want_grad_correction = ctx.needs_input_grad[_STUDENT_CORRECTION]
    grads = [None] * 9
    if want_grad_student or want_grad_correction:
        saved = _Saved(*ctx.saved_tensors)
        grad = grad_loss.to(saved.weights.dtype).contiguous()
        grad_student, grad_correction = _backward_op(grad, *saved, ctx.layout, want_grad_student, want_grad_correction)
        grads[_STUDENT] = grad_student if want_grad_student else None
        grads[_STUDENT_CORRECTION] = grad_correction if want_grad_correction else None
    return tuple(grads)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Entry. Arguments arrive checked by ``vmf_head.functional`` (which dispatches here).


def _shifted_vector(correction: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if correction is None else shifted(correction.reshape(-1), dtype).contiguous()


def _row_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    pairing: Pairing,
    *,
    row_weight: torch.Tensor | None,
    student_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None = None,
    teacher_temp: float | torch.Tensor = 1.0,
    teacher_correction: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    centering: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused centered cross-entropy: ``(loss, center statistic (K,))``, the statistic None with
    given targets. Arguments as ``vmf_head.functional.dino_loss.centered_cross_entropy``, plus:

    Args:
        teacher: (G B, K) raw teacher outputs (``centering`` given) or the targets q themselves
            (``centering`` None); no gradient.
        center: the center (K values, any shape) with ``centering`` ``"logit"`` or ``"probability"``.
    """
    dtype = compute_dtype(student, teacher)
    rows = student.shape[0]
    batch = rows // pairing.n_views
    per_row = (
        torch.full((batch,), 1.0 / batch, dtype=dtype, device=student.device)
        if row_weight is None
        else row_weight.to(dtype)
    )
    weights = (per_row / pairing.n_pairs).repeat(pairing.n_views)
    device = student.device
    inv_temps = torch.stack((temperature_tensor(student_temp, device), temperature_tensor(teacher_temp, device)))
    inv_temps = inv_temps.reciprocal_().to(dtype)
    center_shift = None
    if centering is not None:
        # log c (with the reference's floor at the smallest normal number for an entry that
        # underflowed) or c / tau_t: see _cross_entropy_tiles
        c = center.detach().reshape(-1).to(dtype)
        center_shift = c.clamp_min(torch.finfo(dtype).tiny).log() if centering == "probability" else c * inv_temps[1]
    result = ForwardResult(
        *_forward_op(
            _row_contiguous(student),
            _row_contiguous(teacher.detach()),
            weights.contiguous(),
            center_shift,
            _shifted_vector(student_correction, dtype),
            _shifted_vector(None if teacher_correction is None else teacher_correction.detach(), dtype),
            inv_temps,
            PairLayout.of(pairing, rows).ints(),
            centering == "probability",
        )
    )
    return result.loss, None if centering is None else result.center_stat
