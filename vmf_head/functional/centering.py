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

import torch

from ._distributed import all_reduce_logsumexp_, all_reduce_sum_
from .vmf import check_temperature, compute_dtype, no_autocast, softmax_shifted

CENTERINGS = ("logit", "probability", "sinkhorn")


def check_centering(centering: object) -> str:
    """``centering`` if it is one of :data:`CENTERINGS`, else a ValueError listing them."""
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    return centering  # type: ignore[return-value]


def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the last, kept as size-1 dims: ``(..., K) -> (1, ..., 1, K)``."""
    return x.reshape(-1, x.shape[-1]).mean(0).view((1,) * (x.dim() - 1) + (x.shape[-1],))


def teacher_vmf_logits(
    teacher_output: torch.Tensor, teacher_temp: float, teacher_correction: torch.Tensor | None = None
) -> torch.Tensor:
    """``l_t = teacher_output / teacher_temp + teacher_correction`` (detached), float32 or float64, up
    to a constant (the correction enters shifted by its maximum, see ``softmax_shifted``)."""
    teacher_temp = check_temperature("teacher_temp", teacher_temp)
    dtype = compute_dtype(teacher_output, teacher_correction)
    logits = teacher_output.detach().to(dtype) / teacher_temp
    if teacher_correction is not None:
        logits += softmax_shifted(teacher_correction.detach(), dtype)
    return logits


def logit_centering(
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    teacher_correction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's centering in logit space, with the vMF correction.

    Args:
        teacher_output: ``(..., K)`` raw teacher outputs ``t = w^T y``.
        center: the running mean of ``t``, broadcastable to ``teacher_output`` (DINO: ``(1, K)``).
        teacher_temp: the scheduled teacher temperature.
        teacher_correction: ``(K,)`` ``log C_p(||w_t|| / teacher_temp)`` or None (DINO).

    Returns:
        ``(q, batch_stat)``: ``q = softmax((t - c) / teacher_temp + correction)`` over the last dim,
        and ``batch_stat = mean(t)`` over the leading dims (``(1, ..., 1, K)``), both detached.
    """
    with no_autocast(teacher_output.device), torch.no_grad():
        teacher_temp = check_temperature("teacher_temp", teacher_temp)
        dtype = compute_dtype(teacher_output, teacher_correction)
        t = teacher_output.to(dtype)
        logits = (t - center.to(dtype)) / teacher_temp
        if teacher_correction is not None:
            logits += softmax_shifted(teacher_correction, dtype)
        return torch.softmax(logits, dim=-1, out=logits), _batch_mean(t)


def probability_centering(
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    teacher_correction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO-vMF's centering in probability space.

    Args:
        teacher_output: ``(..., K)`` raw teacher outputs.
        center: running mean of the uncentred posterior ``softmax(l_t)`` (starts at ``1/K``),
            broadcastable to ``teacher_output``. Entries are clamped at the smallest normal float
            before the log, so a prototype whose probability underflowed gets a finite weight.
        teacher_temp: the scheduled teacher temperature.
        teacher_correction: ``(K,)`` ``log C_p(||w_t|| / teacher_temp)`` or None.

    Returns:
        ``(q, batch_stat)``: ``q = softmax(l_t - log c)`` (``q ~ pbar / c``) and
        ``batch_stat = mean(pbar)``, ``pbar = softmax(l_t)``, over the leading dims; detached.
    """
    with no_autocast(teacher_output.device), torch.no_grad():
        logits = teacher_vmf_logits(teacher_output, teacher_temp, teacher_correction)
        stat = _batch_mean(torch.softmax(logits, dim=-1))
        log_center = center.to(logits.dtype).clamp_min(torch.finfo(logits.dtype).tiny).log()
        logits -= log_center
        return torch.softmax(logits, dim=-1, out=logits), stat


def sinkhorn_centering(
    teacher_output: torch.Tensor,
    teacher_temp: float,
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
        teacher_temp: the scheduled teacher temperature.
        teacher_correction: ``(K,)`` vMF correction or None.
        n_iterations: number of Sinkhorn iterations (>= 0; DINOv2 uses 3).

    Returns:
        ``q`` like ``teacher_output`` (float32/float64, detached): rows sum to 1 and prototype
        marginals approach ``B / K`` as the iterations proceed.
    """
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 0:
        raise ValueError(f"sinkhorn_iterations must be an int >= 0, got {n_iterations!r}")
    with no_autocast(teacher_output.device), torch.no_grad():
        log_q = teacher_vmf_logits(teacher_output, teacher_temp, teacher_correction)
        shape = log_q.shape
        log_q = log_q.reshape(-1, shape[-1])
        for _ in range(n_iterations):
            log_q -= all_reduce_logsumexp_(torch.logsumexp(log_q, dim=0, keepdim=True))
            torch.log_softmax(log_q, dim=-1, out=log_q)
        if n_iterations == 0:
            torch.log_softmax(log_q, dim=-1, out=log_q)
        return log_q.exp_().view(shape)


def center_teacher(
    teacher_output: torch.Tensor,
    center: torch.Tensor | None,
    *,
    teacher_temp: float,
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
    if center.shape[-1] != teacher_output.shape[-1]:
        raise ValueError(
            f"center has {center.shape[-1]} prototypes but teacher_output has {teacher_output.shape[-1]}"
        )
    fn = logit_centering if centering == "logit" else probability_centering
    return fn(teacher_output, center, teacher_temp, teacher_correction)


def global_batch_means(*stats: tuple[torch.Tensor, int]) -> list[torch.Tensor]:
    """Turn local-batch means into global-batch means (over all ranks).

    Args:
        stats: pairs ``(batch_stat, n_local)``: a mean over ``n_local`` local samples.

    Returns:
        The means over the global batch, every rank weighted by its own sample count, in float32
        (float64 for float64 stats), shaped like each ``batch_stat``. Identity without a process
        group; otherwise ONE all-reduce of ``[stat_1 * n_1, ..., n_1, ...]``.
    """
    dtype = compute_dtype(*(stat for stat, _ in stats))
    parts = [stat.detach().reshape(-1).to(dtype) * n for stat, n in stats]
    counts = torch.tensor([float(n) for _, n in stats], dtype=dtype, device=parts[0].device)
    buf = all_reduce_sum_(torch.cat(parts + [counts]))
    out, start = [], 0
    for i, (stat, _) in enumerate(stats):
        out.append((buf[start : start + stat.numel()] / buf[len(buf) - len(stats) + i]).view(stat.shape))
        start += stat.numel()
    return out
