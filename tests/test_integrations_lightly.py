"""``vmf_head.integrations.lightly`` against the real lightly package (``DINOProjectionHead``,
``lightly.loss.DINOLoss``, ``update_momentum``), in lightly's own DINO training pattern."""

from __future__ import annotations

import io
import warnings

import _integration_reference as ref
import pytest
import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from vmf_head.integrations import FrozenNormsWarning
from vmf_head.integrations import lightly as vmf_lightly

K, P, IN = 32, 8, 12

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


class DINO(nn.Module):
    """lightly's DINO example model, small."""

    def __init__(self, norm_last_layer=False):
        super().__init__()
        torch.manual_seed(0)
        self.student_backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, IN), nn.Tanh())
        self.student_head = DINOProjectionHead(IN, 24, P, K, freeze_last_layer=1, norm_last_layer=norm_last_layer)
        self.teacher_backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, IN), nn.Tanh())
        self.teacher_head = DINOProjectionHead(IN, 24, P, K)
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        if not norm_last_layer:
            g = torch.Generator().manual_seed(1)
            norms = 0.5 + 1.5 * torch.rand(K, 1, generator=g)
            self.student_head.last_layer.weight_g.data.copy_(norms)
            self.teacher_head.last_layer.weight_g.data.copy_(norms)

    def forward(self, x):
        return self.student_head(self.student_backbone(x))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x))


def _views(seed, n=4, batch=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 4, 4, generator=g) for _ in range(n)]


def _criterion():
    return DINOLoss(
        output_dim=K,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=2,
        student_temp=0.1,
        center_momentum=0.8,
    )


def _expected(teacher_out, student_out, model, temp, center):
    q, stat = ref.teacher_targets(
        torch.cat(teacher_out).detach(),
        ref.norms_of(model.teacher_head.last_layer).detach(),
        temp,
        P,
        center,
        "probability",
    )
    logits = ref.student_logits(
        torch.cat(student_out).detach(), ref.norms_of(model.student_head.last_layer).detach(), 0.1, P
    )
    return ref.multicrop(logits, q, len(student_out), len(teacher_out)), stat


def test_three_training_steps_match_the_rederivation():
    model = DINO()
    criterion = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion())
    optimizer = torch.optim.AdamW(
        list(model.student_backbone.parameters()) + list(model.student_head.parameters()), lr=0.05
    )
    center = torch.full((K,), 1.0 / K, dtype=torch.float64)
    g_start = model.student_head.last_layer.weight_g.detach().clone()
    for epoch, temp in zip(range(3), (0.04, 0.07, 0.07)):  # lightly's warm-up schedule over 2 epochs
        update_momentum(model.student_backbone, model.teacher_backbone, m=0.7)
        update_momentum(model.student_head, model.teacher_head, m=0.7)
        views = _views(epoch)
        teacher_out = [model.forward_teacher(view) for view in views[:2]]
        student_out = [model.forward(view) for view in views]
        expected, stat = _expected(teacher_out, student_out, model, temp, center)
        loss = criterion(teacher_out, student_out, epoch=epoch)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
        center = 0.8 * center + 0.2 * stat
        torch.testing.assert_close(criterion.center.double().flatten(), center, atol=1e-6, rtol=0)
        loss.backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(model.student_head.last_layer.weight_g, g_start)


def test_gradient_reaches_the_prototype_norms():
    model = DINO()
    criterion = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion())
    views = _views(0)
    with torch.no_grad():
        teacher_out = [model.forward_teacher(view) for view in views[:2]]
        student_out = [model.forward(view) for view in views]
    criterion(teacher_out, student_out, teacher_temp=0.05).backward()

    layer = model.student_head.last_layer
    g = layer.weight_g.detach().clone().requires_grad_()
    norms = ref.norms_of(type("Leaf", (), {"weight_g": g, "weight_v": layer.weight_v.detach()})())
    q, _ = ref.teacher_targets(
        torch.cat(teacher_out),
        ref.norms_of(model.teacher_head.last_layer).detach(),
        0.05,
        P,
        torch.full((K,), 1.0 / K, dtype=torch.float64),
        "probability",
    )
    ref.multicrop(ref.student_logits(torch.cat(student_out), norms, 0.1, P), q, 4, 2).backward()
    assert layer.weight_g.grad.abs().max() > 1e-4
    torch.testing.assert_close(layer.weight_g.grad.double(), g.grad.double(), atol=1e-6, rtol=1e-4)


def test_temperature_follows_lightlys_rule():
    model = DINO()
    criterion = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion())
    assert criterion.temperature(teacher_temp=0.05, epoch=0) == 0.05
    assert criterion.temperature(epoch=1) == pytest.approx(0.07)
    assert criterion.temperature(epoch=0) == pytest.approx(0.04)
    assert criterion.temperature(epoch=10) == pytest.approx(0.07)
    assert criterion.temperature() == pytest.approx(0.07)


def test_frozen_norms_warn_and_logit_centering_equals_lightlys_loss():
    model = DINO(norm_last_layer=True)
    lightly_loss = _criterion()
    with pytest.warns(FrozenNormsWarning, match="norm_last_layer=False"):
        patched = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion(), centering="logit")
    with torch.no_grad():
        for epoch in range(3):
            views = _views(epoch)
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model.forward(view) for view in views]
            expected = lightly_loss(teacher_out, student_out, epoch=epoch)
            torch.testing.assert_close(patched(teacher_out, student_out, epoch=epoch), expected, atol=2e-6, rtol=1e-6)
            torch.testing.assert_close(patched.center, lightly_loss.center, atol=1e-6, rtol=1e-6)


def test_free_norms_do_not_warn_and_the_whole_model_is_ambiguous():
    model = DINO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenNormsWarning)
        vmf_lightly.patch(nn.Sequential(model.student_backbone, model.student_head), model.teacher_head, _criterion())
    with pytest.raises(ValueError, match="several heads"):
        vmf_lightly.patch(model, model.teacher_head, _criterion())


def test_checkpoint_of_patched_run_loads_into_unpatched_heads():
    model = DINO()
    criterion = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion())
    optimizer = torch.optim.SGD(model.student_head.parameters(), lr=0.1)
    views = _views(3)
    loss = criterion([model.forward_teacher(v) for v in views[:2]], [model.forward(v) for v in views], epoch=2)
    loss.backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    plain = DINO()
    plain.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(plain.forward(views[0]), model.forward(views[0]), rtol=0, atol=0)


def _equal_norm_pair():
    """lightly's own loss and the patched one with logit centering on a model with equal norms: the
    patched loss must be lightly's exactly (DINO-vMF with equal norms is DINO)."""
    model = DINO(norm_last_layer=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenNormsWarning)
        patched = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion(), centering="logit")
    return model, _criterion(), patched


@pytest.mark.parametrize("n_teacher, n_student", [(3, 2), (4, 1), (2, 4)])
def test_any_number_of_teacher_and_student_views_as_lightly(n_teacher, n_student):
    model, lightly_loss, patched = _equal_norm_pair()
    with torch.no_grad():
        views = _views(5, n=max(n_teacher, n_student))
        teacher_out = [model.forward_teacher(v) for v in views[:n_teacher]]
        student_out = [model.forward(v) for v in views[:n_student]]
        expected = lightly_loss(teacher_out, student_out, epoch=1)
        torch.testing.assert_close(patched(teacher_out, student_out, epoch=1), expected, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(patched.center, lightly_loss.center, atol=1e-6, rtol=1e-6)


def test_teacher_temp_as_a_tensor_as_lightlys_schedule():
    model, lightly_loss, patched = _equal_norm_pair()
    with torch.no_grad():
        views = _views(6)
        teacher_out = [model.forward_teacher(v) for v in views[:2]]
        student_out = [model.forward(v) for v in views]
        temp = torch.tensor(0.055)
        expected = lightly_loss(teacher_out, student_out, teacher_temp=0.055)
        torch.testing.assert_close(patched(teacher_out, student_out, teacher_temp=temp), expected, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(
            patched(teacher_out, student_out, teacher_temp=0.055),
            lightly_loss(teacher_out, student_out, teacher_temp=0.055),
            atol=2e-6,
            rtol=1e-6,
        )


def test_update_center_is_lightlys():
    model, lightly_loss, patched = _equal_norm_pair()
    teacher_out = torch.stack([model.forward_teacher(v).detach() for v in _views(7)[:2]])
    lightly_loss.update_center(teacher_out)
    patched.update_center(teacher_out)
    torch.testing.assert_close(patched.center, lightly_loss.center, atol=1e-7, rtol=1e-6)
    # probability centering averages the teacher's vMF posterior at lightly's temperature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenNormsWarning)
        probability = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion())
    before = probability.center.clone()
    probability.update_center(teacher_out, epoch=0)
    stat = torch.softmax(teacher_out.reshape(-1, K) / 0.04, dim=-1).mean(0)  # equal norms here: no correction
    torch.testing.assert_close(probability.center.flatten(), 0.8 * before.flatten() + 0.2 * stat, atol=1e-6, rtol=1e-5)


def test_errors_and_non_finite_inputs_in_lightlys_terms():
    model = DINO()
    criterion = vmf_lightly.patch(model.student_head, model.teacher_head, _criterion())
    views = _views(8)
    teacher_out = [model.forward_teacher(v).detach() for v in views[:2]]
    student_out = [model.forward(v).detach() for v in views]
    with pytest.raises(ValueError, match=r"student_out\[1\] has shape \(4, 32\); every view must be \(B, K = 32\)"):
        criterion(teacher_out, [student_out[0], student_out[1][:4]])
    with pytest.raises(TypeError, match="teacher_out must be a non-empty list"):
        criterion(torch.stack(teacher_out), student_out)
    with pytest.raises(ValueError, match="at least two views"):
        criterion(teacher_out[:1], student_out[:1])
    with pytest.raises(ValueError, match="same batch size"):
        criterion(teacher_out, [s[:4] for s in student_out])
    bad = [t.clone() for t in teacher_out]
    bad[1][0, 3] = float("nan")
    with pytest.raises(ValueError, match="teacher_out has non-finite values"):
        criterion(bad, student_out)
    with pytest.raises(TypeError, match="dino_loss must be lightly's DINOLoss"):
        vmf_lightly.patch(model.student_head, model.teacher_head, nn.CrossEntropyLoss())
