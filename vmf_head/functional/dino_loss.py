"""DINO-vMF and iBOT-vMF losses as pure functions, and the cross-entropy with given targets.

One term computes them all (:func:`centered_cross_entropy`): the teacher's targets under a centering
(``functional.centering``), then the multi-crop cross-entropy of the student's vMF logits against
them (``functional.cross_entropy``), or both at once in the fused Triton op
(``vmf_head.ops.cross_entropy``) when ``backend`` picks it (``vmf_head._dispatch``: CUDA inputs by
default; Sinkhorn centering and empty batches stay on the reference). The public functions below
check their arguments and call it; the loss modules check theirs and call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dispatch
from .._validation import check_int, check_temperature, check_tensor
from .centering import check_centering, targets
from .cross_entropy import Pairing, cross_entropy
from .vmf import compute_dtype, no_autocast


def masked_token_weights(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """iBOT's weight of each patch token, ``(images, tokens)``: ``1 / (masked tokens of its image) /
    images`` for a masked token, 0 for the others, so that the weighted sum of per-token losses is the
    mean over images of the mean over their masked tokens (an image without masked tokens adds 0, as
    iBOT's ``clamp(min=1)``). The tokens are weighted, not selected: a selection's size depends on the
    mask, and reading it would synchronise a GPU."""
    selected = mask.to(dtype)
    return selected / (selected.sum(dim=1, keepdim=True).clamp(min=1.0) * max(mask.shape[0], 1))


def centered_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    pairing: Pairing,
    student_temp: float | torch.Tensor,
    student_correction: torch.Tensor | None,
    backend: str,
    centering: str | None = None,
    center: torch.Tensor | None = None,
    teacher_temp: float | torch.Tensor = 1.0,
    teacher_correction: torch.Tensor | None = None,
    sinkhorn_iterations: int = 3,
    row_weight: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One term on checked arguments: ``(loss, batch_stat)``.

    ``student`` (V B, K) and ``teacher`` (G B, K) are views stacked as ``pairing`` says: raw teacher
    outputs centered by ``centering``, or with ``centering=None`` the targets themselves. ``row_weight``
    (B,) weighs the rows (default ``1/B``); ``rows`` (G B,) bool restricts Sinkhorn's batch (iBOT's
    masked tokens). ``batch_stat`` has the shape of ``center`` (None for Sinkhorn and given targets):
    the mean over the teacher's rows of its raw output (logit) or uncentered posterior (probability).
    """
    unsupported = ""
    if centering == "sinkhorn":
        unsupported = "Sinkhorn centering has no fused kernel"
    elif not student.shape[0]:
        unsupported = "an empty batch"
    with no_autocast(student.device):
        if _dispatch.use_triton(backend, "cross_entropy", student.device, unsupported):
            from ..ops.cross_entropy import fused_cross_entropy

            loss, stat = fused_cross_entropy(
                student,
                teacher,
                pairing,
                row_weight=row_weight,
                student_temp=student_temp,
                student_correction=student_correction,
                teacher_temp=teacher_temp,
                teacher_correction=teacher_correction,
                center=center,
                centering=centering,
            )
        else:
            q, stat = teacher, None
            if centering is not None:
                q, stat = targets(
                    teacher,
                    None if center is None else center.view(1, -1),
                    teacher_temp=teacher_temp,
                    teacher_correction=teacher_correction,
                    centering=centering,
                    sinkhorn_iterations=sinkhorn_iterations,
                    rows=rows,
                )
            loss = cross_entropy(
                student,
                q,
                pairing,
                student_temp=student_temp,
                student_correction=student_correction,
                row_weight=row_weight,
            )
        return loss, None if stat is None else stat.view_as(center)


# ----------------------------------------------------------------------------------------------
# Public functions: check the arguments, then compute with ``centered_cross_entropy``.


def _check_2d(name: str, x: object) -> torch.Tensor:
    return check_tensor(name, x, dims=2, shape="(views * batch, K)")


def check_correction(name: str, correction: object, k: int) -> torch.Tensor | None:
    """``correction`` if it is None or a ``(K,)`` floating tensor."""
    if correction is None:
        return None
    correction = check_tensor(name, correction, dims=1, shape=f"(K,) = ({k},)")
    if correction.shape[0] != k:
        raise ValueError(f"{name} must have shape (K,) = ({k},), got {tuple(correction.shape)}")
    return correction


def check_devices(**tensors: torch.Tensor | None) -> None:
    """ValueError unless every tensor given (None is skipped) is on one device."""
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


def check_patch_outputs(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    names: tuple[str, str] = ("student_patch", "teacher_patch"),
) -> tuple[int, int, int]:
    """Check the shapes of iBOT's patch outputs (``names`` as the caller calls them); return
    ``(images, tokens, K)``."""
    for name, x in zip(names, (student_patch, teacher_patch)):
        check_tensor(name, x, dims=3, shape="(images, tokens, K)")
    if student_patch.shape != teacher_patch.shape:
        raise ValueError(
            f"{names[0]} {tuple(student_patch.shape)} and {names[1]} {tuple(teacher_patch.shape)} differ in shape"
        )
    images, tokens, k = student_patch.shape
    return images, tokens, k


def check_patch_mask(mask: torch.Tensor, images: int, tokens: int) -> None:
    """Check that ``mask`` is an ``(images, tokens)`` bool or integer tensor."""
    check_tensor("mask", mask, floating=False, shape=f"(images, tokens) = {(images, tokens)}")
    if tuple(mask.shape) != (images, tokens):
        raise ValueError(f"mask must have shape (images, tokens) = {(images, tokens)}, got {tuple(mask.shape)}")


def _check_center(center: object, centering: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if centering == "sinkhorn" and center is None:
        return None
    if center is None:
        raise ValueError(f"centering={centering!r} needs a center tensor, got None")
    center = check_tensor("center", center, shape=str(shape))
    if tuple(center.shape) != shape:
        raise ValueError(f"center must have shape {shape} (K = {shape[-1]} prototypes), got {tuple(center.shape)}")
    return center


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
    """Multi-crop cross-entropy ``1/n_pairs sum_{pairs (i, j)} sum_b w_b [-q_i[b] . log_softmax(l_s_j[b])]``
    (derivation: ``vmf_head.functional.cross_entropy``).

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
        Scalar loss in float32 (float64 for float64 inputs), with an analytic backward that supports
        one backward pass.
    """
    student_temp = check_temperature("student_temp", student_temp)
    _check_2d("student_output", student_output)
    _check_2d("targets", targets)
    n_views = check_int("n_views", n_views, minimum=1)
    backend = _dispatch.check_backend(backend)
    if student_output.shape[0] % n_views:
        raise ValueError(f"n_views = {n_views} does not divide the {student_output.shape[0]} rows of student_output")
    rows, k = student_output.shape[0] // n_views, student_output.shape[1]
    if targets.shape[1] != k or (rows and targets.shape[0] % rows) or (not rows and targets.shape[0]):
        raise ValueError(f"targets must have shape (G * {rows}, {k}), got {tuple(targets.shape)}")
    n_targets = targets.shape[0] // rows if rows else 1
    if skip_same_view and n_targets == 1 and n_views == 1:
        raise ValueError("skip_same_view=True leaves no pair with one student view and one target view")
    if row_weight is not None:
        check_tensor("row_weight", row_weight, dims=1, shape=f"({rows},)")
        if row_weight.shape[0] != rows:
            raise ValueError(f"row_weight must have shape ({rows},), got {tuple(row_weight.shape)}")
    student_correction = check_correction("student_correction", student_correction, k)
    check_devices(
        student_output=student_output, targets=targets, student_correction=student_correction, row_weight=row_weight
    )
    return centered_cross_entropy(
        student_output,
        targets,
        pairing=Pairing(n_views, n_targets, bool(skip_same_view)),
        student_temp=student_temp,
        student_correction=student_correction,
        backend=backend,
        row_weight=row_weight,
    )[0]


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
        center (mean raw teacher output for ``logit``, mean uncentered teacher posterior for
        ``probability``, None for ``sinkhorn``; 0 for an empty batch, which the modules never apply).
    """
    check_centering(centering)
    _, k = check_dino_inputs(student_output, teacher_output, n_views=n_views, n_global=n_global)
    term = _check_term(
        k,
        centering,
        center,
        (1, k),
        student_temp,
        teacher_temp,
        student_correction,
        teacher_correction,
        sinkhorn_iterations,
        backend,
    )
    check_devices(student_output=student_output, teacher_output=teacher_output, **term.tensors())
    return centered_cross_entropy(student_output, teacher_output, pairing=Pairing(n_views, n_global), **term.kwargs())


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
        (``logit``) or of the uncentered teacher posterior (``probability``); None for ``sinkhorn``.
        The reference computes the student's log-sum-exp on every token (as iBOT does); the fused
        kernels skip the unmasked ones.
    """
    check_centering(centering)
    images, tokens, k = check_patch_outputs(student_patch, teacher_patch)
    check_patch_mask(mask, images, tokens)
    term = _check_term(
        k,
        centering,
        center,
        (1, 1, k),
        student_temp,
        teacher_temp,
        student_correction,
        teacher_correction,
        sinkhorn_iterations,
        backend,
    )
    check_devices(student_patch=student_patch, teacher_patch=teacher_patch, mask=mask, **term.tensors())
    return patch_term(student_patch, teacher_patch, mask, **term.kwargs())


def patch_term(
    student_patch: torch.Tensor, teacher_patch: torch.Tensor, mask: torch.Tensor, **term
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`ibot_patch_vmf_loss` on checked arguments (``term``: those of :func:`centered_cross_entropy`)."""
    images, tokens, k = student_patch.shape
    selected = mask.to(torch.bool).reshape(-1)
    weight = masked_token_weights(mask, compute_dtype(student_patch, teacher_patch)).reshape(-1)
    return centered_cross_entropy(
        student_patch.reshape(images * tokens, k),
        teacher_patch.reshape(images * tokens, k),
        pairing=Pairing(1, 1, skip_same=False),
        row_weight=weight,
        rows=selected,
        **term,
    )


@dataclass
class _Term:
    """The checked arguments of one term, shared by the public functions."""

    center: torch.Tensor | None
    student_temp: float | torch.Tensor
    teacher_temp: float | torch.Tensor
    student_correction: torch.Tensor | None
    teacher_correction: torch.Tensor | None
    centering: str
    sinkhorn_iterations: int
    backend: str

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "center": self.center,
            "student_correction": self.student_correction,
            "teacher_correction": self.teacher_correction,
        }

    def kwargs(self) -> dict:
        return dict(vars(self))


def _check_term(
    k,
    centering,
    center,
    center_shape,
    student_temp,
    teacher_temp,
    student_correction,
    teacher_correction,
    sinkhorn_iterations,
    backend,
) -> _Term:
    return _Term(
        center=_check_center(center, centering, center_shape),
        student_temp=check_temperature("student_temp", student_temp),
        teacher_temp=check_temperature("teacher_temp", teacher_temp),
        student_correction=check_correction("student_correction", student_correction, k),
        teacher_correction=check_correction("teacher_correction", teacher_correction, k),
        centering=centering,
        sinkhorn_iterations=check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0),
        backend=_dispatch.check_backend(backend),
    )
