"""DINO-vMF and iBOT-vMF losses as pure functions: the plain-PyTorch reference, and the dispatch to
the fused Triton op ``vmf_head.ops.cross_entropy`` (same contracts; see ``docs/loss.md``).

The multi-crop cross-entropy of DINO (Caron et al., 2021), with student logits ``l_s`` and teacher
targets ``q`` of the global views,

    L = 1/n_pairs sum_{i != j} mean_b [ -q_i[b] . log_softmax(l_s_j[b]) ],

is computed with ONE log-softmax per student view (DINO's code recomputes it for every pair):
``sum_{i != j} -q_i . lsm_j = -(sum_{i != j} q_i) . lsm_j``. The backward is analytic,

    dL/dl_s_j[b] = (n_j softmax(l_s_j[b]) - sum_{i != j} q_i[b]) / (n_pairs B),   n_j = #{i : i != j},

with ``dL/dstudent = dL/dl_s / student_temp`` and ``dL/dstudent_correction = sum_{j,b} dL/dl_s_j[b]``;
it is computed in place in the buffer that held the log-softmax, so forward plus backward allocate one
``(n_views B, K)`` float32 buffer (plus the gradient's cast when the input is half precision).

Every function takes ``backend=`` (``vmf_head._dispatch``): ``"auto"`` runs the fused kernels for
CUDA inputs (except Sinkhorn centering and empty batches, which stay on the reference).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _dispatch
from .._validation import check_int, check_temperature, check_tensor
from .centering import center_teacher, check_centering, flush_exp_, sinkhorn_log_targets, teacher_vmf_logits
from .vmf import compute_dtype, no_autocast, softmax_shifted


class _MultiCropCrossEntropy(torch.autograd.Function):
    """Weighted multi-view cross-entropy between fixed targets and a softmax of student logits.

    Student rows are ``n_views`` stacked views of ``B`` rows; targets are ``G`` stacked views of the
    same ``B`` rows. Student view ``j`` is paired with every target view ``i`` (``i != j`` when
    ``skip_same``). Row ``b`` weighs ``row_weight[b]`` (``1/B`` when None); the sum over pairs is
    divided by the number of pairs.
    """

    @staticmethod
    def forward(ctx, student, correction, targets, row_weight, n_views, skip_same, inv_temp):
        dtype = compute_dtype(student, targets)
        rows, k = student.shape
        batch = rows // n_views
        n_targets = targets.shape[0] // batch if batch else 0
        n_same = min(n_targets, n_views) if skip_same else 0
        # n_j: number of target views paired with student view j.
        n_per_view = torch.full((n_views,), float(n_targets), dtype=dtype, device=student.device)
        n_per_view[:n_same] -= 1
        n_pairs = max(n_views * n_targets - n_same, 1)

        # One fresh (rows, K) buffer, written in one pass (type promotion does the cast), then
        # overwritten by the log-softmax and, in the backward, by the gradient.
        if correction is not None:
            shifted = softmax_shifted(correction, dtype)
            if isinstance(inv_temp, torch.Tensor):
                logits = torch.addcmul(shifted, student, inv_temp.to(dtype))
            else:
                logits = torch.add(shifted, student, alpha=inv_temp)
        elif student.dtype == dtype:
            logits = torch.mul(student, inv_temp)
        else:
            logits = student.to(dtype).mul_(inv_temp)
        log_p = torch.log_softmax(logits, dim=-1, out=logits).view(n_views, batch, k)

        weight = (
            row_weight.to(dtype)
            if row_weight is not None
            else torch.full((batch,), 1.0 / max(batch, 1), dtype=dtype, device=student.device)
        )
        # (targets from vmf_head's centerings hold no subnormal numbers: see centering.softmax_flushed)
        weighted = targets.to(dtype).view(n_targets, batch, k) * weight[None, :, None]
        total = weighted.sum(0)  # sum_i w q_i, paired with every student view
        # Row-wise dot products (batched matmul over the K axis): one dot over all n_views B K
        # entries would lose about 5e-5 of the loss in float32 at DINO's sizes.
        cross = torch.bmm(log_p.transpose(0, 1), total.unsqueeze(-1)).sum()
        if n_same:
            same = torch.bmm(
                log_p[:n_same].reshape(n_same * batch, 1, k), weighted[:n_same].reshape(n_same * batch, k, 1)
            )
            cross = cross - same.sum()
        loss = -cross / n_pairs

        ctx.save_for_backward(log_p, total, weighted[:n_same], weight, n_per_view)
        ctx.n_pairs, ctx.inv_temp = n_pairs, inv_temp
        ctx.student_dtype = student.dtype
        ctx.correction_dtype = correction.dtype if correction is not None else None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        log_p, total, weighted_same, weight, n_per_view = ctx.saved_tensors
        n_views, batch, k = log_p.shape
        # Reuse the log-softmax buffer: grad = coef * (n_j w_b p - sum_{i != j} w_b q_i).
        coef = grad_loss.to(log_p.dtype) * (ctx.inv_temp / ctx.n_pairs)
        row_scale = (coef * n_per_view[:, None] * weight[None, :])[..., None]
        grad = torch.addcmul(total * -coef, log_p.exp_(), row_scale, out=log_p)
        if len(weighted_same):
            grad[: len(weighted_same)] += weighted_same * coef
        grad = grad.view(n_views * batch, k)
        grad_correction = None
        if ctx.needs_input_grad[1]:
            grad_correction = (grad.sum(0) / ctx.inv_temp).to(ctx.correction_dtype)
        return grad.to(ctx.student_dtype), grad_correction, None, None, None, None, None


def _check_2d(name: str, x: object) -> torch.Tensor:
    return check_tensor(name, x, dims=2, shape="(views * batch, K)")


def _check_correction(name: str, correction: object, k: int) -> torch.Tensor | None:
    if correction is None:
        return None
    correction = check_tensor(name, correction, dims=1, shape=f"(K,) = ({k},)")
    if correction.shape[0] != k:
        raise ValueError(f"{name} must have shape (K,) = ({k},), got {tuple(correction.shape)}")
    return correction


def _inverse(temperature: float | torch.Tensor) -> float | torch.Tensor:
    return 1.0 / temperature if not isinstance(temperature, torch.Tensor) else temperature.reciprocal()


def multicrop_cross_entropy(
    student_output: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_views: int,
    student_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None = None,
    skip_same_view: bool = True,
    row_weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-crop cross-entropy ``1/n_pairs sum_{pairs (i, j)} sum_b w_b [-q_i[b] . log_softmax(l_s_j[b])]``.

    Args:
        student_output: ``(n_views * B, K)`` raw student outputs, views stacked (any float dtype).
        targets: ``(G * B, K)`` target distributions (rows sum to 1), the first G views; not
            differentiated.
        n_views: number of student views.
        student_temp: ``tau_s`` (a number or a 0-d tensor); ``l_s = student_output / tau_s + student_correction``.
        student_correction: ``(K,)`` or None; differentiable.
        skip_same_view: skip pairs with ``i == j`` (DINO); False pairs every target view with every
            student view (iBOT's patch term uses one view with ``G = n_views = 1``).
        row_weight: ``(B,)`` weights ``w_b`` (default ``1/B``: the mean over the batch).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``vmf_head._dispatch``).

    Returns:
        Scalar loss in float32 (float64 for float64 inputs). Its backward is analytic (see the module
        docstring), and it supports one backward pass (the buffer is reused).
    """
    student_temp = check_temperature("student_temp", student_temp)
    _check_2d("student_output", student_output)
    _check_2d("targets", targets)
    n_views = check_int("n_views", n_views, minimum=1)
    if student_output.shape[0] % n_views:
        raise ValueError(f"n_views = {n_views} does not divide the {student_output.shape[0]} rows of student_output")
    rows, k = student_output.shape[0] // n_views, student_output.shape[1]
    if targets.shape[1] != k or (rows and targets.shape[0] % rows) or (not rows and targets.shape[0]):
        raise ValueError(f"targets must have shape (G * {rows}, {k}), got {tuple(targets.shape)}")
    if skip_same_view and rows and targets.shape[0] // rows == 1 and n_views == 1:
        raise ValueError("skip_same_view=True leaves no pair with one student view and one target view")
    if row_weight is not None:
        check_tensor("row_weight", row_weight, dims=1, shape=f"({rows},)")
        if row_weight.shape[0] != rows:
            raise ValueError(f"row_weight must have shape ({rows},), got {tuple(row_weight.shape)}")
    student_correction = _check_correction("student_correction", student_correction, k)
    _check_devices(
        student_output=student_output, targets=targets, student_correction=student_correction, row_weight=row_weight
    )
    with no_autocast(student_output.device):
        if _dispatch.use_triton(backend, "cross_entropy", student_output.device, "" if rows else "an empty batch"):
            return _dispatch.kernels("cross_entropy").multicrop_cross_entropy(
                student_output,
                targets.detach(),
                n_views=n_views,
                student_temp=student_temp,
                student_correction=student_correction,
                skip_same_view=bool(skip_same_view),
                row_weight=row_weight,
            )
        return _MultiCropCrossEntropy.apply(
            student_output,
            student_correction,
            targets.detach(),
            row_weight,
            n_views,
            bool(skip_same_view),
            _inverse(student_temp),
        )


def _check_devices(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    first, device = next(iter(present.items()))[0], next(iter(present.values())).device
    for name, t in present.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: put every input on one device")


def check_dino_inputs(
    student_output: torch.Tensor, teacher_output: torch.Tensor, *, n_views: int, n_global: int
) -> tuple[int, int]:
    """Check the shapes of DINO's multi-crop outputs; return ``(B, K)`` or raise a ValueError
    (TypeError for non-float tensors) naming the problem. ``n_global`` may exceed ``n_views``
    (lightly pairs every teacher view with every other student view)."""
    _check_2d("student_output", student_output)
    _check_2d("teacher_output", teacher_output)
    n_views = check_int("n_views", n_views, minimum=1)
    n_global = check_int("n_global", n_global, minimum=1)
    if n_views * n_global - min(n_views, n_global) < 1:
        raise ValueError(
            f"n_views = {n_views} student and n_global = {n_global} teacher views leave no pair of different views"
        )
    k = student_output.shape[1]
    if teacher_output.shape[1] != k:
        raise ValueError(f"student_output has K={k} prototypes but teacher_output has K={teacher_output.shape[1]}")
    if student_output.shape[0] % n_views:
        raise ValueError(f"student_output has {student_output.shape[0]} rows, not divisible by n_views={n_views}")
    batch = student_output.shape[0] // n_views
    if teacher_output.shape[0] != n_global * batch:
        raise ValueError(
            f"teacher_output must hold the {n_global} global views of the student's batch of {batch} "
            f"({n_global * batch} rows), got {teacher_output.shape[0]} rows"
        )
    return batch, k


def dino_vmf_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor | None,
    *,
    n_views: int,
    n_global: int = 2,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None = None,
    teacher_correction: torch.Tensor | None = None,
    centering: str = "probability",
    sinkhorn_iterations: int = 3,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DINO(-vMF) multi-crop loss on the LOCAL batch, and the local statistic for the center update.

    Args:
        student_output: ``(n_views * B, K)`` raw student outputs ``w_k^T y``, views stacked.
        teacher_output: ``(n_global * B, K)`` raw teacher outputs of the global views (the first
            ``n_global`` student views, same order); no gradient.
        center: ``(1, K)`` logit center (``logit``) or probability center (``probability``); unused
            (may be None) for ``sinkhorn``.
        n_views: number of student views (DINO's ``ncrops``), >= 1.
        n_global: number of teacher views, >= 1 (at least one pair of different views).
        student_temp, teacher_temp: temperatures (the teacher's already scheduled), numbers or 0-d tensors.
        student_correction: ``(K,)`` ``log C_p(||w_s|| / student_temp)`` or None; differentiable.
        teacher_correction: ``(K,)`` ``log C_p(||w_t|| / teacher_temp)`` or None; treated as constant.
        centering: ``"logit"``, ``"probability"`` or ``"sinkhorn"`` (see ``functional.centering``).
        sinkhorn_iterations: Sinkhorn-Knopp iterations for ``sinkhorn``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(loss, batch_stat)``: the scalar loss ``1/n_pairs sum_{i != j} mean_b[-q_i . log_softmax(l_s_j)]``
        with ``l_s = student_output / student_temp + student_correction`` (float32, or float64 for
        float64 outputs; 0 for an empty batch), and the ``(1, K)`` local-batch statistic for the
        center (mean raw teacher output for ``logit``, mean uncentred teacher posterior for
        ``probability``, None for ``sinkhorn``; NaN for an empty batch).
    """
    check_centering(centering)
    batch, k = check_dino_inputs(student_output, teacher_output, n_views=n_views, n_global=n_global)
    student_correction = _check_correction("student_correction", student_correction, k)
    teacher_correction = _check_correction("teacher_correction", teacher_correction, k)
    student_temp = check_temperature("student_temp", student_temp)
    teacher_temp = check_temperature("teacher_temp", teacher_temp)
    unsupported = (
        "Sinkhorn centering has no fused kernel" if centering == "sinkhorn" else "" if batch else "an empty batch"
    )
    if _dispatch.use_triton(backend, "cross_entropy", student_output.device, unsupported):
        _check_devices(
            student_output=student_output,
            teacher_output=teacher_output,
            center=center,
            student_correction=student_correction,
            teacher_correction=teacher_correction,
        )
        with no_autocast(student_output.device):
            return _dispatch.kernels("cross_entropy").dino_vmf_loss(
                student_output,
                teacher_output,
                _check_center(center, k, (1, k)),
                n_views=n_views,
                n_global=n_global,
                student_temp=student_temp,
                teacher_temp=teacher_temp,
                student_correction=student_correction,
                teacher_correction=teacher_correction,
                centering=centering,
            )
    q, stat = center_teacher(
        teacher_output,
        center,
        teacher_temp=teacher_temp,
        teacher_correction=teacher_correction,
        centering=centering,
        sinkhorn_iterations=sinkhorn_iterations,
    )
    loss = multicrop_cross_entropy(
        student_output,
        q,
        n_views=n_views,
        student_temp=student_temp,
        student_correction=student_correction,
        backend="reference",
    )
    return loss, stat


def _check_center(center: object, k: int, shape: tuple[int, ...]) -> torch.Tensor:
    center = check_tensor("center", center, shape=str(shape))
    if tuple(center.shape) != shape:
        raise ValueError(f"center must have shape {shape} (K = {k} prototypes), got {tuple(center.shape)}")
    return center


def check_patch_inputs(
    student_patch: torch.Tensor, teacher_patch: torch.Tensor, mask: torch.Tensor
) -> tuple[int, int, int]:
    """Check the shapes of iBOT's patch outputs and mask; return ``(images, tokens, K)``."""
    for name, x in (("student_patch", student_patch), ("teacher_patch", teacher_patch)):
        check_tensor(name, x, dims=3, shape="(images, tokens, K)")
    if student_patch.shape != teacher_patch.shape:
        raise ValueError(
            f"student_patch {tuple(student_patch.shape)} and teacher_patch {tuple(teacher_patch.shape)} differ in shape"
        )
    check_tensor("mask", mask, floating=False, shape=f"(images, tokens) = {tuple(student_patch.shape[:2])}")
    if tuple(mask.shape) != tuple(student_patch.shape[:2]):
        raise ValueError(
            f"mask must have shape (images, tokens) = {tuple(student_patch.shape[:2])}, got {tuple(mask.shape)}"
        )
    images, tokens, k = student_patch.shape
    return images, tokens, k


def ibot_patch_vmf_loss(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    mask: torch.Tensor,
    center: torch.Tensor | None,
    *,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None = None,
    teacher_correction: torch.Tensor | None = None,
    centering: str = "probability",
    sinkhorn_iterations: int = 3,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """iBOT(-vMF) masked-patch loss on the LOCAL batch, and the local statistic for ``center2``.

    Teacher token ``n`` of image ``b`` is paired with the student's token ``n`` of the SAME view of
    ``b`` (the student sees a masked copy); images are the global views of every sample, stacked in
    the same order for student, teacher and mask.

    Args:
        student_patch: ``(B, N, K)`` raw student patch outputs.
        teacher_patch: ``(B, N, K)`` raw teacher patch outputs (no gradient).
        mask: ``(B, N)`` bool (or 0/1), True for the masked tokens (the only ones in the loss).
        center: ``(1, 1, K)`` center; unused (may be None) for ``sinkhorn``.
        student_temp, teacher_temp: temperatures (the teacher's is iBOT's scheduled ``teacher_temp2``).
        student_correction, teacher_correction: ``(K,)`` vMF corrections or None.
        centering: ``"logit"``, ``"probability"`` or ``"sinkhorn"``. Logit and probability centering
            use all tokens for the statistic (as iBOT's ``center2``); Sinkhorn balances the masked
            tokens only (as DINOv2's ``iBOTPatchLoss``).
        sinkhorn_iterations: Sinkhorn-Knopp iterations for ``sinkhorn``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(loss, batch_stat)``: ``mean_b [ sum_{n masked} -q[b,n] . log_softmax(l_s[b,n]) / max(1, #masked_b) ]``
        (an image without masked tokens contributes 0 to the mean, as iBOT's ``clamp(min=1)``; 0 for
        an empty batch), and the ``(1, 1, K)`` mean over all local tokens of the raw teacher output
        (``logit``) or of the uncentred teacher posterior (``probability``); None for ``sinkhorn``.

    The masked tokens are weighted, not selected: a selection's size depends on the mask, and
    reading it would synchronise a GPU. The reference therefore computes the student's log-softmax
    on every token (as iBOT does); the fused kernels skip the unmasked ones.
    """
    check_centering(centering)
    images, tokens, k = check_patch_inputs(student_patch, teacher_patch, mask)
    student_correction = _check_correction("student_correction", student_correction, k)
    teacher_correction = _check_correction("teacher_correction", teacher_correction, k)
    student_temp = check_temperature("student_temp", student_temp)
    teacher_temp = check_temperature("teacher_temp", teacher_temp)
    rows = images * tokens
    unsupported = (
        "Sinkhorn centering has no fused kernel" if centering == "sinkhorn" else "" if rows else "an empty batch"
    )
    if _dispatch.use_triton(backend, "cross_entropy", student_patch.device, unsupported):
        _check_devices(
            student_patch=student_patch,
            teacher_patch=teacher_patch,
            mask=mask,
            center=center,
            student_correction=student_correction,
            teacher_correction=teacher_correction,
        )
        with no_autocast(student_patch.device):
            return _dispatch.kernels("cross_entropy").ibot_patch_vmf_loss(
                student_patch,
                teacher_patch,
                mask.to(torch.bool),
                _check_center(center, k, (1, 1, k)),
                student_temp=student_temp,
                teacher_temp=teacher_temp,
                student_correction=student_correction,
                teacher_correction=teacher_correction,
                centering=centering,
            )
    selected = mask.to(torch.bool).reshape(rows)
    if centering == "sinkhorn":
        iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
        with no_autocast(teacher_patch.device), torch.no_grad():
            log_q = teacher_vmf_logits(teacher_patch, teacher_temp, teacher_correction).reshape(rows, k)
            q, stat = flush_exp_(sinkhorn_log_targets(log_q, iterations, rows=selected)), None
    else:
        q, stat = center_teacher(
            teacher_patch, center, teacher_temp=teacher_temp, teacher_correction=teacher_correction, centering=centering
        )
        q = q.reshape(rows, k)
    dtype = compute_dtype(student_patch, teacher_patch)
    weight = mask.to(dtype)
    weight = (weight / (weight.sum(1, keepdim=True).clamp(min=1.0) * max(images, 1))).reshape(rows)
    loss = multicrop_cross_entropy(
        student_patch.reshape(rows, k),
        q,
        n_views=1,
        student_temp=student_temp,
        student_correction=student_correction,
        skip_same_view=False,
        row_weight=weight,
        backend="reference",
    )
    return loss, stat
