"""Teacher centering: from raw teacher head outputs to the teacher's target distribution (SPEC 3).

Three ways to keep the teacher from collapsing, each a pure function of the teacher outputs and the
current center (the exponential moving average of the center is the nn.Module's job):

* ``logit`` (DINO, iBOT): subtract a running mean of the raw outputs before the softmax,
  ``q = softmax((t - c) / tau_t + log C_p(||w|| / tau_t))``; statistic ``mean_batch(t)``.
* ``probability`` (DINO-vMF, Govindarajan et al. 2023, sec. 4): divide the uncentred posterior by a
  running mean of itself, ``q ~ softmax(l_t) / c``, i.e. ``q = softmax(l_t - log c)``; statistic
  ``mean_batch(softmax(l_t))``, where ``l_t = t / tau_t + log C_p(||w|| / tau_t)``.
* ``sinkhorn`` (SwAV, DINOv2): a few Sinkhorn-Knopp iterations on ``exp(l_t)`` towards uniform
  marginals over prototypes and samples; no running statistic.

Batch statistics are means over every leading dim of ``teacher_output`` (rows, or images and tokens),
returned with those dims kept as size 1 so they have the center's shape. All computation is in float32
(float64 for float64 inputs), with autocast switched off.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_choice, check_int, check_temperature, check_tensor
from ._distributed import all_reduce_logsumexp_, all_reduce_sum_, is_distributed
from .vmf import compute_dtype, no_autocast, softmax_shifted

CENTERINGS = ("logit", "probability", "sinkhorn")


def check_centering(centering: object) -> str:
    """``centering`` if it is one of :data:`CENTERINGS`, else a ValueError listing them."""
    return check_choice("centering", centering, CENTERINGS)


def softmax_flushed(logits: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(logits)`` over the last dim with every probability below the smallest normal float
    set to 0 (one more pass, in place). ``out`` may be ``logits`` itself.

    Such a probability contributes nothing a float32 sum of the loss can hold, but a teacher at
    temperature 0.04 is mostly such values, and the CPU's matrix products slow down on subnormal
    operands (torch.set_flush_denormal reaches only the calling thread, not OpenMP's workers)."""
    q = torch.softmax(logits, dim=-1) if out is None else torch.softmax(logits, dim=-1, out=out)
    return torch.threshold_(q, torch.finfo(q.dtype).tiny, 0.0)


def flush_exp_(log_q: torch.Tensor) -> torch.Tensor:
    """``exp`` in place of log-probabilities, 0 where the result would be subnormal (see ``softmax_flushed``)."""
    return torch.threshold_(log_q, math.log(torch.finfo(log_q.dtype).tiny), float("-inf")).exp_()


def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the last, kept as size-1 dims: ``(..., K) -> (1, ..., 1, K)``."""
    return x.reshape(-1, x.shape[-1]).mean(0).view((1,) * (x.dim() - 1) + (x.shape[-1],))


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


def _check_center(center: object, teacher_output: torch.Tensor) -> torch.Tensor:
    center = check_tensor("center", center, shape="broadcastable to teacher_output, e.g. (1, K)")
    k = teacher_output.shape[-1]
    if (
        center.dim() == 0
        or tuple(center.shape) != (1,) * (center.dim() - 1) + (k,)
        or center.dim() > teacher_output.dim()
    ):
        raise ValueError(
            f"center must have shape (1, ..., 1, K) with K = {teacher_output.shape[-1]} (the prototypes of "
            f"teacher_output {tuple(teacher_output.shape)}), got {tuple(center.shape)}"
        )
    return center


def teacher_vmf_logits(
    teacher_output: torch.Tensor, teacher_temp: float | torch.Tensor, teacher_correction: torch.Tensor | None = None
) -> torch.Tensor:
    """``l_t = teacher_output / teacher_temp + teacher_correction`` (detached), float32 (float64 for
    float64 outputs), up to a constant (the correction enters shifted by its maximum, see
    ``softmax_shifted``)."""
    teacher_output = _check_teacher(teacher_output, teacher_correction)
    teacher_temp = check_temperature("teacher_temp", teacher_temp)
    dtype = compute_dtype(teacher_output)
    logits = teacher_output.detach().to(dtype) / teacher_temp
    if teacher_correction is not None:
        logits += softmax_shifted(teacher_correction.detach(), dtype)
    return logits


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
    teacher_output = _check_teacher(teacher_output, teacher_correction)
    center = _check_center(center, teacher_output)
    teacher_temp = check_temperature("teacher_temp", teacher_temp)
    with no_autocast(teacher_output.device), torch.no_grad():
        dtype = compute_dtype(teacher_output)
        t = teacher_output.to(dtype)
        logits = (t - center.to(dtype)) / teacher_temp
        if teacher_correction is not None:
            logits += softmax_shifted(teacher_correction, dtype)
        return softmax_flushed(logits, out=logits), _batch_mean(t)


def probability_centering(
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO-vMF's centering in probability space.

    Args:
        teacher_output: ``(..., K)`` raw teacher outputs.
        center: running mean of the uncentred posterior ``softmax(l_t)`` (starts at ``1/K``),
            ``(1, ..., 1, K)``. Entries are clamped at the smallest normal float before the log, so a
            prototype whose probability underflowed gets a finite weight.
        teacher_temp: the scheduled teacher temperature (a number or a 0-d tensor).
        teacher_correction: ``(K,)`` ``log C_p(||w_t|| / teacher_temp)`` or None.

    Returns:
        ``(q, batch_stat)``: ``q = softmax(l_t - log c)`` (``q ~ pbar / c``) and
        ``batch_stat = mean(pbar)``, ``pbar = softmax(l_t)``, over the leading dims; detached.
    """
    teacher_output = _check_teacher(teacher_output, teacher_correction)
    center = _check_center(center, teacher_output)
    with no_autocast(teacher_output.device), torch.no_grad():
        logits = teacher_vmf_logits(teacher_output, teacher_temp, teacher_correction)
        stat = _batch_mean(torch.softmax(logits, dim=-1))  # (a sum: subnormal terms cost nothing there)
        log_center = center.to(logits.dtype).clamp_min(torch.finfo(logits.dtype).tiny).log()
        logits -= log_center
        return softmax_flushed(logits, out=logits), stat


def sinkhorn_log_targets(log_q: torch.Tensor, n_iterations: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp in log space on a ``(N, K)`` matrix of logits, in place; returns ``log q``.

    Each iteration divides every prototype column by its sum over the global batch (all-reduced
    under torch.distributed), then every sample row by its sum. ``rows`` (``(N,)`` bool) restricts
    the batch to the rows marked True without selecting them (a selection of data-dependent size
    would synchronise a GPU): the others take no part in the column sums and get rows that sum to
    1 but mean nothing. A column without any row in the global batch keeps its logits."""
    for _ in range(n_iterations):
        summed = log_q if rows is None else log_q.masked_fill(~rows[:, None], float("-inf"))
        column = all_reduce_logsumexp_(torch.logsumexp(summed, dim=0, keepdim=True))
        log_q -= column.masked_fill_(column == float("-inf"), 0.0)
        torch.log_softmax(log_q, dim=-1, out=log_q)
    if n_iterations == 0:
        torch.log_softmax(log_q, dim=-1, out=log_q)
    return log_q


def sinkhorn_centering(
    teacher_output: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    teacher_correction: torch.Tensor | None = None,
    n_iterations: int = 3,
) -> torch.Tensor:
    """Sinkhorn-Knopp centering (as DINOv2's ``sinkhorn_knopp_teacher``), in log space.

    Starting from ``Q = exp(l_t)`` (rows = samples of the global batch, columns = prototypes), each
    iteration first divides every prototype column by its sum over the global batch (all-reduced when
    torch.distributed is initialised), then every sample row by its sum. Constant factors of DINOv2's
    version (``1/K``, ``1/B``, the initial global normalisation) cancel in the next normalisation and
    are left out. Working with ``log Q`` and log-sum-exps keeps it finite where ``exp(l_t)`` would
    overflow or underflow (DINOv2 exponentiates directly).

    Args:
        teacher_output: ``(..., K)`` raw teacher outputs; every leading index is one sample.
        teacher_temp: the scheduled teacher temperature (a number or a 0-d tensor).
        teacher_correction: ``(K,)`` vMF correction or None.
        n_iterations: number of Sinkhorn iterations (>= 0; DINOv2 uses 3).

    Returns:
        ``q`` like ``teacher_output`` (float32/float64, detached): rows sum to 1 and prototype
        marginals approach ``B / K`` as the iterations proceed.
    """
    n_iterations = check_int("sinkhorn_iterations", n_iterations, minimum=0)
    with no_autocast(teacher_output.device), torch.no_grad():
        log_q = teacher_vmf_logits(teacher_output, teacher_temp, teacher_correction)
        shape = log_q.shape
        return flush_exp_(sinkhorn_log_targets(log_q.reshape(-1, shape[-1]), n_iterations)).view(shape)


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
    if centering == "sinkhorn":
        return sinkhorn_centering(teacher_output, teacher_temp, teacher_correction, sinkhorn_iterations), None
    if center is None:
        raise ValueError(f"centering={centering!r} needs a center tensor, got None")
    fn = logit_centering if centering == "logit" else probability_centering
    return fn(teacher_output, center, teacher_temp, teacher_correction)


def _check_stats(stats: tuple) -> list[tuple[torch.Tensor, int]]:
    if not stats:
        raise ValueError("pass at least one (batch_stat, n_local) pair")
    checked = []
    for i, pair in enumerate(stats):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"stats[{i}] must be a pair (batch_stat, n_local), got {type(pair).__name__}")
        stat = check_tensor(f"stats[{i}][0] (batch_stat)", pair[0])
        checked.append((stat, check_int(f"stats[{i}][1] (n_local)", pair[1], minimum=0)))
    return checked


def global_batch_sums(*stats: tuple[torch.Tensor, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(sums, counts)``: per statistic the sum over the global batch of ``batch_stat * n_local``, and
    the ``(len(stats),)`` global sample counts; ONE all-reduce (none without a process group), no
    host synchronisation. A rank with ``n_local = 0`` adds zeros (its mean over no samples is NaN)."""
    stats = _check_stats(stats)
    dtype = compute_dtype(*(stat for stat, _ in stats))
    device = stats[0][0].device
    parts = [
        stat.detach().reshape(-1).to(dtype) * n if n else stat.new_zeros(stat.numel(), dtype=dtype) for stat, n in stats
    ]
    # filled on the device: torch.tensor of Python numbers would be a host-to-device copy
    counts = torch.cat([torch.full((1,), float(n), dtype=dtype, device=device) for _, n in stats])
    buf = all_reduce_sum_(torch.cat([*parts, counts]))
    sums, start = [], 0
    for stat, _ in stats:
        sums.append(buf[start : start + stat.numel()].view(stat.shape))
        start += stat.numel()
    return sums, buf[start:]


def global_batch_means(*stats: tuple[torch.Tensor, int]) -> list[torch.Tensor]:
    """Turn local-batch means into global-batch means (over all ranks).

    Args:
        stats: pairs ``(batch_stat, n_local)``: a mean over ``n_local`` >= 0 local samples.

    Returns:
        The means over the global batch, every rank weighted by its own sample count, in float32
        (float64 for float64 stats), shaped like each ``batch_stat``; ONE all-reduce. A rank without
        samples contributes nothing. Without a process group, every ``n_local = 0`` is a ValueError
        (there is no mean); under torch.distributed a statistic no rank has samples for is NaN
        (knowing that would need a synchronisation; the loss modules then keep their centres).
    """
    checked = _check_stats(stats)
    if not is_distributed() and all(n == 0 for _, n in checked):
        raise ValueError("no samples: every n_local is 0, so there is no batch mean")
    sums, counts = global_batch_sums(*checked)
    return [total / counts[i] for i, total in enumerate(sums)]
