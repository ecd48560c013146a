"""The von Mises-Fisher log-normaliser log C_p(kappa) and mean resultant length A_p(kappa).

    C_p(kappa) = kappa^nu / ((2 pi)^(p/2) I_nu(kappa)),   nu = p/2 - 1,
    log C_p(kappa) = -(p/2) log(2 pi) - log(I_nu(kappa) / kappa^nu),
    d/dkappa log C_p(kappa) = -A_p(kappa) = -I_{p/2}(kappa) / I_{p/2-1}(kappa).

Plain PyTorch forward computations without autograd; ``vmf_head.normalizer`` wraps them in the
differentiable public function. Inputs are float64 tensors with 0 <= kappa <= ``bessel.X_LARGE``
(the public layer maps the rest of the real line).

Near its zero kappa_0, log C_p is a small difference of terms as large as s = sqrt(nu^2 + kappa^2)
(p = 65536: kappa_0 = 3.6e5). Every rounding of a term costs 1e-16 of its size, so in float64 the
value there is off by about 1e-16 s in absolute terms (6e-11 at p = 65536), while the library
promises 1e-12 where |log C_p| < 1. For such p the large terms are written relative to an anchor
kappa_0 near the zero (see ``log_normalizer_exact``): the constant part is computed once in 40-digit
decimal arithmetic, and what is left at run time is small near kappa_0.
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal, localcontext

import torch

from . import _debye
from .bessel import TOL_FLOAT64, Debye, bessel_iv_scaled_ratio, downward, neg_log_bessel_iv_scaled

MODES = ("exact", "approx")
"""How log C_p is computed: ``exact`` (to float64 rounding) or ``approx`` (the seed's large-nu formula)."""

_LOG_2PI = math.log(2.0 * math.pi)
_PI_40 = Decimal("3.141592653589793238462643383279502884197169399")

# Anchor where the plain form's rounding near the zero, about 2^-53 s_0 with s_0 = sqrt(nu^2 +
# kappa_0^2) (measured against mpmath: 4.2e-14 at p = 256, 3.0e-13 at p = 1024, 6.0e-11 at
# p = 65536), exceeds this multiple of the tolerance: 1e-13 in float64, so p >= 512 is anchored and
# the plain form keeps a 20x margin to 1e-12; float32 inputs (1e-7) never need an anchor.
_ANCHOR_FACTOR = 1000.0


def _plain(kappa: torch.Tensor, p: int, tol: float) -> torch.Tensor:
    return neg_log_bessel_iv_scaled(0.5 * p - 1.0, kappa, tol, offset=-0.5 * p * _LOG_2PI)


def log_normalizer_at_zero(p: int) -> float:
    """log C_p(0) = log Gamma(p/2) - log 2 - (p/2) log pi, minus the log area of the sphere S^(p-1)."""
    return math.lgamma(0.5 * p) - math.log(2.0) - 0.5 * p * math.log(math.pi)


def leading_term(kappa: float, p: int) -> float:
    """``log_normalizer_approx`` at one Python float (no tensors: for host-side decisions)."""
    nu = 0.5 * p - 1.0
    s = math.hypot(nu, kappa)
    return nu * math.log(nu + s) - s + 0.5 * math.log(s) - (nu + 0.5) * _LOG_2PI


def sign_change(f, p: int) -> float | None:
    """The kappa > 0 at which a decreasing ``f`` (log C_p or an approximation of it) changes sign, by
    bisection down to adjacent float64s; None where log C_p(0) <= 0 (p <= 19: log C_p decreases, so
    it is then negative everywhere)."""
    if log_normalizer_at_zero(p) <= 0:
        return None
    lo, hi = 0.0, float(p)
    while f(hi) > 0:
        lo, hi = hi, 2.0 * hi
    while (mid := 0.5 * (lo + hi)) not in (lo, hi):
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return hi


@functools.cache
def zero(p: int, tol: float = TOL_FLOAT64) -> float | None:
    """The kappa > 0 at which log C_p changes sign (None where it has none), by bisection on the
    plain form: accurate to its rounding there (about 1e-16 kappa_0 in log C_p, the same in kappa)."""
    return sign_change(lambda k: _plain(torch.tensor([k], dtype=torch.float64), p, tol).item(), p)


@functools.cache
def anchor(p: int, tol: float) -> tuple[float, float, float] | None:
    """(kappa_0, r_0, b_p) for the anchored form of log C_p, or None where the plain form suffices.

    With the expansion's order mu = nu + M (``_debye.shifted_order``): kappa_0 = ``zero(p, tol)``,
    r_0 = sqrt(1 + (kappa_0/mu)^2) and b_p = a_mu - (p/2) log(2 pi) + mu (log(1 + r_0) - r_0), the
    large terms of log C_p(kappa_0), computed in 40-digit decimal arithmetic (r_0 returned rounded: it
    only enters denominators). The rule compares the rounding of those terms near the zero, about
    2^-53 sqrt(mu^2 + kappa_0^2), with the budget; it is the same for every shift M."""
    nu = 0.5 * p - 1.0
    mu = nu + _debye.shifted_order(nu, tol)[0]
    kappa0 = zero(p, tol)
    # No zero, a zero at small kappa where the terms are small, or rounding within the budget:
    if kappa0 is None or math.hypot(mu, kappa0) * 2.0**-53 <= _ANCHOR_FACTOR * tol:
        return None
    with localcontext() as ctx:
        ctx.prec = 40
        m, k = Decimal(mu), Decimal(kappa0)
        r0 = (1 + (k / m) ** 2).sqrt()
        log_2pi = (2 * _PI_40).ln()
        b = m * m.ln() + (2 * _PI_40 * m).ln() / 2 - Decimal(p) / 2 * log_2pi + m * ((1 + r0).ln() - r0)
    return kappa0, float(r0), float(b)


def log_normalizer_exact(kappa: torch.Tensor, p: int, tol: float) -> torch.Tensor:
    """log C_p(kappa) for float64 ``kappa``; at 0 it is log Gamma(p/2) - log 2 - (p/2) log pi.

    Plain form (every p): -(p/2) log(2 pi) - h_nu(kappa) with h_nu from ``bessel``. Anchored form,
    where ``anchor(p, tol)`` gives (kappa_0, r_0, b_p): with the expansion's order mu = nu + M,
    r = sqrt(1 + (kappa/mu)^2) and the M-step product of the downward recurrence P (``bessel``),

        log C_p(kappa) = b_p + mu (log1p(D / (1 + r_0)) - D) + log(r / U(1/r)^2) / 2 + log P,
        D = r - r_0 = (kappa - kappa_0)(kappa + kappa_0) / (mu^2 (r + r_0)),

    the same quantity, but with kappa - kappa_0 exact and D small near the zero, so the terms
    that are rounded there are small too. Away from kappa_0 it is as accurate as the plain form
    (its terms are then of the size of the value)."""
    anchored = anchor(p, tol)
    if anchored is None:
        return _plain(kappa, p, tol)
    kappa0, r0, b = anchored
    nu = 0.5 * p - 1.0
    shift, terms = _debye.shifted_order(nu, tol)
    mu = nu + shift
    d = Debye(mu, terms, tol, kappa)
    log_prod = downward(nu, shift, d.scaled_ratio(), kappa, want_log=True)[1] if shift else None
    # mu^2 D, then mu log1p(D / (1 + r_0)) - mu D + b_p + log(r / U^2) / 2
    diff = torch.sub(kappa, kappa0).mul_(torch.add(kappa, kappa0)).div_(torch.add(d.r, r0))
    out = torch.mul(diff, 1.0 / (mu * mu * (1.0 + r0))).log1p_().mul_(mu).sub_(diff, alpha=1.0 / mu).add_(b)
    out.add_(d.log_r_over_u2(), alpha=0.5)
    return out if log_prod is None else out.add_(log_prod)


def mean_resultant_length(kappa: torch.Tensor, p: int, tol: float) -> torch.Tensor:
    """A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa) in [0, 1] for float64 ``kappa`` (1 only where
    the ratio rounds to it; the clamp removes the rounding of kappa Q above 1 at huge kappa)."""
    return bessel_iv_scaled_ratio(0.5 * p - 1.0, kappa, tol).mul_(kappa).clamp_max_(1.0)


def log_normalizer_approx(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """Leading term of the uniform expansion (the seed's large-nu approximation):

        nu log(nu + s) - s + (1/2) log s - (nu + 1/2) log(2 pi),   s = sqrt(nu^2 + kappa^2).

    The constant is the one that makes it exact as kappa -> inf: approx - exact = log U(t), with
    U(t) = 1 + sum_k u_k(t)/nu^k and t = nu/s, which is about u_1(t)/nu = t(3 - 5t^2)/(24 nu):
    -1/(12 nu) at kappa = 0, +1/(12 sqrt(5) nu) at kappa = 2 nu, 0 as kappa -> inf. Its spread over
    kappa, about (1 + 1/sqrt(5))/(12 nu) = 0.24/p, is the error that does not cancel in a softmax over
    prototypes of equal p. Requires p >= 3 (at p = 2 the term diverges at kappa = 0).
    """
    nu = 0.5 * p - 1.0
    s = torch.hypot(kappa, kappa.new_tensor(nu))
    return nu * torch.log(nu + s) - s + 0.5 * torch.log(s) - (nu + 0.5) * _LOG_2PI


def log_normalizer_approx_derivative(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """Exact derivative of ``log_normalizer_approx``: -kappa/(nu + s) + kappa/(2 s^2)."""
    nu = 0.5 * p - 1.0
    s = torch.hypot(kappa, kappa.new_tensor(nu))
    return kappa * (0.5 / (s * s) - 1.0 / (nu + s))
