"""Fused Triton cross-entropy (``vmf_head.ops.cross_entropy``): the DINO-vMF multi-crop loss, iBOT-vMF's
patch term and the cross-entropy with precomputed targets, reached through ``vmf_head.functional``
with ``backend="triton"``.

Truth is a straightforward float64 re-derivation written here in DINO's and iBOT's eager form (one
log-softmax per pair, iBOT's masked mean), not the identity the kernels use; the plain-torch
reference of ``vmf_head.functional`` is compared as well. Without a GPU the kernels run in Triton's
interpreter on the CPU (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so shapes stay small
(odd K, B and crop counts); the full-size checks are marked ``gpu``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import functools

from vmf_head import functional as reference
from vmf_head.functional.cross_entropy import Pairing
from vmf_head.nn import DINOvMFLoss, iBOTvMFLoss
from vmf_head.ops import cross_entropy as fused
from vmf_head.ops import cross_entropy_forward

fused_dino_vmf_loss = functools.partial(reference.dino_vmf_loss, backend="triton")
ibot_patch_vmf_loss = functools.partial(reference.ibot_patch_vmf_loss, backend="triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a CUDA GPU, or TRITON_INTERPRET=1 (tests/conftest.py sets it when there is none)",
)
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


# ---------------------------------------------------------------------------------------------
# Independent float64 truth
# ---------------------------------------------------------------------------------------------


def _teacher_targets(teacher, center, correction, centering):
    """(q, batch_stat) in float64 from the definitions (docs/design.md, section 2)."""
    t = teacher.double()
    corr = 0.0 if correction is None else correction.double()
    if centering == "logit":
        return F.softmax((t - center.double()) / TEACHER_TEMP + corr, dim=-1), t.mean(0, keepdim=True)
    logits = t / TEACHER_TEMP + corr
    pbar = F.softmax(logits, dim=-1)
    return F.softmax(logits - center.double().log(), dim=-1), pbar.mean(0, keepdim=True)


def eager_dino_loss(student, teacher, center, n_views, n_global, s_corr, t_corr, centering):
    """DINO's eager loop: a log-softmax for every (teacher view, student view) pair, i != j."""
    q, stat = _teacher_targets(teacher, center, t_corr, centering)
    logits = student.double() / STUDENT_TEMP + (0.0 if s_corr is None else s_corr.double())
    total, pairs = 0.0, 0
    for i, q_i in enumerate(q.chunk(n_global)):
        for j, l_j in enumerate(logits.chunk(n_views)):
            if i != j:
                total = total + (-q_i * F.log_softmax(l_j, dim=-1)).sum(-1).mean()
                pairs += 1
    return total / pairs, stat


def eager_ibot_patch_loss(student, teacher, mask, center, s_corr, t_corr, centering):
    """iBOT's patch term: per image the mean over masked tokens (clamp(min=1)), then the mean."""
    k = student.shape[-1]
    q, stat = _teacher_targets(teacher.reshape(-1, k), center.reshape(1, k), t_corr, centering)
    logits = student.double() / STUDENT_TEMP + (0.0 if s_corr is None else s_corr.double())
    ce = (-q.view_as(logits) * F.log_softmax(logits, dim=-1)).sum(-1)
    per_image = (ce * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_image.mean(), stat.reshape(1, 1, k)


# ---------------------------------------------------------------------------------------------
# Inputs and comparisons
# ---------------------------------------------------------------------------------------------


def _corrections(k, gen, offset=340.0):
    """vMF-like corrections: log C_256 at kappa ~ 10 is about 340, with a spread over prototypes."""
    return offset + torch.randn(k, generator=gen, dtype=torch.float64), offset + torch.randn(
        k, generator=gen, dtype=torch.float64
    )


def _center(k, centering, gen, shape):
    if centering == "logit":
        return (0.1 * torch.randn(k, generator=gen, dtype=torch.float64)).reshape(shape)
    return torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0).reshape(shape)


def dino_inputs(k, batch, n_global, n_local, centering, with_corrections, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_views = n_global + n_local
    student = 0.5 * torch.randn(n_views * batch, k, generator=gen, dtype=torch.float64)
    teacher = 0.5 * torch.randn(n_global * batch, k, generator=gen, dtype=torch.float64)
    s_corr, t_corr = _corrections(k, gen) if with_corrections else (None, None)
    return student, teacher, _center(k, centering, gen, (1, k)), s_corr, t_corr


def _to(x, dtype):
    """A fresh leaf copy of x on the test device (never the input itself)."""
    return None if x is None else x.detach().to(device=DEVICE, dtype=dtype, copy=True)


def _rel(a, b):
    """max |a - b| / max |b| (a relative error that ignores the cancellation in near-zero entries)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def run_fused_dino(student, teacher, center, s_corr, t_corr, *, n_views, n_global, centering, dtype, corr_dtype):
    """Fused loss and gradients; inputs cast to ``dtype`` (corrections to ``corr_dtype``)."""
    s = _to(student, dtype).requires_grad_()
    sc = None if s_corr is None else _to(s_corr, corr_dtype).requires_grad_()
    loss, stat = fused_dino_vmf_loss(
        s,
        _to(teacher, dtype),
        _to(center, corr_dtype),
        n_views=n_views,
        n_global=n_global,
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        student_correction=sc,
        teacher_correction=_to(t_corr, corr_dtype),
        centering=centering,
    )
    loss.backward()
    return loss, stat, s.grad, None if sc is None else sc.grad


def run_truth_dino(student, teacher, center, s_corr, t_corr, *, n_views, n_global, centering):
    s = student.detach().double().requires_grad_()
    sc = None if s_corr is None else s_corr.detach().double().requires_grad_()
    loss, stat = eager_dino_loss(
        s,
        teacher.double(),
        center.double(),
        n_views,
        n_global,
        sc,
        None if t_corr is None else t_corr.double(),
        centering,
    )
    loss.backward()
    return loss, stat, s.grad, None if sc is None else sc.grad


def _round(x, dtype):
    """x as the kernel sees it after the cast to dtype (so the truth shares the input rounding)."""
    return None if x is None else x.to(dtype).double()


# ---------------------------------------------------------------------------------------------
# DINO term
# ---------------------------------------------------------------------------------------------

# (K, B, n_global, n_local, centering, vMF corrections)
DINO_CASES = [
    (7, 1, 2, 1, "probability", True),
    (7, 3, 2, 3, "logit", False),
    (1000, 3, 2, 3, "probability", True),
    (1000, 1, 2, 1, "logit", True),
    (1000, 3, 1, 2, "probability", False),
    (7, 3, 2, 0, "probability", True),  # every student view has its own teacher view (iBOT without local crops)
]


@needs_kernels
@pytest.mark.parametrize("k, batch, n_global, n_local, centering, with_corr", DINO_CASES)
def test_dino_float32_matches_eager_truth(k, batch, n_global, n_local, centering, with_corr):
    inputs = dino_inputs(k, batch, n_global, n_local, centering, with_corr)
    kw = dict(n_views=n_global + n_local, n_global=n_global, centering=centering)
    loss, stat, g_s, g_c = run_fused_dino(*inputs, dtype=torch.float32, corr_dtype=torch.float32, **kw)
    rounded = [_round(x, torch.float32) for x in inputs]
    t_loss, t_stat, t_g_s, t_g_c = run_truth_dino(*rounded, **kw)
    assert loss.dtype == stat.dtype == g_s.dtype == torch.float32
    assert stat.shape == (1, k)
    assert abs(loss.item() - t_loss.item()) <= 1e-5 * abs(t_loss.item())
    assert _rel(stat, t_stat) <= 1e-5
    assert _rel(g_s, t_g_s) <= 1e-5
    if with_corr:
        assert g_c.dtype == torch.float32 and _rel(g_c, t_g_c) <= 1e-5


@needs_kernels
def test_dino_many_blocks_and_splits(monkeypatch):
    """A tile of 128 elements cuts K = 300 into 10 blocks shared by 2 splits per image (3 images, 4
    target programs) and the 2 teacher rows of B = 1 into 2 splits each: the online log-sum-exp and
    the host merges of the splits are exercised."""
    monkeypatch.setattr(cross_entropy_forward, "TILE_ELEMENTS", 128)
    for batch in (1, 3):
        inputs = dino_inputs(300, batch, 2, 1, "probability", True, seed=batch)
        kw = dict(n_views=3, n_global=2, centering="probability")
        got = run_fused_dino(*inputs, dtype=torch.float32, corr_dtype=torch.float32, **kw)
        truth = run_truth_dino(*[_round(x, torch.float32) for x in inputs], **kw)
        for a, b in zip(got, truth):
            assert _rel(a, b) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("centering", ["logit", "probability"])
def test_dino_float64_is_exact(centering):
    """Float64 inputs run the same kernels in float64: agreement to rounding shows the kernel logic
    (pairing, masks, merges, the lse/dot identity) is exact, independent of float32 tolerances."""
    inputs = dino_inputs(1000, 3, 2, 3, centering, True, seed=5)
    kw = dict(n_views=5, n_global=2, centering=centering)
    got = run_fused_dino(*inputs, dtype=torch.float64, corr_dtype=torch.float64, **kw)
    truth = run_truth_dino(*inputs, **kw)
    assert got[0].dtype == got[1].dtype == torch.float64
    for a, b in zip(got, truth):
        assert _rel(a, b) <= 1e-12


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_dino_half_inputs_accumulate_in_float32(dtype, tol):
    """Half-precision outputs: the loss and the statistic are float32 results on the rounded inputs
    (float32 accuracy); the gradient comes back in the input dtype, rounded once."""
    inputs = dino_inputs(1000, 3, 2, 3, "probability", True, seed=2)
    student, teacher = inputs[0], inputs[1]
    kw = dict(n_views=5, n_global=2, centering="probability")
    loss, stat, g_s, g_c = run_fused_dino(*inputs, dtype=dtype, corr_dtype=torch.float32, **kw)
    rounded = (_round(student, dtype), _round(teacher, dtype), *[_round(x, torch.float32) for x in inputs[2:]])
    t_loss, t_stat, t_g_s, t_g_c = run_truth_dino(*rounded, **kw)
    assert loss.dtype == torch.float32 and g_s.dtype == dtype and g_c.dtype == torch.float32
    assert abs(loss.item() - t_loss.item()) <= 1e-5 * abs(t_loss.item())
    assert _rel(stat, t_stat) <= 1e-5
    assert _rel(g_c, t_g_c) <= 1e-5
    assert torch.allclose(g_s.double().cpu(), t_g_s, rtol=tol, atol=tol * float(t_g_s.abs().max()))


@needs_kernels
@pytest.mark.parametrize("k, batch, n_global, n_local, centering, with_corr", DINO_CASES[1:3])
def test_dino_matches_the_reference_function(k, batch, n_global, n_local, centering, with_corr):
    """Same contract as ``vmf_head.functional.dino_vmf_loss`` (float32 on both sides)."""
    inputs = [_to(x, torch.float32) for x in dino_inputs(k, batch, n_global, n_local, centering, with_corr)]
    kw = dict(
        n_views=n_global + n_local,
        n_global=n_global,
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        teacher_correction=inputs[4],
        centering=centering,
    )
    results = []
    for fn in (fused_dino_vmf_loss, functools.partial(reference.dino_vmf_loss, backend="reference")):
        s = inputs[0].clone().requires_grad_()
        sc = None if inputs[3] is None else inputs[3].clone().requires_grad_()
        loss, stat = fn(s, inputs[1], inputs[2], student_correction=sc, **kw)
        loss.backward()
        results.append((loss, stat, s.grad) + (() if sc is None else (sc.grad,)))
    for a, b in zip(*results):
        assert a.shape == b.shape and a.dtype == b.dtype
        # the reference rounds float32 logits near 340 (the raw correction); 2e-5 covers both sides
        assert _rel(a, b) <= 2e-5


@needs_kernels
@settings(max_examples=4, deadline=None)
@given(shift=st.floats(-500.0, 500.0), seed=st.integers(0, 2**16))
def test_equal_norms_give_dino(shift, seed):
    """docs/design.md, section 1: with equal prototype norms the correction is one constant and the loss, the statistic
    and the student gradient are DINO's; the correction's gradient sums to 0 (softmax invariance)."""
    student, teacher, center, _, _ = dino_inputs(7, 3, 2, 1, "probability", False, seed=seed)
    const = torch.full((7,), shift, dtype=torch.float64)
    kw = dict(n_views=3, n_global=2, centering="probability", dtype=torch.float32, corr_dtype=torch.float32)
    plain = run_fused_dino(student, teacher, center, None, None, **kw)
    vmf = run_fused_dino(student, teacher, center, const, const, **kw)
    for a, b in zip(vmf[:3], plain[:3]):
        assert _rel(a, b) <= 1e-6
    assert abs(float(vmf[3].sum())) <= 1e-6 * float(vmf[3].abs().max())


@needs_kernels
def test_teacher_gets_no_gradient_and_corrections_are_optional():
    student, teacher, center, _, t_corr = dino_inputs(7, 3, 2, 1, "logit", True)
    s = _to(student, torch.float32).requires_grad_()
    t = _to(teacher, torch.float32).requires_grad_()
    tc = _to(t_corr, torch.float32).requires_grad_()
    loss, stat = fused_dino_vmf_loss(
        s,
        t,
        _to(center, torch.float32),
        n_views=3,
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        teacher_correction=tc,
        centering="logit",
    )
    assert not stat.requires_grad
    loss.backward()
    assert s.grad is not None and t.grad is None and tc.grad is None


@needs_kernels
def test_row_strided_student_gives_the_same_result():
    """A column slice of a wider tensor (rows further apart than K) is read and its gradient written
    with the right strides."""
    student, teacher, center, s_corr, t_corr = dino_inputs(7, 3, 2, 1, "logit", True)
    kw = dict(n_views=3, n_global=2, centering="logit", dtype=torch.float32, corr_dtype=torch.float32)
    wide = torch.cat([student, torch.full_like(student, 1e4)], dim=1)
    s = _to(wide, torch.float32)[:, :7].requires_grad_()
    assert s.stride(0) == 14
    loss, stat = fused_dino_vmf_loss(
        s,
        _to(teacher, torch.float32),
        _to(center, torch.float32),
        n_views=3,
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        student_correction=_to(s_corr, torch.float32),
        teacher_correction=_to(t_corr, torch.float32),
        centering="logit",
    )
    loss.backward()
    plain = run_fused_dino(student, teacher, center, s_corr, t_corr, **kw)
    assert torch.equal(loss, plain[0]) and torch.equal(stat, plain[1]) and torch.equal(s.grad, plain[2])


@needs_kernels
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_float64_corrections_keep_float32_arithmetic(backend):
    """float32 logits with float64 K-vectors (corrections, center): the B x K work stays float32 (the
    loss comes back float32), and it equals the float32-correction result to float32 rounding."""
    student, teacher, center, s_corr, t_corr = dino_inputs(300, 3, 2, 2, "probability", True, seed=8)
    kw = dict(
        n_views=4,
        n_global=2,
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        centering="probability",
        backend=backend,
    )
    results = []
    for corr_dtype in (torch.float64, torch.float32):
        s = _to(student, torch.float32).requires_grad_()
        sc = _to(s_corr, corr_dtype).requires_grad_()
        loss, stat = reference.dino_vmf_loss(
            s,
            _to(teacher, torch.float32),
            _to(center, corr_dtype),
            student_correction=sc,
            teacher_correction=_to(t_corr, corr_dtype),
            **kw,
        )
        loss.backward()
        assert loss.dtype == stat.dtype == torch.float32 and sc.grad.dtype == corr_dtype
        results.append((loss, stat, s.grad, sc.grad))
    for a, b in zip(*results):
        assert _rel(a, b) <= 2e-5


@needs_kernels
def test_more_teacher_than_student_views():
    """lightly pairs every teacher view with every other student view, also for more teacher views
    (3 teacher, 2 student views: 4 pairs)."""
    inputs = dino_inputs(300, 3, 3, 0, "logit", True, seed=9)
    student = inputs[0][: 2 * 3]
    kw = dict(n_views=2, n_global=3, centering="logit")
    got = run_fused_dino(student, *inputs[1:], dtype=torch.float32, corr_dtype=torch.float32, **kw)
    truth = run_truth_dino(*[_round(x, torch.float32) for x in (student, *inputs[1:])], **kw)
    for a, b in zip(got, truth):
        assert _rel(a, b) <= 1e-5


@needs_kernels
def test_tensor_temperatures_equal_python_floats():
    """0-d tensor temperatures (a schedule on the device) give exactly what Python floats give."""
    student, teacher, center, s_corr, t_corr = (_to(x, torch.float32) for x in dino_inputs(300, 3, 2, 1, "logit", True))
    results = []
    for ts, tt in (
        (STUDENT_TEMP, TEACHER_TEMP),
        (
            torch.tensor(STUDENT_TEMP, dtype=torch.float64, device=DEVICE),
            torch.tensor(TEACHER_TEMP, dtype=torch.float64, device=DEVICE),
        ),
    ):
        s = student.clone().requires_grad_()
        loss, stat = fused_dino_vmf_loss(
            s,
            teacher,
            center,
            n_views=3,
            student_temp=ts,
            teacher_temp=tt,
            student_correction=s_corr,
            teacher_correction=t_corr,
            centering="logit",
        )
        loss.backward()
        results.append((loss, stat, s.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def eager_targets_loss(student, targets, n_views, skip_same, row_weight, s_corr):
    """DINOv2/DINOv3's eager form: a log-softmax per student view, a weighted mean per pair."""
    logits = student.double() / STUDENT_TEMP + (0.0 if s_corr is None else s_corr.double())
    batch = student.shape[0] // n_views
    weight = torch.full((batch,), 1.0 / batch, dtype=torch.float64) if row_weight is None else row_weight.double()
    total, pairs = 0.0, 0
    for i, q_i in enumerate(targets.double().chunk(targets.shape[0] // batch)):
        for j, l_j in enumerate(logits.chunk(n_views)):
            if not (skip_same and i == j):
                total = total + ((-q_i * F.log_softmax(l_j, dim=-1)).sum(-1) * weight).sum()
                pairs += 1
    return total / pairs


@needs_kernels
@pytest.mark.parametrize(
    "n_views, n_targets, skip_same, weighted",
    [
        (1, 1, False, True),  # DINOv2's global term and iBOT-style tokens: row to row
        (3, 2, True, False),  # DINOv3's forward(..., ignore_diagonal=True)
        (3, 2, False, False),  # DINOv3's forward(..., ignore_diagonal=False), DINOv2's local crops
        (2, 3, True, True),
    ],
)
def test_given_targets_match_eager_truth(n_views, n_targets, skip_same, weighted):
    gen = torch.Generator().manual_seed(10)
    k, batch = 300, 5
    student = 0.5 * torch.randn(n_views * batch, k, generator=gen, dtype=torch.float64)
    targets = torch.softmax(torch.randn(n_targets * batch, k, generator=gen, dtype=torch.float64) / 0.1, -1)
    s_corr = _corrections(k, gen)[0]
    row_weight = torch.rand(batch, generator=gen, dtype=torch.float64) if weighted else None
    s = _to(student, torch.float32).requires_grad_()
    sc = _to(s_corr, torch.float32).requires_grad_()
    loss = reference.multicrop_cross_entropy(
        s,
        _to(targets, torch.float32),
        n_views=n_views,
        student_temp=STUDENT_TEMP,
        student_correction=sc,
        skip_same_view=skip_same,
        row_weight=_to(row_weight, torch.float32),
        backend="triton",
    )
    loss.backward()
    t_s = _round(student, torch.float32).requires_grad_()
    t_sc = _round(s_corr, torch.float32).requires_grad_()
    truth = eager_targets_loss(
        t_s, _round(targets, torch.float32), n_views, skip_same, _round(row_weight, torch.float32), t_sc
    )
    truth.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - truth.item()) <= 1e-5 * abs(truth.item())
    assert _rel(s.grad, t_s.grad) <= 1e-5 and _rel(sc.grad, t_sc.grad) <= 1e-5


# ---------------------------------------------------------------------------------------------
# iBOT patch term
# ---------------------------------------------------------------------------------------------


def patch_inputs(k, images, tokens, centering, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = 0.5 * torch.randn(images, tokens, k, generator=gen, dtype=torch.float64)
    teacher = 0.5 * torch.randn(images, tokens, k, generator=gen, dtype=torch.float64)
    mask = torch.rand(images, tokens, generator=gen) < 0.4
    mask[0] = False  # an image without masked tokens contributes 0 (iBOT's clamp(min=1))
    mask[-1, 0] = True
    s_corr, t_corr = _corrections(k, gen)
    return student, teacher, mask, _center(k, centering, gen, (1, 1, k)), s_corr, t_corr


def run_patch(fn, student, teacher, mask, center, s_corr, t_corr, *, centering, dtype, corr_dtype):
    s = _to(student, dtype).requires_grad_()
    sc = _to(s_corr, corr_dtype).requires_grad_()
    loss, stat = fn(
        s,
        _to(teacher, dtype),
        mask.to(DEVICE),
        _to(center, corr_dtype),
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        student_correction=sc,
        teacher_correction=_to(t_corr, corr_dtype),
        centering=centering,
    )
    loss.backward()
    return loss, stat, s.grad, sc.grad


def truth_patch(student, teacher, mask, center, s_corr, t_corr, *, centering):
    s = student.detach().double().requires_grad_()
    sc = s_corr.detach().double().requires_grad_()
    loss, stat = eager_ibot_patch_loss(s, teacher.double(), mask, center.double(), sc, t_corr.double(), centering)
    loss.backward()
    return loss, stat, s.grad, sc.grad


@needs_kernels
@pytest.mark.parametrize("k, images, tokens, centering", [(7, 3, 5, "probability"), (1000, 3, 7, "logit")])
def test_ibot_patch_float32_matches_eager_truth(k, images, tokens, centering):
    inputs = patch_inputs(k, images, tokens, centering)
    got = run_patch(ibot_patch_vmf_loss, *inputs, centering=centering, dtype=torch.float32, corr_dtype=torch.float32)
    rounded = [x if x.dtype == torch.bool else _round(x, torch.float32) for x in inputs]
    truth = truth_patch(*rounded, centering=centering)
    assert got[1].shape == (1, 1, k)
    for a, b in zip(got, truth):
        assert _rel(a, b) <= 1e-5
    assert float(got[2][0].abs().max()) == 0.0  # the unmasked image gets no gradient


@needs_kernels
def test_ibot_patch_float64_and_bfloat16():
    inputs = patch_inputs(1000, 2, 5, "probability", seed=3)
    got = run_patch(
        ibot_patch_vmf_loss, *inputs, centering="probability", dtype=torch.float64, corr_dtype=torch.float64
    )
    for a, b in zip(got, truth_patch(*inputs, centering="probability")):
        assert _rel(a, b) <= 1e-12
    got = run_patch(
        ibot_patch_vmf_loss, *inputs, centering="probability", dtype=torch.bfloat16, corr_dtype=torch.float32
    )
    rounded = (
        _round(inputs[0], torch.bfloat16),
        _round(inputs[1], torch.bfloat16),
        inputs[2],
        *[_round(x, torch.float32) for x in inputs[3:]],
    )
    truth = truth_patch(*rounded, centering="probability")
    assert got[2].dtype == torch.bfloat16
    for i in (0, 1, 3):
        assert _rel(got[i], truth[i]) <= 1e-5
    assert torch.allclose(got[2].double().cpu(), truth[2], rtol=2**-8, atol=2**-8 * float(truth[2].abs().max()))


@needs_kernels
def test_ibot_patch_matches_the_reference_function():
    inputs = patch_inputs(1000, 3, 5, "probability", seed=4)
    kw = dict(centering="probability", dtype=torch.float32, corr_dtype=torch.float32)
    for a, b in zip(
        run_patch(ibot_patch_vmf_loss, *inputs, **kw),
        run_patch(functools.partial(reference.ibot_patch_vmf_loss, backend="reference"), *inputs, **kw),
    ):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) <= 2e-5


# ---------------------------------------------------------------------------------------------
# Dispatch and argument checks
# ---------------------------------------------------------------------------------------------


@needs_kernels
def test_module_backend_triton_equals_reference():
    """``DINOvMFLoss(backend="triton")`` reaches the fused op with the contract's arguments and
    updates its center like the reference backend."""
    k, batch = 1000, 3
    student, teacher, _, _, _ = dino_inputs(k, batch, 2, 1, "probability", False, seed=6)
    norms = 1.0 + 0.1 * torch.rand(k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outputs = []
    for backend in ("triton", "reference"):
        module = DINOvMFLoss(k, 3, 0.04, 0.07, 2, 4, p=16, backend=backend).to(DEVICE)
        s = _to(student, torch.float32).requires_grad_()
        n_s = _to(norms, torch.float32).requires_grad_()
        loss = module(s, _to(teacher, torch.float32), 1, student_norms=n_s, teacher_norms=_to(norms, torch.float32))
        loss.backward()
        outputs.append((loss, module.center, s.grad, n_s.grad))
    for a, b in zip(*outputs):
        assert _rel(a, b) <= 2e-5


@needs_kernels
def test_ibot_module_backend_triton_equals_reference():
    """``iBOTvMFLoss(backend="triton")``: both terms through the fused ops, same losses, gradients and
    centers as the reference backend (masks given as iBOT's per-crop list)."""
    k, k2, batch, tokens = 64, 48, 2, 5
    gen = torch.Generator().manual_seed(7)
    cls_s = torch.randn(3 * batch, k, generator=gen)
    cls_t = torch.randn(2 * batch, k, generator=gen)
    patch_s = torch.randn(2 * batch, tokens, k2, generator=gen)
    patch_t = torch.randn(2 * batch, tokens, k2, generator=gen)
    masks = [torch.rand(batch, tokens, generator=gen) < 0.5 for _ in range(2)]
    norms = (1 + 0.1 * torch.rand(k, generator=gen), 1 + 0.1 * torch.rand(k2, generator=gen))
    outputs = []
    for backend in ("triton", "reference"):
        module = iBOTvMFLoss(k, k2, 2, 1, 0.04, 0.07, 0.04, 0.07, 2, 4, p=16, backend=backend).to(DEVICE)
        s_cls, s_patch = cls_s.to(DEVICE).requires_grad_(), patch_s.to(DEVICE).requires_grad_()
        s_local = s_cls[2 * batch :]
        n_s = tuple(n.to(DEVICE).requires_grad_() for n in norms)
        losses = module(
            (s_cls[: 2 * batch], s_patch),
            (cls_t.to(DEVICE), patch_t.to(DEVICE)),
            s_local,
            student_mask=[m.to(DEVICE) for m in masks],
            epoch=1,
            student_norms=n_s,
            teacher_norms=tuple(n.to(DEVICE) for n in norms),
        )
        losses["loss"].backward()
        outputs.append(
            (
                losses["cls"],
                losses["patch"],
                module.center,
                module.center2,
                s_cls.grad,
                s_patch.grad,
                *(n.grad for n in n_s),
            )
        )
    for a, b in zip(*outputs):
        assert _rel(a, b) <= 2e-5


@needs_kernels
@pytest.mark.parametrize("centering", ["probability", None])
def test_custom_ops_pass_opcheck(centering):
    """The forward and backward are torch.library custom ops: schema, fake (meta) implementation and
    autograd registration are consistent (torch.library.opcheck), with computed and given targets."""
    student, teacher, center, s_corr, t_corr = (
        _to(x, torch.float32) for x in dino_inputs(7, 3, 2, 1, "probability", True)
    )
    weights = torch.full((9,), 1.0 / 12, device=DEVICE)
    layout = fused.PairLayout.of(Pairing(n_views=3, n_teacher_views=2), rows=9).ints()
    inv_temps = torch.tensor([1 / STUDENT_TEMP, 1 / TEACHER_TEMP], device=DEVICE)
    if centering is None:
        args = (
            student.requires_grad_(),
            torch.softmax(teacher, -1),
            weights,
            None,
            s_corr.requires_grad_(),
            None,
            inv_temps,
            layout,
            False,
        )
    else:
        args = (
            student.requires_grad_(),
            teacher,
            weights,
            center.reshape(-1).log(),
            s_corr.requires_grad_(),
            t_corr,
            inv_temps,
            layout,
            True,
        )
    torch.library.opcheck(fused._forward_op, args)


@needs_kernels
def test_a_python_float_temperature_stays_an_input_of_the_compiled_graph():
    """A teacher temperature passed as a changing Python float: dynamo specialises the first value, then
    one graph serves every other (the fused op takes it as a tensor made inside the graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    student, teacher, center, _, _ = (_to(x, torch.float32) for x in dino_inputs(64, 3, 2, 1, "probability", False))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(temp):
        return fused_dino_vmf_loss(student, teacher, center, n_views=3, student_temp=0.1, teacher_temp=temp)[0]

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for temp in (0.04, 0.05, 0.06, 0.07):
        torch.testing.assert_close(compiled(temp), step(temp))
    assert counter.frame_count == 2


@needs_kernels
def test_torch_compile_traces_the_fused_loss_in_one_graph():
    """fullgraph=True: no graph break around the fused op (the dispatch picks it inside compiled
    training steps), and the compiled loss and gradients equal the eager ones."""
    student, teacher, center, s_corr, t_corr = (_to(x, torch.float32) for x in dino_inputs(300, 3, 2, 1, "logit", True))

    def step(s, sc):
        loss, stat = fused_dino_vmf_loss(
            s,
            teacher,
            center,
            n_views=3,
            student_temp=STUDENT_TEMP,
            teacher_temp=TEACHER_TEMP,
            student_correction=sc,
            teacher_correction=t_corr,
            centering="logit",
        )
        return 2 * loss, stat

    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        s, sc = student.clone().requires_grad_(), s_corr.clone().requires_grad_()
        loss, stat = fn(s, sc)
        loss.backward()
        results.append((loss, stat, s.grad, sc.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rejects_sinkhorn_bad_center_and_devices_without_triton(monkeypatch):
    student, teacher, center, _, _ = (
        x.float() if x is not None else None for x in dino_inputs(7, 2, 2, 1, "logit", False)
    )
    kw = dict(n_views=3, student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP)
    with pytest.raises(ValueError, match="Sinkhorn"):
        fused_dino_vmf_loss(student, teacher, center, centering="sinkhorn", **kw)
    with pytest.raises(ValueError, match="center"):
        fused_dino_vmf_loss(student, teacher, center[:, :5], centering="logit", **kw)
    with pytest.raises(ValueError, match="student_correction"):
        fused_dino_vmf_loss(student, teacher, center, centering="logit", student_correction=torch.zeros(6), **kw)
    with pytest.raises(ValueError, match="teacher_temp"):
        fused_dino_vmf_loss(student, teacher, center, centering="logit", **{**kw, "teacher_temp": 0.0})
    with pytest.raises(ValueError, match="teacher_output must hold the 4 global views"):
        fused_dino_vmf_loss(student, teacher, center, centering="logit", n_global=4, **kw)
    monkeypatch.setattr(fused, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="CUDA"):
        fused_dino_vmf_loss(student.cpu(), teacher.cpu(), center.cpu(), centering="logit", **kw)
    # auto takes the reference for the same CPU tensors
    reference.dino_vmf_loss(student.cpu(), teacher.cpu(), center.cpu(), centering="logit", **kw)


# ---------------------------------------------------------------------------------------------
# Full size on a GPU (run by benchmarks/gpu_check.sh)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("centering", ["logit", "probability"])
def test_full_size_matches_reference_on_gpu(dtype, centering):
    """B = 64, 2 + 8 crops, K = 65,536: loss, statistic and gradients equal the reference's."""
    k, batch, n_views = 65536, 64, 10
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = (0.5 * torch.randn(n_views * batch, k, device="cuda", generator=gen)).to(dtype)
    teacher = (0.5 * torch.randn(2 * batch, k, device="cuda", generator=gen)).to(dtype)
    s_corr = 340 + torch.randn(k, device="cuda", generator=gen)
    t_corr = 340 + torch.randn(k, device="cuda", generator=gen)
    center = _center(k, centering, torch.Generator().manual_seed(1), (1, k)).float().cuda()
    kw = dict(
        n_views=n_views,
        n_global=2,
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        teacher_correction=t_corr,
        centering=centering,
    )
    results = []
    for fn in (fused_dino_vmf_loss, functools.partial(reference.dino_vmf_loss, backend="reference")):
        s = student.clone().requires_grad_()
        sc = s_corr.clone().requires_grad_()
        loss, stat = fn(s, teacher, center, student_correction=sc, **kw)
        loss.backward()
        results.append((loss, stat, s.grad, sc.grad))
    (loss, stat, g_s, g_c), (r_loss, r_stat, r_g_s, r_g_c) = results
    assert g_s.dtype == dtype
    assert _rel(loss, r_loss) <= 2e-5 and _rel(stat, r_stat) <= 2e-5 and _rel(g_c, r_g_c) <= 2e-5
    tol = 2e-5 if dtype == torch.float32 else 2**-7  # the gradient is rounded to the input dtype
    assert _rel(g_s, r_g_s) <= tol


@pytest.mark.gpu
@needs_gpu
def test_full_size_ibot_patch_matches_reference_on_gpu():
    """iBOT's patch term at 2 x 32 images, 196 tokens, K2 = 8192, bfloat16."""
    k, images, tokens = 8192, 64, 196
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = (0.5 * torch.randn(images, tokens, k, device="cuda", generator=gen)).bfloat16()
    teacher = (0.5 * torch.randn(images, tokens, k, device="cuda", generator=gen)).bfloat16()
    mask = torch.rand(images, tokens, device="cuda", generator=gen) < 0.3
    s_corr = 340 + torch.randn(k, device="cuda", generator=gen)
    center = torch.full((1, 1, k), 1.0 / k, device="cuda")
    results = []
    for fn in (ibot_patch_vmf_loss, functools.partial(reference.ibot_patch_vmf_loss, backend="reference")):
        s = student.clone().requires_grad_()
        sc = s_corr.clone().requires_grad_()
        loss, stat = fn(
            s,
            teacher,
            mask,
            center,
            student_temp=STUDENT_TEMP,
            teacher_temp=TEACHER_TEMP,
            student_correction=sc,
            teacher_correction=s_corr,
            centering="probability",
        )
        loss.backward()
        results.append((loss, stat, s.grad, sc.grad))
    (loss, stat, g_s, g_c), (r_loss, r_stat, r_g_s, r_g_c) = results
    assert _rel(loss, r_loss) <= 2e-5 and _rel(stat, r_stat) <= 2e-5 and _rel(g_c, r_g_c) <= 2e-5
    assert _rel(g_s, r_g_s) <= 2**-7
