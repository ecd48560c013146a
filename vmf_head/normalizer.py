"""Differentiable log-normaliser of the von Mises-Fisher distribution (autograd and dispatch layer).

Public functions:

* ``log_vmf_normalizer(kappa, p)``: log C_p(kappa) elementwise, with the exact derivative -A_p(kappa);
* ``vmf_mean_resultant_length(kappa, p)``: A_p(kappa);
* ``prototype_log_normalizer(weight_or_norms, tau, p)``: the DINO-vMF correction log C_p(||w_k||/tau)
  straight from the prototype matrix (or the weight-norm magnitudes), with its gradient with respect
  to the weights.

Each validates its arguments, picks a backend and calls a custom operator registered with
``torch.library`` (``vmf_head::log_vmf_normalizer``, ``vmf_head::log_vmf_normalizer_grad``,
``vmf_head::prototype_log_normalizer``, ``vmf_head::prototype_log_normalizer_backward``). The
operators have fake (meta) implementations and autograd formulas, so ``torch.compile(fullgraph=True)``
traces through them without graph breaks, and backward passes are exact derivatives computed by the
``*_grad``/``*_backward`` operators (never autograd through a series).

Backends (``backend=``):

* ``"reference"``: plain PyTorch (``vmf_head.special``), float64 arithmetic, any device;
* ``"triton"``: the kernels of ``vmf_head.ops.log_normalizer`` (one launch per call, no host
  synchronisation), for CUDA tensors, or CPU tensors when the kernels were imported under
  ``TRITON_INTERPRET=1``; an error where they cannot run;
* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton imports, ``"reference"`` otherwise.

Triton is optional: it is imported only when a CUDA tensor or ``backend="triton"`` asks for it.
See ``docs/triton.md``.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch

from .special import vmf as _vmf
from .special.bessel import X_LARGE, check_argument, finish_domain, tolerance

MODES = ("exact", "approx")
BACKENDS = ("auto", "triton", "reference")

_REAL = (int, float, torch.SymInt, torch.SymFloat)


def _check_p_mode(p: object, mode: object) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, torch.SymInt)) or p < 2:
        raise ValueError(f"p must be an int >= 2 (the ambient dimension of the sphere S^(p-1)), got {p!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "approx" and p < 3:
        raise ValueError("mode='approx' needs p >= 3: at p = 2 the approximation diverges at kappa = 0")


def _check(kappa: object, p: object, mode: object) -> None:
    check_argument("kappa", kappa)
    if kappa.is_complex():  # type: ignore[union-attr]
        raise TypeError("kappa must be real")
    _check_p_mode(p, mode)


# ----------------------------------------------------------------------------------------------
# Dispatch


_TRITON_MODULE = "vmf_head.ops.log_normalizer"
_triton_cache: dict[str, object] = {}


def _triton_kernels() -> ModuleType | ImportError:
    """The kernel module, or the ImportError that importing it (hence Triton) raised; cached."""
    if "module" not in _triton_cache:
        try:
            _triton_cache["module"] = importlib.import_module(_TRITON_MODULE)
        except ImportError as exc:
            _triton_cache["module"] = exc
    return _triton_cache["module"]  # type: ignore[return-value]


def _triton_problem(device_type: str) -> str:
    """Why the Triton kernels cannot run on tensors of ``device_type`` here ('' if they can)."""
    kernels = _triton_kernels()
    if isinstance(kernels, ImportError):
        return f"Triton is not available (importing it failed: {kernels})"
    if device_type == "cuda" or (device_type == "cpu" and kernels.INTERPRETED):
        return ""
    if device_type == "cpu":
        return (
            "Triton kernels run on CUDA tensors; CPU tensors only through Triton's interpreter, which "
            "needs TRITON_INTERPRET=1 in the environment before vmf_head's kernels are first imported"
        )
    return f"Triton kernels run on CUDA tensors, got a tensor on {device_type!r}"


def _check_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _select_backend(backend: str, x: torch.Tensor) -> str:
    """Resolve ``backend`` for tensor ``x`` to ``"triton"`` or ``"reference"`` (see the module doc).

    Called inside the operators, at run time: a compiled graph holds the operator, not this choice,
    so tracing never meets the (lazy) import of Triton."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if x.device.type == "cuda" and not _triton_problem("cuda") else "reference"
    problem = _triton_problem(x.device.type)
    if problem:
        raise RuntimeError(f"backend='triton' cannot run here: {problem}. Use backend='reference' or 'auto'.")
    return "triton"


# ----------------------------------------------------------------------------------------------
# Reference implementation (plain PyTorch, float64)


def _reference(k64: torch.Tensor, p: int, mode: str, tol: float, derivative: bool) -> torch.Tensor:
    """log C_p or its derivative at float64 ``k64``, mapping the rest of the domain: NaN below 0 and
    at NaN (as torch's math functions do), the large-kappa limits above ``X_LARGE`` (-kappa for the
    value, -1 for the slope: there they are exact to float64)."""
    if k64.numel() == 0:
        return torch.empty_like(k64)
    x = k64
    # On the CPU one reduction tells whether the masks are needed at all (they cost as much as a
    # fifth of the computation); on an accelerator the test would be a host synchronisation.
    outside = True
    if k64.device.type == "cpu":
        lo, hi = (v.item() for v in torch.aminmax(k64))
        outside = not (lo >= 0 and hi <= X_LARGE)  # (also true when a NaN is present)
    if outside:
        x = k64.clamp(0.0, X_LARGE)
    if mode == "exact":
        out = _vmf.mean_resultant_length(x, p, tol).neg_() if derivative else _vmf.log_normalizer_exact(x, p, tol)
    else:
        out = _vmf.log_normalizer_approx_derivative(x, p) if derivative else _vmf.log_normalizer_approx(x, p)
    return finish_domain(out, k64, -1.0 if derivative else k64.neg()) if outside else out


def _elementwise(kappa: torch.Tensor, p: int, mode: str, backend: str, derivative: bool) -> torch.Tensor:
    if _select_backend(backend, kappa) == "triton":
        kernels = _triton_kernels()
        fn = kernels.log_normalizer_derivative if derivative else kernels.log_normalizer
        return fn(kappa, p, mode)
    return _reference(kappa.to(torch.float64), p, mode, tolerance(kappa.dtype), derivative).to(kappa.dtype)


def _correction_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 would round log C_p (hundreds or more) to whole units: useless in a softmax.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_norms(weight: torch.Tensor) -> torch.Tensor:
    """||w_k|| as float64 (K,), accumulated in float32 (float64 for float64 weights) like torch's
    own norms, so a large W is not copied to float64."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if weight.dim() == 1:
        return weight.abs().to(torch.float64)
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).to(torch.float64)


# ----------------------------------------------------------------------------------------------
# Custom operators


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
def _prototype_op(weight: torch.Tensor, tau: float, p: int, mode: str, backend: str) -> torch.Tensor:
    out_dtype = _correction_dtype(weight.dtype)
    if _select_backend(backend, weight) == "triton":
        return _triton_kernels().prototype_log_normalizer(weight, tau, p, mode, out_dtype)
    kappa = _reference_norms(weight) / tau
    return _reference(kappa, p, mode, tolerance(weight.dtype), derivative=False).to(out_dtype)


@torch.library.custom_op("vmf_head::prototype_log_normalizer_backward", mutates_args=())
def _prototype_backward_op(
    grad: torch.Tensor, weight: torch.Tensor, tau: float, p: int, mode: str, backend: str
) -> torch.Tensor:
    if _select_backend(backend, weight) == "triton":
        return _triton_kernels().prototype_log_normalizer_backward(grad, weight, tau, p, mode)
    norms = _reference_norms(weight)
    slope = _reference(norms / tau, p, mode, tolerance(weight.dtype), derivative=True)
    # d/dw_k log C_p(||w_k||/tau) = slope / tau * w_k / ||w_k||, and 0 at w_k = 0 (slope(0) = 0).
    scale = torch.where(norms > 0, grad.to(torch.float64) * slope / (tau * norms), 0.0)
    if weight.dim() == 2:
        scale = scale[:, None]
    return scale.to(weight.dtype) * weight


@_prototype_op.register_fake
def _(weight: torch.Tensor, tau: float, p: int, mode: str, backend: str) -> torch.Tensor:
    return weight.new_empty(weight.shape[:1], dtype=_correction_dtype(weight.dtype))


@_prototype_backward_op.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, tau: float, p: int, mode: str, backend: str) -> torch.Tensor:
    return torch.empty_like(weight)


def _prototype_setup_context(ctx, inputs, output) -> None:
    weight, tau, p, mode, backend = inputs
    ctx.save_for_backward(weight)
    ctx.tau, ctx.p, ctx.mode, ctx.backend = tau, p, mode, backend


def _prototype_backward(ctx, grad: torch.Tensor):
    (weight,) = ctx.saved_tensors
    grad_weight = _prototype_backward_op(grad, weight, ctx.tau, ctx.p, ctx.mode, ctx.backend)
    return grad_weight, None, None, None, None


_prototype_op.register_autograd(_prototype_backward, setup_context=_prototype_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions


def log_vmf_normalizer(kappa: torch.Tensor, p: int, *, mode: str = "exact", backend: str = "auto") -> torch.Tensor:
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
        TypeError: kappa is not a tensor, or has an integer or complex dtype.
        ValueError: p is not an int >= 2, or mode or backend is unknown.
        RuntimeError: ``backend="triton"`` where the kernels cannot run (no Triton, or a CPU tensor
            without ``TRITON_INTERPRET=1``).

    Example:
        >>> kappa = torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64, requires_grad=True)
        >>> log_vmf_normalizer(kappa, 3)  # C_3(kappa) = kappa / (4 pi sinh kappa)
        tensor([ -2.5310,  -2.6925, -97.2327], dtype=torch.float64, grad_fn=...)
    """
    _check(kappa, p, mode)
    _check_backend(backend)
    return _log_vmf_normalizer_op(kappa, p, mode, backend)


def vmf_mean_resultant_length(kappa: torch.Tensor, p: int, *, backend: str = "auto") -> torch.Tensor:
    """A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa) = -d/dkappa log C_p(kappa), in [0, 1).

    The expected cosine between a vMF sample and its mean direction. Same argument rules, backends
    and accuracy as ``log_vmf_normalizer(mode="exact")``; not differentiable (use
    ``vmf_head.special.bessel_iv_ratio`` for the Bessel ratio at a general order).
    """
    _check(kappa, p, "exact")
    _check_backend(backend)
    return -_log_vmf_normalizer_grad_op(kappa.detach(), p, "exact", backend)


def prototype_log_normalizer(
    weight_or_norms: torch.Tensor,
    tau: float,
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
        tau: the temperature of the branch, a positive Python number (student 0.1; the teacher's
            scheduled value for the current epoch). Not differentiated.
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
        TypeError: weight_or_norms is not a real floating tensor, or tau is not a real number.
        ValueError: weight_or_norms is not 1-D or 2-D, tau <= 0 or not finite, p is missing, < 2
            or disagrees with W.shape[1], or mode or backend is unknown.
        RuntimeError: ``backend="triton"`` where the kernels cannot run.

    Example:
        >>> W = torch.randn(65536, 256)
        >>> correction = prototype_log_normalizer(W, 0.1)  # (65536,), added to the student logits
    """
    weight = check_argument("weight_or_norms", weight_or_norms)
    if weight.is_complex():
        raise TypeError("weight_or_norms must be real")
    if weight.dim() not in (1, 2):
        raise ValueError(
            f"weight_or_norms must be a (K, p) prototype matrix or (K,) norms, got shape {tuple(weight.shape)}"
        )
    if isinstance(tau, bool) or not isinstance(tau, _REAL):
        raise TypeError(f"tau must be a positive Python number, got {type(tau).__name__}")
    if not 0 < tau < math.inf:  # (NaN fails too; math.isfinite would break torch.compile graphs)
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    # A (K, 1) matrix cannot hold prototypes of a sphere (p >= 2): it is weight_g's layout of norms.
    holds_norms = weight.dim() == 1 or weight.shape[1] == 1
    if holds_norms and p is None:
        raise ValueError("p is required when weight_or_norms holds norms g (shape (K,) or (K, 1))")
    if not holds_norms:
        if p is None:
            p = weight.shape[1]
        elif p != weight.shape[1]:
            raise ValueError(f"p = {p} disagrees with the prototype matrix of shape {tuple(weight.shape)}")
    _check_p_mode(p, mode)
    _check_backend(backend)
    return _prototype_op(weight, tau, p, mode, backend)
