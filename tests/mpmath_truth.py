"""Ground truth for the tests of log I_nu, I_{nu+1}/I_nu, log C_p and A_p, in mpmath at 50 digits.

Two sources, chosen by order (a test helper, not a test module):

* ``mpmath.besseli`` (exact to the working precision) for nu < DEBYE_FROM. It is fast there for
  every argument up to 1e8 but fails to converge or takes seconds once both the order and the
  argument are in the thousands (nu = 4095, x = 3e4 already raises NoConvergence).
* From nu = DEBYE_FROM on, the uniform asymptotic (Debye) expansion, DLMF 10.41.3,

      log I_nu(x) = s + nu log(x / (nu + s)) - log(2 pi s) / 2 + log sum_k u_k(t) / nu^k,
      s = sqrt(nu^2 + x^2),  t = nu / s,

  summed in mpmath until the terms fall below 1e-55 (at least MIN_TERMS terms, about 18 at nu = 500),
  with Debye polynomials generated here by the recurrence DLMF 10.41.10 in 100-digit arithmetic.
  This code shares nothing with ``vmf_head.special._debye``; ``test_special_bessel.py`` checks it
  against ``mpmath.besseli`` where both run.

Everything is cached (``functools.lru_cache``): the tests ask for the same points repeatedly.
"""

from __future__ import annotations

import functools
import math

import mpmath

DPS = 50
DEBYE_FROM = 500.0
MIN_TERMS = 10
_MAX_TERMS = 60
_POLY_DPS = 100


# --- polynomials as tuples of mpf coefficients, ascending powers of t -----------------------------


def _add(a, b):
    n = max(len(a), len(b))
    return tuple((a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n))


def _mul(a, b):
    out = [mpmath.mpf(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return tuple(out)


def _derivative(a):
    return tuple(i * c for i, c in enumerate(a))[1:] or (mpmath.mpf(0),)


def _integral(a):
    """Antiderivative vanishing at t = 0."""
    return (mpmath.mpf(0), *tuple(c / (i + 1) for i, c in enumerate(a)))


@functools.cache
def debye_polynomials(n: int) -> tuple[tuple, ...]:
    """u_0 .. u_n of DLMF 10.41.10: u_0 = 1,
    u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds."""
    with mpmath.workdps(_POLY_DPS):
        half_t2_1mt2 = (0, 0, mpmath.mpf(1) / 2, 0, -mpmath.mpf(1) / 2)  # t^2 (1 - t^2) / 2
        eighth_1m5t2 = (mpmath.mpf(1) / 8, 0, -mpmath.mpf(5) / 8)  # (1 - 5 t^2) / 8
        polys = [(mpmath.mpf(1),)]
        for _ in range(n):
            u = polys[-1]
            nxt = _add(_mul(half_t2_1mt2, _derivative(u)), _integral(_mul(eighth_1m5t2, u)))
            polys.append(nxt[: max(i for i, c in enumerate(nxt) if c) + 1])  # drop zero high powers
        return tuple(polys)


def debye_log_bessel_iv(nu: float, x: float, min_terms: int = MIN_TERMS):
    """log I_nu(x) from the uniform expansion (see the module docstring); for large orders only."""
    with mpmath.workdps(DPS + 10):
        nu_, x_ = mpmath.mpf(nu), mpmath.mpf(x)
        s = mpmath.sqrt(nu_ * nu_ + x_ * x_)
        t = nu_ / s
        total, power = mpmath.mpf(1), mpmath.mpf(1)
        for k, u in enumerate(debye_polynomials(_MAX_TERMS)[1:], start=1):
            power /= nu_
            term = mpmath.polyval(list(reversed(u)), t) * power
            total += term
            if k >= min_terms and abs(term) < mpmath.mpf(10) ** (-DPS - 5):
                break
        else:
            raise ValueError(f"the Debye expansion does not reach {DPS} digits at order {nu}")
        return +(s + nu_ * mpmath.log(x_ / (nu_ + s)) - mpmath.log(2 * mpmath.pi * s) / 2 + mpmath.log(total))


@functools.cache
def log_bessel_iv(nu: float, x: float):
    """log I_nu(x) for nu >= 0, x >= 0 (x = 0 gives 0 for nu = 0, -inf otherwise)."""
    if x == 0:
        return mpmath.mpf(0) if nu == 0 else mpmath.mpf("-inf")
    if nu >= DEBYE_FROM:
        return debye_log_bessel_iv(nu, x)
    with mpmath.workdps(DPS):
        return mpmath.log(mpmath.besseli(nu, x))


@functools.cache
def bessel_ratio(nu: float, x: float):
    """I_{nu+1}(x) / I_nu(x)."""
    if x == 0:
        return mpmath.mpf(0)
    with mpmath.workdps(DPS):
        return mpmath.exp(log_bessel_iv(nu + 1, x) - log_bessel_iv(nu, x))


@functools.cache
def log_normalizer(p: int, kappa: float):
    """log C_p(kappa) = nu log kappa - (p/2) log(2 pi) - log I_nu(kappa); at kappa = 0 the limit
    log Gamma(p/2) - log 2 - (p/2) log pi."""
    with mpmath.workdps(DPS):
        half_p = mpmath.mpf(p) / 2
        if kappa == 0:
            return mpmath.loggamma(half_p) - mpmath.log(2) - half_p * mpmath.log(mpmath.pi)
        nu = half_p - 1
        return nu * mpmath.log(kappa) - half_p * mpmath.log(2 * mpmath.pi) - log_bessel_iv(p / 2 - 1, kappa)


def mean_resultant_length(p: int, kappa: float):
    """A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa)."""
    return bessel_ratio(p / 2 - 1, kappa)


def error(ours: float, truth) -> float:
    """|ours - truth| / max(1, |truth|), the error measure of the issue (inf if ours is not finite)."""
    if not mpmath.isfinite(ours):
        return math.inf
    with mpmath.workdps(DPS):
        return float(abs(mpmath.mpf(ours) - truth) / max(1, abs(truth)))
