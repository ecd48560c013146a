"""``vmf_head.integrations.dinov3`` against a stand-in of facebookresearch/dinov3.

``standins/dinov3.py`` restates DINOv3's ``DINOHead``, ``DINOLoss``, ``iBOTPatchLoss`` and the way
``SSLMetaArch.forward_backward`` calls them (``sinkhorn_knopp_teacher`` only, then ``dino_loss(...)`` on
[crops, B, K] and ``ibot_patch_loss.forward_masked``), from DINOv3's interfaces. The reference below puts
the vMF correction into those stand-in losses directly: float64, scipy Bessel functions, row norms read
from the plain ``nn.Linear`` prototype layers, DINOv3's own exp-domain Sinkhorn; a patched model must
train like it.
"""

from __future__ import annotations

import io
import math

import _integration_reference as ref
import pytest
import torch
from _dispatch_attribution import AttributedSyncCounter, check_no_sync, record_loss_calls
from standins import dinov3 as D3

from vmf_head.integrations import dinov3 as vmf_dinov3
from vmf_head.integrations._common import CapturedNorms
from vmf_head.nn import VMFLinearPrototypeHead

K, K2, P = 32, 24, 8
TEMPS = (0.04, 0.05, 0.06)
CENTERINGS = ("sinkhorn", "probability", "logit")


def row_norms(layer) -> torch.Tensor:
    return layer.weight.double().norm(dim=1)


def sinkhorn64(logits: torch.Tensor, n_iterations: int = 3) -> torch.Tensor:
    """DINOv3's Sinkhorn-Knopp, in float64 on ``exp(logits)`` (rows = samples)."""
    q = torch.exp(logits).t()
    q /= q.sum()
    n_prototypes, n_samples = q.shape
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True) * n_prototypes
        q /= q.sum(dim=0, keepdim=True) * n_samples
    return (q * n_samples).t()


class _Reference:
    """Mixin: the stand-in loss with vMF logits on both sides in float64, centerd as ``centering``."""

    def setup(self, layers, centering, p_student, p_teacher):
        self.layers = layers  # () -> (student last_layer, teacher last_layer); a closure, not a submodule
        self.centering, self.p_student, self.p_teacher = centering, p_student, p_teacher

    def init_weights(self):
        k = self.center.shape[-1]
        self.center = torch.full_like(
            self.center, 1.0 / k if self.centering == "probability" else 0.0, dtype=torch.float64
        )

    @torch.no_grad()
    def _centerd(self, teacher_output, teacher_temp):
        norms = row_norms(self.layers()[1])
        if self.centering == "sinkhorn":
            return sinkhorn64(
                teacher_output.double() / teacher_temp + ref.correction(norms, teacher_temp, self.p_teacher)
            )
        q, stat = ref.teacher_targets(
            teacher_output, norms, teacher_temp, self.p_teacher, self.center.flatten(), self.centering
        )
        self.center = self.center * 0.9 + stat.view_as(self.center) * 0.1
        return q

    def _student_log_softmax(self, student):
        return torch.log_softmax(ref.student_logits(student, row_norms(self.layers()[0]), 0.1, self.p_student), -1)


class RefDINOLoss(_Reference, D3.DINOLoss):
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        return self._centerd(teacher_output, teacher_temp)

    def forward(self, student_logits, teacher_probs, ignore_diagonal=False):
        pairs = -torch.einsum("sbk,tbk->st", self._student_log_softmax(student_logits), teacher_probs.double())
        _n_student, batch, _ = student_logits.shape
        if ignore_diagonal:
            pairs = pairs * (1 - torch.eye(*pairs.shape, dtype=pairs.dtype))
        n_pairs = pairs.numel() - (min(pairs.shape) if ignore_diagonal else 0)
        return pairs.sum() / (batch * n_pairs)


class RefPatchLoss(_Reference, D3.iBOTPatchLoss):
    def __init__(self, patch_out_dim):
        super().__init__(patch_out_dim)
        del self.sinkhorn_knopp_teacher  # the submodule: replaced by the method below

    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        return self._centerd(teacher_output, teacher_temp)

    def forward_masked(self, student, teacher, student_masks_flat, n_masked_patches=None, masks_weight=None):
        loss = torch.sum(teacher.double() * self._student_log_softmax(student[:n_masked_patches]), dim=-1)
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]


def _model(cfg=None, *, equal_norms=False, seed=0):
    """A stand-in SSLMetaArch, initialised as DINOv3's ``main`` does, with prototype row norms spread over
    [0.5, 2] (or all 1.3), the teacher a copy of the student (or, for distillation, its own network)."""
    torch.manual_seed(seed)
    model = D3.SSLMetaArch(cfg or D3.default_cfg(K, K2, P))
    model.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    for heads in [model.student] + ([model.teacher] if model.is_distillation_enabled else []):
        for key in ("dino_head", "ibot_head"):
            weight = heads[key].last_layer.weight.data
            scale = 1.3 if equal_norms else 0.5 + 1.5 * torch.rand(weight.shape[0], 1, generator=g)
            weight.copy_(weight / weight.norm(dim=1, keepdim=True) * scale)
    model.model_ema.load_state_dict(model.student.state_dict())
    return model


def _patched(centering, cfg=None, **kwargs):
    return vmf_dinov3.patch(_model(cfg, **kwargs), centering=centering)


def _reference(centering, cfg=None, **kwargs):
    model = _model(cfg, **kwargs)
    for name, cls, key in (("dino_loss", RefDINOLoss, "dino_head"), ("ibot_patch_loss", RefPatchLoss, "ibot_head")):
        loss = cls(getattr(model, name).center.shape[-1])
        layers = (model.student[key].last_layer, model.teacher[key].last_layer)
        loss.setup(lambda layers=layers: layers, centering, layers[0].in_features, layers[1].in_features)
        loss.init_weights()
        setattr(model, name, loss)
    return model


def _batch(step, n=3):
    return D3.collate(D3.make_samples(n, seed=step))


def _prototype_grads(model):
    return {key: model.student[key].last_layer.weight.grad.clone() for key in ("dino_head", "ibot_head")}


def _floats(metrics):
    return {k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()}


def _train(model, steps=3):
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=0.05)
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        _, metrics = model.forward_backward(_batch(step), teacher_temp=TEMPS[step], iteration=step)
        history.append((_floats(metrics), _prototype_grads(model)))
        optimizer.step()
        model.update_ema(0.7)
    return history


@pytest.mark.parametrize("centering,distillation", [(c, None) for c in CENTERINGS] + [("probability", 6)])
def test_three_training_steps_match_the_rederivation(centering, distillation):
    cfg = D3.default_cfg(K, K2, P, distillation_bottleneck_dim=distillation)
    patched = _patched(centering, cfg)
    got, expected = _train(patched), _train(_reference(centering, cfg))
    for (metrics, grads), (metrics_ref, grads_ref) in zip(got, expected):
        assert metrics == pytest.approx(metrics_ref, abs=1e-5)
        for key in grads:
            torch.testing.assert_close(grads[key], grads_ref[key].float(), rtol=1e-4, atol=1e-6)
    reference = _reference(centering, cfg)
    _train(reference)
    for name in ("dino_loss", "ibot_patch_loss"):
        torch.testing.assert_close(
            getattr(patched, name).center, getattr(reference, name).center.float(), rtol=1e-5, atol=1e-7
        )
    if centering == "probability":
        torch.testing.assert_close(patched.dino_loss.center.sum(), torch.tensor(1.0))


def test_equal_row_norms_give_dinov3s_own_losses_and_the_norms_their_gradient():
    """With every ||w_k|| equal, log C_p is the same for all k and Sinkhorn's targets and the student's
    softmax are DINOv3's. The prototypes' gradient differs only along w_k: the part through log C_p."""
    patched, plain = _patched("sinkhorn", equal_norms=True), _model(equal_norms=True)
    _, metrics = patched.forward_backward(_batch(0), teacher_temp=0.04)
    _, metrics_plain = plain.forward_backward(_batch(0), teacher_temp=0.04)
    assert _floats(metrics) == pytest.approx(_floats(metrics_plain), abs=1e-6)
    for name, param in patched.student.named_parameters():
        if not name.endswith("last_layer.weight"):
            torch.testing.assert_close(param.grad, plain.student.get_parameter(name).grad, rtol=1e-4, atol=1e-6)
    for key in ("dino_head", "ibot_head"):
        weight = patched.student[key].last_layer.weight.detach()
        difference = patched.student[key].last_layer.weight.grad - plain.student[key].last_layer.weight.grad
        radial = (difference * weight).sum(1, keepdim=True) / weight.norm(dim=1, keepdim=True) ** 2
        assert radial.abs().max() > 1e-4  # the correction's gradient reaches the norms
        torch.testing.assert_close(difference, radial * weight, rtol=0, atol=1e-5)  # and nothing else


@pytest.mark.parametrize("centering", CENTERINGS)
def test_meta_device_build_nan_fill_and_init_weights(centering):
    """DINOv3's ``main``: build on the meta device, patch, prepare, fill every tensor with NaN, then
    ``init_weights``; the centers are NaN until then and the first step is finite."""
    with torch.device("meta"):
        model = D3.SSLMetaArch(D3.default_cfg(K, K2, P))
        vmf_dinov3.patch(model, centering=centering)
    assert model.dino_loss.center.is_meta and isinstance(model.dino_loss, vmf_dinov3.DINOv3vMFLoss)
    model.prepare_for_distributed_training()
    model._apply(lambda t: torch.full_like(t, math.nan, device="cpu"), recurse=True)
    assert model.ibot_patch_loss.center.isnan().all()
    torch.manual_seed(0)
    model.init_weights()
    start = 1 / K if centering == "probability" else 0.0
    torch.testing.assert_close(model.dino_loss.center, torch.full((1, K), start))
    assert model.ibot_patch_loss.center.shape == (1, 1, K2)
    loss, _ = model.forward_backward(_batch(0), teacher_temp=0.04)
    assert torch.isfinite(loss) and torch.isfinite(model.dino_loss.center).all()


def test_patching_an_initialised_model_initialises_the_new_centers():
    model = vmf_dinov3.patch(_model(), centering="probability")
    torch.testing.assert_close(model.dino_loss.center, torch.full((1, K), 1 / K))


@pytest.mark.parametrize("centering", CENTERINGS)
def test_compiled_heads_read_their_own_norms(centering):
    """``prepare_for_distributed_training`` compiles the four heads (two pairs of the same class): the
    patch's hooks, added before, record each head's own norms in the compiled graphs."""
    eager = _patched(centering)
    compiled = _patched(centering, D3.default_cfg(K, K2, P, compile=True))
    for model in (eager, compiled):
        model.prepare_for_distributed_training()
    for (metrics, grads), (metrics_eager, grads_eager) in zip(_train(compiled, 2), _train(eager, 2)):
        assert metrics == pytest.approx(metrics_eager, abs=1e-6)
        for key in grads:
            torch.testing.assert_close(grads[key], grads_eager[key])


def test_patching_compiled_heads_is_refused():
    model = _model(D3.default_cfg(K, K2, P, compile=True))
    model.prepare_for_distributed_training()
    with pytest.raises(RuntimeError, match="before prepare_for_distributed_training"):
        vmf_dinov3.patch(model)


@pytest.mark.parametrize("centering", CENTERINGS)
def test_loss_methods_ask_for_no_host_sync(centering):
    """Every call DINOv3 makes to the losses, counted: none of the integration's own code syncs, and once
    the core functions they call are sync-free (issue 11) none at all."""
    model = _patched(centering)
    model.forward_backward(_batch(0), teacher_temp=0.04)
    calls = record_loss_calls(model, AttributedSyncCounter)
    model.forward_backward(_batch(1), teacher_temp=0.05)
    assert [name for name, _ in calls] == ["sinkhorn_knopp_teacher"] * 2 + ["forward"] * 2 + ["forward_masked"]
    check_no_sync(calls)


def test_large_corrections_do_not_overflow_sinkhorn():
    """At p = 256, log C_p(||w|| / tau_t) is about +340 for every norm DINOv3 trains with: DINOv3's float32
    exp(l_t) overflows; the patched Sinkhorn (shifted, in log space) matches float64."""
    model = _patched("sinkhorn", D3.default_cfg(64, K2, 256))
    layer = model.teacher.dino_head.last_layer
    with torch.no_grad():
        t = model.teacher.dino_head(torch.randn(6, 16))
    logits = t.double() / 0.04 + ref.correction(row_norms(layer), 0.04, 256)
    assert logits.min() > 300 and torch.isinf(torch.exp(logits.float())).all()
    q = model.dino_loss.sinkhorn_knopp_teacher(t, teacher_temp=0.04)
    torch.testing.assert_close(q.double(), sinkhorn64(logits - logits.max()), rtol=1e-4, atol=1e-7)


def test_checkpoint_loads_strictly_both_ways():
    patched = _patched("probability")
    _train(patched, steps=2)
    buffer = io.BytesIO()
    torch.save(patched.state_dict(), buffer)
    buffer.seek(0)
    plain = D3.SSLMetaArch(D3.default_cfg(K, K2, P))
    plain.load_state_dict(torch.load(buffer))  # strict: DINOv3's keys and shapes, centers included
    torch.testing.assert_close(plain.dino_loss.center, patched.dino_loss.center)
    back = vmf_dinov3.patch(D3.SSLMetaArch(D3.default_cfg(K, K2, P)), centering="probability")
    back.load_state_dict(plain.state_dict())
    for (name, value), (_, original) in zip(back.state_dict().items(), patched.state_dict().items()):
        torch.testing.assert_close(value, original, rtol=0, atol=0, msg=name)
    # A plain DINOv3 run's center (zeros: Sinkhorn never moves it) is no probability vector.
    fresh = D3.SSLMetaArch(D3.default_cfg(K, K2, P))
    fresh.init_weights()
    with pytest.raises(ValueError, match="not a probability vector"):
        vmf_dinov3.patch(D3.SSLMetaArch(D3.default_cfg(K, K2, P)), centering="probability").load_state_dict(
            fresh.state_dict()
        )
    vmf_dinov3.patch(D3.SSLMetaArch(D3.default_cfg(K, K2, P))).load_state_dict(fresh.state_dict())


def test_other_losses_and_modules_stay_dinov3s():
    model = _model()
    before = {name: module for name, module in model.named_children()}
    vmf_dinov3.patch(model)
    after = dict(model.named_children())
    assert {name for name in before if after[name] is not before[name]} == {"dino_loss", "ibot_patch_loss"}


def test_multidistillation_and_other_models_are_refused():
    with pytest.raises(NotImplementedError, match="process subgroups"):
        vmf_dinov3.patch(D3.MultiDistillationMetaArch(D3.default_cfg(K, K2, P, multidistillation=True)))
    with pytest.raises(TypeError, match="SSLMetaArch"):
        vmf_dinov3.patch(torch.nn.Linear(2, 2))


def test_linear_prototype_head_is_dinov3s_layout():
    """The library's head for plain-Linear prototypes: DINOv3's keys, its init, its output."""
    theirs = D3.DINOHead(16, K, bottleneck_dim=P, hidden_dim=24, mlp_bias=False)
    ours = VMFLinearPrototypeHead(16, K, bottleneck_dim=P, hidden_dim=24, mlp_bias=False)
    torch.manual_seed(3)
    theirs.init_weights()
    torch.manual_seed(3)
    ours.init_weights()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 16)
    for kwargs in ({}, {"no_last_layer": True}):
        torch.testing.assert_close(ours(x, **kwargs), theirs(x, **kwargs))
    y = ours(x, no_last_layer=True)
    torch.testing.assert_close(ours(y, only_last_layer=True), theirs(y, only_last_layer=True))
    torch.testing.assert_close(ours.prototype_norms(), theirs.last_layer.weight.norm(dim=1))
    assert ours.p == P and ours.prototype_norms().requires_grad


def test_norms_of_a_bfloat16_prototype_layer():
    """DINOv3's FSDP2 policy runs the heads in bf16 (``param_dtype: bf16``): the norms are computed in
    float32 from the bf16 rows, their gradient reaches the bf16 weight as float32 autograd would give it."""
    layer = torch.nn.Linear(P, K, bias=False).to(torch.bfloat16)
    reader = CapturedNorms(layer, role="student", detach=False)
    x = torch.randn(3, P, dtype=torch.bfloat16, requires_grad=True)
    layer(x)
    norms = reader()
    weight = layer.weight.detach().float().requires_grad_()
    expected = weight.norm(dim=1)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, expected)
    upstream = torch.randn(K)
    (norms * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight.grad, weight.grad.to(torch.bfloat16))
