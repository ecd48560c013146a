"""The multi-crop cross-entropy between fixed targets and the student's vMF logits (reference).

Student rows are ``V`` stacked views of ``B`` rows, ``l = s / tau_s + c`` their logits (``c`` the
vMF correction, shifted to a maximum of 0); targets are ``G`` stacked views of the same ``B`` rows.
Student view ``j`` is paired with every target view ``i`` (``i != j`` when same views are skipped, as
DINO does), row ``b`` weighs ``w_b``, and

    L = 1/n_pairs sum_j sum_b w_b sum_{i paired with j} -q_i[b] . log_softmax(l_j[b]).

All pairs of a student view share one log-sum-exp (DINO's code recomputes the log-softmax for
every pair): with ``Q_j = sum_{i paired with j} q_i`` and ``r_j[b] = sum_k Q_j[b, k]`` (the number of
paired target views, up to the rounding of the targets actually used),

    sum_{i paired with j} -q_i[b] . log_softmax(l_j[b]) = r_j[b] lse(l_j[b]) - Q_j[b] . l_j[b],
    dL/dl_j[b] = w_b (r_j[b] softmax(l_j[b]) - Q_j[b]) / n_pairs.

The same sums, written twice for two compilers (docs/design.md, "Two formulations"):

* eager: an autograd Function that allocates ONE (V B, K) buffer, writes the logits into it, turns
  them into the softmax in place and, in the backward, into the gradient in place: every B x K tensor
  is read or written as few times as ATen's operators allow, and the exponentials run once;
* traced (under ``torch.compile``): the plain differentiable formula above, which Inductor fuses
  into a few loops over the student logits (it cannot fuse an opaque autograd Function's buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .vmf import compute_dtype, scaled_logits, shifted


@dataclass(frozen=True)
class Pairing:
    """Which target views each student view is paired with.

    ``n_views`` student views, ``n_teacher_views`` target views; with ``skip_same`` (DINO) view ``j``
    is not paired with target view ``j``. iBOT's patch tokens are one view against one target view
    (``Pairing(1, 1, skip_same=False)``): every token against the teacher's token of the same index.
    """

    n_views: int
    n_teacher_views: int
    skip_same: bool = True

    @property
    def n_same(self) -> int:
        """Student views that skip a target view of the same index."""
        return min(self.n_views, self.n_teacher_views) if self.skip_same else 0

    @property
    def n_pairs(self) -> int:
        return self.n_views * self.n_teacher_views - self.n_same

    @property
    def n_paired(self) -> list[int]:
        """``n_j``: how many target views each student view is paired with."""
        return [self.n_teacher_views - (j < self.n_same) for j in range(self.n_views)]


def _row_dots(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` of two (B, K) tensors through a reused (B, K) scratch buffer: a batched
    matmul of (1, K) x (K, 1) products is twice as slow on the CPU."""
    return torch.mul(a, b, out=scratch).sum(-1)


class _EagerCrossEntropy(torch.autograd.Function):
    """The eager formulation (module docstring): one (V B, K) buffer holds the logits, then their
    softmax, then the gradient. ``Q_j`` is never formed: it is the sum ``T`` of all target views,
    minus view j's own target for the first ``n_same`` views. The exponentials run once: the dot
    products are taken with the logits before the softmax overwrites them, and the log-sum-exp comes
    from the softmax itself, whose largest entry is ``exp(max l - lse)``."""

    @staticmethod
    def forward(ctx, student, correction, targets, row_weight, pairing: Pairing, inv_temp):
        dtype = compute_dtype(student, targets)
        rows, k = student.shape
        batch = rows // pairing.n_views
        q = targets.to(dtype).view(pairing.n_teacher_views, batch, k)
        total = q[0] if pairing.n_teacher_views == 1 else q.sum(0)
        logits = scaled_logits(student, inv_temp, None if correction is None else shifted(correction, dtype), dtype)
        views = logits.view(pairing.n_views, batch, k)
        # Each row shifted to a maximum of 0 (the loss and the softmax do not see it): a loss near 0
        # is then a difference of numbers near 0, as in -Q . log_softmax(l), not of two large ones.
        views.sub_(views.amax(dim=-1, keepdim=True))
        # sum_j Q_j . l_j = T . sum_j l_j - sum_{j < n_same} q_j . l_j: one pass over the views and
        # 1 + n_same row-wise dot products instead of one per view
        scratch = torch.empty_like(total)
        dots = _row_dots(views.sum(0), total, scratch)
        for j in range(pairing.n_same):
            dots -= _row_dots(views[j], q[j], scratch)
        probs = torch.softmax(logits, dim=-1, out=logits).view_as(views)
        lse = -probs.amax(dim=-1).log()  # of the shifted rows, whose largest softmax entry is exp(-lse)
        n_lse = lse.sum(0) * pairing.n_teacher_views - lse[: pairing.n_same].sum(0)  # sum_j n_j lse_j
        weight = _row_weight(row_weight, batch, dtype, student.device)
        ctx.save_for_backward(probs, weight, total, q[: pairing.n_same])
        ctx.pairing, ctx.inv_temp = pairing, inv_temp
        ctx.student_dtype = student.dtype
        ctx.correction_dtype = None if correction is None else correction.dtype
        return ((n_lse - dots) * weight).sum() / pairing.n_pairs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        probs, weight, total, same = ctx.saved_tensors
        pairing = ctx.pairing
        # dL/ds = dL/dl * inv_temp: the temperature rides in the coefficient, and the buffer is
        # overwritten in one pass, probs_j <- coef (n_j w probs_j - w T) (+ coef w q_j for j < n_same),
        # with n_j the number of target views paired with view j.
        coef = grad_loss.to(probs.dtype) * (ctx.inv_temp / pairing.n_pairs)
        # filled on the device: torch.tensor of Python numbers would be a host-to-device copy
        n_paired = torch.full(
            (pairing.n_views,), float(pairing.n_teacher_views), dtype=probs.dtype, device=probs.device
        )
        n_paired[: pairing.n_same] -= 1
        row_scale = (coef * n_paired[:, None] * weight)[..., None]
        grad = torch.addcmul((total * weight[:, None]).mul_(-coef), probs, row_scale, out=probs)
        for j in range(pairing.n_same):
            grad[j].addcmul_(same[j], weight[:, None] * coef)
        grad = grad.view(-1, grad.shape[-1])
        grad_correction = None
        if ctx.needs_input_grad[1]:
            # a matrix-vector product sums the rows faster than sum(0) on the CPU
            grad_correction = (grad.new_ones(grad.shape[0]) @ grad / ctx.inv_temp).to(ctx.correction_dtype)
        return grad.to(ctx.student_dtype), grad_correction, None, None, None, None


def _row_weight(row_weight: torch.Tensor | None, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    if row_weight is None:
        return torch.full((batch,), 1.0 / max(batch, 1), dtype=dtype, device=device)
    return row_weight.to(dtype)


class _TracedCrossEntropy(torch.autograd.Function):
    """The traced formulation (module docstring): broadcast operators over all views at once. Only the
    inputs and the (V, B) log-sum-exps are saved: the backward recomputes the logits in the one
    element-wise loop that writes the gradient, and sums the correction's gradient over the rows with
    a matrix-vector product (Inductor would write that column reduction as a loop over the rows for
    every column, which the CPU's caches cannot follow)."""

    @staticmethod
    def forward(ctx, student, correction, q, weight, pairing: Pairing, inv_temp):
        logits, paired, n_paired = _traced_terms(student, correction, q, pairing, inv_temp)
        # every reduction over the same (V B, K) rows, so that Inductor can merge their loops
        flat, k = logits.reshape(-1, logits.shape[-1]), logits.shape[-1]
        lse = torch.logsumexp(flat, dim=-1).view(n_paired.shape[0], -1)
        dots = (flat * paired.reshape(-1, k)).sum(-1).view_as(lse)
        ctx.save_for_backward(student, correction, q, weight, lse)
        ctx.pairing, ctx.inv_temp = pairing, inv_temp
        return ((n_paired * lse - dots) * weight).sum() / pairing.n_pairs

    @staticmethod
    def backward(ctx, grad_loss):
        student, correction, q, weight, lse = ctx.saved_tensors
        pairing, inv_temp = ctx.pairing, ctx.inv_temp
        logits, paired, n_paired = _traced_terms(student, correction, q, pairing, inv_temp)
        coef = (grad_loss * inv_temp / pairing.n_pairs) * weight[:, None]
        grad = coef * (n_paired[..., None] * torch.exp(logits - lse[..., None]) - paired)
        grad = grad.view(student.shape)
        grad_correction = None
        if correction is not None and ctx.needs_input_grad[1]:
            grad_correction = grad.new_ones(grad.shape[0]) @ grad / inv_temp
        return grad, grad_correction, None, None, None, None


def _traced_terms(student, correction, q, pairing: Pairing, inv_temp):
    """The logits (V, B, K), ``Q_j`` (V, B, K) and ``n_j`` (V, 1) of the traced formulation."""
    dtype = q.dtype
    logits = student.to(dtype) * inv_temp
    if correction is not None:
        logits = logits + correction
    logits = logits.view(pairing.n_views, *q.shape[1:])
    # Q_j = T - q_j for the first n_same views, T for the others (the padding is index arithmetic)
    own = torch.nn.functional.pad(q[: pairing.n_same], (0, 0, 0, 0, 0, pairing.n_views - pairing.n_same))
    n_paired = torch.full((pairing.n_views, 1), float(pairing.n_teacher_views), dtype=dtype, device=q.device)
    n_paired[: pairing.n_same] -= 1
    return logits, q.sum(0) - own, n_paired


def cross_entropy(
    student: torch.Tensor,
    targets: torch.Tensor,
    pairing: Pairing,
    *,
    student_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference multi-crop cross-entropy on checked arguments (see
    :func:`vmf_head.functional.multicrop_cross_entropy` for the contract): the eager formulation, or
    the traced one while ``torch.compile`` traces."""
    inv_temp = student_temp.reciprocal() if isinstance(student_temp, torch.Tensor) else 1.0 / student_temp
    targets = targets.detach()
    if torch.compiler.is_compiling():
        dtype = compute_dtype(student, targets)
        batch = student.shape[0] // pairing.n_views
        return _TracedCrossEntropy.apply(
            student,
            None if student_correction is None else shifted(student_correction, dtype),
            targets.to(dtype).view(pairing.n_teacher_views, batch, -1),
            _row_weight(row_weight, batch, dtype, student.device),
            pairing,
            inv_temp,
        )
    return _EagerCrossEntropy.apply(student, student_correction, targets, row_weight, pairing, inv_temp)
