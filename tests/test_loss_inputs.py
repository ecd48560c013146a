"""Every bad input of the loss modules and their pure functions gets a ValueError or TypeError that
names the argument; nothing returns a silently wrong number (non-finite inputs, a logit-space center
in a probability-centerd loss, an empty batch, a missing ``p``); half precision and autocast stay
finite; the backend choice; the center as checkpoint state."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmf_head import DINOvMFLoss, VMFPrototypeHead, _dispatch, _validation, iBOTvMFLoss
from vmf_head import functional as F

K, NCROPS, B = 16, 4, 3


def _dino(**kwargs):
    return DINOvMFLoss(K, NCROPS, 0.04, 0.07, 2, 5, **{"p": 32, **kwargs})


def _ibot(**kwargs):
    return iBOTvMFLoss(K, 8, 2, 2, 0.04, 0.07, 0.04, 0.07, 1, 3, **{"p": 32, **kwargs})


def _batch(k=K, ncrops=NCROPS, b=B, teacher_views=2):
    return torch.randn(ncrops * b, k), torch.randn(teacher_views * b, k)


def _norms(k=K):
    return torch.rand(k) + 0.5


def _ibot_batch(b=B, tokens=6):
    g = torch.Generator().manual_seed(0)
    cls = (torch.randn(2 * b, K, generator=g), torch.randn(2 * b, K, generator=g))
    patch = (torch.randn(2 * b, tokens, 8, generator=g), torch.randn(2 * b, tokens, 8, generator=g))
    masks = [torch.rand(b, 2, 3, generator=g) < 0.5 for _ in range(4)]
    return (cls[0], patch[0]), (cls[1], patch[1]), torch.randn(2 * b, K, generator=g), masks


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
    with pytest.raises(ValueError, match=r"teacher_norms must have shape \(K,\) = \(16,\)"):
        _dino()(student, teacher, 0, torch.ones(K), torch.ones(K + 1))
    with pytest.raises(TypeError, match=r"student_norms must have a floating dtype .* got torch.int64"):
        _dino()(student, teacher, 0, torch.ones(K, dtype=torch.int64), torch.ones(K))
    with pytest.raises(TypeError, match=r"teacher_norms must be a torch.Tensor"):
        _dino()(student, teacher, 0, torch.ones(K), [1.0] * K)


def test_norms_without_p_are_refused():
    """p decides log C_p; a default would be silently wrong for every head but one."""
    student, teacher = _batch()
    loss = DINOvMFLoss(K, NCROPS, 0.04, 0.07, 2, 5)
    assert torch.isfinite(loss(student, teacher, 0))  # plain DINO needs no p
    with pytest.raises(ValueError, match=r"p=head.p"):
        loss(student, teacher, 0, _norms(), _norms())
    assert "p=32" in repr(_dino())  # the p a loss was built with shows in its repr


def test_p_from_the_head_gives_the_heads_normaliser():
    """With p = head.p the correction is log C_p at the head's own dimension (the loss with another p
    differs: the mismatch the argument guards against is real)."""
    head = VMFPrototypeHead(12, K, norm_last_layer=False, hidden_dim=16, bottleneck_dim=8)
    torch.nn.init.uniform_(head.last_layer.weight_g, 0.5, 2.0)
    out = head(torch.randn(NCROPS * B, 12))
    norms = head.prototype_norms()
    right, wrong = (
        DINOvMFLoss(K, NCROPS, 0.04, 0.07, 2, 5, p=p)(out, out[: 2 * B].detach(), 0, norms, norms.detach())
        for p in (head.p, 256)
    )
    want = F.dino_vmf_loss(
        out,
        out[: 2 * B].detach(),
        torch.full((1, K), 1 / K),
        n_views=NCROPS,
        student_temp=0.1,
        teacher_temp=0.04,
        student_correction=F.vmf_correction(norms, 0.1, 8),
        teacher_correction=F.vmf_correction(norms.detach(), 0.04, 8),
    )[0]
    assert torch.equal(right, want) and abs(float((right - wrong).detach())) > 1e-3


@pytest.mark.parametrize(
    "epoch, exc, match",
    [
        (-1, ValueError, r"epoch must be an int >= 0"),
        (5, ValueError, r"epoch must be in \[0, nepochs\) = \[0, 5\)"),
        (1.0, TypeError, "epoch must be an int"),
        ("1", TypeError, "epoch must be an int"),
        (torch.tensor(1.0), TypeError, "epoch must be an int or a 0-d integer tensor"),
        (torch.tensor([1]), TypeError, "epoch must be an int or a 0-d integer tensor"),
    ],
)
def test_bad_epochs(epoch, exc, match):
    student, teacher = _batch()
    with pytest.raises(exc, match=match):
        _dino()(student, teacher, epoch)


@pytest.mark.parametrize("epoch", [np.int64(1), np.int32(1), torch.tensor(1)])
def test_numpy_and_tensor_epochs_equal_the_int(epoch):
    student, teacher = _batch()
    assert torch.equal(_dino()(student, teacher, epoch), _dino()(student, teacher, 1))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"centering": "mean"}, ValueError, "centering must be one of"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"mode": "fast"}, ValueError, "mode must be one of"),
        ({"p": 1}, ValueError, "p must be an int >= 2"),
        ({"p": 32.0}, TypeError, "p must be an int"),
        ({"center_momentum": 1.5}, ValueError, "center_momentum must be"),
        ({"center_momentum": "0.9"}, TypeError, "center_momentum must be a real number"),
        ({"student_temp": 0.0}, ValueError, "student_temp must be a finite number in"),
        ({"student_temp": "0.1"}, TypeError, "student_temp must be a positive number"),
        ({"sinkhorn_iterations": -1}, ValueError, "sinkhorn_iterations must be an int >= 0"),
    ],
)
def test_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _dino(**kwargs)


@pytest.mark.parametrize(
    "position, value, exc, match",
    [
        (4, 0.0, ValueError, "^warmup_teacher_temp must"),
        (6, 0.0, ValueError, "^warmup_teacher_temp2 must"),
        (7, float("inf"), ValueError, "^teacher_temp2 must"),
        (5, "0.07", TypeError, "^teacher_temp must be a real number"),
        (8, 4, ValueError, "does not fit in nepochs=3"),
    ],
)
def test_ibot_schedule_errors_name_the_argument(position, value, exc, match):
    args = [K, 8, 2, 2, 0.04, 0.07, 0.04, 0.07, 1, 3]
    args[position] = value
    with pytest.raises(exc, match=match):
        iBOTvMFLoss(*args, p=32)


@pytest.mark.parametrize(
    "name, value, exc",
    [("lambda1", float("nan"), ValueError), ("lambda2", float("inf"), ValueError), ("lambda1", "1", TypeError)],
)
def test_ibot_loss_weights_must_be_finite_numbers(name, value, exc):
    with pytest.raises(exc, match=f"^{name} must be"):
        _ibot(**{name: value})


@settings(max_examples=20, deadline=None)
@given(integer=st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]))
def test_numpy_integers_are_accepted_for_every_integer_argument(integer):
    student, teacher = _batch()
    loss = DINOvMFLoss(
        integer(K), integer(NCROPS), 0.04, 0.07, integer(2), integer(5), p=integer(32), sinkhorn_iterations=integer(3)
    )
    assert torch.equal(loss(student, teacher, integer(1), _norms(), _norms()) * 0, torch.zeros(()))
    ibot = iBOTvMFLoss(
        integer(K),
        integer(8),
        integer(2),
        integer(2),
        0.04,
        0.07,
        0.04,
        0.07,
        integer(1),
        integer(3),
        mim_start_epoch=integer(1),
        p=integer(32),
    )
    assert ibot.teacher_temp2_schedule.shape == (3,)


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


def test_negative_norms_are_named():
    student, teacher = _batch()
    norms = _norms()
    norms[3] = -1.0
    with pytest.raises(ValueError, match="student_norms has negative values"):
        _dino()(student, teacher, 0, norms, _norms())
    with pytest.raises(ValueError, match=r"teacher_norms\[1\] has negative values"):
        s, t, local, masks = _ibot_batch()
        _ibot()(s, t, local, masks, 0, (_norms(), _norms(8)), (_norms(), -_norms(8)))


def test_overflowing_logits_are_named():
    student, teacher = _batch()
    with pytest.raises(ValueError, match="the logits overflow float32"):
        _dino()(student * 1e37, teacher, 0)


@pytest.mark.parametrize("make", [_dino, _ibot])
def test_a_logit_space_center_is_refused_by_a_probability_centerd_loss(make):
    """A plain DINO/iBOT checkpoint's center (raw output means) read as a distribution would train
    with a meaningless center (loss 25.9 instead of 5.5 in the report): a ValueError instead."""
    logit = make(centering="logit")
    logit.center.add_(0.3)
    with pytest.raises(ValueError, match="center is not a probability vector"):
        make().load_state_dict(logit.state_dict())
    probability = make()
    probability.load_state_dict(make().state_dict())  # a probability center loads
    make(centering="logit").load_state_dict(logit.state_dict())


def test_empty_batch_keeps_the_center_and_gives_zero_loss():
    """B = 0 (one empty rank): loss 0 with a zero gradient, the center does not move (no NaN)."""
    loss = _dino()
    before = loss.center.clone()
    student = torch.empty(0, K, requires_grad=True)
    value = loss(student, torch.empty(0, K), 0, _norms().requires_grad_(), _norms())
    value.backward()
    assert value.item() == 0.0 and torch.equal(student.grad, torch.zeros(0, K))
    assert torch.equal(loss.center, before)


def test_ibot_empty_batch():
    s, t, local, masks = _ibot_batch(b=0)
    loss = _ibot()
    before = (loss.center.clone(), loss.center2.clone())
    out = loss(s, t, local, masks, 0, (_norms(), _norms(8)), (_norms(), _norms(8)))
    assert all(float(v) == 0.0 for v in out.values())
    assert torch.equal(loss.center, before[0]) and torch.equal(loss.center2, before[1])


def test_global_batch_means_bad_and_empty_inputs():
    stat = torch.rand(1, K)
    with pytest.raises(ValueError, match="at least one"):
        F.global_batch_means()
    with pytest.raises(ValueError, match="no samples"):
        F.global_batch_means((stat, 0))
    with pytest.raises(TypeError, match=r"stats\[0\] must be a pair"):
        F.global_batch_means(stat)
    with pytest.raises(ValueError, match=r"n_local\) must be an int >= 0"):
        F.global_batch_means((stat, -1))
    empty_mean = torch.full((1, K), float("nan"))  # a mean over no rows, what torch gives
    mean, other = F.global_batch_means((empty_mean, 0), (stat, 3))
    assert torch.isnan(mean).all()  # no sample anywhere: no mean (documented), never a number
    assert torch.allclose(other, stat)


def test_functional_arguments_of_the_wrong_type_are_named():
    student, teacher = _batch()
    q = torch.softmax(teacher, -1)
    kw = dict(n_views=NCROPS, student_temp=0.1)
    with pytest.raises(TypeError, match=r"^student_output must be a torch.Tensor"):
        F.multicrop_cross_entropy(student.tolist(), q, **kw)
    with pytest.raises(TypeError, match=r"^targets must be a torch.Tensor"):
        F.multicrop_cross_entropy(student, q.tolist(), **kw)
    with pytest.raises(TypeError, match=r"^teacher_output must be a torch.Tensor"):
        F.probability_centering([[0.0] * K], torch.full((1, K), 1 / K), 0.04)
    with pytest.raises(ValueError, match=r"^center must have shape \(1, \.\.\., 1, K\) with K = 16"):
        F.logit_centering(teacher, torch.zeros(1, K + 1), 0.04)
    with pytest.raises(ValueError, match=r"^center must have shape"):
        F.dino_vmf_loss(student, teacher, torch.zeros(1, 5), n_views=NCROPS, student_temp=0.1, teacher_temp=0.04)
    with pytest.raises(ValueError, match=r"^branches must be a non-empty sequence"):
        F.vmf_corrections([], 8)
    with pytest.raises(TypeError, match=r"^prototype_norms must have a floating dtype"):
        F.vmf_correction(torch.ones(K, dtype=torch.int32), 0.1, 8)
    with pytest.raises(TypeError, match=r"^teacher_temp must be a positive number"):
        F.sinkhorn_centering(teacher, "0.04")


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


def test_float64_norms_leave_float32_outputs_in_float32():
    """The B x K work follows the outputs' dtype, never the K-vectors' (float64 norms)."""
    student, teacher = _batch()
    loss = _dino()(student, teacher, 0, _norms().double(), _norms().double())
    assert loss.dtype == torch.float32
    assert _dino()(student.double(), teacher.double(), 0).dtype == torch.float64


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
    monkeypatch.setitem(_dispatch._imported, "cross_entropy", ImportError("no triton here"))
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: Triton is not available"):
        _dino(backend="triton")(student, teacher, 0)
    # auto takes the reference when the kernels are missing
    assert torch.isfinite(_dino(backend="auto")(student, teacher, 0))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Sinkhorn centering has no fused kernel"):
        _dino(backend="triton", centering="sinkhorn")(student, teacher, 0)


def test_center_is_checkpoint_state():
    loss = _dino(centering="logit")
    assert torch.equal(loss.center, torch.zeros(1, K))
    assert torch.allclose(_dino().center, torch.full((1, K), 1 / K))
    student, teacher = _batch()
    loss(student, teacher, 0)
    state = loss.state_dict()
    assert set(state) == {"center"}  # DINO's DINOLoss has the same single buffer; the schedule is not saved
    fresh = _dino(centering="logit")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.center, loss.center) and fresh.center.abs().sum() > 0


def _count_tensor_checks(monkeypatch) -> list[int]:
    """Spy on ``check_tensor`` in every module of the package that imported it; the ids of the
    tensors it was asked to check, in order."""
    seen: list[int] = []
    original = _validation.check_tensor

    def spy(name, x, *args, **kwargs):
        seen.append(id(x))
        return original(name, x, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("vmf_head") and getattr(module, "check_tensor", None) is original:
            monkeypatch.setattr(module, "check_tensor", spy)
    return seen


@pytest.mark.parametrize("centering", ["probability", "logit", "sinkhorn"])
def test_each_input_is_validated_once_per_public_call(monkeypatch, centering):
    student, teacher = _batch()
    s_norms, t_norms = _norms().requires_grad_(), _norms()
    center = torch.full((1, K), 1.0 / K) if centering == "probability" else torch.zeros(1, K)
    loss = _dino(centering=centering)
    seen = _count_tensor_checks(monkeypatch)
    loss(student, teacher, 0, s_norms, t_norms).backward()
    for x in (student, teacher, s_norms, t_norms):
        assert seen.count(id(x)) == 1
    seen.clear()
    F.dino_vmf_loss(
        student,
        teacher,
        None if centering == "sinkhorn" else center,
        n_views=NCROPS,
        student_temp=0.1,
        teacher_temp=0.04,
        student_correction=torch.zeros(K),
        centering=centering,
    )
    for x in (student, teacher):
        assert seen.count(id(x)) == 1


def test_ibot_inputs_are_validated_once_per_call(monkeypatch):
    s, t, local, masks = _ibot_batch()
    s_norms, t_norms = (_norms(), _norms(8)), (_norms(), _norms(8))
    seen = _count_tensor_checks(monkeypatch)
    _ibot()(s, t, local, masks, 0, s_norms, t_norms)
    for x in (*s, *t, local, *masks[:2], *s_norms, *t_norms):  # iBOT reads the global crops' masks only
        assert seen.count(id(x)) == 1


def test_a_floating_mask_is_refused():
    """A float mask would silently weight the tokens by its values."""
    s, t, local, masks = _ibot_batch()
    with pytest.raises(TypeError, match="student_mask must be a bool"):
        _ibot()(s, t, local, torch.rand(2 * B, 6), 0)
    with pytest.raises(TypeError, match=r"student_mask\[0\] must be a bool"):
        _ibot()(s, t, local, [m.float() for m in masks], 0)
    with pytest.raises(TypeError, match="mask must be a bool"):
        center = torch.zeros(1, 1, 8)
        F.ibot_patch_vmf_loss(s[1], t[1], torch.rand(2 * B, 6), center, student_temp=0.1, teacher_temp=0.04)
