"""Differentiable log-normaliser of the von Mises-Fisher distribution (autograd and dispatch layer).

Public functions:

* ``log_vmf_normalizer(kappa, p)``: log C_p(kappa) elementwise, with the exact derivative -A_p(kappa);
* ``vmf_mean_resultant_length(kappa, p)``: A_p(kappa);
* ``prototype_log_normalizer(weight_or_norms, tau, p)``: the DINO-vMF correction log C_p(||w_k||/tau)
  straight from the prototype matrix (or the weight-norm magnitudes), with its gradient with respect
  to the weights.

Each validates its arguments and calls a custom operator registered with ``torch.library``
(``vmf_head::log_vmf_normalizer``, ``vmf_head::log_vmf_normalizer_grad``,
``vmf_head::prototype_log_normalizer``, ``vmf_head::prototype_log_normalizer_backward``), which picks
the backend (``vmf_head._dispatch``: the Triton kernels of ``vmf_head.ops.log_normalizer`` or the plain
PyTorch reference of ``vmf_head.special``) when it runs. The operators have fake (meta)
implementations and autograd formulas, so ``torch.compile(fullgraph=True)`` traces through them
without graph breaks, and backward passes are exact derivatives computed by the ``*_grad``/``*_backward``
operators (never autograd through a series). Neither backend reads the data on the host: a call is
free of host-device synchronisation. See ``docs/triton.md``.
"""

from __future__ import annotations

import math

import torch

from . import _dispatch
from ._validation import check_choice, check_int, check_temperature, check_tensor, temperature_tensor
from .special import vmf as _vmf
from .special.bessel import X_LARGE, tolerance
from .special.vmf import MODES

__all__ = ["log_vmf_normalizer", "prototype_log_normalizer", "vmf_mean_resultant_length"]

# float16 rounds to inf from 65520 on (its largest number 65504 plus half a unit in the last place).
_FLOAT16_OVERFLOW = float(torch.finfo(torch.float16).max) + 16.0


def _check_p_mode(p: object, mode: object) -> int:
    p = check_int("p", p, minimum=2, what="the ambient dimension of the sphere S^(p-1)")
    check_choice("mode", mode, MODES)
    if mode == "approx" and p < 3:
        raise ValueError("mode='approx' needs p >= 3: at p = 2 the approximation diverges at kappa = 0")
    return p


def _check_float16_range(p: int) -> None:
    """ValueError when float16 cannot hold log C_p(kappa) for every float16 kappa.

    log C_p decreases from log C_p(0) = log Gamma(p/2) - log 2 - (p/2) log pi, which rounds to inf
    from p = 18723 on, to its value at float16's largest kappa, 65504, where the leading term of the
    uniform expansion (``mode="approx"``'s formula, off by less than 1/(12 nu) there) gives it in
    closed form."""
    at_max = _vmf.leading_term(65504.0, p)
    at_zero = _vmf.log_normalizer_at_zero(p)
    if at_zero >= _FLOAT16_OVERFLOW or at_max <= -_FLOAT16_OVERFLOW:
        where = f"log C_p(0) = {at_zero:.6g}" if at_zero >= _FLOAT16_OVERFLOW else f"log C_p(65504) = {at_max:.6g}"
        raise ValueError(
            f"float16 cannot hold log C_p(kappa) at p = {p}: {where} is beyond float16's range (65504); "
            "pass kappa as float32 (or bfloat16)"
        )


def _check_kappa(kappa: object, p: int) -> torch.Tensor:
    kappa = check_tensor("kappa", kappa)
    if kappa.is_complex():
        raise TypeError("kappa must be real")
    if kappa.dtype == torch.float16:
        _check_float16_range(p)
    return kappa


# ----------------------------------------------------------------------------------------------
# Reference implementation (plain PyTorch, float64)


def _reference(k64: torch.Tensor, p: int, mode: str, tol: float, derivative: bool) -> torch.Tensor:
    """log C_p or its derivative at float64 ``k64``, on the whole real line without reading the data
    (a branch on it would synchronise a GPU): computed at ``k64`` clamped to [0, X_LARGE], then NaN
    below 0 (NaN stays NaN, as in torch's math functions). Above ``X_LARGE`` the value continues as
    its limit -kappa, exactly: log C_p(X_LARGE) = -X_LARGE to float64, so adding the clamped-off
    part ``X_LARGE - kappa`` gives -kappa; the slope's limit -1 is already what it is at X_LARGE."""
    if k64.numel() == 0:
        return torch.empty_like(k64)
    x = k64.clamp(0.0, X_LARGE)
    if mode == "exact":
        out = _vmf.mean_resultant_length(x, p, tol).neg_() if derivative else _vmf.log_normalizer_exact(x, p, tol)
    else:
        out = _vmf.log_normalizer_approx_derivative(x, p) if derivative else _vmf.log_normalizer_approx(x, p)
    if not derivative:
        out.add_(x.sub_(k64))
    return out.masked_fill_(k64 < 0, math.nan)


def _elementwise(kappa: torch.Tensor, p: int, mode: str, backend: str, derivative: bool) -> torch.Tensor:
    if _dispatch.use_triton(backend, "log_normalizer", kappa.device):
        from .ops.log_normalizer import log_normalizer

        return log_normalizer(kappa, p=p, mode=mode, derivative=derivative)
    return _reference(kappa.to(torch.float64), p, mode, tolerance(kappa.dtype), derivative).to(kappa.dtype)


def _correction_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 would round log C_p (hundreds or more) to whole units: useless in a softmax.
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||w_k||`` of the rows of ``weight`` (K, p), or ``|g_k|`` of weight-norm magnitudes (K,) or
    (K, 1): a (K,) tensor accumulated and returned in float32 (float64 for float64 weights), so a
    half-precision layer (FSDP mixed precision) gives concentrations of full precision."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if weight.dim() == 2 and weight.shape[1] > 1:
        return torch.linalg.vector_norm(weight, dim=1, dtype=dtype)
    return weight.abs().reshape(-1).to(dtype)


# ----------------------------------------------------------------------------------------------
# Custom operators. The backend is chosen inside them, at run time: a compiled graph holds the
# operator, not the choice, so tracing never imports Triton. Temperatures are 0-d float64 tensors
# on the weights' device, so a new temperature is new data, not a new graph.


@torch.library.custom_op("vmf_head::log_vmf_normalizer", mutates_args=())
def _log_vmf_normalizer_op(kappa: torch.Tensor, p: int, mode: str, backend: str) -> torch.Tensor:
    return _elementwise(kappa, p, mode, backend, derivative=False)


@torch.library.custom_op("vmf_head::log_vmf_normalizer_grad", mutates_args=())
def _log_vmf_normalizer_grad_op(kappa: torch.Tensor, p: int, mode: str, backend: str) -> torch.Tensor:
    return _elementwise(kappa, p, mode, backend, derivative=True)


@_log_vmf_normalizer_op.register_fake
def _(kappa: torch.Tensor, p: int, mode: str, backend: str) -> torch.Tensor:
    return torch.empty_like(kappa)


@_log_vmf_normalizer_grad_op.register_fake
def _(kappa: torch.Tensor, p: int, mode: str, backend: str) -> torch.Tensor:
    return torch.empty_like(kappa)


def _setup_context(ctx, inputs, output) -> None:
    kappa, p, mode, backend = inputs
    ctx.save_for_backward(kappa)
    ctx.p, ctx.mode, ctx.backend = p, mode, backend


def _backward(ctx, grad: torch.Tensor):
    (kappa,) = ctx.saved_tensors
    return grad * _log_vmf_normalizer_grad_op(kappa, ctx.p, ctx.mode, ctx.backend), None, None, None


_log_vmf_normalizer_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vmf_head::prototype_log_normalizer", mutates_args=())
def _prototype_op(weight: torch.Tensor, tau: torch.Tensor, p: int, mode: str, backend: str) -> torch.Tensor:
    out_dtype = _correction_dtype(weight.dtype)
    if _dispatch.use_triton(backend, "log_normalizer", weight.device):
        from .ops.log_normalizer import prototype_log_normalizer

        return prototype_log_normalizer(weight, tau=tau, p=p, mode=mode, out_dtype=out_dtype)
    kappa = row_norms(weight).to(torch.float64) / tau
    return _reference(kappa, p, mode, tolerance(weight.dtype), derivative=False).to(out_dtype)


@torch.library.custom_op("vmf_head::prototype_log_normalizer_backward", mutates_args=())
def _prototype_backward_op(
    grad: torch.Tensor, weight: torch.Tensor, tau: torch.Tensor, p: int, mode: str, backend: str
) -> torch.Tensor:
    if _dispatch.use_triton(backend, "log_normalizer", weight.device):
        from .ops.log_normalizer import prototype_log_normalizer_backward

        return prototype_log_normalizer_backward(grad, weight, tau=tau, p=p, mode=mode)
    norms = row_norms(weight).to(torch.float64)
    slope = _reference(norms / tau, p, mode, tolerance(weight.dtype), derivative=True)
    # d/dw_k log C_p(||w_k||/tau) = slope / tau * w_k / ||w_k||, and 0 at w_k = 0 (slope(0) = 0).
    scale = torch.where(norms > 0, grad.to(torch.float64) * slope / (tau * norms), 0.0)
    if weight.dim() == 2:
        scale = scale[:, None]
    return scale.to(weight.dtype) * weight


@_prototype_op.register_fake
def _(weight: torch.Tensor, tau: torch.Tensor, p: int, mode: str, backend: str) -> torch.Tensor:
    return weight.new_empty(weight.shape[:1], dtype=_correction_dtype(weight.dtype))


@_prototype_backward_op.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, tau: torch.Tensor, p: int, mode: str, backend: str) -> torch.Tensor:
    return torch.empty_like(weight)


def _prototype_setup_context(ctx, inputs, output) -> None:
    weight, tau, p, mode, backend = inputs
    ctx.save_for_backward(weight, tau)
    ctx.p, ctx.mode, ctx.backend = p, mode, backend


def _prototype_backward(ctx, grad: torch.Tensor):
    weight, tau = ctx.saved_tensors
    grad_weight = _prototype_backward_op(grad, weight, tau, ctx.p, ctx.mode, ctx.backend)
    return grad_weight, None, None, None, None


_prototype_op.register_autograd(_prototype_backward, setup_context=_prototype_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions


def log_vmf_normalizer(kappa: torch.Tensor, p: int, *, mode: str = "exact", backend: str = "auto") -> torch.Tensor:
    """log C_p(kappa), the log-normaliser of the von Mises-Fisher distribution on S^(p-1).

        log C_p(kappa) = nu log kappa - (p/2) log(2 pi) - log I_nu(kappa),   nu = p/2 - 1.

    Args:
        kappa: concentrations, a tensor of any shape on any device; float16, bfloat16, float32 or
            float64. Everything is computed in float64 and returned in kappa's dtype. float16 is
            refused where it cannot hold the result (p >= 18723: log C_p(0) rounds to inf), never returned as inf.
        p: the ambient dimension (an int >= 2); DINO's bottleneck gives p = 256.
        mode: ``"exact"`` (default) or ``"approx"``.

            * ``exact``: float64 error <= 1e-12 of max(1, |value|) for p in [2, 1e5] and kappa in
              [0, 1e8] (kappa = 0 gives the limit log Gamma(p/2) - log 2 - (p/2) log pi), float32
              <= 2e-6; see ``docs/log_normalizer.md`` for the measured table.
            * ``approx``: the seed paper's large-nu approximation
              ``nu log(nu + s) - s + log(s)/2 - (nu + 1/2) log(2 pi)`` with
              ``s = sqrt(nu^2 + kappa^2)``; it equals ``exact`` plus a function of kappa that is
              -1/(12 nu) at kappa = 0, +1/(12 sqrt(5) nu) at kappa = 2 nu and tends to 0 as kappa
              grows (a spread of about 0.24/p), so it is good where that is negligible (large p).
              Needs p >= 3.
        backend: ``"auto"`` (default: the Triton kernel for CUDA tensors when Triton imports, the
            reference otherwise), ``"triton"`` or ``"reference"`` (plain PyTorch, any device). Both
            backends run the same algorithm in float64 and agree to rounding; see ``docs/triton.md``.

    Returns:
        A tensor like ``kappa``. Differentiable in kappa with the exact derivative of the chosen mode:
        ``-A_p(kappa) = -I_{p/2}(kappa)/I_{p/2-1}(kappa)`` for ``exact``. Negative or NaN kappa give
        NaN (as torch's own math functions do outside their domain); above 1e150 the result is the
        large-kappa limit -kappa (exact to float64 there), so +inf gives -inf.

    Raises:
        TypeError: kappa is not a tensor, or has an integer or complex dtype; p is not an int.
        ValueError: p < 2, mode or backend is unknown, or float16 kappa where float16 cannot hold
            log C_p.
        RuntimeError: ``backend="triton"`` where the kernels cannot run (no Triton, or a CPU tensor
            without ``TRITON_INTERPRET=1``).

    Example:
        >>> kappa = torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64, requires_grad=True)
        >>> log_vmf_normalizer(kappa, 3)  # C_3(kappa) = kappa / (4 pi sinh kappa)
        tensor([ -2.5310,  -2.6925, -97.2327], dtype=torch.float64, grad_fn=...)
    """
    p = _check_p_mode(p, mode)
    kappa = _check_kappa(kappa, p)
    return _log_vmf_normalizer_op(kappa, p, mode, _dispatch.check_backend(backend))


def vmf_mean_resultant_length(kappa: torch.Tensor, p: int, *, backend: str = "auto") -> torch.Tensor:
    """A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa) = -d/dkappa log C_p(kappa), in [0, 1).

    The expected cosine between a vMF sample and its mean direction. Same argument rules, backends
    and accuracy as ``log_vmf_normalizer(mode="exact")``; not differentiable (use
    ``vmf_head.special.bessel_iv_ratio`` for the Bessel ratio at a general order).
    """
    p = _check_p_mode(p, "exact")
    kappa = _check_kappa(kappa, p)
    return -_log_vmf_normalizer_grad_op(kappa.detach(), p, "exact", _dispatch.check_backend(backend))


def prototype_log_normalizer(
    weight_or_norms: torch.Tensor,
    tau: float | torch.Tensor,
    p: int | None = None,
    *,
    mode: str = "exact",
    backend: str = "auto",
) -> torch.Tensor:
    """The DINO-vMF logit correction log C_p(kappa_k), kappa_k = ||w_k|| / tau, for K prototypes.

        out_k = log C_p(||w_k|| / tau)
        d out_k / d w_k = -A_p(kappa_k) / tau * w_k / ||w_k||      (0 at w_k = 0)

    With the Triton backend the norms, kappa and log C_p come from one kernel launch (the norms
    are never written to memory), and the backward is one launch writing dL/dW directly. The
    reference backend is plain PyTorch: the row norms, then ``log_vmf_normalizer``'s computation.

    Args:
        weight_or_norms: either the prototype matrix W of shape (K, p) (the rows w_k; e.g. the
            head's last-layer weight), or the weight-norm magnitudes g of shape (K,) (or weight_g's
            own (K, 1) layout), for which ||w_k|| = |g_k|. Floating dtype, any device.
        tau: the temperature of the branch (student 0.1; the teacher's scheduled value for the
            current epoch): a positive number, or a 0-d floating tensor (a schedule kept on the
            device; its value is not checked, reading it would synchronise a GPU). Not differentiated.
        p: the dimension of the sphere's ambient space. Defaults to W.shape[1] for a matrix (and
            must equal it if given); required for norms.
        mode: ``"exact"`` (default) or ``"approx"``, as in ``log_vmf_normalizer``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``, as in ``log_vmf_normalizer``.

    Returns:
        A (K,) tensor: float64 for float64 weights, float32 otherwise (a float16/bfloat16 correction
        would be rounded to whole units). Differentiable with respect to ``weight_or_norms``.
        Accuracy as ``log_vmf_normalizer`` at the kappa the norms give (the Triton kernel sums the
        squares in float64, the reference in float32 for non-float64 weights).

    Raises:
        TypeError: weight_or_norms is not a real floating tensor, tau is neither a real number nor a
            0-d floating tensor, or p is not an int.
        ValueError: weight_or_norms is not 1-D or 2-D, tau <= 0 or not finite, p is missing, < 2
            or disagrees with W.shape[1], or mode or backend is unknown.
        RuntimeError: ``backend="triton"`` where the kernels cannot run.

    Example:
        >>> W = torch.randn(65536, 256)
        >>> correction = prototype_log_normalizer(W, 0.1)  # (65536,), added to the student logits
    """
    weight = check_tensor("weight_or_norms", weight_or_norms, dims=(1, 2), shape="(K, p) or (K,)")
    if weight.is_complex():
        raise TypeError("weight_or_norms must be real")
    tau = check_temperature("tau", tau)
    # A (K, 1) matrix cannot hold prototypes of a sphere (p >= 2): it is weight_g's layout of norms.
    holds_norms = weight.dim() == 1 or weight.shape[1] == 1
    if holds_norms and p is None:
        raise ValueError("p is required when weight_or_norms holds norms g (shape (K,) or (K, 1))")
    if p is not None:
        p = check_int("p", p, minimum=2, what="the ambient dimension of the sphere S^(p-1)")
    if not holds_norms:
        if p is None:
            p = weight.shape[1]
        elif p != weight.shape[1]:
            raise ValueError(f"p = {p} disagrees with the prototype matrix of shape {tuple(weight.shape)}")
    p = _check_p_mode(p, mode)
    backend = _dispatch.check_backend(backend)
    return _prototype_op(weight, temperature_tensor(tau, weight.device), p, mode, backend)
