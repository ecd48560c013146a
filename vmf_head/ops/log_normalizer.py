"""Triton kernels for the vMF log-normaliser log C_p(kappa) and its derivative -A_p(kappa).

The kernels mirror the reference algorithm of ``vmf_head.special.bessel`` step for step, with the
same shift M, term count K and polynomial coefficients (``_debye.shifted_order``,
``_debye.series_coefficients``), so the two agree to float64 rounding:

1. uniform (Debye) expansion at the shifted order mu = nu + M, nu = p/2 - 1 (DLMF 10.41.3, 10.41.4):
   r = sqrt(1 + (kappa/mu)^2), t = 1/r,
   -h_mu = -log(I_mu(kappa)/kappa^mu) = mu (log(1 + r) - r) + log(r / U(t)^2)/2 + a_mu,
   Q_mu = I_{mu+1}/(kappa I_mu) = (1/(1 + r) + t W(t)/U(t)) / mu;
2. M steps of the downward recurrence Q_n = 1/(kappa^2 Q_{n+1} + 2(n+1)) (DLMF 10.29.1), with
   log prod Q_n accumulated as prod Q_n (1 + kappa) so that it neither under- nor overflows;
3. log C_p = -(p/2) log(2 pi) - h_nu and d/dkappa log C_p = -kappa Q_nu; where
   ``vmf_head.special.vmf.anchor`` says so (p >= 352) the large terms of the value are taken in its
   anchored form (the same anchor kappa_0 and 40-digit constant), which keeps it accurate near the
   zero of log C_p.

``approx`` mode is the seed paper's leading term nu log(nu + s) - s + log(s)/2 - (nu + 1/2) log(2 pi) with
s = hypot(kappa, nu), and its exact derivative.

All arithmetic is float64 whatever the storage dtype: for large p the value is a small difference
of terms near p log p (p = 65536: 4e5), which float32 arithmetic cannot resolve to the 2e-6 the
library promises. The per-order constants (shifted order, term counts, shift, coefficients,
log 2 pi terms) live in a small cached float64 tensor per (p, mode, accuracy, device), because
Triton passes Python floats to a kernel as float32, and because loops bounded by values read at run
time let one compiled kernel serve every p (no recompilation per dimension). For the same reasons
the temperature of the prototype kernels is read from a 0-d float64 tensor: every scalar a kernel
needs in float64 reaches it through memory, never as a launch argument.

Nothing here synchronises with the host: shapes decide the grid, the per-order constants are
uploaded once and cached, and there is no data-dependent Python control flow.

Kernels are compiled for CUDA tensors; with ``TRITON_INTERPRET=1`` in the environment *before this
module is imported* (Triton decides when ``@triton.jit`` runs), they run through Triton's
interpreter on CPU tensors instead (``INTERPRETED`` records which). The autograd and dispatch layer
is ``vmf_head.normalizer``; this module only launches kernels.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..special import _debye
from ..special.bessel import X_LARGE, log_order_constant, tolerance
from ..special.vmf import anchor
from ._launch import is_interpreted, on_device

_LOG_2PI = math.log(2.0 * math.pi)

# Layout of the float64 constants tensor: a header, then U's and W's coefficients (highest first).
_MU = tl.constexpr(0)
_NU = tl.constexpr(1)
_INV_MU2 = tl.constexpr(2)  # 1/mu^2
_PLAIN_CONST = tl.constexpr(3)  # a_mu - (p/2) log(2 pi)
_APPROX_CONST = tl.constexpr(4)
_N_U = tl.constexpr(5)  # counts and shift are stored as float64 too: one compiled kernel serves every p
_N_W = tl.constexpr(6)
_SHIFT = tl.constexpr(7)
# NaN is read from memory too: a NaN constexpr global fails Triton's compile-time consistency
# check of globals (NaN != NaN), which the interpreter does not run.
_NAN = tl.constexpr(8)
_ANCHORED = tl.constexpr(9)  # 1.0 for the anchored form, then kappa_0, r_0, b_p, 1/(mu^2 (1 + r_0))
_KAPPA0 = tl.constexpr(10)
_R0 = tl.constexpr(11)
_ANCHOR_B = tl.constexpr(12)
_ANCHOR_SCALE = tl.constexpr(13)
_HEADER = tl.constexpr(14)
_X_LARGE = tl.constexpr(X_LARGE)

# Block sizes, chosen from ptxas's register report for sm_90 (benchmarks/kernel_registers.py; no GPU
# was at hand to time them, see docs/triton.md): the float64 series costs about 55 registers per
# element in flight.
_BLOCK = 256  # elementwise kernels: elements per program (2 per thread, 54 registers, no spill)
_TILE = 1024  # fused kernels: elements of W per program and loop step ([32, 32] for p >= 32)
_MAX_BLOCK_D = 32  # narrow column blocks keep few threads per row, so little per-row math is replicated


@triton.jit
def _to_f64(x):
    # 16-bit floats go through float32: not every GPU converts them to float64 directly.
    if x.dtype.is_fp16() or x.dtype.is_bf16():
        x = x.to(tl.float32)
    return x.to(tl.float64)


@triton.jit
def _from_f64(x, dtype: tl.constexpr):
    if dtype.is_fp16() or dtype.is_bf16():
        x = x.to(tl.float32)
    return x.to(dtype)


@triton.jit
def _horner(params, offset, n, t):
    """sum_j c_j t^(n-1-j) for the n >= 2 coefficients at params[offset:], highest power first."""
    acc = tl.load(params + offset) * t + tl.load(params + offset + 1)
    for j in range(2, n):
        acc = acc * t + tl.load(params + offset + j)
    return acc


@triton.jit
def _expansion(x2, params):
    """r, t and U(t) of the uniform expansion at the shifted order mu, for x2 = kappa^2."""
    r = tl.sqrt(1.0 + x2 * tl.load(params + _INV_MU2))
    t = 1.0 / r
    u = _horner(params, _HEADER, tl.load(params + _N_U).to(tl.int32), t)
    return r, t, u


@triton.jit
def _scaled_ratio_shifted(r, t, u, params):
    """Q_mu = I_{mu+1}/(kappa I_mu) = (1/(1 + r) + t W(t)/U(t)) / mu, over one division (each float64
    division is a long instruction sequence: with three, ptxas spilled)."""
    n_u = tl.load(params + _N_U).to(tl.int32)
    w = _horner(params, _HEADER + n_u, tl.load(params + _N_W).to(tl.int32), t)
    r1 = r + 1.0
    return (u + r1 * t * w) / (r1 * u * tl.load(params + _MU))


@triton.jit
def _log1p(y):
    # log(1 + y) to a few ulps from log alone (the rounding of 1 + y cancels in log(u) / (u - 1)).
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _log_normalizer_exact(x, params):
    """log C_p(x) for float64 x >= 0 (values outside are fixed by ``_finish``)."""
    x2 = x * x
    r, t, u = _expansion(x2, params)
    # The recurrence's product first, then log(r / U^2): t and U are dead before the large terms
    # (fewer registers live through the branch; ptxas spilled with the other order).
    out = 0.5 * tl.log(r / (u * u))
    shift = tl.load(params + _SHIFT).to(tl.int32)
    if shift > 0:
        nu = tl.load(params + _NU)
        q = _scaled_ratio_shifted(r, t, u, params)
        x1 = 1.0 + x
        prod = tl.full(x.shape, 1.0, tl.float64)
        for i in range(shift):
            # order n = nu + shift - 1 - i, so 2(n + 1) = 2(nu + shift - i)
            q = 1.0 / (2.0 * (nu + (shift - i).to(tl.float64)) + x2 * q)
            prod = prod * q * x1
        out = out + (tl.log(prod) - shift.to(tl.float64) * tl.log(x1))
    mu = tl.load(params + _MU)
    if tl.load(params + _ANCHORED) > 0.0:
        kappa0 = tl.load(params + _KAPPA0)
        diff = (x - kappa0) * (x + kappa0) / (r + tl.load(params + _R0))  # mu^2 (r - r_0)
        out = out + (_log1p(diff * tl.load(params + _ANCHOR_SCALE)) * mu - diff / mu + tl.load(params + _ANCHOR_B))
    else:
        out = out + ((tl.log(r + 1.0) - r) * mu + tl.load(params + _PLAIN_CONST))
    return out


@triton.jit
def _scaled_derivative_exact(x, params):
    """(d/dx log C_p(x)) / x = -Q_nu(x) = -I_{nu+1}(x)/(x I_nu(x)); -1/p at x = 0."""
    x2 = x * x
    r, t, u = _expansion(x2, params)
    q = _scaled_ratio_shifted(r, t, u, params)
    nu = tl.load(params + _NU)
    shift = tl.load(params + _SHIFT).to(tl.int32)
    for i in range(shift):
        q = 1.0 / (2.0 * (nu + (shift - i).to(tl.float64)) + x2 * q)
    return -q


@triton.jit
def _hypot_nu(x, nu):
    # hypot without overflow for large x (nu > 0 in approx mode, so the larger one is positive).
    a = tl.maximum(x, nu)
    b = tl.minimum(x, nu)
    r = b / a
    return a * tl.sqrt(1.0 + r * r)


@triton.jit
def _log_normalizer_approx(x, params):
    nu = tl.load(params + _NU)
    s = _hypot_nu(x, nu)
    return nu * tl.log(nu + s) - s + 0.5 * tl.log(s) - tl.load(params + _APPROX_CONST)


@triton.jit
def _scaled_derivative_approx(x, params):
    """(d/dx approx)/x = 1/(2 s^2) - 1/(nu + s)."""
    nu = tl.load(params + _NU)
    s = _hypot_nu(x, nu)
    return 0.5 / (s * s) - 1.0 / (nu + s)


@triton.jit
def _log_normalizer(x, params, EXACT: tl.constexpr):
    out = _log_normalizer_exact(x, params) if EXACT else _log_normalizer_approx(x, params)
    return out


@triton.jit
def _scaled_derivative(x, params, EXACT: tl.constexpr):
    out = _scaled_derivative_exact(x, params) if EXACT else _scaled_derivative_approx(x, params)
    return out


@triton.jit
def _finish(out, x, at_large, params):
    """The rest of the domain, as the reference maps it: NaN below 0 and at NaN, the large-kappa
    limit ``at_large`` (exact to float64) above X_LARGE."""
    out = tl.where(x >= 0.0, out, tl.load(params + _NAN))
    return tl.where(x > _X_LARGE, at_large, out)


@triton.jit
def _elementwise_kernel(
    kappa_ptr, out_ptr, params, n, DERIVATIVE: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr
):
    """out = log C_p(kappa), or its derivative -A_p(kappa) when DERIVATIVE, over n flat elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _to_f64(tl.load(kappa_ptr + offs, mask=mask, other=0.0))
    if DERIVATIVE:
        # -A_p in [-1, 0]: the rounding of x Q can pass 1 at huge x
        out = _finish(tl.maximum(x * _scaled_derivative(x, params, EXACT), -1.0), x, -1.0, params)
    else:
        out = _finish(_log_normalizer(x, params, EXACT), x, -x, params)
    tl.store(out_ptr + offs, _from_f64(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_norms(w_ptr, rows, row_mask, n_cols, stride_r, stride_c, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """||w_k|| (float64) for the rows ``rows`` of W, summing squares in float64."""
    acc = tl.zeros([BLOCK_K], dtype=tl.float64)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m = row_mask[:, None] & (cols < n_cols)[None, :]
        w = _to_f64(tl.load(w_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=m, other=0.0))
        acc += tl.sum(w * w, axis=1)
    return tl.sqrt(acc)


@triton.jit
def _prototype_forward_kernel(
    w_ptr,
    out_ptr,
    params,
    n_rows,
    n_cols,
    stride_r,
    stride_c,
    tau_ptr,
    EXACT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out_k = log C_p(||w_k|| / tau) for the rows of W (K x D); D = 1 gives |g_k| / tau."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    tau = tl.load(tau_ptr)
    kappa = _row_norms(w_ptr, rows, row_mask, n_cols, stride_r, stride_c, BLOCK_K, BLOCK_D) / tau
    out = _finish(_log_normalizer(kappa, params, EXACT), kappa, -kappa, params)
    tl.store(out_ptr + rows, _from_f64(out, out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _prototype_backward_kernel(
    grad_ptr,
    w_ptr,
    gw_ptr,
    params,
    n_rows,
    n_cols,
    stride_r,
    stride_c,
    gstride_r,
    gstride_c,
    tau_ptr,
    EXACT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dL/dw_k = dL/dout_k * (d log C_p/dkappa)(kappa_k) / tau * w_k / ||w_k||.

    With kappa = ||w||/tau and (d log C_p/dkappa)(kappa) = kappa * D(kappa), the factor is
    D(kappa)/tau^2 * w_k: no division by ||w_k||, and 0 for w_k = 0 as the limit says."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    tau = tl.load(tau_ptr)
    kappa = _row_norms(w_ptr, rows, row_mask, n_cols, stride_r, stride_c, BLOCK_K, BLOCK_D) / tau
    g = _to_f64(tl.load(grad_ptr + rows, mask=row_mask, other=0.0))
    scale = g * _scaled_derivative(kappa, params, EXACT) / (tau * tau)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m = row_mask[:, None] & (cols < n_cols)[None, :]
        w = _to_f64(tl.load(w_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=m, other=0.0))
        gw = _from_f64(scale[:, None] * w, gw_ptr.dtype.element_ty)
        tl.store(gw_ptr + rows[:, None] * gstride_r + cols[None, :] * gstride_c, gw, mask=m)


INTERPRETED: bool = is_interpreted(_elementwise_kernel)
"""True when the kernels were built under ``TRITON_INTERPRET=1``: they then run on CPU tensors."""


def _plan(p: int, mode: str, tol: float) -> tuple[float, ...]:
    """The float64 constants of one (p, mode, accuracy): the same shift M, term count K and
    coefficients as the reference (``vmf_head.special.bessel``)."""
    nu = 0.5 * p - 1.0
    anchored = None
    if mode == "exact":
        shift, terms = _debye.shifted_order(nu, tol)
        cu, cw = _debye.series_coefficients(nu + shift, terms, tol)
        anchored = anchor(p, tol)
    else:
        shift, cu, cw = 0, (), ()
    mu = nu + shift
    header = (
        mu,
        nu,
        1.0 / mu**2,
        log_order_constant(mu) - 0.5 * p * _LOG_2PI,
        (nu + 0.5) * _LOG_2PI,
        len(cu),
        len(cw),
        shift,
        math.nan,
    )
    if anchored is None:
        header += (0.0, 0.0, 0.0, 0.0, 0.0)
    else:
        kappa0, r0, b = anchored
        header += (1.0, kappa0, r0, b, 1.0 / (mu * mu * (1.0 + r0)))
    return header + cu + cw


@functools.lru_cache(maxsize=256)
def _constants(p: int, mode: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Uploaded once per (order, accuracy, device): a host-to-device copy per call would be a sync point.
    return torch.tensor(_plan(p, mode, tolerance(dtype)), dtype=torch.float64, device=device)


def log_normalizer(kappa: torch.Tensor, *, p: int, mode: str, derivative: bool) -> torch.Tensor:
    """log C_p(kappa), or its derivative (= -A_p(kappa) in exact mode), elementwise: same shape,
    dtype and layout as ``kappa``, one kernel launch.

    Arguments are validated by ``vmf_head.normalizer``; kappa must be a CUDA tensor (a CPU tensor
    under the interpreter), p an int >= 2, mode one of ``MODES``."""
    out = torch.empty_like(kappa)
    n = kappa.numel()
    if n == 0:
        return out
    # One flat launch when input and output share a dense layout; otherwise work on a contiguous copy.
    flat_ok = kappa.is_contiguous() and out.is_contiguous()
    src = kappa if flat_ok else kappa.contiguous()
    dst = out if flat_ok else torch.empty_like(src)
    with on_device(kappa.device):
        _elementwise_kernel[(triton.cdiv(n, _BLOCK),)](
            kappa_ptr=src,
            out_ptr=dst,
            params=_constants(p, mode, kappa.dtype, kappa.device),
            n=n,
            DERIVATIVE=derivative,
            EXACT=mode == "exact",
            BLOCK=_BLOCK,
        )
    if not flat_ok:
        out.copy_(dst)
    return out


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    # A vector of norms g is a K x 1 matrix: its row norms are |g_k| and w/||w|| is sign(g).
    return weight if weight.dim() == 2 else weight.unsqueeze(1)


def _blocks(n_cols: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(n_cols, 1)), _MAX_BLOCK_D)
    return max(1, min(_BLOCK, _TILE // block_d)), block_d


def prototype_log_normalizer(
    weight: torch.Tensor, *, tau: torch.Tensor, p: int, mode: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """log C_p(||w_k|| / tau) for the K rows of ``weight`` (K x D), or log C_p(|g_k| / tau) for a
    vector ``weight`` of K norms; a (K,) tensor of ``out_dtype``. ``tau`` is a 0-d float64 tensor on
    the weights' device. One kernel launch: the row norms are summed in float64 and never written
    to memory."""
    w = _as_matrix(weight)
    n_rows, n_cols = w.shape
    out = torch.empty(n_rows, dtype=out_dtype, device=weight.device)
    if n_rows == 0:
        return out
    block_k, block_d = _blocks(n_cols)
    with on_device(weight.device):
        _prototype_forward_kernel[(triton.cdiv(n_rows, block_k),)](
            w_ptr=w,
            out_ptr=out,
            params=_constants(p, mode, weight.dtype, weight.device),
            n_rows=n_rows,
            n_cols=n_cols,
            stride_r=w.stride(0),
            stride_c=w.stride(1),
            tau_ptr=tau,
            EXACT=mode == "exact",
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
    return out


def prototype_log_normalizer_backward(
    grad: torch.Tensor, weight: torch.Tensor, *, tau: torch.Tensor, p: int, mode: str
) -> torch.Tensor:
    """Gradient of ``sum_k grad_k * log C_p(||w_k|| / tau)`` with respect to ``weight``:
    ``grad_k * (d log C_p/dkappa)(kappa_k) / tau * w_k / ||w_k||`` (0 for a zero row), shaped and
    strided like ``weight`` (``torch.empty_like``). One kernel launch."""
    grad_weight = torch.empty_like(weight)
    w, gw = _as_matrix(weight), _as_matrix(grad_weight)
    n_rows, n_cols = w.shape
    if w.numel() == 0:
        return grad_weight
    block_k, block_d = _blocks(n_cols)
    with on_device(weight.device):
        _prototype_backward_kernel[(triton.cdiv(n_rows, block_k),)](
            grad_ptr=grad.contiguous(),
            w_ptr=w,
            gw_ptr=gw,
            params=_constants(p, mode, weight.dtype, weight.device),
            n_rows=n_rows,
            n_cols=n_cols,
            stride_r=w.stride(0),
            stride_c=w.stride(1),
            gstride_r=gw.stride(0),
            gstride_c=gw.stride(1),
            tau_ptr=tau,
            EXACT=mode == "exact",
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
    return grad_weight
