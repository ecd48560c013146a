"""Modified Bessel function of the first kind in log space, and the ratio I_{nu+1}/I_nu.

Plain PyTorch, any device, no autograd of its own (the autograd layer lives in
``vmf_head.normalizer``). Orders are Python numbers (one order per call, as in a vMF model where the
order is fixed by the dimension); arguments are tensors. All arithmetic is float64 whatever the
input dtype; the result is cast back. The float64 tolerance is 1e-16 (relative to the terms kept),
half and single precision inputs use a cheaper 1e-10 that is still far below their own rounding.

Algorithm (one branch for every argument, so there is no seam in x):

1. Pick the cheapest integer shift M >= 0 and term count K such that the uniform asymptotic
   (Debye) expansion at order mu = nu + M is accurate to the tolerance for every x >= 0
   (DLMF 10.41.3, bounds from the first omitted Debye polynomial; see ``_debye.py``).
2. With r = sqrt(1 + (x/mu)^2) (so s = sqrt(mu^2 + x^2) = mu r), t = 1/r and
   U = 1 + sum_k u_k(t)/mu^k, DLMF 10.41.3 reads

       h_mu(x) := log(I_mu(x) / x^mu) = -G_mu(r) - a_mu,
       G_mu(r) = mu (log(1 + r) - r) + log(r / U(t)^2) / 2,   a_mu = mu log mu + log(2 pi mu) / 2,

   in which x = 0 is an ordinary point (r = t = 1) and the constant mu log mu is rounded once.
3. The scaled ratio Q_mu = I_{mu+1}/(x I_mu) follows from I'_mu (DLMF 10.41.4) and
   I_{mu+1} = I'_mu - (mu/x) I_mu (DLMF 10.29.2); writing V - U = (1 - t^2) W removes the
   cancellation at small x:   Q_mu = (1/(1 + r) + t W(t)/U(t)) / mu.
4. Downward recurrence (DLMF 10.29.1), stable for I because every term is positive:
   Q_{n} = 1/(x^2 Q_{n+1} + 2(n+1)), and h_nu = h_mu - log prod_{n=nu}^{mu-1} Q_n.

Every step works in place on a few buffers the size of x: on the CPU an element-wise op that
allocates its output costs about twice one that does not.
"""

from __future__ import annotations

import functools
import math

import torch

from .._validation import check_real, check_tensor
from . import _debye

TOL_FLOAT64 = 1e-16
TOL_REDUCED = 1e-10

# Above this argument (x/mu)^2 could overflow; there every quantity here has reached its large-x
# limit to float64 precision (log I_nu(x) = x - log(2 pi x)/2 - (4 nu^2 - 1)/(8 x) + ..., and the
# orders are below 1e6), so the public functions take the limits instead.
X_LARGE = 1e150

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def check_order(name: str, nu: object) -> float:
    nu = check_real(name, nu, low=0.0)
    return nu


def tolerance(dtype: torch.dtype) -> float:
    return TOL_FLOAT64 if dtype == torch.float64 else TOL_REDUCED


@functools.lru_cache(maxsize=512)
def _coefficient_tensors(
    nu: float, terms: int, tol: float, device: torch.device
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    # 0-d tensors made once per device: creating them per call costs more than the arithmetic.
    cu, cw = _debye.series_coefficients(nu, terms, tol)
    make = functools.partial(torch.tensor, dtype=torch.float64, device=device)
    return tuple(make(c) for c in cu), tuple(make(c) for c in cw)


@functools.lru_cache(maxsize=512)
def scalar(value: float, device: torch.device) -> torch.Tensor:
    """A cached 0-d float64 tensor, for the fused ops (addcmul) that take constants as tensors."""
    return torch.tensor(value, dtype=torch.float64, device=device)


def horner(coeffs: tuple[torch.Tensor, ...], t: torch.Tensor) -> torch.Tensor:
    """sum_j coeffs[j] t^(n-j) (highest power first), one in-place multiply-add per degree."""
    acc = torch.addcmul(coeffs[1], coeffs[0], t)
    for c in coeffs[2:]:
        torch.addcmul(c, acc, t, out=acc)
    return acc


def log_order_constant(mu: float) -> float:
    """a_mu = mu log mu + log(2 pi mu)/2, the x-independent part of -h_mu (mu > 0)."""
    return mu * math.log(mu) + 0.5 * math.log(mu) + _HALF_LOG_2PI


class Debye:
    """The pieces of the uniform expansion at order ``mu > 0`` for float64 arguments ``0 <= x <= X_LARGE``:
    ``r = sqrt(1 + (x/mu)^2)``, ``t = 1/r`` and ``U(t)``.

    ``log_terms`` and ``log_r_over_u2`` are the last use of an instance: they write into the
    buffers of t and U (on the CPU an element-wise op that allocates its output costs about twice
    one that does not)."""

    def __init__(self, mu: float, terms: int, tol: float, x: torch.Tensor):
        self.mu = mu
        self.r = torch.addcmul(scalar(1.0, x.device), x, x, value=1.0 / (mu * mu)).sqrt_()
        self.t = torch.reciprocal(self.r)
        self.coeffs_u, self.coeffs_w = _coefficient_tensors(mu, terms, tol, x.device)
        self.u = horner(self.coeffs_u, self.t)

    def log_r_over_u2(self) -> torch.Tensor:
        """log(r / U^2), in U's buffer (U is gone afterwards)."""
        return torch.div(self.r, self.u.mul_(self.u), out=self.u).log_()

    def log_terms(self, const: float) -> torch.Tensor:
        """G_mu(r) + const = mu (log(1 + r) - r + log(r / U^2) / (2 mu)) + const, in t's buffer
        (h_mu = -G_mu - a_mu). The last use of the instance."""
        out = torch.add(self.r, 1.0, out=self.t).log_().sub_(self.r).add_(self.log_r_over_u2(), alpha=0.5 / self.mu)
        device = out.device
        return torch.addcmul(scalar(const, device), out, scalar(self.mu, device), out=out)

    def scaled_ratio(self) -> torch.Tensor:
        """Q_mu(x) = I_{mu+1}(x) / (x I_mu(x)) = (1/(1 + r) + t W(t)/U(t)) / mu, a new tensor."""
        q = horner(self.coeffs_w, self.t).mul_(self.t).div_(self.u)
        return q.add_(torch.add(self.r, 1.0).reciprocal_()).mul_(1.0 / self.mu)


def downward(nu: float, shift: int, q: torch.Tensor, x: torch.Tensor, want_log: bool):
    """Recur Q from order nu + shift down to nu (DLMF 10.29.1): Q_n = 1/(x^2 Q_{n+1} + 2(n+1)).

    Returns Q_nu and, if ``want_log``, log prod_{n=nu}^{nu+shift-1} Q_n. Each factor is
    accumulated as Q_n (1 + x), which lies in [1/(2n+2), 2] for every x >= 0, so the product
    neither under- nor overflows whatever the argument; shift log(1 + x), of the same rounded 1 + x,
    is taken off at the end."""
    x2 = x * x
    x1 = torch.add(x, 1.0)
    prod = torch.ones_like(x) if want_log else None
    for j in range(shift - 1, -1, -1):
        q = torch.addcmul(scalar(2.0 * (nu + j + 1), q.device), x2, q, out=q).reciprocal_()
        if want_log:
            prod.mul_(q).mul_(x1)
    if not want_log:
        return q, None
    return q, prod.log_().sub_(x1.log_(), alpha=shift)


def neg_log_bessel_iv_scaled(nu: float, x: torch.Tensor, tol: float, offset: float = 0.0) -> torch.Tensor:
    """offset - h_nu(x) = offset - log(I_nu(x) / x^nu) for float64 ``0 <= x <= X_LARGE`` (a new
    tensor; finite at x = 0). The offset is added as part of a constant the expansion adds anyway."""
    shift, terms = _debye.shifted_order(nu, tol)
    mu = nu + shift
    d = Debye(mu, terms, tol, x)
    if not shift:
        return d.log_terms(offset + log_order_constant(mu))
    _, log_prod = downward(nu, shift, d.scaled_ratio(), x, want_log=True)
    return d.log_terms(offset + log_order_constant(mu)).add_(log_prod)


def bessel_iv_scaled_ratio(nu: float, x: torch.Tensor, tol: float) -> torch.Tensor:
    """Q_nu(x) = I_{nu+1}(x) / (x I_nu(x)) for float64 ``0 <= x <= X_LARGE``; equals 1/(2 nu + 2) at x = 0."""
    shift, terms = _debye.shifted_order(nu, tol)
    q = Debye(nu + shift, terms, tol, x).scaled_ratio()
    if shift:
        q, _ = downward(nu, shift, q, x, want_log=False)
    return q


def _domain(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copy of x, and x clamped to [0, X_LARGE] (entries outside are replaced afterwards by
    ``finish_domain``)."""
    x64 = x.to(torch.float64)
    return x64, x64.clamp(0.0, X_LARGE)


def finish_domain(out: torch.Tensor, raw: torch.Tensor, at_large: torch.Tensor | float) -> torch.Tensor:
    """``out`` computed at ``raw`` clamped to [0, X_LARGE], with the rest of the real line mapped:
    ``at_large`` (the large-argument limit, exact to float64 there) above X_LARGE, NaN below 0 and
    at NaN (as torch's own functions do outside their domain)."""
    out = torch.where(raw > X_LARGE, at_large, out)
    return out.masked_fill_(~(raw >= 0), math.nan)


def _log_bessel_iv(nu: float, x: torch.Tensor) -> torch.Tensor:
    raw, x64 = _domain(x)
    tol = tolerance(x.dtype)
    out = torch.xlogy(x64.new_tensor(nu), x64).sub_(neg_log_bessel_iv_scaled(nu, x64, tol))
    # log I_nu(x) = x - log(2 pi x)/2 to float64 precision above X_LARGE (+inf at +inf).
    finite = raw.clamp_max(torch.finfo(torch.float64).max)
    # The limit at 0 exactly (the shifted expansion leaves ~1e-14 there for small orders).
    out = torch.where(raw == 0, 0.0 if nu == 0 else -math.inf, out)
    return finish_domain(out, raw, raw - 0.5 * torch.log(finite) - _HALF_LOG_2PI).to(x.dtype)


def _bessel_iv_ratio(nu: float, x: torch.Tensor) -> torch.Tensor:
    raw, x64 = _domain(x)
    out = x64 * bessel_iv_scaled_ratio(nu, x64, tolerance(x.dtype))
    # R < 1 for every finite x; the rounding of x Q can pass 1 at huge x, the clamp keeps R in [0, 1].
    return finish_domain(out.clamp_max_(1.0), raw, 1.0).to(x.dtype)


def _log_bessel_iv_slope(nu: float, x: torch.Tensor) -> torch.Tensor:
    """d/dx log I_nu(x) = nu/x + I_{nu+1}(x)/I_nu(x)  (DLMF 10.29.2)."""
    ratio = bessel_iv_ratio(nu, x)
    return ratio if nu == 0 else ratio + nu / x


def _bessel_iv_ratio_slope(nu: float, x: torch.Tensor) -> torch.Tensor:
    """d/dx R = 1 - R^2 - (2 nu + 1) R / x with R = I_{nu+1}/I_nu (DLMF 10.29.2 for both orders);
    R / x = 1/(2 nu + 2) at x = 0."""
    ratio = bessel_iv_ratio(nu, x)
    over_x = torch.where(x == 0, 1.0 / (2.0 * nu + 2.0), ratio / x)
    return 1.0 - ratio * ratio - (2.0 * nu + 1.0) * over_x


class _Elementwise(torch.autograd.Function):
    """``value(nu, x)`` with the derivative ``slope(nu, x)``, itself built from the differentiable
    public functions, so the result is differentiable to any order."""

    @staticmethod
    def forward(ctx, x, nu, value, slope):
        ctx.save_for_backward(x)
        ctx.nu, ctx.slope = nu, slope
        return value(nu, x.detach())

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ctx.slope(ctx.nu, x), None, None, None


def log_bessel_iv(nu: float, x: torch.Tensor) -> torch.Tensor:
    """log I_nu(x), elementwise.

    Args:
        nu: order, a real number >= 0 (integer or not).
        x: argument, a floating tensor of any shape and device; float16/bfloat16/float32 inputs are
            computed in float64 and returned in their own dtype.

    Returns:
        ``log I_nu(x)``, same shape and dtype as ``x``. ``x = 0`` gives 0 for ``nu = 0`` and
        ``-inf`` otherwise; ``x = +inf`` gives ``+inf``; negative or NaN ``x`` gives NaN (as
        ``torch.log`` does for values outside its domain). Differentiable in ``x`` (any order):
        ``d/dx log I_nu(x) = nu/x + I_{nu+1}(x)/I_nu(x)``.

    Accurate to about 1e-15 relative in float64 for every x >= 0 and every order, including
    arguments where ``scipy.special.iv`` over- or underflows (e.g. nu = 5000, x = 10).
    """
    nu = check_order("nu", nu)
    x = check_tensor("x", x)
    return _Elementwise.apply(x, nu, _log_bessel_iv, _log_bessel_iv_slope)


def bessel_iv_ratio(nu: float, x: torch.Tensor) -> torch.Tensor:
    """I_{nu+1}(x) / I_nu(x), elementwise, in [0, 1].

    Args:
        nu: order, a real number >= 0.
        x: argument tensor (floating, any shape and device).

    Returns:
        The ratio, same shape and dtype as ``x``; 0 at x = 0, 1 at x = +inf (and where it rounds to 1),
        NaN for negative or NaN ``x``. Differentiable in ``x`` (any order):
        ``dR/dx = 1 - R^2 - (2 nu + 1) R / x``. For a vMF distribution on S^{p-1} this is the mean
        resultant length A_p(kappa) with ``nu = p/2 - 1`` (see ``vmf_mean_resultant_length``).
    """
    nu = check_order("nu", nu)
    x = check_tensor("x", x)
    return _Elementwise.apply(x, nu, _bessel_iv_ratio, _bessel_iv_ratio_slope)
