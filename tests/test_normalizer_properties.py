"""Properties of log C_p and A_p that hold for every p and kappa (hypothesis).

* log C_p is decreasing and convex, with derivative -A_p: by the mean value theorem, for k1 < k2,
  A_p(k1) (k2 - k1) <= log C_p(k1) - log C_p(k2) <= A_p(k2) (k2 - k1);
* 0 <= A_p < 1, increasing, and inside Amos' bounds (Amos 1974; Ruiz-Antolin & Segura 2016):
  k / (nu + 1/2 + sqrt(k^2 + (nu + 3/2)^2)) <= A_p(k) <= k / (nu + 1/2 + sqrt(k^2 + (nu + 1/2)^2));
* the autograd gradient equals -A_p(kappa) from mpmath;
* float32 agrees with float64 at the same (float32) kappa.
"""

import math

import mpmath_truth as truth
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmf_head import log_vmf_normalizer, vmf_mean_resultant_length

EPS64 = torch.finfo(torch.float64).eps

dims = st.one_of(st.integers(2, 300), st.integers(2, 100000), st.sampled_from([2, 3, 256, 65536, 100000]))
kappas = st.one_of(
    st.floats(-8, 8).map(lambda e: 10.0**e),  # log-uniform over the whole domain
    st.floats(0, 200),  # DINO's range of ||w|| / tau
    st.just(0.0),
)


def _f64(kappa, p, **kw):
    return log_vmf_normalizer(torch.tensor(kappa, dtype=torch.float64), p, **kw)


def _a(kappa, p):
    return vmf_mean_resultant_length(torch.tensor(kappa, dtype=torch.float64), p)


@settings(max_examples=200, deadline=None)
@given(p=dims, k1=kappas, k2=kappas)
def test_decreasing_and_convex_with_slope_minus_a(p, k1, k2):
    k1, k2 = sorted((k1, k2))
    drop = (_f64(k1, p) - _f64(k2, p)).item()
    a1, a2 = _a(k1, p).item(), _a(k2, p).item()
    # rounding of the two values (terms up to ~nu log kappa + kappa) and of the slopes
    slack = 8 * EPS64 * (abs(_f64(k1, p).item()) + abs(_f64(k2, p).item()) + (p / 2) * math.log(2 + k2) + k2)
    assert a1 * (k2 - k1) - slack <= drop <= a2 * (k2 - k1) * (1 + 1e-14) + slack


@settings(max_examples=200, deadline=None)
@given(p=dims, k1=kappas, k2=kappas)
def test_mean_resultant_length_is_in_0_1_increasing_and_within_amos_bounds(p, k1, k2):
    k1, k2 = sorted((k1, k2))
    a1, a2 = _a(k1, p).item(), _a(k2, p).item()
    assert 0.0 <= a1 <= a2 * (1 + 1e-14) and a2 <= 1.0
    assert a1 < 1.0 or k1 > 1e15  # A_p = 1 - (p - 1)/(2 kappa) + ...: only rounds to 1 beyond 1e16
    nu = p / 2 - 1
    for k, a in ((k1, a1), (k2, a2)):
        lower = k / (nu + 0.5 + math.sqrt(k * k + (nu + 1.5) ** 2))
        upper = k / (nu + 0.5 + math.sqrt(k * k + (nu + 0.5) ** 2))
        assert lower * (1 - 1e-13) <= a <= upper * (1 + 1e-13), (k, a, lower, upper)


@settings(max_examples=60, deadline=None)
@given(p=dims, kappa=kappas)
def test_gradient_equals_minus_a_from_mpmath(p, kappa):
    k = torch.tensor(kappa, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_vmf_normalizer(k, p), k)
    assert truth.error(-grad.item(), truth.mean_resultant_length(p, kappa)) <= 1e-10


@settings(max_examples=200, deadline=None)
@given(p=dims, kappa=kappas)
def test_float32_agrees_with_float64(p, kappa):
    k32 = torch.tensor(kappa, dtype=torch.float32)
    v32 = log_vmf_normalizer(k32, p).item()
    v64 = log_vmf_normalizer(k32.double(), p).item()
    assert abs(v32 - v64) <= 2e-6 * max(1.0, abs(v64))
    a32 = vmf_mean_resultant_length(k32, p).item()
    assert abs(a32 - vmf_mean_resultant_length(k32.double(), p).item()) <= 2e-6
