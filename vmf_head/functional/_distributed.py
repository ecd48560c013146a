"""All-reductions over ``torch.distributed`` that fall back to the identity in a single process.

Every batch statistic of the losses (centers, Sinkhorn marginals) is a statistic of the GLOBAL batch,
as in DINO's ``update_center``; these helpers are the only place that talks to ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
