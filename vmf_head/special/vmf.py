"""The von Mises-Fisher log-normaliser log C_p(kappa) and mean resultant length A_p(kappa).

    C_p(kappa) = kappa^nu / ((2 pi)^(p/2) I_nu(kappa)),   nu = p/2 - 1,
    log C_p(kappa) = -(p/2) log(2 pi) - log(I_nu(kappa) / kappa^nu),
    d/dkappa log C_p(kappa) = -A_p(kappa) = -I_{p/2}(kappa) / I_{p/2-1}(kappa).

Plain PyTorch forward computations without autograd; ``vmf_head.normalizer`` wraps them in the
differentiable public function. Inputs are float64 tensors with kappa >= 0 (the public layer maps
the rest of the real line to NaN).
"""

from __future__ import annotations

import math

import torch

from .bessel import bessel_iv_scaled_ratio, log_bessel_iv_scaled

_LOG_2PI = math.log(2.0 * math.pi)


def log_normalizer_exact(kappa: torch.Tensor, p: int, tol: float) -> torch.Tensor:
    """log C_p(kappa) for float64 ``kappa >= 0``; at 0 it is log Gamma(p/2) - log 2 - (p/2) log pi."""
    return -0.5 * p * _LOG_2PI - log_bessel_iv_scaled(0.5 * p - 1.0, kappa, tol)


def mean_resultant_length(kappa: torch.Tensor, p: int, tol: float) -> torch.Tensor:
    """A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa) in [0, 1) for float64 ``kappa >= 0``."""
    return kappa * bessel_iv_scaled_ratio(0.5 * p - 1.0, kappa, tol)


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
