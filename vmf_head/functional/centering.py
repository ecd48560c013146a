"""Teacher centering: from raw teacher head outputs to the teacher's target distribution.

Three ways to keep the teacher from collapsing (docs/design.md), each a pure function of the teacher
outputs ``t`` and the current center ``c``, with the teacher's vMF logits
``l_t = t / tau_t + log C_p(||w|| / tau_t)``:

* ``logit`` (DINO, iBOT): ``q = softmax((t - c) / tau_t + log C_p(||w|| / tau_t))``; statistic ``mean(t)``.
* ``probability`` (DINO-vMF, Govindarajan et al. 2023, sec. 4): ``q = softmax(l_t - log c)``, i.e.
  ``q ~ softmax(l_t) / c``; statistic ``mean(softmax(l_t))``; the center starts at ``1/K``.
* ``sinkhorn`` (SwAV, DINOv2): a few Sinkhorn-Knopp iterations on ``exp(l_t)`` towards uniform
  marginals over prototypes and samples; no running statistic.

The exponential moving average of the center is the loss modules' job. Batch statistics are means
over every leading dim of ``teacher_output`` (rows, or images and tokens), with those dims kept as
size 1 so they have the center's shape. All computation is in float32 (float64 for float64 inputs),
without autocast and without gradient.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_choice, check_int, check_temperature, check_tensor
from ._distributed import all_reduce_logsumexp_
from .vmf import compute_dtype, no_autocast, scaled_logits, shifted

CENTERINGS = ("logit", "probability", "sinkhorn")


def check_centering(centering: object) -> str:
    """``centering`` if it is one of :data:`CENTERINGS`, else a ValueError listing them."""
    return check_choice("centering", centering, CENTERINGS)


def initial_center(centering: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The center a loss starts from: ``1/K`` for probability centering (the uniform posterior), 0
    for logit centering (DINO's) and for Sinkhorn (which keeps no center)."""
    return torch.full(shape, 1.0 / shape[-1] if centering == "probability" else 0.0)


def flush_(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` in place with every value below the smallest normal float set to 0.

    Such a probability contributes nothing a float32 sum of the loss can hold, but a teacher at
    temperature 0.04 is mostly such values, and the CPU's arithmetic (a matrix product most of all)
    slows down on subnormal operands (torch.set_flush_denormal reaches only the calling thread, not
    OpenMP's workers)."""
    return torch.threshold_(probs, torch.finfo(probs.dtype).tiny, 0.0)


def softmax_flushed_(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)`` over the last dim, in place, flushed (:func:`flush_`)."""
    return flush_(torch.softmax(logits, dim=-1, out=logits))


def flush_exp_(log_q: torch.Tensor) -> torch.Tensor:
    """``exp`` in place of log-probabilities, 0 where the result would be subnormal (see :func:`flush_`)."""
    return torch.threshold_(log_q, math.log(torch.finfo(log_q.dtype).tiny), float("-inf")).exp_()


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the last, kept as size-1 dims: ``(..., K) -> (1, ..., 1, K)``. A
    vector-matrix product: a column reduction is several times slower on the CPU, eager or compiled."""
    rows = x.reshape(-1, x.shape[-1])
    mean = rows.new_full((rows.shape[0],), 1.0 / max(rows.shape[0], 1)) @ rows
    return mean.view((1,) * (x.dim() - 1) + (x.shape[-1],))


def teacher_logits(
    teacher_output: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """``l_t = (teacher_output - center) / teacher_temp + teacher_correction`` in a fresh tensor, float32
    (float64 for float64 outputs), up to a constant (the correction enters shifted by its maximum)."""
    dtype = compute_dtype(teacher_output)
    inv_temp = teacher_temp.reciprocal() if isinstance(teacher_temp, torch.Tensor) else 1.0 / teacher_temp
    bias = None if teacher_correction is None else shifted(teacher_correction.detach(), dtype)
    if center is not None:
        bias = center.to(dtype) * -inv_temp if bias is None else bias - center.to(dtype) * inv_temp
    return scaled_logits(teacher_output.detach(), inv_temp, bias, dtype)


def sinkhorn_log_targets(log_q: torch.Tensor, n_iterations: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp in log space on a ``(N, K)`` matrix of logits, in place; returns ``log q``.

    Each iteration divides every prototype column by its sum over the global batch (all-reduced
    under torch.distributed), then every sample row by its sum. ``rows`` (``(N,)`` bool) restricts
    the batch to the rows marked True without selecting them (a selection of data-dependent size
    would synchronise a GPU): the others take no part in the column sums and get rows that sum to
    1 but mean nothing. A column without any row in the global batch keeps its logits. Constant
    factors of DINOv2's version (``1/K``, ``1/B``, the initial global normalisation) cancel in the
    next normalisation and are left out; working with log-sum-exps keeps it finite where
    ``exp(l_t)`` would overflow (DINOv2 exponentiates directly)."""
    for _ in range(n_iterations):
        summed = log_q if rows is None else log_q.masked_fill(~rows[:, None], float("-inf"))
        column = all_reduce_logsumexp_(torch.logsumexp(summed, dim=0, keepdim=True))
        log_q -= column.masked_fill_(column == float("-inf"), 0.0)
        torch.log_softmax(log_q, dim=-1, out=log_q)
    if n_iterations == 0:
        torch.log_softmax(log_q, dim=-1, out=log_q)
    return log_q


@torch.no_grad()
def targets(
    teacher_output: torch.Tensor,
    center: torch.Tensor | None,
    *,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None,
    centering: str,
    sinkhorn_iterations: int = 3,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's targets ``q`` (like ``teacher_output``, float32/float64) and the batch statistic
    for the center (``(1, ..., 1, K)``; None for Sinkhorn), on checked arguments: the three
    centerings of the module docstring. ``center`` broadcasts against ``teacher_output``; ``rows``
    restricts Sinkhorn's batch (see :func:`sinkhorn_log_targets`)."""
    with no_autocast(teacher_output.device):
        if centering == "sinkhorn":
            log_q = teacher_logits(teacher_output, teacher_temp, teacher_correction)
            k = log_q.shape[-1]
            return flush_exp_(sinkhorn_log_targets(log_q.view(-1, k), sinkhorn_iterations, rows)).view_as(log_q), None
        dtype = compute_dtype(teacher_output)
        if centering == "logit":
            logits = teacher_logits(teacher_output, teacher_temp, teacher_correction, center.reshape(-1))
            return softmax_flushed_(logits), batch_mean(teacher_output.detach().to(dtype))
        logits = teacher_logits(teacher_output, teacher_temp, teacher_correction)
        stat = batch_mean(torch.softmax(logits, dim=-1))
        # An entry of the center that underflowed gets the smallest normal number, a finite weight.
        logits -= center.to(dtype).clamp_min(torch.finfo(dtype).tiny).log()
        return softmax_flushed_(logits), stat


# ----------------------------------------------------------------------------------------------
# Public functions: check the arguments, then compute with ``targets``.


def _check_teacher(teacher_output: object, teacher_correction: object) -> torch.Tensor:
    teacher_output = check_tensor("teacher_output", teacher_output, shape="(..., K)")
    if teacher_output.dim() == 0:
        raise ValueError("teacher_output must have a last dim of K prototypes, got a 0-d tensor")
    if teacher_correction is not None:
        check_tensor("teacher_correction", teacher_correction, dims=1, shape="(K,)")
        if teacher_correction.shape[0] != teacher_output.shape[-1]:
            raise ValueError(
                f"teacher_correction has {teacher_correction.shape[0]} prototypes but teacher_output has "
                f"{teacher_output.shape[-1]}"
            )
    return teacher_output


def check_center(center: object, teacher_output: torch.Tensor) -> torch.Tensor:
    """``center`` if it has shape ``(1, ..., 1, K)`` and broadcasts against ``teacher_output``."""
    center = check_tensor("center", center, shape="broadcastable to teacher_output, e.g. (1, K)")
    k = teacher_output.shape[-1]
    if (
        center.dim() == 0
        or tuple(center.shape) != (1,) * (center.dim() - 1) + (k,)
        or center.dim() > teacher_output.dim()
    ):
        raise ValueError(
            f"center must have shape (1, ..., 1, K) with K = {k} (the prototypes of teacher_output "
            f"{tuple(teacher_output.shape)}), got {tuple(center.shape)}"
        )
    return center


def logit_centering(
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's centering in logit space, with the vMF correction.

    Args:
        teacher_output: ``(..., K)`` raw teacher outputs ``t = w^T y``.
        center: the running mean of ``t``, ``(1, ..., 1, K)`` (DINO: ``(1, K)``).
        teacher_temp: the scheduled teacher temperature (a number or a 0-d tensor).
        teacher_correction: ``(K,)`` ``log C_p(||w_t|| / teacher_temp)`` or None (DINO).

    Returns:
        ``(q, batch_stat)``: ``q = softmax((t - c) / teacher_temp + correction)`` over the last dim,
        and ``batch_stat = mean(t)`` over the leading dims (``(1, ..., 1, K)``), both detached.
    """
    return center_teacher(
        teacher_output, center, teacher_temp=teacher_temp, teacher_correction=teacher_correction, centering="logit"
    )


def probability_centering(
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO-vMF's centering in probability space.

    Args:
        teacher_output: ``(..., K)`` raw teacher outputs.
        center: running mean of the uncentered posterior ``softmax(l_t)`` (starts at ``1/K``),
            ``(1, ..., 1, K)``. Entries are clamped at the smallest normal float before the log, so a
            prototype whose probability underflowed gets a finite weight.
        teacher_temp: the scheduled teacher temperature (a number or a 0-d tensor).
        teacher_correction: ``(K,)`` ``log C_p(||w_t|| / teacher_temp)`` or None.

    Returns:
        ``(q, batch_stat)``: ``q = softmax(l_t - log c)`` (``q ~ pbar / c``) and
        ``batch_stat = mean(pbar)``, ``pbar = softmax(l_t)``, over the leading dims; detached.
    """
    return center_teacher(
        teacher_output,
        center,
        teacher_temp=teacher_temp,
        teacher_correction=teacher_correction,
        centering="probability",
    )


def sinkhorn_centering(
    teacher_output: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None = None,
    n_iterations: int = 3,
) -> torch.Tensor:
    """Sinkhorn-Knopp centering (as DINOv2's ``sinkhorn_knopp_teacher``), in log space.

    Starting from ``Q = exp(l_t)`` (rows = samples of the global batch, columns = prototypes), each
    iteration first divides every prototype column by its sum over the global batch (all-reduced when
    torch.distributed is initialised), then every sample row by its sum (:func:`sinkhorn_log_targets`).

    Args:
        teacher_output: ``(..., K)`` raw teacher outputs; every leading index is one sample.
        teacher_temp: the scheduled teacher temperature (a number or a 0-d tensor).
        teacher_correction: ``(K,)`` vMF correction or None.
        n_iterations: number of Sinkhorn iterations (>= 0; DINOv2 uses 3).

    Returns:
        ``q`` like ``teacher_output`` (float32/float64, detached): rows sum to 1 and prototype
        marginals approach ``B / K`` as the iterations proceed.
    """
    return center_teacher(
        teacher_output,
        None,
        teacher_temp=teacher_temp,
        teacher_correction=teacher_correction,
        centering="sinkhorn",
        sinkhorn_iterations=n_iterations,
    )[0]


def center_teacher(
    teacher_output: torch.Tensor,
    center: torch.Tensor | None,
    *,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None = None,
    centering: str = "probability",
    sinkhorn_iterations: int = 3,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's target distribution under ``centering``: ``(q, batch_stat)``; ``batch_stat``
    is None for ``sinkhorn`` (and ``center`` may then be None). See the three functions above."""
    check_centering(centering)
    teacher_output = _check_teacher(teacher_output, teacher_correction)
    teacher_temp = check_temperature("teacher_temp", teacher_temp)
    if centering == "sinkhorn":
        sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
    elif center is None:
        raise ValueError(f"centering={centering!r} needs a center tensor, got None")
    else:
        check_center(center, teacher_output)
    return targets(
        teacher_output,
        center,
        teacher_temp=teacher_temp,
        teacher_correction=teacher_correction,
        centering=centering,
        sinkhorn_iterations=sinkhorn_iterations,
    )
