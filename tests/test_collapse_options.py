"""Every integration's ``patch()`` takes the collapse options (docs/collapse.md): ``koleo_weight`` adds
KoLeo on the student's prototypes to what the codebase backpropagates, and ``monitor`` gets the teacher's
targets and logs a report.

For each codebase one training step runs twice on the same model, data and seed, without and with the
options: the gradient of the student's prototype layer must differ by exactly ``koleo_weight`` times
KoLeo's own gradient (computed apart), and a monitor checking every step must have logged one report.
DINOv2 and DINOv3 weigh the DINO loss that carries the term by their own factor (their DINO loss weight
over their number of crop-pair terms), so there the difference is that positive multiple of it.
"""

from __future__ import annotations

import pytest
import torch
from lightly.loss import DINOLoss, IBOTPatchLoss
from lightly.models.modules import DINOv2ProjectionHead
from standins import dino as D
from standins import dinov2 as D2
from standins import dinov3 as D3
from standins import ibot as I
from standins import solo as S

from vmf_head.diagnostics import CollapseMonitor
from vmf_head.functional import koleo_prototype_loss
from vmf_head.integrations import dino, dinov2, dinov3, ibot, lightly, solo

K, P, WEIGHT = 16, 8, 0.5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _dino(options):
    student, teacher = D.build_networks(K, norm_last_layer=False, bottleneck_dim=P, seed=0)
    loss_fn = dino.patch(student, teacher, D.DINOLoss(K, 4, 0.04, 0.07, 3, 5), **options)
    images = D.crops(n_local=2)
    loss_fn(student(images), teacher(images[:2]).detach(), 0).backward()
    return student.head.last_layer


def _ibot(options):
    student, teacher = I.build_networks(K, K, norm_last_layer=False, bottleneck_dim=P)
    loss_fn = ibot.patch(student, teacher, I.iBOTLoss(K, K, 2, 1, 0.04, 0.07, 0.05, 0.06, 2, 5), **options)
    images, masks = I.crops_and_masks(n_local=1, seed=0)
    student_out = student(images[:2], mask=masks[:2])
    teacher_out = tuple(x.detach() for x in teacher(images[:2]))
    student.backbone.masked_im_modeling = False
    local_cls = student(images[2:])[0]
    loss_fn(student_out, teacher_out, local_cls, masks, 0)["loss"].backward()
    return student.head.last_layer


def _lightly_heads(cls, *args):
    torch.manual_seed(0)
    student, teacher = cls(*args), cls(*args)
    teacher.load_state_dict(student.state_dict())
    g = torch.Generator().manual_seed(1)
    student.last_layer.weight_g.data.copy_(0.5 + 1.5 * torch.rand(K, 1, generator=g))
    return student, teacher


def _lightly(options):
    student, teacher = _lightly_heads(DINOv2ProjectionHead, 12, 16, P, K)
    loss_fn = lightly.patch(student, teacher, DINOLoss(K, warmup_teacher_temp_epochs=2), **options)
    views = [torch.randn(5, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    loss_fn([teacher(v).detach() for v in views[:2]], [student(v) for v in views], epoch=0).backward()
    return student.last_layer


def _lightly_ibot(options):
    student, teacher = _lightly_heads(DINOv2ProjectionHead, 12, 16, P, K)
    loss_fn = lightly.patch_ibot(student, teacher, IBOTPatchLoss(K), **options)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 2, 3, generator=g) < 0.5
    mask[0, 0, 0] = True
    tokens = torch.randn(int(mask.sum()), 12, generator=g)
    loss_fn(teacher(tokens).detach(), student(tokens), mask).backward()
    return student.last_layer


def _dinov2(options):
    torch.manual_seed(0)
    model = D2.SSLMetaArch(D2.default_cfg(K, K, separate_head=False, centering="centering"))
    model.prepare_for_distributed_training()
    dinov2.patch(model, **options)
    model.forward_backward(D2.collated_batch(seed=0), 0.04)
    return model.student.dino_head.last_layer


def _dinov3(options):
    torch.manual_seed(0)
    model = D3.SSLMetaArch(D3.default_cfg(K, K, P))
    model.init_weights()
    model.model_ema.load_state_dict(model.student.state_dict())
    dinov3.patch(model, **options)
    model.forward_backward(D3.collate(D3.make_samples(3, seed=0)), teacher_temp=0.04, iteration=0)
    return model.student.dino_head.last_layer


def _solo(options):
    torch.manual_seed(0)
    method = solo.patch(S.DINO(S.config(num_prototypes=K, bottleneck_dim=P, norm_last_layer=False)), **options)
    method.current_epoch = 1  # (epoch 0 freezes the last layer)
    method.on_train_epoch_start()
    S.train_step(method, S.batch(seed=0), torch.optim.SGD(method.parameters(), lr=0.0))
    return method.head.last_layer


# codebase -> (one step, the factor the codebase multiplies the returned loss by; None: its own weighting)
STEPS = {
    "dino": (_dino, 1.0),
    "ibot": (_ibot, 1.0),
    "lightly": (_lightly, 1.0),
    "lightly-ibot": (_lightly_ibot, 1.0),
    "dinov2": (_dinov2, None),
    "dinov3": (_dinov3, None),
    "solo": (_solo, 1.0),
}


def _grads(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("codebase", list(STEPS))
def test_patch_adds_koleo_to_what_is_backpropagated_and_feeds_the_monitor(codebase):
    step, factor = STEPS[codebase]
    reports = []
    plain = _grads(step({}))
    layer = step({"koleo_weight": WEIGHT, "monitor": CollapseMonitor(every=1, log=reports.append)})
    watched = _grads(layer)
    for param in layer.parameters():
        param.grad = None
    (WEIGHT * koleo_prototype_loss(layer)).backward()
    koleo = _grads(layer)
    added = torch.cat([(watched[name] - plain[name]).flatten() for name in watched])
    expected = torch.cat([koleo.get(name, torch.zeros_like(watched[name])).flatten() for name in watched])
    assert expected.abs().max() > 0
    if factor is None:  # the codebase's own positive factor, fitted
        factor = float(added @ expected / (expected @ expected))
        assert factor > 0
    torch.testing.assert_close(added, factor * expected, atol=1e-6, rtol=1e-4)
    assert len(reports) == 1 and reports[0].status in ("ok", "uniform", "one-hot", "partial")


def test_bad_options_are_refused():
    student, teacher = D.build_networks(K, norm_last_layer=False, bottleneck_dim=P, seed=0)
    with pytest.raises(ValueError, match="koleo_weight"):
        dino.patch(student, teacher, D.DINOLoss(K, 4, 0.04, 0.07, 3, 5), koleo_weight=-1.0)
    with pytest.raises(TypeError, match="monitor must be None, True or a CollapseMonitor"):
        dino.patch(student, teacher, D.DINOLoss(K, 4, 0.04, 0.07, 3, 5), monitor="yes")
