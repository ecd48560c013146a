"""``python -m vmf_head accuracy``: the error of ``log_vmf_normalizer`` against mpmath, and where scipy fails.

For each dimension p the command evaluates, on kappa = 0 and a log-uniform grid over [1e-8, 1e8]
(plus kappa = p - 2, where approx mode's error peaks, and points around the zero of log C_p where
it has one), the worst error of

* ``exact`` mode in float64 and in float32 (bounds 1e-12 and 2e-6),
* the float64 gradient, i.e. -A_p(kappa) (bound 1e-10),
* ``approx`` mode: the spread max - min over kappa of (approx - truth), the part of its error that a
  softmax over prototypes with different kappa sees (a kappa-independent offset cancels there),
* scipy's formula ``nu log k - (p/2) log 2pi - log(ive(nu, k)) - k``: its worst error where finite
  and the kappa where it is inf/NaN.

Errors are ``|ours - truth| / max(1, |truth|)`` with the truth taken at the kappa the input holds
(grid points are float32 numbers, so one truth serves both precisions).

Ground truth (independent of the package's Debye-plus-recurrence algorithm and of the test suite's
reference, which uses ``mpmath.besseli`` and checks this one): the Poisson integral, DLMF 10.32.2,

    I_nu(x) = (x/2)^nu / (sqrt(pi) Gamma(nu + 1/2)) int_0^pi exp(x cos th) sin(th)^(2 nu) dth,

whose integrand is positive, so no cancellation at any order or argument. Differentiating under the
integral sign (with I'_nu = I_{nu+1} + (nu/x) I_nu, DLMF 10.29.2) gives the mean resultant length as
the mean of cos(th) under the same weight,

    A_p(kappa) = I_{nu+1}(kappa) / I_nu(kappa) = int cos(th) w(th) dth / int w(th) dth,

so one pass of quadrature yields both. The weight is unimodal with its peak at cos(th0) =
(sqrt(nu^2 + x^2) - nu) / x; it is integrated by 24-point Gauss-Legendre rules on panels of at most
2 widths of the peak (and at most 0.7 rad), from the peak outwards until it falls below e^-100 of
its maximum, in mpmath with enough guard digits to absorb x cos(th) (about 1e-40 relative overall).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import math
import os
import sys
import time

import torch

P_VALUES = (2, 3, 16, 64, 256, 1024, 4096, 65536)
BOUND_F64, BOUND_F32, BOUND_GRAD = 1e-12, 2e-6, 1e-10
DPS = 40
# Values of log C_p around its zero at which the crossing table samples the error (default).
CROSSING_VALUES = (0.0, 0.25, -0.25, 1.0, -1.0, 4.0, -4.0, 16.0, -16.0, 64.0, -64.0)

_PANEL_WIDTHS = 2.0  # Gauss-Legendre panel width in units of the peak width ...
_PANEL_MAX = 0.7  # ... and in radians: the integrand varies on the scale of cos/sin too
_GL_DEGREE = 4  # mpmath's degree 4: 3 * 2^3 = 24 nodes per panel
_CUTOFF = 100  # stop once the integrand is below exp(-100) of its peak (4e-44)


def poisson_log_bessel_and_ratio(nu: float, x: float, dps: int = DPS):
    """(log I_nu(x), I_{nu+1}(x)/I_nu(x)) as mpmath numbers, for nu >= 0 and x > 0, from the Poisson
    integral (DLMF 10.32.2) by Gauss-Legendre quadrature; see the module docstring."""
    import mpmath
    from mpmath.calculus.quadrature import GaussLegendre

    mp = mpmath.mp
    guard = 8 + int(math.log10(max(x, nu, 1.0)))  # x cos(th) - its peak value loses log10(x) digits
    with mpmath.workdps(dps + guard):
        nu_, x_ = mpmath.mpf(nu), mpmath.mpf(x)
        cos0 = (mpmath.sqrt(nu_ * nu_ + x_ * x_) - nu_) / x_
        sin2 = 1 - cos0 * cos0
        # 1/width^2 = -(log w)'' at the peak = x cos th0 + 2 nu / sin^2 th0
        width = 1 / mpmath.sqrt(x_ * cos0 + (2 * nu_ / sin2 if nu else 0))
        step = min(_PANEL_WIDTHS * width, mpmath.mpf(_PANEL_MAX))

        def log_weight(th):
            return x_ * mpmath.cos(th) + 2 * nu_ * mpmath.log(mpmath.sin(th)) if nu else x_ * mpmath.cos(th)

        th0 = mpmath.acos(cos0)
        peak = log_weight(th0) if nu else x_

        def panels_towards(end, direction):
            edges = [th0]
            while edges[-1] != end:
                nxt = edges[-1] + direction * step
                if (nxt - end) * direction >= 0:
                    edges.append(end)
                    break
                edges.append(nxt)
                if log_weight(nxt) - peak < -_CUTOFF:  # unimodal: the rest is smaller still
                    break
            return edges

        edges = panels_towards(mpmath.mpf(0), -1)[::-1] + panels_towards(+mp.pi, 1)[1:]
        rule = GaussLegendre(mp)
        mass = first_moment = mpmath.mpf(0)
        sin0 = mpmath.sqrt(sin2)
        # sin^(2 nu) as a power of sin/sin(th0): for the integer 2 nu of a sphere (p - 2) that is a
        # few multiplications instead of a logarithm.
        power = int(2 * nu) if float(2 * nu).is_integer() else 2 * nu_
        for a, b in itertools.pairwise(edges):
            for th, w in rule.get_nodes(a, b, _GL_DEGREE, mp.prec):
                c, s = mpmath.cos_sin(th)
                v = w * mpmath.exp(x_ * (c - cos0)) * (s / sin0) ** power if nu else w * mpmath.exp(x_ * (c - 1))
                mass += v
                first_moment += v * c
        log_i = (
            nu_ * mpmath.log(x_ / 2)
            - mpmath.log(mp.pi) / 2
            - mpmath.loggamma(nu_ + mpmath.mpf(1) / 2)
            + peak
            + mpmath.log(mass)
        )
        return +log_i, +(first_moment / mass)


def truth(p: int, kappa: float, dps: int = DPS):
    """(log C_p(kappa), A_p(kappa)) as mpmath numbers; kappa = 0 gives the limit
    log Gamma(p/2) - log 2 - (p/2) log pi (minus the log area of S^(p-1), DLMF 10.25.2) and A_p = 0."""
    import mpmath

    with mpmath.workdps(dps):
        half_p = mpmath.mpf(p) / 2
        if kappa == 0:
            return mpmath.loggamma(half_p) - mpmath.log(2) - half_p * mpmath.log(mpmath.pi), mpmath.mpf(0)
        nu = p / 2 - 1
        log_i, ratio = poisson_log_bessel_and_ratio(nu, kappa, dps)
        return (nu * mpmath.log(kappa) - half_p * mpmath.log(2 * mpmath.pi) - log_i), ratio


def kappa_grid(per_decade: int) -> list[float]:
    """0 and a log-uniform grid over [1e-8, 1e8], rounded to float32 numbers."""
    n = 16 * per_decade + 1
    points = torch.logspace(-8, 8, n, dtype=torch.float64).to(torch.float32).to(torch.float64)
    return [0.0, *points.tolist()]


def crossing_points(p: int, values: tuple[float, ...] = CROSSING_VALUES) -> list[float]:
    """float32 kappas > 0 at which log C_p takes about ``values`` near its zero; ``values[0]`` must
    be 0, so that the first kappa is the zero itself. Empty if log C_p(0) <= 0 (then there is no
    zero). Located with the package's own function: only where to sample comes from the code under
    test, never the truth."""
    from .normalizer import vmf_mean_resultant_length
    from .special.vmf import zero

    hi = zero(p)
    if hi is None:
        return []
    slope = vmf_mean_resultant_length(torch.tensor(hi, dtype=torch.float64), p).item()
    ks = torch.tensor([hi - v / slope for v in values], dtype=torch.float64)
    return [k for k in ks.to(torch.float32).to(torch.float64).tolist() if k > 0]


def _scipy_formula(p: int, kappa):
    import numpy as np
    from scipy.special import ive

    nu = p / 2 - 1
    with np.errstate(all="ignore"):
        return nu * np.log(kappa) - p / 2 * math.log(2 * math.pi) - np.log(ive(nu, kappa)) - kappa


def _error(ours: float, true) -> float:
    if not math.isfinite(ours):
        return math.inf
    return float(abs(ours - true) / max(1, abs(true)))


def _ranges(kappas: list[float], bad: list[bool]) -> str:
    """Runs of consecutive grid points flagged ``bad``, e.g. '0..0.01, 1e+06'."""
    runs, start = [], None
    for i, flag in enumerate([*bad, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            a, b = kappas[start], kappas[i - 1]
            runs.append(f"{a:.3g}" if a == b else f"{a:.3g}..{b:.3g}")
            start = None
    return ", ".join(runs) if runs else "none"


def _truth_task(task: tuple[int, float]):
    return truth(*task)


def measure(p: int, kappas: list[float], truths: list) -> dict:
    """Worst errors of the package (and of scipy's formula) for one p over sorted ``kappas``, given
    ``truths[i] = truth(p, kappas[i])``."""
    import numpy as np

    from .normalizer import log_vmf_normalizer

    true_value = [t[0] for t in truths]

    k64 = torch.tensor(kappas, dtype=torch.float64, requires_grad=True)
    value64 = log_vmf_normalizer(k64, p)
    (grad64,) = torch.autograd.grad(value64.sum(), k64)
    value32 = log_vmf_normalizer(k64.detach().to(torch.float32), p).double()

    def worst(errors):
        i = max(range(len(errors)), key=lambda j: errors[j])
        return errors[i], kappas[i]

    row = {
        "p": p,
        "f64": worst([_error(o, t) for o, t in zip(value64.tolist(), true_value)]),
        "f32": worst([_error(o, t) for o, t in zip(value32.tolist(), true_value)]),
        "grad": worst([_error(-g, t[1]) for g, t in zip(grad64.tolist(), truths)]),
    }
    if p >= 3:
        approx = log_vmf_normalizer(k64.detach(), p, mode="approx").tolist()
        diff = [float(a - t) for a, t in zip(approx, true_value)]
        row["approx"] = max(diff) - min(diff)
    else:
        row["approx"] = None
    scipy_value = _scipy_formula(p, np.asarray(kappas)).tolist()
    finite = [math.isfinite(v) for v in scipy_value]
    errs = [_error(v, t) for v, t, ok in zip(scipy_value, true_value, finite) if ok]
    row["scipy"] = max(errs) if errs else math.nan
    row["scipy_nonfinite"] = _ranges(kappas, [not ok for ok in finite])
    row["ok"] = row["f64"][0] <= BOUND_F64 and row["f32"][0] <= BOUND_F32 and row["grad"][0] <= BOUND_GRAD
    return row


def measure_crossing(p: int, kappas: list[float], truths: list) -> dict:
    """Error of float64 ``exact`` mode at the points around the zero of log C_p (``kappas[0]`` is the
    zero), given ``truths[i] = truth(p, kappas[i])``."""
    from .normalizer import log_vmf_normalizer

    ours = log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float64), p).tolist()
    true_value = [t[0] for t in truths]
    failing = [abs(float(t)) for o, t in zip(ours, true_value) if _error(o, t) > BOUND_F64]
    return {
        "p": p,
        "kappa0": kappas[0],
        "abs_err": max(float(abs(o - t)) for o, t in zip(ours, true_value)),
        "terms": (p / 2 - 1) * math.log(kappas[0]),  # the size of nu log kappa and of log I_nu there
        "fail_upto": max(failing) if failing else None,
    }


def approx_zero(p: int) -> float | None:
    """The zero of the leading term of the uniform expansion of log C_p (approx mode's formula): within
    about 0.3/p of the exact zero in log C_p, so |log C_p| < 0.01 there. None where log C_p has none."""
    from .special.vmf import leading_term, sign_change

    return sign_change(lambda k: leading_term(k, p), p)


def identity_residual(p: int) -> tuple[float, float] | None:
    """``(kappa, residual)`` of the recurrence in the dimension,

        log C_{p+2}(kappa) = log C_p(kappa) + log(kappa / (2 pi A_p(kappa))),

    (from I_{nu+1} = A_p I_nu) at kappa near the zero of log C_{p+2}, where the 1e-12 bound is absolute
    and the terms of the formula are largest relative to the value. Needs no mpmath: a form that is
    wrong for one p shows as a residual that its neighbours do not have. None where C_{p+2} has no zero."""
    from .normalizer import log_vmf_normalizer, vmf_mean_resultant_length

    kappa = approx_zero(p + 2)
    if kappa is None:
        return None
    k = torch.tensor([kappa], dtype=torch.float64)
    lhs = log_vmf_normalizer(k, p + 2)
    rhs = log_vmf_normalizer(k, p) + torch.log(k / (2.0 * math.pi * vmf_mean_resultant_length(k, p)))
    return kappa, float(lhs - rhs)


def _identity_task(ps: range) -> list[tuple[int, float, float]]:
    return [(p, *found) for p in ps if (found := identity_residual(p)) is not None]


def identity_scan(p_max: int, jobs: int) -> str:
    """The worst residual of ``identity_residual`` over every p in [2, p_max] and the p that miss 1e-12."""
    chunks = [range(start, min(start + 1000, p_max + 1)) for start in range(2, p_max + 1, 1000)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        results = [row for part in pool.map(_identity_task, chunks) for row in part]
    worst = max(results, key=lambda r: abs(r[2]))
    missing = [r for r in results if abs(r[2]) > BOUND_F64]
    lines = [
        f"identity log C_(p+2) = log C_p + log(kappa / (2 pi A_p)) near the zero of log C_(p+2), every p in "
        f"[2, {p_max}] with a zero ({len(results)} orders):",
        f"worst |residual| {abs(worst[2]):.1e} at p = {worst[0]} (kappa = {worst[1]:.6g}); "
        f"{len(missing)} orders above {BOUND_F64:g}" + (f": {[r[0] for r in missing][:20]}" if missing else ""),
    ]
    return "\n".join(lines)


def _format_table(rows: list[dict]) -> str:
    head = (
        f"{'p':>6} | {'exact f64':>9} {'at kappa':>9} | {'exact f32':>9} {'at kappa':>9} | "
        f"{'grad f64':>9} {'at kappa':>9} | {'approx':>8} | {'scipy':>8}  {'scipy inf/NaN at kappa':<24} | ok"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        approx = "n/a" if r["approx"] is None else f"{r['approx']:.1e}"
        lines.append(
            f"{r['p']:>6} | {r['f64'][0]:>9.1e} {r['f64'][1]:>9.3g} | {r['f32'][0]:>9.1e} {r['f32'][1]:>9.3g} | "
            f"{r['grad'][0]:>9.1e} {r['grad'][1]:>9.3g} | {approx:>8} | {r['scipy']:>8.1e}  "
            f"{r['scipy_nonfinite']:<24} | {'yes' if r['ok'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmf-head accuracy",
        description="Worst errors of log_vmf_normalizer (exact and approx) against mpmath, and where "
        "scipy.special.ive's formula is inf/NaN. Needs mpmath and scipy (pip install 'vmf-head[accuracy]').",
    )
    parser.add_argument("--p", type=int, nargs="+", default=list(P_VALUES), help="dimensions (default: %(default)s)")
    parser.add_argument("--per-decade", type=int, default=4, help="kappa points per decade (default: %(default)s)")
    parser.add_argument(
        "--crossing-scan",
        type=int,
        default=0,
        metavar="N",
        help="sample the zero of log C_p at N values evenly spaced in [-60, 60] instead of the default 11",
    )
    parser.add_argument(
        "--identity-scan",
        type=int,
        default=0,
        metavar="P_MAX",
        help="instead of the table: check log C_(p+2) = log C_p + log(kappa/(2 pi A_p)) near the zero of "
        "log C_(p+2) for every p in [2, P_MAX] (no mpmath; a few minutes for 1e5)",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any bound is missed")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes for the mpmath truth (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.identity_scan:
        if args.identity_scan < 2 or args.jobs < 1:
            parser.error("--identity-scan needs P_MAX >= 2 and --jobs >= 1")
        start = time.perf_counter()
        report = identity_scan(args.identity_scan, args.jobs)
        print(report + f"\n({time.perf_counter() - start:.0f} s)")
        return 1 if args.strict and "0 orders above" not in report else 0
    try:
        import mpmath  # noqa: F401
        import scipy.special  # noqa: F401
    except ImportError as exc:
        print(
            f"the accuracy table needs mpmath and scipy ({exc}); install them with: pip install 'vmf-head[accuracy]'",
            file=sys.stderr,
        )
        return 1
    if any(p < 2 for p in args.p) or args.per_decade < 1 or args.jobs < 1:
        parser.error("p must be >= 2, --per-decade and --jobs >= 1")

    start = time.perf_counter()
    grid = kappa_grid(args.per_decade)
    # kappa = 2 nu = p - 2 is where approx - exact peaks (docs/log_normalizer.md): sample it too.
    values = CROSSING_VALUES
    if args.crossing_scan:
        values = (0.0, *tuple(torch.linspace(-60, 60, args.crossing_scan, dtype=torch.float64).tolist()))
    points = {p: sorted(set(grid + crossing_points(p, values) + [float(p - 2)])) for p in args.p}
    tasks = [(p, k) for p in args.p for k in points[p]]
    # The quadratures dominate the run time and are independent: spread them over the cores.
    if args.jobs == 1:
        known = {task: _truth_task(task) for task in tasks}
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            known = dict(zip(tasks, pool.map(_truth_task, tasks, chunksize=8)))
    rows, crossings = [], []
    for p in args.p:
        rows.append(measure(p, points[p], [known[p, k] for k in points[p]]))
        near_zero = crossing_points(p, values)
        if near_zero:
            crossings.append(measure_crossing(p, near_zero, [known[p, k] for k in near_zero]))

    print(
        f"log C_p(kappa) against mpmath ({DPS} digits; Poisson integral DLMF 10.32.2 by Gauss-Legendre quadrature)\n"
        f"kappa: 0, {16 * args.per_decade + 1} float32 points log-uniform in [1e-8, 1e8], p - 2, and "
        f"{len(values)} points around the zero of log C_p where it has one\n"
        f"error = |ours - truth| / max(1, |truth|), worst over kappa; "
        f"ok = exact f64 <= {BOUND_F64:g}, exact f32 <= {BOUND_F32:g}, grad f64 <= {BOUND_GRAD:g}\n"
        "approx = max - min over kappa of (approx - truth): the error a softmax over prototypes sees\n"
        "scipy  = nu log k - (p/2) log 2pi - log(ive(nu, k)) - k in float64: worst error where finite\n"
    )
    print(_format_table(rows))
    if crossings:
        print(
            "\nNear the zero of log C_p the bound is absolute (1e-12) while the terms of the formula are as large "
            "as kappa0;\nfrom p = 352 on the package takes the anchored form there (docs/log_normalizer.md):\n"
        )
        head = f"{'p':>6} | {'kappa0':>10} | {'size of terms':>13} | {'worst abs err':>13} | "
        head += "bound 1e-12 missed while |log C_p| <="
        print(head + "\n" + "-" * len(head))
        for c in crossings:
            fail = "never (at the sampled values)" if c["fail_upto"] is None else f"{c['fail_upto']:.3g}"
            print(f"{c['p']:>6} | {c['kappa0']:>10.6g} | {c['terms']:>13.3g} | {c['abs_err']:>13.1e} | {fail}")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 1 if args.strict and not all(r["ok"] for r in rows) else 0
