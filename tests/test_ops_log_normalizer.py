"""The Triton kernels of log C_p (``vmf_head.ops.log_normalizer``) against the reference backend and
closed forms, the backend dispatch, and the custom operators under torch.compile.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (``tests/conftest.py``
sets TRITON_INTERPRET=1); on a GPU machine the same tests run the compiled kernels on CUDA tensors.
Shapes stay small: the interpreter executes every program in Python.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vmf_head
from vmf_head import log_vmf_normalizer, normalizer, prototype_log_normalizer, vmf_mean_resultant_length


def _triton_device() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    try:
        from vmf_head.ops import log_normalizer as kernels
    except ImportError:
        return None
    return "cpu" if kernels.INTERPRETED else None


DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(
    DEVICE is None, reason="needs Triton: a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors"
)

# Several blocks of the elementwise kernel (256 elements) plus a tail, so masking is exercised.
# numpy (inside the interpreter) warns about the NaN and inf lanes of the special values.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

N_KAPPA = 2 * 1024 + 37
SPECIALS = [0.0, math.inf, -1.0, math.nan, 1e-300, 1e200]


def _kappa(dtype: torch.dtype, device: str | None = DEVICE) -> torch.Tensor:
    grid = torch.logspace(-6, 6, N_KAPPA - len(SPECIALS), dtype=torch.float64)
    return torch.cat([torch.tensor(SPECIALS, dtype=torch.float64), grid]).to(dtype=dtype, device=device)


def _assert_agree(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Same NaN/inf pattern, and |got - want| <= rel * max(1, |want|) on the finite entries."""
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan())
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
    err = (got[finite] - want[finite]).abs() / want[finite].abs().clamp_min(1.0)
    assert err.numel() == 0 or err.max().item() <= rel, err.max().item()


REL = {torch.float32: 2e-6, torch.float64: 1e-12}


# ----------------------------------------------------------------------------------------------
# Elementwise kernels against the reference backend


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# approx mode is defined for p >= 3 only, so p = 2 is paired with exact mode alone.
@pytest.mark.parametrize(
    ("p", "mode"), [(p, m) for p in (2, 3, 256, 4096) for m in ("exact", "approx") if (p, m) != (2, "approx")]
)
def test_forward_and_derivative_match_reference(p, mode, dtype):
    kappa = _kappa(dtype)
    got = log_vmf_normalizer(kappa, p, mode=mode, backend="triton")
    want = log_vmf_normalizer(kappa, p, mode=mode, backend="reference")
    _assert_agree(got, want, REL[dtype])
    slope = normalizer._log_vmf_normalizer_grad_op(kappa, p, mode, "triton")
    _assert_agree(slope, normalizer._log_vmf_normalizer_grad_op(kappa, p, mode, "reference"), REL[dtype])


@needs_triton
@pytest.mark.parametrize("p", [1024, 65536])
def test_kernel_keeps_the_absolute_bound_near_the_zero(p):
    # Against mpmath, not the reference: the kernel must take the anchored form too, or float64
    # rounding of terms of size kappa0 (3.6e5 at p = 65536) costs 6e-11 here.
    pytest.importorskip("mpmath", reason="needs mpmath for the truth (the test extra)")
    import mpmath_truth as truth

    from vmf_head.special.vmf import zero

    kappa0 = zero(p)
    kappas = [kappa0 + d for d in (0.0, 0.5, -0.5, 2.0, -2.0, 60.0, -60.0)]
    got = log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float64, device=DEVICE), p, backend="triton")
    for k, o in zip(kappas, got.tolist()):
        assert truth.error(o, truth.log_normalizer(p, k)) <= 1e-14, (k, o)


@needs_triton
def test_autograd_and_mean_resultant_length_through_the_kernel():
    kappa = _kappa(torch.float64)[5:].clone().requires_grad_()
    log_vmf_normalizer(kappa, 256, backend="triton").sum().backward()
    want = vmf_mean_resultant_length(kappa.detach(), 256, backend="reference")
    _assert_agree(-kappa.grad, want, 1e-12)
    _assert_agree(vmf_mean_resultant_length(kappa.detach(), 256, backend="triton"), want, 1e-12)


@needs_triton
def test_triton_backend_really_runs_the_kernel(monkeypatch):
    # Guards every comparison above: "triton" must not quietly fall back to the reference.
    from vmf_head.ops import log_normalizer as kernels

    calls = []
    real = kernels.log_normalizer
    monkeypatch.setattr(kernels, "log_normalizer", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    log_vmf_normalizer(_kappa(torch.float32)[:10], 16, backend="triton")
    assert len(calls) == 1


@needs_triton
def test_closed_forms_p2_p3():
    # Independent of the reference: C_2 = 1/(2 pi I_0), C_3 = kappa/(4 pi sinh kappa),
    # A_3 = coth(kappa) - 1/kappa.
    special = pytest.importorskip("scipy.special")
    kappa = torch.logspace(-3, 4, 300, dtype=torch.float64)
    k = kappa.numpy()
    log_i0 = torch.from_numpy(special.i0e(k)).log() + kappa
    want2 = -math.log(2 * math.pi) - log_i0
    log_sinh = kappa + torch.log(-torch.expm1(-2 * kappa)) - math.log(2)
    want3 = torch.log(kappa) - math.log(4 * math.pi) - log_sinh
    _assert_agree(log_vmf_normalizer(kappa.to(DEVICE), 2, backend="triton"), want2, 1e-13)
    _assert_agree(log_vmf_normalizer(kappa.to(DEVICE), 3, backend="triton"), want3, 1e-13)
    a3 = 1 / torch.tanh(kappa) - 1 / kappa
    _assert_agree(vmf_mean_resultant_length(kappa.to(DEVICE), 3, backend="triton"), a3, 1e-12)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    kappa = torch.logspace(-4, 4, 200).to(dtype=dtype, device=DEVICE)
    got = log_vmf_normalizer(kappa, 256, backend="triton")
    want = log_vmf_normalizer(kappa, 256, backend="reference")
    assert got.dtype == dtype
    # float64 rounded to the storage dtype by both; through float32 in the kernel: at most 1 ulp apart.
    torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=0)


@needs_triton
@pytest.mark.parametrize("shape", [(0,), (3, 0), (7, 5), (2, 3, 11)])
def test_shapes_and_empty(shape):
    kappa = torch.rand(shape, dtype=torch.float64, device=DEVICE) * 50
    got = log_vmf_normalizer(kappa, 64, backend="triton")
    assert got.shape == kappa.shape
    _assert_agree(got, log_vmf_normalizer(kappa, 64, backend="reference"), 1e-12)


@needs_triton
def test_non_contiguous_input_keeps_layout():
    base = torch.logspace(-3, 3, 60, dtype=torch.float64, device=DEVICE).reshape(6, 10)
    for kappa in (base.t(), base[:, ::3]):
        got = log_vmf_normalizer(kappa, 16, backend="triton")
        assert got.stride() == torch.empty_like(kappa).stride()  # what the fake implementation says
        _assert_agree(got, log_vmf_normalizer(kappa.contiguous(), 16, backend="reference"), 1e-12)


@needs_triton
@settings(max_examples=25, deadline=None)
@given(p=st.integers(2, 3000), kappa=st.lists(st.floats(0.0, 1e7, allow_nan=False), min_size=1, max_size=40))
def test_any_order_matches_reference(p, kappa):
    k = torch.tensor(kappa, dtype=torch.float64, device=DEVICE)
    _assert_agree(log_vmf_normalizer(k, p, backend="triton"), log_vmf_normalizer(k, p, backend="reference"), 1e-12)


# ----------------------------------------------------------------------------------------------
# Fused prototype kernels: norms, kappa and log C_p in one launch; dL/dW in one launch


def _prototypes(k: int, p: int, dtype: torch.dtype) -> torch.Tensor:
    """K rows with norms spread over 1e-4..1e4 (kappa up to 1e5 at tau = 0.1), one zero row."""
    gen = torch.Generator().manual_seed(k * 1000 + p)
    w = torch.randn(k, p, dtype=torch.float64, generator=gen)
    w = w / w.norm(dim=1, keepdim=True) * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    w[k // 3] = 0.0
    return w.to(dtype)


def _independent(weight: torch.Tensor, tau: float, p: int, grad: torch.Tensor, mode: str):
    """Straightforward float64 derivation: norms, then log C_p, then
    dL/dw_k = grad_k * (d log C_p/dkappa)(kappa_k) / tau * w_k / ||w_k||."""
    w = weight.double().cpu()
    w = w if w.dim() == 2 else w[:, None]
    norms = torch.sqrt((w * w).sum(dim=1))
    kappa = norms / tau
    value = log_vmf_normalizer(kappa, p, mode=mode, backend="reference")
    slope = normalizer._log_vmf_normalizer_grad_op(kappa, p, mode, "reference")
    direction = torch.where(norms[:, None] > 0, w / norms[:, None], 0.0)
    grad_w = (grad.double().cpu() * slope / tau)[:, None] * direction
    return value, grad_w.reshape(weight.shape)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, p", [(37, 3), (37, 256), (5, 4096)])
@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_prototype_kernel_matches_float64_derivation(k, p, mode, dtype):
    tau = 0.07
    weight = _prototypes(k, p, dtype).to(DEVICE).requires_grad_()
    out = prototype_log_normalizer(weight, tau, mode=mode, backend="triton")
    assert out.shape == (k,) and out.dtype == dtype
    grad = torch.linspace(-1, 2, k, dtype=dtype, device=DEVICE)
    (out * grad).sum().backward()
    value, grad_w = _independent(weight.detach(), tau, p, grad, mode)
    _assert_agree(out, value.to(dtype), REL[dtype])
    scale = grad_w.abs().max()
    assert ((weight.grad.double().cpu() - grad_w).abs().max() / scale).item() <= REL[dtype]
    assert weight.grad[k // 3].abs().max().item() == 0.0  # zero prototype: zero gradient


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prototype_kernel_matches_reference_backend(dtype):
    weight = _prototypes(29, 256, dtype).to(DEVICE)
    wt, wr = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    out_t = prototype_log_normalizer(wt, 0.1, backend="triton")
    out_r = prototype_log_normalizer(wr, 0.1, backend="reference")
    assert out_t.dtype == out_r.dtype == torch.float32  # the correction is never rounded to 16 bits
    # The reference sums squares in float32, the kernel in float64: kappa differs by ~1e-7.
    _assert_agree(out_t, out_r, 2e-6)
    grad = torch.randn(29, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    (out_t * grad).sum().backward()
    (out_r * grad).sum().backward()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(
        wt.grad.float(), wr.grad.float(), rtol=4 * eps, atol=4 * eps * wr.grad.abs().max().item()
    )


@needs_triton
@pytest.mark.parametrize("shape", [(41,), (41, 1)])
def test_prototype_from_norms(shape):
    g = torch.linspace(-3.0, 3.0, 41, dtype=torch.float64).reshape(shape).to(DEVICE).requires_grad_()
    out = prototype_log_normalizer(g, 0.1, 256, backend="triton")
    out.sum().backward()
    value, grad_g = _independent(g.detach(), 0.1, 256, torch.ones(41, dtype=torch.float64), "exact")
    _assert_agree(out, value, 1e-12)
    assert g.grad.shape == g.shape
    torch.testing.assert_close(g.grad.cpu(), grad_g, rtol=1e-12, atol=1e-15)


@needs_triton
def test_prototype_strided_weight_and_empty():
    w = _prototypes(12, 40, torch.float64).to(DEVICE)
    for weight in (w[:, ::2], w.t().contiguous().t()):
        weight = weight.requires_grad_()
        out = prototype_log_normalizer(weight, 0.5, backend="triton")
        out.sum().backward()
        value, grad_w = _independent(
            weight.detach(), 0.5, weight.shape[1], torch.ones(12, dtype=torch.float64), "exact"
        )
        _assert_agree(out, value, 1e-12)
        assert weight.grad.stride() == torch.empty_like(weight).stride()
        torch.testing.assert_close(weight.grad.cpu(), grad_w, rtol=1e-12, atol=1e-15)
    empty = torch.empty(0, 7, device=DEVICE, requires_grad=True)
    out = prototype_log_normalizer(empty, 0.1, backend="triton")
    out.sum().backward()
    assert out.shape == (0,) and empty.grad.shape == (0, 7)


# ----------------------------------------------------------------------------------------------
# The compiler sees what the interpreter does not (types, globals, lowering): compile for Hopper


def test_kernels_compile_for_hopper_without_a_gpu():
    """Every kernel launch the ops make at DINO's sizes (normaliser and fused loss, 16-bit and float64
    inputs) compiles for sm_90, ptxas included, without spilling registers. This caught a NaN
    constexpr global that the interpreter accepts and the compiler rejects."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton's NVIDIA backend")
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "kernel_registers.py")
    res = subprocess.run(
        [sys.executable, script, "--arch", "90", "--dtypes", "bfloat16", "float64"],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"},
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| _")]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert kernels >= {
        "_elementwise_kernel",
        "_prototype_forward_kernel",
        "_prototype_backward_kernel",
        "_teacher_stats_kernel",
        "_center_stat_kernel",
        "_student_forward_kernel",
        "_student_backward_kernel",
        "_merge_kernel",
    }
    spilling = [row for row in rows if not row.rstrip(" |").endswith("/ 0")]
    assert not spilling, spilling


# ----------------------------------------------------------------------------------------------
# Argument checks and dispatch


def test_prototype_argument_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend"):
        prototype_log_normalizer(w, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="tau"):
        prototype_log_normalizer(w, 0.0)
    with pytest.raises(ValueError, match="tau"):
        prototype_log_normalizer(w, math.nan)
    with pytest.raises(TypeError, match="tau"):
        prototype_log_normalizer(w, torch.tensor([0.1]))
    with pytest.raises(TypeError, match="tau"):
        prototype_log_normalizer(w, "0.1")
    with pytest.raises(TypeError, match="p must be an int"):
        prototype_log_normalizer(w, 0.1, 8.0)
    with pytest.raises(ValueError, match="disagrees"):
        prototype_log_normalizer(w, 0.1, 16)
    with pytest.raises(ValueError, match="p is required"):
        prototype_log_normalizer(w[:, 0], 0.1)
    with pytest.raises(ValueError, match="shape"):
        prototype_log_normalizer(torch.randn(2, 3, 4), 0.1)
    with pytest.raises(TypeError, match="floating"):
        prototype_log_normalizer(torch.ones(4, 8, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="backend"):
        log_vmf_normalizer(torch.ones(3), 8, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        vmf_mean_resultant_length(torch.ones(3), 8, backend=None)


def test_reference_prototype_path_is_norms_then_log_normalizer():
    w = _prototypes(9, 16, torch.float64).requires_grad_()
    out = prototype_log_normalizer(w, 0.2, backend="reference")
    grad = torch.arange(9, dtype=torch.float64)
    (out * grad).sum().backward()
    value, grad_w = _independent(w.detach(), 0.2, 16, grad, "exact")
    _assert_agree(out, value, 1e-13)
    torch.testing.assert_close(w.grad, grad_w, rtol=1e-12, atol=1e-15)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_package_works_without_triton():
    # Triton blocked from importing: the package imports, "auto" takes the reference on the CPU,
    # and "triton" says why it cannot run.
    code = """
import sys
sys.modules["triton"] = None
import torch, vmf_head
k = torch.tensor([0.5, 2.0], dtype=torch.float64)
assert torch.isfinite(vmf_head.log_vmf_normalizer(k, 256)).all()
assert vmf_head.prototype_log_normalizer(torch.randn(3, 8), 0.1).shape == (3,)
try:
    vmf_head.log_vmf_normalizer(k, 256, backend="triton")
except RuntimeError as exc:
    print("ERROR:", exc)
"""
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert "ERROR: backend='triton' cannot run here: Triton is not available" in res.stdout


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    pytest.importorskip("triton", reason="needs Triton installed (without it the error is the other one)")
    code = """
import torch, vmf_head
try:
    vmf_head.log_vmf_normalizer(torch.ones(3), 256, backend="triton")
except RuntimeError as exc:
    print("ERROR:", exc)
"""
    res = _run_python(code, TRITON_INTERPRET="0")
    assert res.returncode == 0, res.stderr
    assert "ERROR: backend='triton' cannot run here" in res.stdout and "TRITON_INTERPRET=1" in res.stdout


# ----------------------------------------------------------------------------------------------
# torch.library registration and torch.compile (reference backend on the CPU)


def test_custom_ops_pass_opcheck():
    kappa = torch.logspace(-3, 3, 9, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(normalizer._log_vmf_normalizer_op, (kappa, 16, "exact", "reference"))
    weight = _prototypes(5, 8, torch.float64).requires_grad_()
    tau = torch.tensor(0.1, dtype=torch.float64)
    torch.library.opcheck(normalizer._prototype_op, (weight, tau, 8, "exact", "reference"))


def test_torch_compile_fullgraph_forward_and_backward():
    def loss(weight, kappa, tau):
        correction = prototype_log_normalizer(weight, tau)
        return (correction * correction.detach().softmax(0)).sum() + log_vmf_normalizer(kappa, 256).sum()

    compiled = torch.compile(loss, fullgraph=True)
    weight = _prototypes(10, 256, torch.float32)
    kappa = torch.logspace(-2, 3, 7)
    grads = []
    for fn in (compiled, loss):
        w, k = weight.clone().requires_grad_(), kappa.clone().requires_grad_()
        value = fn(w, k, 0.1)
        value.backward()
        grads.append((value.detach(), w.grad, k.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_takes_the_kernel_and_never_syncs(dtype, monkeypatch):
    from vmf_head.ops import log_normalizer as kernels

    calls = []
    for name in ("log_normalizer", "prototype_log_normalizer", "prototype_log_normalizer_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels,
            name,
            lambda *a, _real=real, _name=name, **kw: (
                calls.append(_name + ("_derivative" if kw.get("derivative") else "")) or _real(*a, **kw)
            ),
        )
    weight = _prototypes(65536, 256, dtype).cuda().requires_grad_()
    kappa = torch.logspace(-6, 6, 100_003, dtype=dtype, device="cuda").requires_grad_()

    def step():
        out = prototype_log_normalizer(weight, 0.1)
        (out.sum() + log_vmf_normalizer(kappa, 256).sum()).backward()
        return out

    step()  # first call per order uploads the constants (a host-to-device copy)
    torch.cuda.synchronize()
    assert sorted(set(calls)) == [
        "log_normalizer",
        "log_normalizer_derivative",
        "prototype_log_normalizer",
        "prototype_log_normalizer_backward",
    ]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = prototype_log_normalizer(weight.detach(), 0.1, backend="reference")
    _assert_agree(out.detach(), want, REL[dtype] if dtype == torch.float64 else 2e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_torch_compile_with_kernels():
    def loss(weight, tau):
        return prototype_log_normalizer(weight, tau).logsumexp(0)

    weight = _prototypes(4096, 256, torch.float32).cuda()
    results = []
    for fn in (torch.compile(loss, fullgraph=True), loss):
        w = weight.clone().requires_grad_()
        value = fn(w, 0.1)
        value.backward()
        results.append((value.detach(), w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_public_exports():
    assert vmf_head.prototype_log_normalizer is prototype_log_normalizer
    assert "prototype_log_normalizer" in vmf_head.__all__
