"""``vmf_head.integrations.dinov2`` against a stand-in of facebookresearch/dinov2.

``standins/dinov2.py`` restates DINOv2's ``DINOHead``, ``DINOLoss``, ``iBOTPatchLoss`` and the way
``SSLMetaArch.forward_backward`` calls them (teacher targets by ``softmax_center_teacher`` or
``sinkhorn_knopp_teacher``, ``update_center``, then the student terms), from DINOv2's interfaces. The
reference below puts the vMF correction into those stand-in losses directly (float64, scipy Bessel
functions, norms read from the heads' weights); a model patched by vmf_head must train like it.
"""

from __future__ import annotations

import io
from collections import Counter

import _integration_reference as ref
import pytest
import torch
from _dispatch_attribution import AttributedSyncCounter, OpsByOwner, check_no_sync, record_loss_calls
from standins import dinov2 as D2

from vmf_head.integrations import dinov2 as vmf_dinov2

K, K2, P = 32, 24, 8
TEMPS = (0.04, 0.05, 0.06)

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


class _Reference:
    """Mixin: the stand-in loss with vMF logits on both sides and probability centering (or Sinkhorn)."""

    def setup(self, layers):
        self.layers = layers  # () -> (student last_layer, teacher last_layer); a closure, not a submodule
        self.center = torch.full_like(self.center, 1.0 / self.center.shape[-1], dtype=torch.float64)

    def _norms(self, which):
        return ref.norms_of(self.layers()[which])

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        self.temp = teacher_temp
        q, _ = ref.teacher_targets(teacher_output, self._norms(1), teacher_temp, P, self.center, "probability")
        return q

    @torch.no_grad()
    def update_center(self, teacher_output):
        _, stat = ref.teacher_targets(teacher_output, self._norms(1), self.temp, P, self.center, "probability")
        self.updated, self.pending = False, stat

    @torch.no_grad()
    def apply_center_update(self):
        if not self.updated:
            self.center = self.center * 0.9 + self.pending.view_as(self.center) * 0.1
            self.updated = True

    def _shifted(self, teacher_output, teacher_temp):
        # exp(t / T + log C_p) = exp((t + T log C_p) / T): DINOv2's own Sinkhorn on shifted outputs
        return teacher_output.double() + teacher_temp * ref.correction(self._norms(1), teacher_temp, P).detach()

    def _student_log_softmax(self, student):
        return torch.log_softmax(ref.student_logits(student, self._norms(0), 0.1, P), -1)


class RefDINOLoss(_Reference, D2.DINOLoss):
    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        return super().sinkhorn_knopp_teacher(self._shifted(teacher_output, teacher_temp), teacher_temp, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        total = 0
        for s in student_output_list:
            lsm = self._student_log_softmax(s)
            for t in teacher_out_softmaxed_centered_list:
                total -= torch.sum(t * lsm, dim=-1).mean()
        return total


class RefPatchLoss(_Reference, D2.iBOTPatchLoss):
    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        return super().sinkhorn_knopp_teacher(
            self._shifted(teacher_output, teacher_temp), teacher_temp, n_masked_patches_tensor, n_iterations
        )

    def forward_masked(self, student, teacher, student_masks_flat, n_masked_patches=None, masks_weight=None):
        loss = torch.sum(teacher * self._student_log_softmax(student[:n_masked_patches]), dim=-1)
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]


def _model(separate_head, centering):
    torch.manual_seed(0)
    model = D2.SSLMetaArch(D2.default_cfg(K, K2, separate_head=separate_head, centering=centering))
    g = torch.Generator().manual_seed(1)
    for head in [model.student[key] for key in model.student if key != "backbone"]:
        head.last_layer.weight_g.data.copy_(0.5 + 1.5 * torch.rand(head.last_layer.weight_g.shape, generator=g))
    model.prepare_for_distributed_training()  # DINOv2 copies the student into the teacher here
    return model


def _reference_model(separate_head, centering):
    model = _model(separate_head, centering)
    patch_key = "ibot_head" if separate_head else "dino_head"
    for name, cls, key in (("dino_loss", RefDINOLoss, "dino_head"), ("ibot_patch_loss", RefPatchLoss, patch_key)):
        loss = cls(getattr(model, name).center.shape[-1])
        loss.setup(lambda key=key: (model.student[key].last_layer, model.teacher[key].last_layer))
        setattr(model, name, loss)
    return model


def _train(model, steps=3):
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=0.05)
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        history.append(
            {k: v.item() for k, v in model.forward_backward(D2.collated_batch(seed=step), TEMPS[step]).items()}
        )
        assert model.student.dino_head.last_layer.weight_g.grad.abs().max() > 0
        optimizer.step()
        model.update_teacher(0.7)
    return history


@pytest.mark.parametrize(
    "separate_head,centering", [(False, "centering"), (True, "centering"), (False, "sinkhorn_knopp")]
)
def test_three_training_steps_match_the_rederivation(separate_head, centering):
    patched = vmf_dinov2.patch(_model(separate_head, centering))
    got, expected = _train(patched), _train(_reference_model(separate_head, centering))
    for step_got, step_expected in zip(got, expected):
        assert step_got == pytest.approx(step_expected, abs=1e-5)
    if centering == "centering":
        torch.testing.assert_close(patched.dino_loss.center.sum(), torch.tensor(1.0))  # a probability vector


def test_checkpoint_of_patched_run_loads_into_unpatched_dinov2():
    patched = vmf_dinov2.patch(_model(False, "centering"))
    _train(patched, steps=2)
    buffer = io.BytesIO()
    torch.save({"model": patched.state_dict(), "teacher": patched.teacher.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    plain = D2.SSLMetaArch(D2.default_cfg(K, K2))
    plain.load_state_dict(checkpoint["model"])  # strict: DINOv2's keys and shapes, centers included
    backbone = D2.TinyViT()
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")}
    )
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(
        backbone(x)["x_norm_clstoken"], patched.teacher.backbone(x)["x_norm_clstoken"], rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "separate_head,centering", [(False, "centering"), (True, "centering"), (False, "sinkhorn_knopp")]
)
def test_loss_methods_ask_for_no_host_sync(separate_head, centering):
    """Every call DINOv2 makes to the losses, counted: none of the integration's own code syncs, and once
    the core functions they call are sync-free (issue 11) none at all."""
    model = vmf_dinov2.patch(_model(separate_head, centering))
    model.forward_backward(D2.collated_batch(), 0.04)  # the next step applies this one's center update
    calls = record_loss_calls(model, AttributedSyncCounter)
    model.forward_backward(D2.collated_batch(), 0.04)
    assert len(calls) == (7 if centering == "centering" else 5)
    check_no_sync(calls)


def test_center_statistics_come_from_the_centering_pass():
    """``update_center`` runs no operator: the statistic is a by-product of ``softmax_center_teacher`` on
    the same tensor; the student terms' softmaxes are all inside the core cross-entropy."""
    model = vmf_dinov2.patch(_model(False, "centering"))
    calls = record_loss_calls(model, OpsByOwner)
    model.forward_backward(D2.collated_batch(), 0.04)
    updates = [c.counts for name, c in calls if name == "update_center"]
    assert len(updates) == 2 and not any(sum(counts.values(), Counter()) for counts in updates)
    for name, c in calls:
        if name in ("forward", "forward_masked"):
            assert any("softmax" in op for op in c.counts["core"])
            assert not {op for owner in ("integration", "caller") for op in c.counts[owner] if "softmax" in op}


def test_update_center_on_another_tensor_raises():
    model = vmf_dinov2.patch(_model(False, "centering"))
    model.student.dino_head(torch.randn(2, 16))
    model.teacher.dino_head(torch.randn(2, 16))
    teacher_output = torch.randn(4, K)
    model.dino_loss.softmax_center_teacher(teacher_output, 0.04)
    with pytest.raises(ValueError, match="tensor just passed to softmax_center_teacher"):
        model.dino_loss.update_center(teacher_output.clone())
    model.dino_loss.update_center(teacher_output)


def test_the_loss_before_any_head_forward_raises():
    model = vmf_dinov2.patch(_model(False, "centering"))
    with pytest.raises(RuntimeError, match="has not run yet"):
        model.dino_loss.softmax_center_teacher(torch.zeros(4, K), 0.04)


def test_not_a_meta_arch_raises():
    with pytest.raises(TypeError, match="SSLMetaArch"):
        vmf_dinov2.patch(torch.nn.Linear(2, 2))
