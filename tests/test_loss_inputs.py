"""Bad input raises ValueErrors that name the problem; half precision and autocast stay finite; the
backend choice; the center as checkpoint state."""

from __future__ import annotations

import pytest
import torch

from vmf_head import DINOvMFLoss, iBOTvMFLoss
from vmf_head.nn import _loss_common

K, NCROPS, B = 16, 4, 3


def _dino(**kwargs):
    return DINOvMFLoss(K, NCROPS, 0.04, 0.07, 2, 5, **{"p": 32, **kwargs})


def _batch(k=K, ncrops=NCROPS, b=B, teacher_views=2):
    return torch.randn(ncrops * b, k), torch.randn(teacher_views * b, k)


@pytest.mark.parametrize(
    "student, teacher, match",
    [
        (torch.randn(NCROPS * B + 1, K), torch.randn(2 * B, K), "not divisible by n_views"),
        (torch.randn(NCROPS * B, K), torch.randn(3 * B, K), "2 global views"),
        (torch.randn(NCROPS * B, K), torch.randn(2 * B, K + 1), "teacher_output has K=17"),
        (torch.randn(NCROPS * B, K + 1), torch.randn(2 * B, K + 1), "out_dim=16"),
        (torch.randn(NCROPS, B, K), torch.randn(2 * B, K), "must be 2-D"),
    ],
)
def test_bad_shapes(student, teacher, match):
    with pytest.raises(ValueError, match=match):
        _dino()(student, teacher, 0)


def test_bad_norms():
    student, teacher = _batch()
    with pytest.raises(ValueError, match="both student_norms and teacher_norms"):
        _dino()(student, teacher, 0, torch.ones(K))
    with pytest.raises(ValueError, match=r"teacher_norms must be a tensor of shape \(K,\) = \(16,\)"):
        _dino()(student, teacher, 0, torch.ones(K), torch.ones(K + 1))


@pytest.mark.parametrize("epoch", [-1, 5, 1.0, "1"])
def test_epoch_outside_the_schedule(epoch):
    student, teacher = _batch()
    with pytest.raises(ValueError, match=r"epoch must be an int in \[0, nepochs\) = \[0, 5\)"):
        _dino()(student, teacher, epoch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"centering": "mean"}, "centering must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"p": 1}, "p must be an int >= 2"),
        ({"center_momentum": 1.5}, "center_momentum must be"),
        ({"student_temp": 0.0}, "student_temp must be a positive"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dino(**kwargs)


def test_schedule_longer_than_training():
    with pytest.raises(ValueError, match="does not fit in nepochs=3"):
        DINOvMFLoss(K, NCROPS, 0.04, 0.07, 4, 3)


@pytest.mark.parametrize("which, value", [("student_output", float("nan")), ("teacher_output", float("inf"))])
def test_non_finite_outputs_are_named(which, value):
    student, teacher = _batch()
    (student if which == "student_output" else teacher)[1, 2] = value
    with pytest.raises(ValueError, match=f"{which} has non-finite values"):
        _dino()(student, teacher, 0)
    assert not torch.isfinite(_dino(check_finite=False)(student, teacher, 0))


def test_ibot_bad_inputs():
    loss = iBOTvMFLoss(K, 8, 2, 2, 0.04, 0.07, 0.04, 0.07, 1, 3)
    s_cls, t_cls = torch.randn(2 * B, K), torch.randn(2 * B, K)
    s_patch, t_patch = torch.randn(2 * B, 6, 8), torch.randn(2 * B, 6, 8)
    masks = [torch.rand(B, 2, 3) < 0.5 for _ in range(4)]
    with pytest.raises(ValueError, match="student_local_cls must hold the 2 local crops"):
        loss((s_cls, s_patch), (t_cls, t_patch), None, masks, 0)
    with pytest.raises(ValueError, match="at least ngcrops=2"):
        loss((s_cls, s_patch), (t_cls, t_patch), torch.randn(2 * B, K), masks[:1], 0)
    with pytest.raises(ValueError, match=r"student_local_cls must be a \(crops \* B, out_dim=16\) tensor"):
        loss((s_cls, s_patch), (t_cls, t_patch), torch.randn(2 * B, K + 1), masks, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        loss((s_cls, s_patch), (t_cls, t_patch[:, :5]), torch.randn(2 * B, K), masks, 0)
    with pytest.raises(ValueError, match=r"student_norms\[1\] \(patch\) must be a tensor of shape \(K,\) = \(8,\)"):
        norms = (torch.ones(K), torch.ones(K))
        loss((s_cls, s_patch), (t_cls, t_patch), torch.randn(2 * B, K), masks, 0, norms, norms)


@pytest.mark.parametrize("dtype, scale", [(torch.float16, 65504.0), (torch.bfloat16, 1e36), (torch.bfloat16, 1.0)])
@pytest.mark.parametrize("centering", ["logit", "probability", "sinkhorn"])
def test_half_precision_inputs_stay_finite(dtype, scale, centering):
    """Softmax, log-sum-exp and the normaliser run in float32: no inf/NaN up to the largest float16
    (65504) and for bfloat16 up to float32's range times the temperature."""
    torch.manual_seed(0)
    student = (torch.rand(NCROPS * B, K) * 2 - 1).mul(scale).to(dtype).requires_grad_()
    teacher = (torch.rand(2 * B, K) * 2 - 1).mul(scale).to(dtype)
    norms = (torch.rand(K) + 0.5).to(dtype).requires_grad_()
    loss = _dino(centering=centering)(student, teacher, 0, norms, norms.detach())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student.grad.dtype == dtype and torch.isfinite(student.grad).all()
    assert torch.isfinite(norms.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_cpu_autocast(dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, K)
    x, xt = torch.randn(NCROPS * B, 8), torch.randn(2 * B, 8)
    norms = (torch.rand(K) + 0.5).requires_grad_()
    loss_fn = _dino()
    with torch.autocast("cpu", dtype=dtype):
        student, teacher = head(x), head(xt).detach()
        assert student.dtype == dtype
        loss = loss_fn(student, teacher, 1, norms, norms.detach())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    assert loss_fn.center.dtype == torch.float32


def test_second_backward_through_the_same_graph_raises():
    """The analytic backward reuses its buffer: a second pass is refused, never silently wrong."""
    student, teacher = _batch()
    student.requires_grad_()
    loss = _dino(backend="reference")(student, teacher, 0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backend_choice(monkeypatch):
    student, teacher = _batch()
    monkeypatch.setitem(_loss_common._imported, "dino_vmf_loss", ImportError("no triton here"))
    with pytest.raises(RuntimeError, match="backend='triton' needs the fused op vmf_head.ops.dino_loss"):
        _dino(backend="triton")(student, teacher, 0)
    # auto falls back to the reference when the fused op is missing
    assert torch.isfinite(_dino(backend="auto")(student, teacher, 0))

    class FusedWithoutSinkhorn:
        CENTERINGS = ("logit", "probability")

        @staticmethod
        def dino_vmf_loss(*args, **kwargs):
            raise AssertionError("the fused op must not be used here")

    monkeypatch.setitem(_loss_common._imported, "dino_vmf_loss", FusedWithoutSinkhorn)
    assert torch.isfinite(_dino(backend="auto")(student, teacher, 0))  # CPU inputs: reference
    with pytest.raises(ValueError, match="backend='triton' supports centering in"):
        _dino(backend="triton", centering="sinkhorn")(student, teacher, 0)


def test_center_is_checkpoint_state():
    loss = _dino(centering="logit")
    assert torch.equal(loss.center, torch.zeros(1, K))
    assert torch.allclose(_dino().center, torch.full((1, K), 1 / K))
    student, teacher = _batch()
    loss(student, teacher, 0)
    state = loss.state_dict()
    assert set(state) == {"center"}  # DINO's DINOLoss has the same single buffer
    fresh = _dino(centering="logit")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.center, loss.center) and fresh.center.abs().sum() > 0
