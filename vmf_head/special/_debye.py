"""Debye polynomials of the uniform asymptotic expansion of I_nu (DLMF 10.41).

For large order,

    I_nu(nu z) ~ exp(nu eta) / ((2 pi nu)^(1/2) (1 + z^2)^(1/4)) * sum_k u_k(t) / nu^k      (DLMF 10.41.3)
    I'_nu(nu z) ~ (1 + z^2)^(1/4) exp(nu eta) / ((2 pi nu)^(1/2) z) * sum_k v_k(t) / nu^k  (DLMF 10.41.4)

with t = 1/sqrt(1 + z^2). The u_k are generated exactly (rational arithmetic) by DLMF 10.41.10,

    u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds,

and v_k - u_k = t (t^2 - 1) (u_{k-1}/2 + t u_{k-1}') (DLMF 10.41.10, second line), which lets the
ratio I_{nu+1}/I_nu be written without cancellation (see ``bessel.py``).

Everything here runs once per (order, accuracy) and is cached; the per-element work is one or two
polynomial evaluations in t whose coefficients already contain the powers of 1/nu.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

# Upper bounds of max_{0<=t<=1} |u_k(t)| and of max |t (u_{k-1}/2 + t u_{k-1}')|, k = 1..MAX_TERMS,
# evaluated on a 401-point grid in 60-digit arithmetic and rounded up. They decide how many terms
# an order needs: the first omitted term bounds the truncation error.
_U_MAX = (
    0.084,
    0.033,
    0.017,
    0.021,
    0.021,
    0.041,
    0.066,
    0.171,
    0.382,
    1.24,
    3.56,
    13.8,
    48.2,
    218.0,
    898.0,
    4624.0,
    22005.0,
    1.28e5,
    6.86e5,
    4.41e6,
    2.66e7,
    1.88e8,
    1.25e9,
    9.61e9,
)
_W_MAX = (
    0.5,
    0.542,
    0.544,
    0.543,
    0.542,
    0.543,
    0.666,
    1.46,
    3.50,
    9.76,
    30.5,
    104.0,
    397.0,
    1588.0,
    7154.0,
    33131.0,
    1.71e5,
    9.00e5,
    5.25e6,
    3.08e7,
    2.01e8,
    1.31e9,
    9.28e9,
    6.62e10,
)
MAX_TERMS = len(_U_MAX) - 1

# Relative cost of one step of the downward recurrence (DLMF 10.29.1, 2-4 element-wise passes)
# against one more term of the expansion (after economisation a few more polynomial degrees across
# U and W), chosen by timing: at p = 3 (float64) the pair (M, K) = (19, 15) it picks takes 5.0 ms
# for 65,536 values against 6.3 ms for the (27, 12) that weights of 3 and 12 gave, and fewer
# recurrence steps also round less (worst error 4e-15 against 9e-15).
_STEP_COST, _TERM_COST = 3, 6
_MAX_SHIFT = 64


@functools.cache
def _u_polys(n: int) -> tuple[tuple[Fraction, ...], ...]:
    """Exact coefficients (ascending powers of t) of u_0 .. u_n."""
    polys = [(Fraction(1),)]
    for _ in range(n):
        u = polys[-1]
        nxt = [Fraction(0)] * (len(u) + 3)
        for j, c in enumerate(u):
            if j:  # t^2 (1 - t^2) u'(t) / 2
                nxt[j + 1] += j * c / 2
                nxt[j + 3] -= j * c / 2
            nxt[j + 1] += c / (8 * (j + 1))  # (1/8) int_0^t (1 - 5 s^2) u(s) ds
            nxt[j + 3] -= 5 * c / (8 * (j + 3))
        while nxt and nxt[-1] == 0:
            nxt.pop()
        polys.append(tuple(nxt))
    return tuple(polys)


def _w_poly(k: int) -> list[Fraction]:
    """Coefficients of w_k(t) = -t (u_{k-1}(t)/2 + t u_{k-1}'(t)), so that V - U = (1 - t^2) W."""
    u = _u_polys(k)[k - 1]
    w = [Fraction(0)] * (len(u) + 1)
    for j, c in enumerate(u):
        w[j + 1] -= c / 2 + j * c
    return w


def terms_needed(nu: float, tol: float) -> int | None:
    """Smallest K whose first omitted terms (u and w families) are below ``tol`` at order ``nu``;
    ``None`` when MAX_TERMS terms do not suffice."""
    # in logs: nu^(k + 1) underflows for tiny orders (nu = 1e-154)
    for k in range(1, MAX_TERMS + 1):
        if math.log(max(_U_MAX[k], _W_MAX[k])) - (k + 1) * math.log(nu) < math.log(tol):
            return k
    return None


@functools.cache
def shifted_order(nu: float, tol: float) -> tuple[int, int]:
    """(M, K): the cheapest integer shift M >= 0 and term count K such that the expansion at order
    nu + M reaches ``tol`` with K terms. Small orders cannot be reached by the expansion itself;
    they are recovered from order nu + M by M steps of the downward recurrence."""
    best = None
    for m in range(_MAX_SHIFT + 1):
        k = terms_needed(nu + m, tol) if nu + m > 0 else None
        if k is not None and (best is None or m * _STEP_COST + k * _TERM_COST < best[0]):
            best = (m * _STEP_COST + k * _TERM_COST, m, k)
    assert best is not None, "the expansion reaches any tolerance above 1e-20 at order 64"
    return best[1], best[2]


@functools.cache
def _shifted_chebyshev(n: int) -> tuple[tuple[int, ...], ...]:
    """Integer coefficients (ascending) of T_0(2t-1) .. T_n(2t-1), the Chebyshev basis on [0, 1]."""
    polys = [(1,), (-1, 2)]
    while len(polys) <= n:
        a, b = polys[-1], polys[-2]
        nxt = [0] * (len(a) + 1)
        for j, c in enumerate(a):  # T_{k+1} = 2 (2t - 1) T_k - T_{k-1}
            nxt[j] -= 2 * c
            nxt[j + 1] += 4 * c
        for j, c in enumerate(b):
            nxt[j] -= c
        polys.append(tuple(nxt))
    return tuple(polys[: n + 1])


def _economize(coeffs: list[Fraction], budget: float) -> list[Fraction]:
    """Drop the highest Chebyshev modes of a polynomial on [0, 1] while their total size stays
    within ``budget`` (|T_n| <= 1 there, so that is a bound on the change), exactly."""
    deg = len(coeffs) - 1
    basis = _shifted_chebyshev(deg)
    rest, cheb = list(coeffs), [Fraction(0)] * (deg + 1)
    for n in range(deg, -1, -1):
        cheb[n] = rest[n] / basis[n][n]
        for j, c in enumerate(basis[n]):
            rest[j] -= cheb[n] * c
    dropped, keep = Fraction(0), deg
    while keep > 0 and dropped + abs(cheb[keep]) <= budget:
        dropped += abs(cheb[keep])
        keep -= 1
    out = [Fraction(0)] * (keep + 1)
    for n in range(keep + 1):
        for j, c in enumerate(basis[n]):
            out[j] += cheb[n] * c
    return out


@functools.lru_cache(maxsize=256)
def series_coefficients(nu: float, terms: int, tol: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Float coefficients, highest power first (for Horner; at least two), of polynomials in t on [0, 1] within
    ``tol / 4`` of

        U(t) = 1 + sum_{k=1}^{K} u_k(t) / nu^k
        W(t) = sum_{k=1}^{K} w_k(t) / nu^k          (so that V - U = (1 - t^2) W)

    The sums are formed exactly, economised (the degree falls by about a third) and rounded once,
    so the only rounding left is Horner's.
    """
    u = _u_polys(terms)
    inv = Fraction(1) / Fraction(nu)
    deg = 3 * terms + 1
    s = [Fraction(0)] * (deg + 1)
    w = [Fraction(0)] * (deg + 1)
    s[0] = Fraction(1)
    for k in range(1, terms + 1):
        scale = inv**k
        for j, c in enumerate(u[k]):
            s[j] += c * scale
        for j, c in enumerate(_w_poly(k)):
            w[j] += c * scale
    budget = Fraction(tol) / 4
    return _at_least_linear(_economize(s, budget)), _at_least_linear(_economize(w, budget))


def _at_least_linear(coeffs: list[Fraction]) -> tuple[float, ...]:
    # Horner's loops start from two coefficients; at huge orders (p > 6e9) a sum shrinks to a constant.
    return tuple(float(c) for c in reversed(coeffs + [Fraction(0)] * (2 - len(coeffs))))
