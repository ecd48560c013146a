"""log_vmf_normalizer / vmf_mean_resultant_length against mpmath (50 digits), scipy and their own
formulas' limits; argument rules and conventions.

Errors are |ours - truth| / max(1, |truth|) with the truth at the kappa the input dtype holds (see
``tests/mpmath_truth.py`` for where the truth comes from).
"""

import math

import mpmath
import mpmath_truth as truth
import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmf_head import accuracy, log_vmf_normalizer, vmf_mean_resultant_length
from vmf_head.special import vmf as _vmf
from vmf_head.special.bessel import TOL_FLOAT64

F64_BOUND, F32_BOUND, GRAD_BOUND = 1e-12, 2e-6, 1e-10
EPS64 = torch.finfo(torch.float64).eps

DIMS = (2, 3, 4, 5, 16, 64, 255, 256, 1024, 4096, 16384, 65536, 100000)
KAPPAS = [0.0] + [10.0 ** (e / 3) for e in range(-24, 25)]  # 0 and 1e-8 .. 1e8, three per decade


def _held(kappas, dtype) -> list[float]:
    """The kappas a tensor of ``dtype`` actually holds."""
    return torch.tensor(kappas, dtype=dtype).double().tolist()


def _worst(ours: torch.Tensor, exact: list, where: list) -> tuple[float, float]:
    errors = [truth.error(o, t) for o, t in zip(ours.double().tolist(), exact)]
    i = max(range(len(errors)), key=errors.__getitem__)
    return errors[i], where[i]


def _crossing(p: int) -> tuple[float, float]:
    """(kappa0, A_p(kappa0)) with log C_p(kappa0) = 0 (p >= 24), located with the code under test
    (only to choose where to look)."""
    kappa0 = _vmf.zero(p)
    return kappa0, vmf_mean_resultant_length(torch.tensor(kappa0, dtype=torch.float64), p).item()


# --- accuracy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", DIMS)
def test_float64_value_and_gradient_against_mpmath(p):
    kappa = torch.tensor(KAPPAS, dtype=torch.float64, requires_grad=True)
    value = log_vmf_normalizer(kappa, p)
    (grad,) = torch.autograd.grad(value.sum(), kappa)
    worst = _worst(value, [truth.log_normalizer(p, k) for k in KAPPAS], KAPPAS)
    assert worst[0] <= F64_BOUND, worst
    a_true = [truth.mean_resultant_length(p, k) for k in KAPPAS]
    worst = _worst(-grad, a_true, KAPPAS)
    assert worst[0] <= GRAD_BOUND, worst
    worst = _worst(vmf_mean_resultant_length(kappa.detach(), p), a_true, KAPPAS)
    assert worst[0] <= GRAD_BOUND, worst


@pytest.mark.parametrize("p", DIMS)
def test_float32_against_mpmath_at_the_float32_kappa(p):
    held = _held(KAPPAS, torch.float32)
    value = log_vmf_normalizer(torch.tensor(KAPPAS, dtype=torch.float32), p)
    assert value.dtype == torch.float32
    worst = _worst(value, [truth.log_normalizer(p, k) for k in held], held)
    assert worst[0] <= F32_BOUND, worst


@pytest.mark.parametrize("p", [3, 256, 65536])
def test_dense_realistic_kappas(p):
    # DINO's prototypes: kappa = ||w|| / tau with ||w|| in 0.5..5 and tau in 0.04..0.1.
    kappas = torch.linspace(5.0, 125.0, 97, dtype=torch.float64)
    exact = [truth.log_normalizer(p, k) for k in kappas.tolist()]
    assert _worst(log_vmf_normalizer(kappas, p), exact, kappas.tolist())[0] <= F64_BOUND


def test_kappa_zero_and_first_order_limits():
    # log C_p(kappa) = log C_p(0) - kappa^2 / (2p) + O(kappa^4) and A_p = kappa / p + O(kappa^3).
    for p in (2, 3, 256, 100000):
        k = torch.tensor([0.0, 1e-8, 1e-5], dtype=torch.float64, requires_grad=True)
        c0 = math.lgamma(p / 2) - math.log(2) - p / 2 * math.log(math.pi)
        value = log_vmf_normalizer(k, p)
        (grad,) = torch.autograd.grad(value.sum(), k)
        expected = c0 - k.detach() ** 2 / (2 * p)
        torch.testing.assert_close(value.detach(), expected, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(-grad, k.detach() / p, rtol=1e-9, atol=0)


# --- the zero of log C_p ---------------------------------------------------------------------------

NEAR_ZERO = (0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 8.0, -8.0, 60.0, -60.0, 1000.0, -1000.0)


@pytest.mark.parametrize("p", [24, 128, 256, 512, 1024, 4096, 65536, 100000])
def test_absolute_bound_near_the_zero(p):
    # log C_p changes sign at kappa0 (p >= 24), where the bound is absolute: 1e-12 although the
    # terms of the formula are as large as kappa0 (3.6e5 at p = 65536).
    kappa0, slope = _crossing(p)
    kappas = [kappa0 - v / slope for v in NEAR_ZERO if kappa0 - v / slope > 0]
    ours = log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float64), p).tolist()
    for k, o in zip(kappas, ours):
        assert truth.error(o, truth.log_normalizer(p, k)) <= F64_BOUND, (k, o)


@pytest.mark.parametrize("p", [512, 4096, 65536, 100000])
def test_anchored_form_leaves_only_the_rounding_of_the_value(p):
    # Where the plain form would lose 1e-16 kappa0 (p >= 512, vmf_head/special/vmf.py), the
    # anchored form keeps the absolute error near the zero at a few units of 1e-16: the rounding of
    # terms of size 1, not of size kappa0.
    assert _vmf.anchor(p, TOL_FLOAT64) is not None
    kappa0, slope = _crossing(p)
    kappas = [kappa0 - v / slope for v in NEAR_ZERO[:11]]
    ours = log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float64), p).tolist()
    for k, o in zip(kappas, ours):
        assert float(abs(o - truth.log_normalizer(p, k))) <= 40 * EPS64, (k, o)


@pytest.mark.parametrize("p", [8192, 65536, 100000])
def test_near_the_zero_finite_differences_equal_the_gradient(p):
    # A smoothness check that needs no truth: over steps of 5e-3 around the zero, divided differences
    # of log C_p must equal -A_p at the midpoints to 1e-9. An absolute error e in the values shows up
    # as 2e / 5e-3 here, so the plain form's 6e-11 at p = 65536 would give 2.4e-8.
    kappa0, _ = _crossing(p)
    k = kappa0 + torch.arange(-2000, 2001, dtype=torch.float64) * 5e-3
    value = log_vmf_normalizer(k, p)
    slope = value.diff() / k.diff()
    a_mid = vmf_mean_resultant_length(0.5 * (k[1:] + k[:-1]), p)
    assert (value.diff() < 0).all()
    assert (slope + a_mid).abs().max().item() <= 1e-9


# --- scipy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3, 16, 256, 1024, 4096])
def test_agrees_with_scipy_where_scipy_is_finite(p):
    kappa = np.logspace(-3, 6, 37)
    nu = p / 2 - 1
    with np.errstate(all="ignore"):
        ref = nu * np.log(kappa) - p / 2 * math.log(2 * math.pi) - np.log(scipy.special.ive(nu, kappa)) - kappa
    ours = log_vmf_normalizer(torch.from_numpy(kappa), p).numpy()
    finite = np.isfinite(ref)
    assert finite.sum() >= 10
    # scipy's own rounding is that of its largest term, so compare on that scale.
    scale = 1 + nu * np.abs(np.log(kappa)) + kappa + p
    np.testing.assert_array_less((np.abs(ours - ref) / scale)[finite], 1e-13)


def test_scipy_formula_fails_where_documented():
    # docs/log_normalizer.md: scipy's formula is -inf/inf for p = 256 at kappa <= 0.01, p = 1024 at
    # kappa <= 100, p = 4096 at kappa <= 1000; ours is finite and exact there.
    for p, kappa in ((256, 0.01), (1024, 100.0), (4096, 1000.0)):
        nu = p / 2 - 1
        with np.errstate(all="ignore"):
            ref = nu * math.log(kappa) - p / 2 * math.log(2 * math.pi) - np.log(scipy.special.ive(nu, kappa)) - kappa
        assert not np.isfinite(ref)
        ours = log_vmf_normalizer(torch.tensor([kappa], dtype=torch.float64), p).item()
        assert truth.error(ours, truth.log_normalizer(p, kappa)) <= F64_BOUND


# --- approx mode ----------------------------------------------------------------------------------


def _approx_spread_bound(p: int) -> float:
    """docs/log_normalizer.md: approx - exact = log U(t), U = 1 + u_1(t)/nu + ...,
    t = nu/sqrt(nu^2 + kappa^2). u_1 = (3t - 5t^3)/24 spans [-1/12, 1/(12 sqrt 5)] on [0, 1] (ends
    at kappa = 0 and kappa = 2 nu), so over all kappa the difference varies by (1 + 1/sqrt 5)/(12 nu)
    to first order."""
    nu = p / 2 - 1
    return (1 + 1 / math.sqrt(5)) / (12 * nu)


@pytest.mark.parametrize("p", [3, 16, 64, 256, 1024, 65536])
def test_approx_is_exact_up_to_a_constant(p):
    nu = p / 2 - 1
    # t sweeps [0, 1]: kappa = 0, the maximum of u_1 at kappa = 2 nu, log-spaced up to 1e8
    kappas = [0.0, 2 * nu] + [k for k in (nu * 10.0 ** (e / 8) for e in range(-24, 33)) if k <= 1e8] + [1e8]
    approx = log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float64), p, mode="approx").tolist()
    exact = [truth.log_normalizer(p, k) for k in kappas]
    with mpmath.workdps(truth.DPS):
        diff = [float(a - e) for a, e in zip(approx, exact)]
    # second-order terms are below 0.01/nu^2 (measured); float64 rounding of the values adds a few ulp
    tol = 0.01 / nu**2 + 8 * EPS64 * max(abs(float(e)) for e in exact)
    assert abs(max(diff) - min(diff) - _approx_spread_bound(p)) <= tol, (max(diff) - min(diff), tol)
    assert abs(diff[0] - diff[-1] + 1 / (12 * nu)) <= tol  # log U(1) = -1/(12 nu) + O(1/nu^2)
    assert abs(diff[-1]) <= 1 / (8 * kappas[-1]) + tol  # log U(t) ~ t/(8 nu): exact as kappa -> inf


def test_approx_gradient_is_the_derivative_of_its_formula():
    # d/dk [nu log(nu + s) - s + log(s)/2] with s = sqrt(nu^2 + k^2), derived by hand
    for p in (3, 256, 65536):
        nu = p / 2 - 1
        k = torch.tensor([0.0, 0.1, 10.0, 1e3, 1e6], dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(log_vmf_normalizer(k, p, mode="approx").sum(), k)
        kd = k.detach()
        s = torch.sqrt(nu**2 + kd**2)
        expected = nu * kd / (s * (nu + s)) - kd / s + kd / (2 * s**2)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


# --- autograd -------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3, 256, 65536])
def test_gradcheck(p):
    kappa = torch.tensor([0.3, 5.0, 80.0, 2.5e3, 4e5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: log_vmf_normalizer(k, p), (kappa,), eps=1e-3, atol=1e-7, rtol=1e-5)


def test_gradient_flows_through_float32_and_shapes():
    kappa = torch.full((2, 3), 10.0, requires_grad=True)
    log_vmf_normalizer(kappa, 256).sum().backward()
    a = truth.mean_resultant_length(256, 10.0)
    assert kappa.grad.dtype == torch.float32 and kappa.grad.shape == (2, 3)
    assert max(truth.error(-g, a) for g in kappa.grad.flatten().tolist()) <= F32_BOUND


# --- dtypes, shapes, conventions ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [2, 3, 64, 256])
def test_half_dtypes_are_computed_in_float_and_rounded_once(dtype, p):
    kappas = [0.0, 0.01, 0.5, 3.0, 20.0, 100.0, 1000.0]
    held = _held(kappas, dtype)
    out = log_vmf_normalizer(torch.tensor(kappas, dtype=dtype), p)
    assert out.dtype == dtype
    # one rounding to the half format: at most half an ulp, i.e. eps/2 relative (eps absolute below 1)
    worst = _worst(out, [truth.log_normalizer(p, k) for k in held], held)
    assert worst[0] <= torch.finfo(dtype).eps / 2 * 1.01, worst


@pytest.mark.parametrize("p", [16384, 18722, 18723, 20000, 65536])
def test_float16_is_refused_exactly_where_it_cannot_hold_log_c(p):
    # float16 rounds |x| >= 65520 to inf; log C_p(0) = log Gamma(p/2) - log 2 - (p/2) log pi does
    # from p = 18723 on. There a float16 kappa is a ValueError, never an inf result; below it every
    # float16 kappa gives a finite, correctly rounded value (kappa itself stays in float16's range).
    kappas = [0.0, 1e3, 1e4, 3e4, 6e4, 65504.0]
    if math.lgamma(p / 2) - math.log(2) - p / 2 * math.log(math.pi) >= 65520:
        with pytest.raises(ValueError, match=f"float16 cannot hold log C_p.*p = {p}"):
            log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float16), p)
        assert torch.isfinite(log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float32), p)).all()
        return
    held = _held(kappas, torch.float16)
    out = log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float16), p).tolist()
    for o, k in zip(out, held):
        assert math.isfinite(o) and truth.error(o, truth.log_normalizer(p, k)) <= 2**-11 * 1.01, (k, o)
    assert p in (16384, 18722)


# --- every order: the recurrence in p -------------------------------------------------------------


@pytest.mark.parametrize("p", [332, 350, 351, 352, 2804, 2805, 2806, 2807, 17168, 17169, 17170, 17171, 99998])
def test_recurrence_in_p_near_the_zero_at_orders_around_a_change_of_form(p):
    # log C_(p+2) = log C_p + log(kappa / (2 pi A_p)) at the zero of log C_(p+2): orders where the
    # expansion's shift or the anchored form changes (vmf_head/special/vmf.py). 2805/2806 and
    # 17169/17170 missed 1e-12 by 15x when the anchored form was skipped for shifted orders.
    kappa, residual = accuracy.identity_residual(p)
    assert abs(residual) <= F64_BOUND, (p, kappa, residual)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(20, 100000))
def test_recurrence_in_p_near_the_zero_at_any_order(p):
    """Any order (``python -m vmf_head accuracy --identity-scan 100000`` checks every one)."""
    kappa, residual = accuracy.identity_residual(p)
    assert abs(residual) <= F64_BOUND, (p, kappa, residual)


def test_reported_order_against_mpmath():
    # The order and kappa of the report (p = 17169): absolute error now at the rounding of the value.
    for kappa in (81773.5270309369, _vmf.zero(17169, TOL_FLOAT64)):
        ours = float(log_vmf_normalizer(torch.tensor([kappa], dtype=torch.float64), 17169))
        assert abs(ours - float(truth.log_normalizer(17169, kappa))) <= 40 * EPS64, kappa


@pytest.mark.parametrize("p", [6_500_000_000, 10**11])
def test_huge_orders(p):
    # p >= 6.5e9 once crashed (one polynomial coefficient left); at kappa = 0 the value is the closed form.
    out = log_vmf_normalizer(torch.tensor([0.0, 1e3, 1e12], dtype=torch.float64), p)
    assert torch.isfinite(out).all() and (out[:-1] >= out[1:]).all() and out[0] > out[-1]
    exact0 = math.lgamma(p / 2) - math.log(2) - p / 2 * math.log(math.pi)
    assert abs(float(out[0]) - exact0) <= 1e-12 * abs(exact0)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3, 4)])
def test_shapes(shape):
    kappa = torch.rand(shape, dtype=torch.float64) * 100
    out = log_vmf_normalizer(kappa, 256)
    assert out.shape == kappa.shape and out.dtype == kappa.dtype
    a = vmf_mean_resultant_length(kappa, 256)
    assert a.shape == kappa.shape
    flat = log_vmf_normalizer(kappa.reshape(-1), 256)
    torch.testing.assert_close(out.reshape(-1), flat, rtol=0, atol=0)


def test_non_contiguous_input():
    kappa = torch.logspace(-2, 4, 12, dtype=torch.float64).reshape(3, 4).t()
    out = log_vmf_normalizer(kappa, 64)
    torch.testing.assert_close(out, log_vmf_normalizer(kappa.contiguous(), 64), rtol=0, atol=0)


def test_nan_negative_and_infinite_kappa():
    kappa = torch.tensor([-1.0, -math.inf, math.nan, math.inf, -0.0], dtype=torch.float64, requires_grad=True)
    value = log_vmf_normalizer(kappa, 256)
    (grad,) = torch.autograd.grad(value.sum(), kappa)
    assert all(math.isnan(v) for v in value[:3].tolist())
    assert value[3].item() == -math.inf  # C_p(kappa) -> 0 as kappa -> inf
    assert value[4].item() == pytest.approx(float(truth.log_normalizer(256, 0.0)), rel=1e-15)
    assert all(math.isnan(g) for g in grad[:3].tolist())
    assert grad[3].item() == -1.0 and grad[4].item() == 0.0  # -A_p: A_p(inf) = 1, A_p(0) = 0
    a = vmf_mean_resultant_length(kappa.detach(), 256)
    assert a[3].item() == 1.0 and math.isnan(a[0].item())
    for mode in ("exact", "approx"):
        out = log_vmf_normalizer(torch.tensor([-2.0, math.nan, math.inf]), 16, mode=mode).tolist()
        assert math.isnan(out[0]) and math.isnan(out[1]) and out[2] == -math.inf


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"p": 1}, ValueError, "p must be an int >= 2"),
        ({"p": 0}, ValueError, "p must be an int >= 2"),
        ({"p": 3.0}, TypeError, "p must be an int .*got float 3.0"),
        ({"p": True}, TypeError, "p must be an int .*got bool True"),
        ({"p": "3"}, TypeError, "p must be an int .*got str '3'"),
        ({"p": 3, "mode": "fast"}, ValueError, r"mode must be one of \('exact', 'approx'\)"),
        ({"p": 2, "mode": "approx"}, ValueError, "p >= 3"),
        ({"p": 3, "kappa": [1.0]}, TypeError, "kappa must be a torch.Tensor"),
        ({"p": 3, "kappa": 1.0}, TypeError, "kappa must be a torch.Tensor"),
        ({"p": 3, "kappa": torch.ones(2, dtype=torch.int32)}, TypeError, "float16, bfloat16, float32 or float64"),
        ({"p": 3, "kappa": torch.ones(2, dtype=torch.bool)}, TypeError, "kappa must have a floating dtype"),
        ({"p": 3, "kappa": torch.ones(2, dtype=torch.complex128)}, TypeError, "kappa"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, words):
    kwargs = {"kappa": torch.ones(2), **kwargs}
    mode = kwargs.pop("mode", "exact")
    with pytest.raises(exc, match=words):
        log_vmf_normalizer(kwargs["kappa"], kwargs["p"], mode=mode)
    if mode == "exact":
        with pytest.raises(exc, match=words):
            vmf_mean_resultant_length(kwargs["kappa"], kwargs["p"])


def test_values_do_not_depend_on_the_other_elements():
    # Element i is log C_p(kappa_i) whatever else the tensor holds (the domain masks are computed for
    # the whole tensor, never decided from its contents).
    kappa = torch.logspace(-6, 6, 3 * 20011, dtype=torch.float64)[torch.randperm(3 * 20011)].view(3, 20011)
    kappa.requires_grad_()
    got = log_vmf_normalizer(kappa, 256)
    pieces = torch.cat([log_vmf_normalizer(part, 256) for part in kappa.detach().reshape(-1).split(1000)])
    assert got.shape == kappa.shape
    assert torch.equal(got.detach().reshape(-1), pieces)
    (grad,) = torch.autograd.grad(got.sum(), kappa)
    slopes = torch.cat([vmf_mean_resultant_length(part, 256) for part in kappa.detach().reshape(-1).split(1000)])
    assert torch.equal(-grad.reshape(-1), slopes)
    mixed = kappa.detach().reshape(-1)[:1000].clone()
    mixed[::7] = float("nan")
    mixed[1::7] = -1.0
    mixed[2::7] = 1e200
    clean = log_vmf_normalizer(kappa.detach().reshape(-1)[:1000], 256)
    keep = torch.ones(1000, dtype=torch.bool)
    keep[::7] = keep[1::7] = keep[2::7] = False
    assert torch.equal(log_vmf_normalizer(mixed, 256)[keep], clean[keep])
