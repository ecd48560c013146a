"""``vmf_head.integrations.lightly`` for lightly's DINOv2 / iBOT pieces, against the real lightly package:
``IBOTPatchLoss`` (``patch_ibot``), ``DINOv2ProjectionHead`` (the norms of its free ``weight_g``, one head
serving both terms) and lightly's DINOv2 example, with a ViT-S from timm, trained patched."""

from __future__ import annotations

import copy
import io
import warnings

import _integration_reference as ref
import pytest
import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, IBOTPlusPlusPatchLoss, KoLeoLoss
from lightly.models.modules import DINOv2ProjectionHead
from lightly.models.utils import update_momentum
from torch import nn

from vmf_head.integrations import FrozenNormsWarning
from vmf_head.integrations import lightly as vmf_lightly

K, P, IN = 24, 8, 12

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def _heads(free=True, seed=0):
    """A student and a teacher ``DINOv2ProjectionHead`` (teacher a frozen copy); ``free``: the norms spread."""
    torch.manual_seed(seed)
    student = DINOv2ProjectionHead(IN, 16, P, K)
    if free:
        g = torch.Generator().manual_seed(seed + 1)
        student.last_layer.weight_g.data.copy_(0.5 + 1.5 * torch.rand(K, 1, generator=g))
    teacher = DINOv2ProjectionHead(IN, 16, P, K)
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def _patched(student, teacher, centering="probability", **kwargs):
    return vmf_lightly.patch_ibot(student, teacher, IBOTPatchLoss(K, **kwargs), centering=centering)


def _tokens(seed, images=3, grid=(2, 3), empty_image=True):
    """Masked-token inputs: a (B, H, W) mask (the last image without masked tokens when ``empty_image``)
    and (R, IN) features of the R masked tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(images, *grid, generator=g) < 0.5
    mask[0, 0, 0] = True
    if empty_image:
        mask[-1] = False
    return mask, torch.randn(int(mask.sum()), IN, generator=g)


def _initial_center(centering):
    return torch.full((K,), 1.0 / K, dtype=torch.float64) if centering == "probability" else torch.zeros(K).double()


def _expected(student_out, teacher_out, mask, student, teacher, temp, center, centering):
    q, stat = ref.teacher_targets(
        teacher_out.detach(), ref.norms_of(teacher.last_layer).detach(), temp, P, center, centering
    )
    logits = ref.student_logits(student_out.detach(), ref.norms_of(student.last_layer).detach(), 0.1, P)
    return ref.masked_tokens(logits, q, mask).item(), stat


def test_lightlys_example_of_three_images_with_equal_norms():
    """lightly's own case: 3 images of 2 x 2 tokens with 2, 1 and 0 masked tokens, teacher_temp 0.1,
    student_temp 0.2, center momentum 0.9: the loss is the re-derivation's and lightly's, the center
    moves to 0.1 times the mean of the masked teacher tokens."""
    teacher_out = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    student_out = torch.tensor([[0.7, 0.8], [0.9, 1.0], [1.1, 1.2]])
    mask = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]], [[False] * 2] * 2])
    heads = [DINOv2ProjectionHead(4, 4, 2, 2) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenNormsWarning)  # DINOv2ProjectionHead's norms are free
        patched = vmf_lightly.patch_ibot(
            *heads, IBOTPatchLoss(2, teacher_temp=0.1, student_temp=0.2, center_momentum=0.9), centering="logit"
        )
    lightly_loss = IBOTPatchLoss(2, teacher_temp=0.1, student_temp=0.2, center_momentum=0.9)
    q, _ = ref.teacher_targets(teacher_out, torch.ones(2), 0.1, 2, torch.zeros(2), "logit")
    expected = ref.masked_tokens(student_out.double() / 0.2, q, mask)
    loss = patched(teacher_out, student_out, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(lightly_loss(teacher_out, student_out, mask).item(), rel=1e-6)
    torch.testing.assert_close(patched.center.value, 0.1 * teacher_out.mean(0, keepdim=True))
    torch.testing.assert_close(patched.center.value, lightly_loss.center.value)


@pytest.mark.parametrize("temp_of", [float, torch.tensor, None])
def test_equal_norms_and_logit_centering_are_lightlys_loss(temp_of):
    """Step by step, masks that change (one image without masked tokens), the temperature as a float, a
    0-d tensor or lightly's default: loss and center are lightly's."""
    student, teacher = _heads(free=False)
    lightly_loss = IBOTPatchLoss(K, teacher_temp=0.05, center_momentum=0.8)
    patched = _patched(student, teacher, centering="logit", teacher_temp=0.05, center_momentum=0.8)
    with torch.no_grad():
        for step in range(4):
            mask, features = _tokens(step)
            teacher_out, student_out = teacher(features * 1.1), student(features)
            temp = None if temp_of is None else 0.04 + 0.01 * step
            expected = lightly_loss(teacher_out, student_out, mask, teacher_temp=temp)
            got = patched(teacher_out, student_out, mask, teacher_temp=None if temp is None else temp_of(temp))
            torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-6)
            torch.testing.assert_close(patched.center.value, lightly_loss.center.value, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("centering", ["probability", "logit"])
def test_free_norms_match_the_rederivation(centering):
    """Three steps of the student with free norms, (B, H, W) and (B, N) masks: loss and center as
    re-derived, and the norms learn."""
    student, teacher = _heads()
    patched = _patched(student, teacher, centering=centering, center_momentum=0.8)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.05)
    center, g_start = _initial_center(centering), student.last_layer.weight_g.detach().clone()
    for step in range(3):
        mask, features = _tokens(step)
        mask = mask.flatten(1) if step == 1 else mask
        with torch.no_grad():
            teacher_out = teacher(features * 1.1)
        student_out = student(features)
        temp = 0.04 + 0.01 * step
        expected, stat = _expected(student_out, teacher_out, mask, student, teacher, temp, center, centering)
        loss = patched(teacher_out, student_out, mask, teacher_temp=temp)
        assert loss.item() == pytest.approx(expected, abs=1e-5)
        center = 0.8 * center + 0.2 * stat
        torch.testing.assert_close(patched.center.value.double().flatten(), center, atol=1e-6, rtol=0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(student.last_layer.weight_g, g_start)


@pytest.mark.parametrize("centering", ["probability", "logit"])
def test_fused_kernels_equal_the_reference(centering):
    """``backend="triton"`` (the fused kernels a CUDA step takes; Triton's interpreter on the CPU) with
    lightly's per-image token weights: loss, center and the gradients of the outputs and norms are the
    reference backend's."""
    pytest.importorskip("triton", reason="the fused kernels are Triton kernels")
    results = []
    for backend in ("triton", "reference"):
        student, teacher = _heads()
        patched = vmf_lightly.patch_ibot(student, teacher, IBOTPatchLoss(K), centering=centering, backend=backend)
        mask, features = _tokens(9)
        with torch.no_grad():
            teacher_out = teacher(features * 1.1)
        student_out = student(features).detach().requires_grad_()
        loss = patched(teacher_out, student_out, mask, teacher_temp=torch.tensor(0.05))
        loss.backward()
        results.append(
            (loss.detach(), patched.center.value.clone(), student_out.grad, student.last_layer.weight_g.grad)
        )
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_head_for_both_terms_sums_both_gradients():
    """lightly's example with ``ibot_separate_head=False``: the DINO and the iBOT term read the norms of
    one head; the gradient of ``weight_g`` is the sum of both corrections' (outputs held fixed)."""
    student, teacher = _heads()
    dino = vmf_lightly.patch(student, teacher, DINOLoss(K))
    ibot = _patched(student, teacher)
    mask, features = _tokens(5)
    g = torch.Generator().manual_seed(6)
    views = [torch.randn(4, IN, generator=g) for _ in range(3)]
    with torch.no_grad():
        cls_t, cls_s = [teacher(v) for v in views[:2]], [student(v) for v in views]
        tok_t, tok_s = teacher(features * 1.1), student(features)
    (dino(cls_t, cls_s, teacher_temp=0.05) + ibot(tok_t, tok_s, mask, teacher_temp=0.06)).backward()

    layer = student.last_layer
    g_leaf = layer.weight_g.detach().clone().requires_grad_()
    norms = ref.norms_of(type("Leaf", (), {"weight_g": g_leaf, "weight_v": layer.weight_v.detach()})())
    t_norms = ref.norms_of(teacher.last_layer).detach()
    q_cls, _ = ref.teacher_targets(torch.cat(cls_t), t_norms, 0.05, P, _initial_center("probability"), "probability")
    q_tok, _ = ref.teacher_targets(tok_t, t_norms, 0.06, P, _initial_center("probability"), "probability")
    total = ref.multicrop(ref.student_logits(torch.cat(cls_s), norms, 0.1, P), q_cls, 3, 2)
    total = total + ref.masked_tokens(ref.student_logits(tok_s, norms, 0.1, P), q_tok, mask)
    total.backward()
    assert layer.weight_g.grad.abs().max() > 1e-4
    torch.testing.assert_close(layer.weight_g.grad.double(), g_leaf.grad.double(), atol=1e-6, rtol=1e-4)


def test_checkpoints_have_lightlys_keys_both_ways():
    student, teacher = _heads()
    lightly_loss, patched = IBOTPatchLoss(K), _patched(student, teacher, centering="logit")
    mask, features = _tokens(7)
    with torch.no_grad():
        patched(teacher(features), student(features), mask)
    state = patched.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in lightly_loss.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    lightly_loss.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(lightly_loss.center.value, patched.center.value, rtol=0, atol=0)
    resumed = _patched(student, teacher, centering="logit")
    resumed.load_state_dict(lightly_loss.state_dict())
    torch.testing.assert_close(resumed.center.value, lightly_loss.center.value, rtol=0, atol=0)
    # logit centering carries the center of the loss it patches over; probability centering refuses
    # a logit center in a checkpoint (a vMF run starts from scratch)
    carried = vmf_lightly.patch_ibot(student, teacher, lightly_loss, centering="logit")
    torch.testing.assert_close(carried.center.value, lightly_loss.center.value, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"checkpoint's center\.center is not a probability vector"):
        _patched(student, teacher).load_state_dict(lightly_loss.state_dict())


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("bottleneck_dim", [8, 16, 32])
def test_dinov2_projection_head_is_unchanged_by_the_patch(bottleneck_dim, batch_norm):
    """The head lightly's suite checks, built and patched (DINO and iBOT term): its outputs and shapes are
    those of the same head unpatched, and the norms read are ``|weight_g|``."""
    heads = []
    for _ in range(3):
        torch.manual_seed(0)
        heads.append(DINOv2ProjectionHead(8, 16, bottleneck_dim, 32, batch_norm=batch_norm).eval())
    plain, head, teacher = heads
    ibot = vmf_lightly.patch_ibot(head, teacher, IBOTPatchLoss(32))
    vmf_lightly.patch(head, teacher, DINOLoss(32))
    for batch_size in (1, 2):
        x = torch.rand(batch_size, 8)
        with torch.no_grad():
            y = head(x)
        assert y.shape == (batch_size, 32)
        torch.testing.assert_close(y, plain(x), rtol=0, atol=0)
    assert ibot.p == bottleneck_dim
    head.last_layer.weight_g.data.mul_(torch.linspace(0.5, 2.0, 32)[:, None])
    torch.testing.assert_close(vmf_lightly._norms(ibot._prototype_layers)[0], head.last_layer.weight_g.flatten())


def test_errors_in_lightlys_terms():
    student, teacher = _heads()
    patched = _patched(student, teacher)
    mask, features = _tokens(8)
    with torch.no_grad():
        t, s = teacher(features), student(features)
    with pytest.raises(ValueError, match=r"student_out has shape \(\d+, 24\); teacher_out and student_out must both"):
        patched(t, s[:-1], mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        patched(t, s, mask.float())
    with pytest.raises(ValueError, match="mask must be 2-D or 3-D"):
        patched(t, s, mask[0, 0])
    with pytest.raises(RuntimeError, match=r"mask does not mark \d+ tokens: pass the outputs of the masked tokens"):
        patched(t[:-1], s[:-1], mask)
    bad = t.clone()
    bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match="teacher_out has non-finite values"):
        patched(bad, s, mask)
    with pytest.raises(TypeError, match="ibot_loss must be lightly's IBOTPatchLoss"):
        vmf_lightly.patch_ibot(student, teacher, IBOTPlusPlusPatchLoss(K))
    with pytest.raises(TypeError, match="ibot_loss must be lightly's IBOTPatchLoss"):
        vmf_lightly.patch_ibot(student, teacher, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="ibot_loss is built for K = 16 prototypes but the heads have K = 24"):
        vmf_lightly.patch_ibot(student, teacher, IBOTPatchLoss(16))
    separate = nn.ModuleDict({"dino_head": student, "ibot_head": _heads()[0]})
    with pytest.raises(ValueError, match="several heads"):
        vmf_lightly.patch_ibot(separate, teacher, IBOTPatchLoss(K))
    student.last_layer.weight_g.requires_grad = False
    with pytest.warns(FrozenNormsWarning, match="trainable last_layer.weight_g"):
        _patched(student, teacher)


class _DINOv2(nn.Module):
    """The model of lightly's DINOv2 example at small scale: its timm ViT-S/16 (learnt position
    embedding, dynamic image size, layer scale) in ``MaskedVisionTransformerTIMM``, the student a copy
    with drop path 0.1, ``DINOv2ProjectionHead``\\ s of K = 64 prototypes (p = 16) under ``dino_head``
    and ``ibot_head``, one module for both unless ``ibot_separate_head``; the teacher frozen."""

    def __init__(self, ibot_separate_head=False, k=64):
        from lightly.models.modules import MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate
        from timm.models.vision_transformer import vit_small_patch16_224

        super().__init__()
        torch.manual_seed(0)
        vit = vit_small_patch16_224(pos_embed="learn", dynamic_img_size=True, init_values=1e-5)
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        update_drop_path_rate(self.student_backbone.vit, drop_path_rate=0.1, mode="uniform")
        g = torch.Generator().manual_seed(1)
        norms = 0.5 + 1.5 * torch.rand(2, k, 1, generator=g)  # free norms, spread from the start
        for role in ("student", "teacher"):
            torch.manual_seed(2)
            dino_head, ibot_head = (DINOv2ProjectionHead(384, 64, 16, k) for _ in range(2))
            dino_head.last_layer.weight_g.data.copy_(norms[0])
            ibot_head.last_layer.weight_g.data.copy_(norms[1])
            setattr(self, f"{role}_head", nn.ModuleDict({"dino_head": dino_head, "ibot_head": ibot_head}))
            if not ibot_separate_head:
                getattr(self, f"{role}_head")["ibot_head"] = dino_head
        for module in (self.teacher_backbone, self.teacher_head):
            for param in module.parameters():
                param.requires_grad = False
            module.eval()

    def forward_teacher(self, x):
        features = self.teacher_backbone.encode(x)
        return features[:, 0], features

    def forward_student(self, x, mask):
        features = self.student_backbone.encode(x, mask=mask)
        return features[:, 0], None if mask is None else features[mask]


def _views(step, batch=2):
    """2 global views of 64 px and 2 local views of 32 px, and a mask over the 4 x 4 patches of the
    global views (the last image without masked tokens)."""
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(batch, 3, 64, 64, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)]
    block_mask = torch.rand(2 * batch, 4, 4, generator=g) < 0.4
    block_mask[0, 0, 0], block_mask[-1] = True, False
    return views, block_mask


@pytest.mark.parametrize("ibot_separate_head", [False, True])
def test_lightlys_dinov2_example_trains_patched_as_rederived(ibot_separate_head):
    """The training step of lightly's DINOv2 example (examples/pytorch/dinov2.py): teacher and student
    forward with the mask on the global views, DINO term on the [CLS] outputs of all views, iBOT term on
    the masked tokens, KoLeo on the student's global [CLS] tokens, the teacher temperature warm-up,
    AdamW with its weight-decay schedule, the momentum update; each loss patched with one line.
    Three steps: both terms equal the float64 DINO-vMF / iBOT-vMF re-derivation within 1e-5 (centers
    too), and the free norms learn."""
    pytest.importorskip("timm", reason="lightly's DINOv2 example builds its ViT-S with timm")
    from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule

    model = _DINOv2(ibot_separate_head)
    k = 64
    dino_criterion = vmf_lightly.patch(model.student_head["dino_head"], model.teacher_head["dino_head"], DINOLoss(k))
    ibot_criterion = vmf_lightly.patch_ibot(
        model.student_head["ibot_head"], model.teacher_head["ibot_head"], IBOTPatchLoss(k)
    )
    koleo_criterion = KoLeoLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.001)
    centers = [torch.full((k,), 1.0 / k, dtype=torch.float64) for _ in range(2)]
    layers = [model.student_head[name].last_layer for name in ("dino_head", "ibot_head")]
    t_layers = [model.teacher_head[name].last_layer for name in ("dino_head", "ibot_head")]
    g_start = [layer.weight_g.detach().clone() for layer in layers]
    steps = 3
    for step in range(steps):
        views, block_mask = _views(step)
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        mask = torch.zeros(len(global_views), 17, dtype=torch.bool)
        mask[:, 1:] = block_mask.flatten(1)
        with torch.no_grad():
            teacher_cls_token, teacher_features = model.forward_teacher(global_views)
            teacher_cls_out = model.teacher_head["dino_head"](teacher_cls_token)
            teacher_masked_out = model.teacher_head["ibot_head"](teacher_features[mask])
        student_global_cls_token, student_masked_features = model.forward_student(global_views, mask)
        student_global_cls_out = model.student_head["dino_head"](student_global_cls_token)
        student_masked_out = model.student_head["ibot_head"](student_masked_features)
        student_local_cls_token, _ = model.forward_student(local_views, None)
        student_cls_out = torch.cat([student_global_cls_out, model.student_head["dino_head"](student_local_cls_token)])
        teacher_temp = linear_warmup_schedule(step=step, warmup_steps=2, start_value=0.04, end_value=0.07)

        q, stat = ref.teacher_targets(
            teacher_cls_out, ref.norms_of(t_layers[0]).detach(), teacher_temp, 16, centers[0], "probability"
        )
        logits = ref.student_logits(student_cls_out.detach(), ref.norms_of(layers[0]).detach(), 0.1, 16)
        expected_dino = ref.multicrop(logits, q, len(views), 2).item()
        q2, stat2 = ref.teacher_targets(
            teacher_masked_out, ref.norms_of(t_layers[1]).detach(), teacher_temp, 16, centers[1], "probability"
        )
        logits2 = ref.student_logits(student_masked_out.detach(), ref.norms_of(layers[1]).detach(), 0.1, 16)
        expected_ibot = ref.masked_tokens(logits2, q2, block_mask).item()

        dino_loss = dino_criterion(
            teacher_out=teacher_cls_out.chunk(2),
            student_out=student_cls_out.chunk(len(views)),
            teacher_temp=teacher_temp,
        )
        ibot_loss = ibot_criterion(
            teacher_out=teacher_masked_out, student_out=student_masked_out, mask=block_mask, teacher_temp=teacher_temp
        )
        koleo_loss = 0.1 * sum(koleo_criterion(t) for t in student_global_cls_token.chunk(2))
        assert dino_loss.item() == pytest.approx(expected_dino, abs=1e-5)
        assert ibot_loss.item() == pytest.approx(expected_ibot, abs=1e-5)
        centers = [0.9 * centers[0] + 0.1 * stat, 0.9 * centers[1] + 0.1 * stat2]
        torch.testing.assert_close(dino_criterion.center.double().flatten(), centers[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(ibot_criterion.center.value.double().flatten(), centers[1], atol=1e-6, rtol=0)

        (dino_loss + ibot_loss + koleo_loss).backward()
        weight_decay = cosine_schedule(step=step, max_steps=steps, start_value=0.04, end_value=0.4)
        for group in optimizer.param_groups:
            if group["weight_decay"] != 0.0:
                group["weight_decay"] = weight_decay
        optimizer.step()
        optimizer.zero_grad()
        momentum = cosine_schedule(step=step, max_steps=steps, start_value=0.992, end_value=1.0)
        update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
        update_momentum(model.student_head, model.teacher_head, m=momentum)
    for layer, start in zip(layers, g_start):
        assert not torch.allclose(layer.weight_g, start)
