"""``vmf_head.integrations.ibot`` against a stand-in of bytedance/ibot.

``standins/ibot.py`` restates iBOT's ``iBOTHead`` (``last_layer``/``last_layer2``, shared or separate),
``MultiCropWrapper`` with masks, ``iBOTLoss`` and one iteration of ``main_ibot.train_one_epoch``, from iBOT's
interfaces (iBOT is a repository, not a package). Expected losses: ``_integration_reference.py`` plus iBOT's
masked patch term restated below.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import _integration_reference as ref
import pytest
import torch
from standins import dino as D
from standins import ibot as I

from vmf_head.integrations import FrozenNormsWarning
from vmf_head.integrations import ibot as vmf_ibot

K, P, NG, NL = 32, 8, 2, 2
LAMBDA1, LAMBDA2 = 1.0, 0.5

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def _spread(layer, seed):
    g = torch.Generator().manual_seed(seed)
    layer.weight_g.data.copy_(0.5 + 1.5 * torch.rand(layer.weight_g.shape, generator=g))


def _networks(shared_head=False, norm_last_layer=False):
    student, teacher = I.build_networks(
        K, K, norm_last_layer=norm_last_layer, shared_head=shared_head, bottleneck_dim=P
    )
    if not norm_last_layer:
        _spread(student.head.last_layer, 1)
        _spread(student.head.last_layer2, 2)  # the same layer when shared
        _spread(teacher.head.last_layer, 3)  # the teacher's head is shared (iBOT's default)
    return student, teacher


def _ibot_loss():
    # teacher_temp2 holds for mim_start_epoch=1 epoch, then warms up: three steps, three temperatures each
    return I.iBOTLoss(
        K,
        K,
        NG,
        NL,
        0.04,
        0.07,
        0.05,
        0.06,
        2,
        5,
        center_momentum=0.8,
        center_momentum2=0.7,
        lambda1=LAMBDA1,
        lambda2=LAMBDA2,
        mim_start_epoch=1,
    )


def _expected(student_output, teacher_output, local_cls, masks, s_norms, t_norms, temps, centers, centering):
    """iBOT's loss with vMF logits (float64): (cls, patch, stat, stat2). ``*_norms`` = ([CLS], patch) norms;
    the student's may carry a graph (the outputs are used as constants)."""
    s_cls = torch.cat([student_output[0], local_cls]).detach()
    q, stat = ref.teacher_targets(teacher_output[0].detach(), t_norms[0], temps[0], P, centers[0], centering)
    cls = ref.multicrop(ref.student_logits(s_cls, s_norms[0], 0.1, P), q, NG + NL, NG)
    q2, stat2 = ref.teacher_targets(teacher_output[1].detach(), t_norms[1], temps[1], P, centers[1], centering)
    log_p = torch.log_softmax(ref.student_logits(student_output[1].detach(), s_norms[1], 0.1, P), -1)
    patch = 0.0
    for v, (qv, lv) in enumerate(zip(q2.chunk(NG), log_p.chunk(NG))):
        mask = masks[v].flatten(1).double()
        per_token = (-qv * lv).sum(-1)
        patch = patch + ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return LAMBDA1 * cls, LAMBDA2 * patch / NG, stat, stat2


def _head_norms(head):
    return tuple(ref.norms_of(layer).detach() for layer in (head.last_layer, head.last_layer2))


def test_three_training_steps_match_the_rederivation():
    student, teacher = _networks()
    ibot_loss = _ibot_loss()
    loss_fn = vmf_ibot.patch(student, teacher, ibot_loss)
    optimizer = torch.optim.AdamW(D.get_params_groups(student), lr=0.05)
    centers = [torch.full((K,), 1.0 / K, dtype=torch.float64)] * 2
    for epoch in range(3):
        images, masks = I.crops_and_masks(n_local=NL, seed=epoch)
        expected = {}

        def observe(student_output, teacher_output, local_cls):
            temps = float(ibot_loss.teacher_temp_schedule[epoch]), float(ibot_loss.teacher_temp2_schedule[epoch])
            expected["values"] = _expected(
                student_output,
                teacher_output,
                local_cls,
                masks,
                _head_norms(student.head),
                _head_norms(teacher.head),
                temps,
                centers,
                "probability",
            )

        out = I.train_step(student, teacher, loss_fn, images, masks, optimizer, epoch, 0.7, observe=observe)
        cls, patch, stat, stat2 = expected["values"]
        assert out["cls"].item() == pytest.approx(cls.item(), abs=1e-5)
        assert out["patch"].item() == pytest.approx(patch.item(), abs=1e-5)
        assert out["loss"].item() == pytest.approx((cls + patch).item(), abs=1e-5)
        centers = [0.8 * centers[0] + 0.2 * stat, 0.7 * centers[1] + 0.3 * stat2]
        torch.testing.assert_close(loss_fn.center.double().flatten(), centers[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(loss_fn.center2.double().flatten(), centers[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("shared_head", [False, True])
def test_gradient_reaches_both_prototype_norms(shared_head):
    student, teacher = _networks(shared_head=shared_head)
    loss_fn = vmf_ibot.patch(student, teacher, _ibot_loss())
    images, masks = I.crops_and_masks(n_local=NL)
    with torch.no_grad():
        teacher_output = teacher(images[:NG])
        student_output = student(images[:NG], mask=masks)
        local_cls = student(images[NG:])[0]
    loss_fn(student_output, teacher_output, local_cls, masks, 2)["loss"].backward()

    head = student.head
    g1 = head.last_layer.weight_g.detach().clone().requires_grad_()
    g2 = g1 if shared_head else head.last_layer2.weight_g.detach().clone().requires_grad_()
    leaves = (
        SimpleNamespace(weight_g=g1, weight_v=head.last_layer.weight_v.detach()),
        SimpleNamespace(weight_g=g2, weight_v=head.last_layer2.weight_v.detach()),
    )
    temps = float(loss_fn.teacher_temp_schedule[2]), float(loss_fn.teacher_temp2_schedule[2])
    uniform = torch.full((K,), 1.0 / K, dtype=torch.float64)
    cls, patch, _, _ = _expected(
        student_output,
        teacher_output,
        local_cls,
        masks,
        tuple(map(ref.norms_of, leaves)),
        _head_norms(teacher.head),
        temps,
        (uniform, uniform),
        "probability",
    )
    (cls + patch).backward()
    assert head.last_layer.weight_g.grad.abs().max() > 1e-4
    torch.testing.assert_close(head.last_layer.weight_g.grad.double(), g1.grad.double(), atol=1e-6, rtol=1e-4)
    if not shared_head:
        assert head.last_layer2.weight_g.grad.abs().max() > 1e-4
        torch.testing.assert_close(head.last_layer2.weight_g.grad.double(), g2.grad.double(), atol=1e-6, rtol=1e-4)


def test_checkpoint_of_patched_run_loads_into_unpatched_ibot():
    student, teacher = _networks()
    loss_fn = vmf_ibot.patch(student, teacher, _ibot_loss())
    optimizer = torch.optim.AdamW(D.get_params_groups(student), lr=0.05)
    for epoch in range(3):
        images, masks = I.crops_and_masks(n_local=NL, seed=epoch)
        I.train_step(student, teacher, loss_fn, images, masks, optimizer, epoch, 0.7)
    buffer = io.BytesIO()
    torch.save(
        {
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ibot_loss": loss_fn.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    plain_student, plain_teacher = I.build_networks(K, K, norm_last_layer=False, bottleneck_dim=P, seed=5)
    plain_student.load_state_dict(checkpoint["student"])
    plain_teacher.load_state_dict(checkpoint["teacher"])
    images, _ = I.crops_and_masks(n_local=0, seed=11)
    for a, b in zip(plain_teacher(images), teacher(images)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _ibot_loss().load_state_dict(checkpoint["ibot_loss"])
    backbone = I.TinyTokenBackbone()
    state = {k.replace("backbone.", ""): v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)


def test_frozen_norms_warn():
    student, teacher = _networks(norm_last_layer=True)
    with pytest.warns(FrozenNormsWarning):
        vmf_ibot.patch(student, teacher, _ibot_loss())


def test_a_norm_after_the_prototypes_is_refused():
    student, teacher = _networks()
    student.head.last_norm = torch.nn.BatchNorm1d(K, affine=False)
    with pytest.raises(ValueError, match="last_norm"):
        vmf_ibot.patch(student, teacher, _ibot_loss())


def test_a_non_loss_is_refused():
    student, teacher = I.build_networks(32, 32)
    with pytest.raises(TypeError, match=r"ibot_loss must be bytedance/ibot's iBOTLoss .* without ngcrops"):
        vmf_ibot.patch(student, teacher, D.DINOLoss(32, 4, 0.04, 0.07, 2, 4))
