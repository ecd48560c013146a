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
2. With s = sqrt(mu^2 + x^2), t = mu/s and U = 1 + sum_k u_k(t)/mu^k,

       h_mu(x) := log(I_mu(x) / x^mu) = s - mu log(mu + s) - log(2 pi s)/2 + log U

   which is exact DLMF 10.41.3 rewritten so that x = 0 is an ordinary point (there t = 1, s = mu).
3. The scaled ratio Q_mu = I_{mu+1}/(x I_mu) follows from I'_mu (DLMF 10.41.4) and
   I_{mu+1} = I'_mu - (mu/x) I_mu (DLMF 10.29.2); writing V - U = (1 - t^2) W removes the
   cancellation at small x:   Q_mu = 1/(s + mu) + W(t)/(s U(t)).
4. Downward recurrence (DLMF 10.29.1), stable for I because every term is positive:
   Q_{n} = 1/(x^2 Q_{n+1} + 2(n+1)), and h_nu = h_mu - log prod_{n=nu}^{mu-1} Q_n.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _debye

TOL_FLOAT64 = 1e-16
TOL_REDUCED = 1e-10

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def check_order(name: str, nu: float) -> float:
    if isinstance(nu, bool) or not isinstance(nu, (int, float)):
        raise TypeError(f"{name} must be a real Python number >= 0, got {type(nu).__name__}")
    nu = float(nu)
    if not (nu >= 0.0 and math.isfinite(nu)):
        raise ValueError(f"{name} must be a finite number >= 0, got {nu}")
    return nu


def check_argument(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    return x


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


def horner(coeffs: tuple[torch.Tensor, ...], t: torch.Tensor) -> torch.Tensor:
    """sum_j coeffs[j] t^(n-j) (highest power first), one fused multiply-add per degree."""
    acc = torch.addcmul(coeffs[1], coeffs[0], t)
    for c in coeffs[2:]:
        acc = torch.addcmul(c, acc, t)
    return acc


class _Debye:
    """The pieces of the uniform expansion at order ``mu`` for float64 arguments ``x >= 0``."""

    def __init__(self, mu: float, terms: int, tol: float, x: torch.Tensor, x2: torch.Tensor):
        self.mu = mu
        self.s = torch.sqrt(x2 + mu * mu)
        self.t = mu / self.s
        self.coeffs_u, self.coeffs_w = _coefficient_tensors(mu, terms, tol, x.device)
        self.u = horner(self.coeffs_u, self.t)

    def log_scaled(self) -> torch.Tensor:
        """h_mu(x) = log(I_mu(x) / x^mu) = s - mu log(mu + s) - log(2 pi s / U^2)/2."""
        s = self.s
        out = torch.add(s, torch.log(s + self.mu), alpha=-self.mu)
        return out.sub_(torch.log(s / self.u.square()), alpha=0.5).sub_(_HALF_LOG_2PI)

    def scaled_ratio(self) -> torch.Tensor:
        """Q_mu(x) = I_{mu+1}(x) / (x I_mu(x)) = 1/(s + mu) + W/(s U)."""
        w = horner(self.coeffs_w, self.t)
        return torch.reciprocal(self.s + self.mu).add_(w / (self.s * self.u))


def _downward(nu: float, shift: int, q: torch.Tensor, x: torch.Tensor, x2: torch.Tensor, want_log: bool):
    """Recur Q from order nu + shift down to nu (DLMF 10.29.1): Q_n = 1/(x^2 Q_{n+1} + 2(n+1)).

    Returns Q_nu and, if ``want_log``, log prod_{n=nu}^{nu+shift-1} Q_n. Each factor is
    accumulated as Q_n (1 + x), which lies in [1/(2n+2), 2] for every x >= 0, so the product
    neither under- nor overflows whatever the argument; shift log1p(x) is taken off at the end."""
    prod = None
    x1 = 1.0 + x
    for j in range(shift - 1, -1, -1):
        q = torch.reciprocal(torch.addcmul(q.new_tensor(2.0 * (nu + j + 1)), x2, q))
        if want_log:
            prod = q * x1 if prod is None else prod.mul_(q).mul_(x1)
    if not want_log:
        return q, None
    return q, torch.log(prod).sub_(torch.log1p(x), alpha=shift)


def log_bessel_iv_scaled(nu: float, x: torch.Tensor, tol: float) -> torch.Tensor:
    """h_nu(x) = log(I_nu(x) / x^nu) for float64 ``x >= 0``; finite at x = 0."""
    shift, terms = _debye.shifted_order(nu, tol)
    x2 = x * x
    d = _Debye(nu + shift, terms, tol, x, x2)
    h = d.log_scaled()
    if shift:
        _, log_prod = _downward(nu, shift, d.scaled_ratio(), x, x2, want_log=True)
        h = h.sub_(log_prod)
    return h


def bessel_iv_scaled_ratio(nu: float, x: torch.Tensor, tol: float) -> torch.Tensor:
    """Q_nu(x) = I_{nu+1}(x) / (x I_nu(x)) for float64 ``x >= 0``; equals 1/(2 nu + 2) at x = 0."""
    shift, terms = _debye.shifted_order(nu, tol)
    x2 = x * x
    q = _Debye(nu + shift, terms, tol, x, x2).scaled_ratio()
    if shift:
        q, _ = _downward(nu, shift, q, x, x2, want_log=False)
    return q


def _domain(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copy of x with negative entries replaced by 0 (they are set to NaN afterwards) and
    +inf by the largest float64 (their limits are set afterwards)."""
    x64 = x.to(torch.float64)
    return x64, torch.nan_to_num(x64.clamp_min(0.0), posinf=torch.finfo(torch.float64).max)


def log_bessel_iv(nu: float, x: torch.Tensor) -> torch.Tensor:
    """log I_nu(x), elementwise.

    Args:
        nu: order, a Python number >= 0 (integer or not).
        x: argument, a floating tensor of any shape and device; float16/bfloat16/float32 inputs are
            computed in float64 and returned in their own dtype.

    Returns:
        ``log I_nu(x)``, same shape and dtype as ``x``. ``x = 0`` gives 0 for ``nu = 0`` and
        ``-inf`` otherwise; ``x = +inf`` gives ``+inf``; negative or NaN ``x`` gives NaN (as
        ``torch.log`` does for values outside its domain).

    Accurate to about 1e-15 relative in float64 for every x >= 0 and every order, including
    arguments where ``scipy.special.iv`` over- or underflows (e.g. nu = 5000, x = 10).
    """
    nu = check_order("nu", nu)
    x = check_argument("x", x)
    raw, x64 = _domain(x)
    tol = tolerance(x.dtype)
    out = log_bessel_iv_scaled(nu, x64, tol) + torch.xlogy(x64.new_tensor(nu), x64)
    out = torch.where(raw >= 0, out, torch.nan)
    out = torch.where(raw == math.inf, math.inf, out)
    return out.to(x.dtype)


def bessel_iv_ratio(nu: float, x: torch.Tensor) -> torch.Tensor:
    """I_{nu+1}(x) / I_nu(x), elementwise, in [0, 1).

    Args:
        nu: order, a Python number >= 0.
        x: argument tensor (floating, any shape and device).

    Returns:
        The ratio, same shape and dtype as ``x``; 0 at x = 0, 1 at x = +inf, NaN for negative or NaN
        ``x``. For a vMF distribution on S^{p-1} this is the mean resultant length A_p(kappa) with
        ``nu = p/2 - 1`` (see ``vmf_mean_resultant_length``).
    """
    nu = check_order("nu", nu)
    x = check_argument("x", x)
    raw, x64 = _domain(x)
    out = x64 * bessel_iv_scaled_ratio(nu, x64, tolerance(x.dtype))
    out = torch.where(raw >= 0, out, torch.nan)
    out = torch.where(raw == math.inf, 1.0, out)
    return out.to(x.dtype)
