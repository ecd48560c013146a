"""Statistics of the global batch: all-reductions over ``torch.distributed`` that fall back to the
identity in a single process.

Every batch statistic of the losses (centers, Sinkhorn marginals) is a statistic of the GLOBAL batch,
as in DINO's ``update_center``; this module is the only place that talks to ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._validation import check_int, check_tensor


def is_distributed() -> bool:
    """True when a default process group is initialised (and statistics must be all-reduced)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op without a process group) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks in place (no-op without a process group)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_logsumexp_(tensor: torch.Tensor) -> torch.Tensor:
    """``log(sum_ranks exp(tensor))`` element-wise, in place: combines per-rank log-sum-exps into the
    log-sum-exp of the global batch without overflow (shift by the global maximum first)."""
    if not is_distributed():
        return tensor
    shift = all_reduce_max_(tensor.clone())
    # A -inf maximum means every rank's sum is 0; keep it -inf instead of producing NaN from -inf - -inf.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = all_reduce_sum_(torch.exp(tensor - shift))
    return tensor.copy_(torch.log(total) + shift)


def global_batch_sums(*stats: tuple[torch.Tensor, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(sums, counts)`` on checked arguments: per statistic the sum over the global batch of
    ``batch_stat * n_local``, and the ``(len(stats),)`` global sample counts; ONE all-reduce (none
    without a process group), no host synchronisation. A rank with ``n_local = 0`` adds zeros (its
    mean over no samples is NaN)."""
    dtype = torch.float64 if any(stat.dtype == torch.float64 for stat, _ in stats) else torch.float32
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
        (knowing that would need a synchronisation; the loss modules then keep their centers).
    """
    if not stats:
        raise ValueError("pass at least one (batch_stat, n_local) pair")
    checked = []
    for i, pair in enumerate(stats):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"stats[{i}] must be a pair (batch_stat, n_local), got {type(pair).__name__}")
        stat = check_tensor(f"stats[{i}][0] (batch_stat)", pair[0])
        checked.append((stat, check_int(f"stats[{i}][1] (n_local)", pair[1], minimum=0)))
    if not is_distributed() and all(n == 0 for _, n in checked):
        raise ValueError("no samples: every n_local is 0, so there is no batch mean")
    sums, counts = global_batch_sums(*checked)
    return [total / counts[i] for i, total in enumerate(sums)]
