"""Differentiable log-normaliser of the von Mises-Fisher distribution (autograd and dispatch layer).

``log_vmf_normalizer`` validates its arguments, then calls the custom operator
``vmf_head::log_vmf_normalizer`` registered with ``torch.library``: it has a fake (meta)
implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through it
without graph breaks, and its backward is the exact derivative -A_p(kappa) computed by the operator
``vmf_head::log_vmf_normalizer_grad`` (never autograd through a series).
"""

from __future__ import annotations

import math

import torch

from .special import vmf as _vmf
from .special.bessel import check_argument, tolerance

MODES = ("exact", "approx")


def _check(kappa: object, p: object, mode: object) -> None:
    check_argument("kappa", kappa)
    if kappa.is_complex():  # type: ignore[union-attr]
        raise TypeError("kappa must be real")
    if isinstance(p, bool) or not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an int >= 2 (the ambient dimension of the sphere S^(p-1)), got {p!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "approx" and p < 3:
        raise ValueError("mode='approx' needs p >= 3: at p = 2 the approximation diverges at kappa = 0")


def _apply(kappa: torch.Tensor, fn, at_inf: float) -> torch.Tensor:
    """Run a float64 kernel on finite kappa >= 0 and map the rest of the domain: NaN below 0 and at
    NaN (as torch's math functions do), ``at_inf`` (the limit) at +inf."""
    k64 = kappa.to(torch.float64)
    # The kernels see the raw values (NaN propagates by itself); the two masks cost less than
    # sanitising the input first.
    out = fn(k64).masked_fill_(k64 < 0, math.nan)
    return out.masked_fill_(k64 == math.inf, at_inf).to(kappa.dtype)


def _forward_reference(kappa: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    if mode == "exact":
        tol = tolerance(kappa.dtype)
        return _apply(kappa, lambda k: _vmf.log_normalizer_exact(k, p, tol), -math.inf)
    return _apply(kappa, lambda k: _vmf.log_normalizer_approx(k, p), -math.inf)


def _derivative_reference(kappa: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    if mode == "exact":
        tol = tolerance(kappa.dtype)
        return _apply(kappa, lambda k: -_vmf.mean_resultant_length(k, p, tol), -1.0)
    return _apply(kappa, lambda k: _vmf.log_normalizer_approx_derivative(k, p), -1.0)


@torch.library.custom_op("vmf_head::log_vmf_normalizer", mutates_args=())
def _log_vmf_normalizer_op(kappa: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    return _forward_reference(kappa, p, mode)


@torch.library.custom_op("vmf_head::log_vmf_normalizer_grad", mutates_args=())
def _log_vmf_normalizer_grad_op(kappa: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    return _derivative_reference(kappa, p, mode)


@_log_vmf_normalizer_op.register_fake
def _(kappa: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    return torch.empty_like(kappa)


@_log_vmf_normalizer_grad_op.register_fake
def _(kappa: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    return torch.empty_like(kappa)


def _setup_context(ctx, inputs, output) -> None:
    kappa, p, mode = inputs
    ctx.save_for_backward(kappa)
    ctx.p, ctx.mode = p, mode


def _backward(ctx, grad: torch.Tensor):
    (kappa,) = ctx.saved_tensors
    return grad * _log_vmf_normalizer_grad_op(kappa, ctx.p, ctx.mode), None, None


_log_vmf_normalizer_op.register_autograd(_backward, setup_context=_setup_context)


def log_vmf_normalizer(kappa: torch.Tensor, p: int, *, mode: str = "exact") -> torch.Tensor:
    """log C_p(kappa), the log-normaliser of the von Mises-Fisher distribution on S^(p-1).

        log C_p(kappa) = nu log kappa - (p/2) log(2 pi) - log I_nu(kappa),   nu = p/2 - 1.

    Args:
        kappa: concentrations, a tensor of any shape on any device; float16, bfloat16, float32 or
            float64. Everything is computed in float64 and returned in kappa's dtype.
        p: the ambient dimension (an int >= 2); DINO's bottleneck gives p = 256.
        mode: ``"exact"`` (default) or ``"approx"``.

            * ``exact``: float64 error <= 1e-12 of max(1, |value|) for p in [2, 1e5] and kappa in
              [0, 1e8] (kappa = 0 gives the limit log Gamma(p/2) - log 2 - (p/2) log pi), float32
              <= 2e-6; see ``docs/log_normalizer.md`` for the measured table.
            * ``approx``: the seed paper's large-nu approximation
              ``nu log(nu + s) - s + log(s)/2 - nu log(2 pi)`` with ``s = sqrt(nu^2 + kappa^2)``;
              it equals ``exact`` plus a function of kappa that goes from about 1/(12 nu) at kappa = 0
              to 0 as kappa grows, so it is good where that change is negligible (large p). Needs p >= 3.

    Returns:
        A tensor like ``kappa``. Differentiable in kappa with the exact derivative of the chosen mode:
        ``-A_p(kappa) = -I_{p/2}(kappa)/I_{p/2-1}(kappa)`` for ``exact``. Negative or NaN kappa give
        NaN (as torch's own math functions do outside their domain); +inf gives -inf.

    Raises:
        TypeError: kappa is not a tensor, or has an integer or complex dtype.
        ValueError: p is not an int >= 2, or mode is unknown.

    Example:
        >>> kappa = torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64, requires_grad=True)
        >>> log_vmf_normalizer(kappa, 3)  # C_3(kappa) = kappa / (4 pi sinh kappa)
        tensor([ -2.5310,  -2.6925, -97.2327], dtype=torch.float64, grad_fn=...)
    """
    _check(kappa, p, mode)
    return _log_vmf_normalizer_op(kappa, p, mode)


def vmf_mean_resultant_length(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa) = -d/dkappa log C_p(kappa), in [0, 1).

    The expected cosine between a vMF sample and its mean direction. Same argument rules and
    accuracy as ``log_vmf_normalizer(mode="exact")``; not differentiable (use
    ``vmf_head.special.bessel_iv_ratio`` for the Bessel ratio at a general order).
    """
    _check(kappa, p, "exact")
    return -_log_vmf_normalizer_grad_op(kappa.detach(), p, "exact")
