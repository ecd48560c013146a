"""vmf_head.special.log_bessel_iv and bessel_iv_ratio against mpmath (50 digits) and scipy.

The truth comes from ``tests/mpmath_truth.py`` (mpmath.besseli, and its own Debye expansion for large
orders, which the first test checks against besseli). Errors are |ours - truth| / max(1, |truth|).
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

from vmf_head.special import bessel_iv_ratio, log_bessel_iv

F64_BOUND, F32_BOUND, RATIO_BOUND = 1e-12, 2e-6, 1e-10

ORDERS = (0.0, 0.5, 1.0, 1.5, 2.5, 7.0, 31.5, 127.0, 499.5, 500.0, 1000.5, 4095.0, 32767.0, 49999.0)
ARGS = [0.0] + [10.0 ** (e / 2) for e in range(-16, 17)]  # 0 and 1e-8 .. 1e8, two per decade


def _errors(ours: torch.Tensor, exact: list) -> list[float]:
    return [truth.error(o, t) for o, t in zip(ours.double().tolist(), exact)]


def _worst(errors: list[float], points: list) -> tuple[float, object]:
    i = max(range(len(errors)), key=errors.__getitem__)
    return errors[i], points[i]


@pytest.mark.parametrize("nu", [500.0, 1000.5, 2000.0])
def test_truth_debye_expansion_matches_besseli(nu):
    # The test suite's own Debye expansion is exact to ~1e-50 where mpmath.besseli also runs fast.
    for x in (1e-3, 1.0, 300.0, 1000.0, 3000.0):
        with mpmath.workdps(truth.DPS):
            exact = mpmath.log(mpmath.besseli(nu, x))
        assert truth.error(truth.debye_log_bessel_iv(nu, x), exact) < 1e-34, (nu, x)


def test_truth_debye_polynomials_known_values():
    # u_1 = (3t - 5t^3)/24, u_2 = (81t^2 - 462t^4 + 385t^6)/1152 (DLMF 10.41.10)
    u = truth.debye_polynomials(2)
    assert [float(c) for c in u[1]] == pytest.approx([0, 3 / 24, 0, -5 / 24], abs=1e-30)
    assert [float(c) for c in u[2]] == pytest.approx([0, 0, 81 / 1152, 0, -462 / 1152, 0, 385 / 1152], abs=1e-30)


@pytest.mark.parametrize("nu", ORDERS)
def test_log_bessel_iv_float64_against_mpmath(nu):
    x = torch.tensor(ARGS, dtype=torch.float64)
    ours = log_bessel_iv(nu, x)
    positive = ARGS[1:]
    err = _errors(ours[1:], [truth.log_bessel_iv(nu, a) for a in positive])
    assert _worst(err, positive)[0] <= F64_BOUND, _worst(err, positive)
    assert ours[0].item() == (0.0 if nu == 0 else -math.inf)


@pytest.mark.parametrize("nu", ORDERS)
def test_bessel_iv_ratio_float64_against_mpmath(nu):
    x = torch.tensor(ARGS, dtype=torch.float64)
    err = _errors(bessel_iv_ratio(nu, x), [truth.bessel_ratio(nu, a) for a in ARGS])
    assert _worst(err, ARGS)[0] <= RATIO_BOUND, _worst(err, ARGS)


@pytest.mark.parametrize("nu", [0.0, 1.5, 127.0, 4095.0, 49999.0])
def test_float32_against_mpmath_at_the_float32_argument(nu):
    x32 = torch.tensor(ARGS, dtype=torch.float32)
    held = x32.double().tolist()  # the truth is taken where the float32 input actually is
    log_i = log_bessel_iv(nu, x32)
    ratio = bessel_iv_ratio(nu, x32)
    assert log_i.dtype == ratio.dtype == torch.float32
    err = _errors(log_i[1:], [truth.log_bessel_iv(nu, a) for a in held[1:]])
    assert max(err) <= F32_BOUND
    err = _errors(ratio, [truth.bessel_ratio(nu, a) for a in held])
    assert max(err) <= F32_BOUND


@pytest.mark.parametrize("nu", [0.0, 0.5, 3.0, 50.5, 127.0, 400.0, 2047.0])
def test_agrees_with_scipy_where_scipy_is_finite(nu):
    x = np.logspace(-6, 6, 49)
    with np.errstate(all="ignore"):
        ive0, ive1 = scipy.special.ive(nu, x), scipy.special.ive(nu + 1, x)
        ref_log = np.log(ive0) + x
    ours_log = log_bessel_iv(nu, torch.from_numpy(x)).numpy()
    ours_ratio = bessel_iv_ratio(nu, torch.from_numpy(x)).numpy()
    finite = np.isfinite(ref_log) & (ive0 > 0)
    assert finite.sum() >= 10  # scipy under/overflows for large orders at small x: see the docs
    # scipy is exact to rounding: its error is that of log(ive) + x, i.e. of the larger term.
    scale = np.maximum(1.0, np.maximum(np.abs(ref_log), x))
    np.testing.assert_array_less(np.abs(ours_log - ref_log)[finite] / scale[finite], 1e-13)
    ok = finite & np.isfinite(ive1) & (ive1 > 0)
    np.testing.assert_allclose(ours_ratio[ok], ive1[ok] / ive0[ok], rtol=1e-12, atol=1e-15)


def test_special_values_shapes_and_dtypes():
    x = torch.tensor([[0.0, math.inf], [-1.0, math.nan]], dtype=torch.float64)
    log_i = log_bessel_iv(2.0, x)
    assert log_i.shape == (2, 2)
    assert log_i[0, 0].item() == -math.inf and log_i[0, 1].item() == math.inf
    assert math.isnan(log_i[1, 0].item()) and math.isnan(log_i[1, 1].item())
    assert log_bessel_iv(0, torch.zeros((), dtype=torch.float64)).item() == 0.0  # I_0(0) = 1
    ratio = bessel_iv_ratio(2.0, x)
    assert ratio[0].tolist() == [0.0, 1.0]
    assert math.isnan(ratio[1, 0].item()) and math.isnan(ratio[1, 1].item())
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        y = torch.linspace(0.5, 4.0, 6, dtype=dtype).reshape(2, 3).t()  # non-contiguous
        for fn in (log_bessel_iv, bessel_iv_ratio):
            out = fn(1.5, y)
            assert out.dtype == dtype and out.shape == (3, 2)
            torch.testing.assert_close(out, fn(1.5, y.contiguous().double()).to(dtype), rtol=0, atol=0)
    assert log_bessel_iv(3.0, torch.empty(0, 4)).shape == (0, 4)
    assert bessel_iv_ratio(3.0, torch.tensor(2.0)).dim() == 0


def test_integer_orders_equal_float_orders():
    x = torch.tensor([0.1, 10.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(log_bessel_iv(3, x), log_bessel_iv(3.0, x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "nu, x, exc, words",
    [
        (-1.0, torch.ones(2), ValueError, "nu"),
        (math.nan, torch.ones(2), ValueError, "nu"),
        (math.inf, torch.ones(2), ValueError, "nu"),
        ("1", torch.ones(2), TypeError, "nu"),
        (True, torch.ones(2), TypeError, "nu"),
        (1.0, [1.0, 2.0], TypeError, "x must be a torch.Tensor"),
        (1.0, torch.ones(2, dtype=torch.int64), TypeError, "float16, bfloat16, float32 or float64"),
        (1.0, torch.ones(2, dtype=torch.complex64), TypeError, "floating dtype"),
    ],
)
def test_bad_arguments_are_named(nu, x, exc, words):
    for fn in (log_bessel_iv, bessel_iv_ratio):
        with pytest.raises(exc, match=words):
            fn(nu, x)


@settings(max_examples=60, deadline=None)
@given(nu=st.floats(0.0, 1e5), log_x=st.floats(-8.0, 18.0))
def test_ratio_is_a_mean_resultant_length(nu, log_x):
    # I_{nu+1}/I_nu is in [0, 1]; at huge x the rounding of x Q passed 1 (0.5, 1e17 gave 1 + 9e-16).
    x = torch.tensor([10.0**log_x, 1e17], dtype=torch.float64)
    r = bessel_iv_ratio(nu, x)
    assert ((r >= 0) & (r <= 1)).all(), (nu, r)


def test_reported_ratio_at_huge_argument():
    assert float(bessel_iv_ratio(0.5, torch.tensor(1e17, dtype=torch.float64))) <= 1.0


@pytest.mark.parametrize("nu", [0.0, 0.5, 3.0, 127.0, 1000.5])
def test_both_functions_are_differentiable_in_x(nu):
    """d/dx log I_nu = nu/x + R and dR/dx = 1 - R^2 - (2 nu + 1) R / x, checked against mpmath's
    derivatives, by torch.autograd.gradcheck (float64 finite differences) and at second order."""
    x = torch.tensor([1e-3, 0.7, 12.0, 900.0, 3e4], dtype=torch.float64, requires_grad=True)
    (g_log,) = torch.autograd.grad(log_bessel_iv(nu, x).sum(), x)
    (g_ratio,) = torch.autograd.grad(bessel_iv_ratio(nu, x).sum(), x)
    with mpmath.workdps(30):
        for i, xv in enumerate(x.tolist()):
            want_log = mpmath.diff(lambda t: mpmath.log(mpmath.besseli(nu, t)), xv)
            want_ratio = mpmath.diff(lambda t: mpmath.besseli(nu + 1, t) / mpmath.besseli(nu, t), xv)
            assert abs(float(g_log[i]) - float(want_log)) <= 1e-11 * max(1.0, abs(float(want_log))), (xv, "log")
            assert abs(float(g_ratio[i]) - float(want_ratio)) <= 1e-11 * max(1.0, abs(float(want_ratio))), (xv, "ratio")
    small = x.detach()[1:4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: (log_bessel_iv(nu, t), bessel_iv_ratio(nu, t)), (small,))
    assert torch.autograd.gradgradcheck(lambda t: bessel_iv_ratio(nu, t), (small,))


def test_requires_grad_inputs_of_any_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.rand(5, dtype=dtype).requires_grad_()
        (log_bessel_iv(2.0, x).sum() + bessel_iv_ratio(2.0, x).sum()).backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bessel_iv_ratio(1.0, zero).backward()
    assert float(zero.grad) == pytest.approx(1 / 4)  # R ~ x / (2 nu + 2) at 0
