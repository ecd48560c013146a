"""Fused Triton cross-entropy between teacher targets and student vMF logits: the DINO-vMF multi-crop
loss, iBOT-vMF's masked patch term, and the cross-entropy with precomputed targets (DINOv2, DINOv3).

Same contracts as the plain-PyTorch reference in ``vmf_head.functional.dino_loss``:

    l_s = student / tau_s + log C_p(||w_s|| / tau_s)                        (student vMF logits)
    logit centering:       q = softmax((teacher - c) / tau_t + log C_p(||w_t|| / tau_t))
    probability centering: l_t = teacher / tau_t + log C_p(||w_t|| / tau_t),
                           pbar = softmax(l_t),  q = softmax(l_t - log c)
    precomputed targets:   q = the teacher rows themselves
    L = sum over student rows r of w_r sum_{teacher rows i paired with r} -q_i . log_softmax(l_s_r)

(Govindarajan et al., "DINO as a von Mises-Fisher mixture model", ICLR 2023). Per student row the
kernels use ``sum_i -q_i . lsm = qs lse - Qsum . l_s`` with ``Qsum = sum_i q_i`` and
``qs = sum_k Qsum[k]`` (the number of paired teacher rows, up to rounding; the computed sum keeps
the identity exact for the q actually used). So the forward needs one online log-sum-exp and one dot
product per student row, and the backward recomputes softmax(l_s) and Qsum instead of saving
anything of size B x K: the forward reads the student once and the teacher three times (row
statistics, centre statistic, the pass with the student; once with targets), the backward reads both
once and writes the gradient once. Kernels: ``cross_entropy_forward.py``, ``cross_entropy_backward.py``.

The forward and the backward are ``torch.library`` custom operators (``vmf_head::fused_cross_entropy``
and ``vmf_head::fused_cross_entropy_backward``) with fake implementations and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` keeps them as opaque nodes. Temperatures reach them as
a tensor (``inv_temps``), so a temperature schedule never recompiles a graph, and nothing here reads
device data on the host.

Arithmetic is float32, float64 only when the logits (or targets) are float64: the B x K work never
runs in float64 because a K-vector (a correction, the centre) is float64; those are cast after their
own float64 arithmetic. Design, tiling and memory traffic: ``docs/fused_loss.md``. Sinkhorn
centering stays on the reference path (``vmf_head.functional`` does not dispatch it here): its
iterations need whole-batch column sums between passes (all-reduced under torch.distributed), which
these row-parallel kernels cannot do in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._validation import temperature_tensor
from ._launch import is_interpreted, on_device
from .cross_entropy_backward import student_backward
from .cross_entropy_forward import _student_forward_kernel, student_pass, teacher_statistics

__all__ = [
    "INTERPRETED",
    "PairLayout",
    "cross_entropy",
    "dino_vmf_loss",
    "ibot_patch_vmf_loss",
    "multicrop_cross_entropy",
]

INTERPRETED: bool = is_interpreted(_student_forward_kernel)
"""True when the kernels were built under ``TRITON_INTERPRET=1``: they then run on CPU tensors."""

# Independent tokens per [tokens, BLOCK_K] tile of a row-to-row pairing (iBOT patches; not tuned on
# a GPU yet, see docs/fused_loss.md).
TOKENS_PER_TILE = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@dataclass(frozen=True)
class PairLayout:
    """Which student rows pair with which teacher rows.

    Student row of view j of group g: ``g * group_stride + j * view_stride`` for j < n_views; the
    teacher row of view i < n_teacher_views has the same index in the teacher tensor.

    * DINO (``pair_self=False``): group = image b, ``view_stride = B``, ``group_stride = 1``;
      student view j pairs with every teacher view i (i != j when ``skip_same``).
    * Row to row (``pair_self=True``: iBOT patches, targets aligned with the student rows): each row
      pairs with the teacher row of the same index only; a group is ``n_views`` consecutive rows
      (``view_stride = 1``, ``group_stride = n_views``, ``n_teacher_views = n_views``), just a tile.
    """

    n_groups: int
    n_views: int
    n_teacher_views: int
    view_stride: int
    group_stride: int
    pair_self: bool
    skip_same: bool = True

    @staticmethod
    def multicrop(batch: int, n_views: int, n_teacher_views: int, skip_same: bool) -> PairLayout:
        return PairLayout(
            n_groups=batch,
            n_views=n_views,
            n_teacher_views=n_teacher_views,
            view_stride=batch,
            group_stride=1,
            pair_self=False,
            skip_same=skip_same,
        )

    @staticmethod
    def row_to_row(rows: int) -> PairLayout:
        return PairLayout(
            n_groups=triton.cdiv(rows, TOKENS_PER_TILE),
            n_views=TOKENS_PER_TILE,
            n_teacher_views=TOKENS_PER_TILE,
            view_stride=1,
            group_stride=TOKENS_PER_TILE,
            pair_self=True,
            skip_same=False,
        )

    def ints(self) -> list[int]:
        return [
            self.n_groups,
            self.n_views,
            self.n_teacher_views,
            self.view_stride,
            self.group_stride,
            int(self.pair_self),
            int(self.skip_same),
        ]

    @staticmethod
    def of(ints: list[int]) -> PairLayout:
        *sizes, pair_self, skip_same = ints
        return PairLayout(*sizes, pair_self=bool(pair_self), skip_same=bool(skip_same))


# ----------------------------------------------------------------------------------------------
# Custom operators. ``center`` None means the teacher rows are the targets q; ``layout`` is
# ``PairLayout.ints()``; ``inv_temps`` = [1/tau_s, 1/tau_t] in the arithmetic dtype.


@torch.library.custom_op("vmf_head::fused_cross_entropy", mutates_args=())
def _forward_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    center: torch.Tensor | None,
    scorr: torch.Tensor | None,
    tcorr: torch.Tensor | None,
    inv_temps: torch.Tensor,
    layout: list[int],
    probability: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, stat, mq, lq, ms, ls, qs): the loss, the centre statistic (K,) (empty with
    targets), the teacher rows' (max, sum exp) of q's logits (empty with targets), and per student
    row (max, sum exp of l_s, qs)."""
    acc = _TL_DTYPES[weights.dtype]
    with on_device(student.device):
        if center is None:
            stat, mq, lq = (weights.new_empty(0) for _ in range(3))  # (outputs must not alias)
        else:
            mq, lq, stat = teacher_statistics(teacher, center, tcorr, inv_temps, probability=probability, ACC=acc)
        loss, ms, ls, qs = student_pass(
            student,
            teacher,
            weights,
            center,
            scorr,
            tcorr,
            None if center is None else mq,
            None if center is None else lq,
            inv_temps,
            PairLayout.of(layout),
            acc,
        )
        return loss, stat, mq, lq, ms, ls, qs


@_forward_op.register_fake
def _(student, teacher, weights, center, scorr, tcorr, inv_temps, layout, probability):
    n_rows, K = student.shape
    n_trows = 0 if center is None else teacher.shape[0]
    vec = weights.new_empty
    return vec(()), vec(0 if center is None else K), vec(n_trows), vec(n_trows), vec(n_rows), vec(n_rows), vec(n_rows)


@torch.library.custom_op("vmf_head::fused_cross_entropy_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    center: torch.Tensor | None,
    scorr: torch.Tensor | None,
    tcorr: torch.Tensor | None,
    mq: torch.Tensor,
    lq: torch.Tensor,
    ms: torch.Tensor,
    ls: torch.Tensor,
    qs: torch.Tensor,
    inv_temps: torch.Tensor,
    layout: list[int],
    want_ds: bool,
    want_dscorr: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d student in the student's dtype, d loss / d scorr (K,)); one not wanted is empty."""
    with on_device(student.device):
        ds, dscorr = student_backward(
            grad,
            student,
            teacher,
            weights,
            center,
            scorr,
            tcorr,
            None if center is None else mq,
            None if center is None else lq,
            ms,
            ls,
            qs,
            inv_temps,
            PairLayout.of(layout),
            want_ds=want_ds,
            want_dscorr=want_dscorr,
            ACC=_TL_DTYPES[weights.dtype],
        )
    return (student.new_empty(0) if ds is None else ds), (weights.new_empty(0) if dscorr is None else dscorr)


@_backward_op.register_fake
def _(
    grad, student, teacher, weights, center, scorr, tcorr, mq, lq, ms, ls, qs, inv_temps, layout, want_ds, want_dscorr
):
    return (
        torch.empty_like(student) if want_ds else student.new_empty(0),
        weights.new_empty(student.shape[1]) if want_dscorr else weights.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, weights, center, scorr, tcorr, inv_temps, layout, _probability = inputs
    _, stat, mq, lq, ms, ls, qs = output
    ctx.save_for_backward(student, teacher, weights, center, scorr, tcorr, mq, lq, ms, ls, qs, inv_temps)
    ctx.layout = layout
    ctx.mark_non_differentiable(stat, mq, lq, ms, ls, qs)


def _backward(ctx, grad_loss, *grads_of_statistics):
    want_ds, want_dscorr = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    grads = [None] * 9
    if want_ds or want_dscorr:
        saved = ctx.saved_tensors
        ds, dscorr = _backward_op(grad_loss.to(saved[2].dtype).contiguous(), *saved, ctx.layout, want_ds, want_dscorr)
        grads[0] = ds if want_ds else None
        grads[4] = dscorr if want_dscorr else None
    return tuple(grads)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Entries. Arguments arrive validated by ``vmf_head.functional`` (which dispatches here).


def _shifted(correction: torch.Tensor | None, dtype: torch.dtype, detach: bool = False) -> torch.Tensor | None:
    """correction - max(correction), in its own dtype, then cast to the arithmetic dtype.

    Softmaxes, the loss and its gradients do not change when a constant is added to a row of
    logits. Shifting a correction by its max keeps the logits near 0 (log C_p is ~340 at p = 256),
    where float32 resolves them 100x finer, and the dot Qsum . l_s loses no digits to the offset. The
    max is a constant for autograd, so the gradient passes through unchanged.
    """
    if correction is None:
        return None
    c = correction.reshape(-1)
    if detach:
        c = c.detach()
    return (c - c.detach().max()).to(dtype).contiguous()


def cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    layout: PairLayout,
    *,
    student_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None = None,
    teacher_temp: float | torch.Tensor = 1.0,
    teacher_correction: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    centering: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel family's common entry: ``sum_r weights[r] sum_{i paired with r} -q_i . log_softmax(l_s_r)``.

    Args:
        student: (rows, K) raw student outputs, any float dtype; receives a gradient.
        teacher: (teacher rows, K): raw teacher outputs (``centering`` given) or the targets q
            themselves (``centering`` None); no gradient.
        weights: (rows,) loss weight per student row, in the arithmetic dtype (float32, or float64 for
            float64 logits); rows with weight 0 are not read.
        layout: the pairing of rows.
        student_temp, teacher_temp: positive temperatures (numbers or 0-d tensors).
        student_correction: (K,) or None; receives a gradient. teacher_correction: (K,) or None.
        center: K values (logit or probability centre) with ``centering`` ``"logit"`` or
            ``"probability"``; None with precomputed targets.

    Returns:
        (loss, batch_stat): the scalar loss and the (K,) mean over teacher rows of the raw teacher
        output (logit) or of pbar (probability), not differentiable; None with targets.
    """
    acc = weights.dtype
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher.detach()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    device = student.device
    inv_temps = torch.stack((temperature_tensor(student_temp, device), temperature_tensor(teacher_temp, device)))
    inv_temps = inv_temps.reciprocal_().to(acc)
    if centering is None:
        center_logits = None
    else:
        # The centre in logit units (see _cross_entropy_tiles): c / tau_t, or log c with the
        # reference's floor at the smallest normal number for an entry that underflowed.
        c = center.detach().reshape(-1).to(acc)
        center_logits = c.clamp_min(torch.finfo(acc).tiny).log() if centering == "probability" else c * inv_temps[1]
    loss, stat, *_ = _forward_op(
        student,
        teacher,
        weights.contiguous(),
        center_logits,
        _shifted(student_correction, acc),
        _shifted(teacher_correction, acc, detach=True),
        inv_temps,
        layout.ints(),
        centering == "probability",
    )
    return loss, None if centering is None else stat


def arithmetic_dtype(*logits: torch.Tensor) -> torch.dtype:
    """float64 when a B x K input is float64, float32 otherwise (K-vectors never decide it)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in logits) else torch.float32


def dino_vmf_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    *,
    n_views: int,
    n_global: int,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None,
    teacher_correction: torch.Tensor | None,
    centering: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DINO-vMF multi-crop loss (contract: ``vmf_head.functional.dino_vmf_loss``), fused:
    ``(loss, (1, K) batch statistic)``. ``n_global`` may exceed ``n_views`` (lightly's pairing)."""
    rows, K = student_output.shape
    batch = rows // n_views
    n_pairs = n_global * n_views - min(n_global, n_views)
    dtype = arithmetic_dtype(student_output, teacher_output)
    weights = torch.full((rows,), 1.0 / (n_pairs * batch), device=student_output.device, dtype=dtype)
    loss, stat = cross_entropy(
        student_output,
        teacher_output,
        weights,
        PairLayout.multicrop(batch, n_views, n_global, skip_same=True),
        student_temp=student_temp,
        student_correction=student_correction,
        teacher_temp=teacher_temp,
        teacher_correction=teacher_correction,
        center=center,
        centering=centering,
    )
    return loss, stat.reshape(1, K)


def ibot_patch_vmf_loss(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    mask: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None,
    teacher_correction: torch.Tensor | None,
    centering: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """iBOT-vMF's masked patch term (contract: ``vmf_head.functional.ibot_patch_vmf_loss``), fused:
    ``(loss, (1, 1, K) batch statistic over all tokens)``. Each token pairs with its own teacher
    token, weighted ``mask / max(1, masked tokens of its image) / images``, so unmasked tokens are
    never read for the loss (they still count for the centre statistic, as iBOT's ``center2``)."""
    images, tokens, K = student_patch.shape
    dtype = arithmetic_dtype(student_patch, teacher_patch)
    selected = mask.to(dtype)
    weights = (selected / (selected.sum(dim=1, keepdim=True).clamp(min=1.0) * images)).reshape(-1)
    loss, stat = cross_entropy(
        student_patch.reshape(images * tokens, K),
        teacher_patch.reshape(images * tokens, K),
        weights,
        PairLayout.row_to_row(images * tokens),
        student_temp=student_temp,
        student_correction=student_correction,
        teacher_temp=teacher_temp,
        teacher_correction=teacher_correction,
        center=center,
        centering=centering,
    )
    return loss, stat.reshape(1, 1, K)


def multicrop_cross_entropy(
    student_output: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_views: int,
    student_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None,
    skip_same_view: bool,
    row_weight: torch.Tensor | None,
) -> torch.Tensor:
    """The cross-entropy against given targets (contract: ``vmf_head.functional.multicrop_cross_entropy``),
    fused. One student view against one target view pairs row to row (tiled like iBOT's tokens)."""
    rows, _K = student_output.shape
    batch = rows // n_views
    n_targets = targets.shape[0] // batch
    n_pairs = n_views * n_targets - (min(n_targets, n_views) if skip_same_view else 0)
    dtype = arithmetic_dtype(student_output, targets)
    per_row = (
        torch.full((batch,), 1.0 / batch, dtype=dtype, device=student_output.device)
        if row_weight is None
        else row_weight.to(dtype)
    )
    weights = (per_row / n_pairs).repeat(n_views)
    if n_views == 1 and n_targets == 1:
        layout = PairLayout.row_to_row(rows)
    else:
        layout = PairLayout.multicrop(batch, n_views, n_targets, skip_same=skip_same_view)
    loss, _ = cross_entropy(
        student_output, targets, weights, layout, student_temp=student_temp, student_correction=student_correction
    )
    return loss
