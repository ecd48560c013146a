"""vMF logits of a prototype head: DINO's logits plus the missing log-normaliser (docs/design.md).

DINO's logits ``w_k^T y / tau`` are the log-posterior of a uniform mixture of von Mises-Fisher
components with means ``mu_k = w_k/||w_k||`` and concentrations ``kappa_k = ||w_k||/tau`` only if every
normaliser ``C_p(kappa_k)`` is the same. DINO-vMF (Govindarajan et al., ICLR 2023, eq. 6) adds it:

    l_k = w_k^T y / tau + log C_p(||w_k|| / tau)  =  kappa_k mu_k^T y + log C_p(kappa_k).

Temperatures are positive numbers or 0-d tensors (a schedule kept on the device, so that a new
temperature is new data, not a new compiled graph). This module also holds the conventions every
loss shares: the dtype of the B x K work, autocast off, and corrections shifted to a maximum of 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .._validation import check_temperature, check_tensor
from ..normalizer import log_vmf_normalizer


def compute_dtype(*logits: torch.Tensor | None) -> torch.dtype:
    """The dtype of the B x K work: float64 if a B x K input (logits, targets) is float64, else
    float32 (float16 and bfloat16 are promoted, so softmax and log-sum-exp never run in half). The
    K-vectors (corrections, centers) never decide it: they are cast after their own arithmetic."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in logits) else torch.float32


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device`` (the losses choose their own precision)."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def shifted(correction: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``correction - max(correction)``, computed in the correction's dtype, then cast to ``dtype``,
    for logits that only enter softmaxes over K.

    A softmax over prototypes does not see a constant, and ``log C_p`` is in the hundreds for DINO's
    p = 256 (about 340 at kappa = 25), which would cost float32 logits five bits of their fraction;
    the shift keeps them near 0. The maximum is taken without gradient, so the gradient with respect
    to ``correction`` is that of the unshifted logits."""
    return (correction - correction.detach().max()).to(dtype)


def scaled_logits(
    x: torch.Tensor, inv_temp: float | torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x * inv_temp + bias`` (bias broadcast over the rows, or None) in ``dtype``, written once into a
    fresh tensor: the one pass over a B x K input that every logit of the losses starts with."""
    if bias is None:
        return x.to(dtype).mul_(inv_temp) if x.dtype != dtype else torch.mul(x, inv_temp)
    if isinstance(inv_temp, torch.Tensor):
        return torch.addcmul(bias.to(dtype), x, inv_temp.to(dtype))
    if torch.compiler.is_compiling():  # (alpha= would make a traced temperature a constant of the graph)
        return x.to(dtype) * inv_temp + bias.to(dtype)
    return torch.add(bias.to(dtype), x, alpha=inv_temp)


def vmf_correction(
    prototype_norms: torch.Tensor, temperature: float | torch.Tensor, p: int, *, mode: str = "exact"
) -> torch.Tensor:
    """The vMF correction ``log C_p(prototype_norms / temperature)`` of one branch.

    Args:
        prototype_norms: ``(K,)`` norms ``||w_k||`` of the prototypes (any float dtype; gradients flow).
        temperature: the branch's temperature (``tau_s`` or the scheduled ``tau_t``), > 0: a number
            or a 0-d tensor.
        p: the dimension of the sphere's ambient space (the head's bottleneck dim, 256 in DINO).
        mode: ``"exact"`` or ``"approx"``, see :func:`vmf_head.log_vmf_normalizer`.

    Returns:
        ``(K,)`` tensor in float32 (float64 for float64 norms), differentiable in the norms with the
        exact derivative ``-A_p(kappa) / temperature``.
    """
    return vmf_corrections([(prototype_norms, temperature)], p, mode=mode)[0]


def vmf_corrections(
    branches: Sequence[tuple[torch.Tensor, float | torch.Tensor]], p: int, *, mode: str = "exact"
) -> list[torch.Tensor]:
    """:func:`vmf_correction` of several branches (e.g. student and teacher) in ONE normaliser call.

    The normaliser's cost on K ~ 1e4-1e5 values is mostly per call (dozens of element-wise
    kernels), so the branches share one call on their concatenated concentrations.

    Args:
        branches: a non-empty sequence of ``(prototype_norms (K_i,), temperature)``, one per branch;
            detach a branch's norms to keep gradients away from it.
        p, mode: as :func:`vmf_correction`.

    Returns:
        One correction per branch, float32 (float64 if any norms are float64).
    """
    if not isinstance(branches, Sequence) or not branches:
        raise ValueError(
            f"branches must be a non-empty sequence of (prototype_norms, temperature) pairs, got {branches!r}"
        )
    checked = []
    for i, branch in enumerate(branches):
        if not isinstance(branch, (tuple, list)) or len(branch) != 2:
            raise TypeError(f"branches[{i}] must be a pair (prototype_norms, temperature), got {type(branch).__name__}")
        norms, temperature = branch
        checked.append((_check_norms("prototype_norms", norms), check_temperature("temperature", temperature)))
    return corrections(checked, p, mode=mode)


def corrections(
    branches: Sequence[tuple[torch.Tensor, float | torch.Tensor]], p: int, *, mode: str
) -> list[torch.Tensor]:
    """:func:`vmf_corrections` on arguments already checked (the losses' path)."""
    dtype = torch.float64 if any(norms.dtype == torch.float64 for norms, _ in branches) else torch.float32
    with no_autocast(branches[0][0].device):
        kappa = torch.cat([norms.to(dtype) / temperature for norms, temperature in branches])
        return list(log_vmf_normalizer(kappa, p, mode=mode).split([len(norms) for norms, _ in branches]))


def vmf_logits(
    logits: torch.Tensor,
    prototype_norms: torch.Tensor,
    temperature: float | torch.Tensor,
    p: int,
    *,
    mode: str = "exact",
) -> torch.Tensor:
    """DINO-vMF logits ``logits / temperature + log C_p(prototype_norms / temperature)``.

    Args:
        logits: ``(..., K)`` raw head outputs ``w_k^T y`` (y unit length), any float dtype.
        prototype_norms: ``(K,)`` prototype norms ``||w_k||``; broadcast over the last dim of ``logits``.
        temperature: the branch's temperature, > 0 (a number or a 0-d tensor).
        p: ambient dimension of the sphere (bottleneck dim).
        mode: ``"exact"`` or ``"approx"`` normaliser (the approximation is off by a constant in kappa
            only for large p, which cancels in the softmax).

    Returns:
        ``(..., K)`` tensor in float32 (float64 for float64 logits), even under autocast, so that
        its softmax is the Bayes posterior of the uniform vMF mixture ``{(mu_k, kappa_k)}``.

    Raises:
        TypeError: an argument has the wrong type; ValueError: the last dim of ``logits`` is not
        the number of norms, or temperature/p/mode are bad.
    """
    logits = check_tensor("logits", logits, shape="(..., K)")
    prototype_norms = _check_norms("prototype_norms", prototype_norms)
    if logits.dim() == 0 or logits.shape[-1] != prototype_norms.shape[0]:
        raise ValueError(
            f"prototype_norms must have shape (K,) with K = logits.shape[-1] = "
            f"{logits.shape[-1] if logits.dim() else None}, got {tuple(prototype_norms.shape)}"
        )
    correction = vmf_correction(prototype_norms, temperature, p, mode=mode)
    with no_autocast(logits.device):
        dtype = compute_dtype(logits)
        return logits.to(dtype) / temperature + correction.to(dtype)


def _check_norms(name: str, norms: object) -> torch.Tensor:
    return check_tensor(name, norms, dims=1, shape="(K,) of prototype norms ||w_k||")
