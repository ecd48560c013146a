"""log C_p against closed forms that need no Bessel function at all."""

import math

import torch

from vmf_head import log_vmf_normalizer


def test_p3_matches_sinh_form():
    # C_3(kappa) = kappa / (4 pi sinh kappa); log written to stay finite for large kappa.
    kappa = torch.tensor([1e-6, 0.1, 1.0, 10.0, 100.0, 1e4], dtype=torch.float64)
    log_sinh = kappa + torch.log(-torch.expm1(-2 * kappa)) - math.log(2)
    expected = torch.log(kappa) - math.log(4 * math.pi) - log_sinh
    torch.testing.assert_close(log_vmf_normalizer(kappa, 3), expected, rtol=1e-13, atol=1e-13)


def test_kappa_zero_is_minus_log_sphere_area():
    for p in (2, 3, 16, 256, 4096, 65536, 100000):
        expected = math.lgamma(p / 2) - math.log(2) - (p / 2) * math.log(math.pi)
        got = log_vmf_normalizer(torch.zeros(1, dtype=torch.float64), p).item()
        assert abs(got - expected) <= 1e-12 * max(1.0, abs(expected)), (p, got, expected)
