"""``vmf_head.integrations.dino`` against a stand-in of facebookresearch/dino.

``standins/dino.py`` restates DINO's ``DINOHead``, ``MultiCropWrapper``, ``DINOLoss``, the ``utils``
functions the training loop calls and one iteration of ``train_one_epoch``, from DINO's interfaces (DINO is
a repository, not a package). The expected losses are re-derived in ``_integration_reference.py``
(float64, scipy Bessel functions, DINO's double loop over view pairs).
"""

from __future__ import annotations

import io
import warnings

import _integration_reference as ref
import pytest
import torch
from standins import dino as D

from vmf_head.integrations import FrozenNormsWarning
from vmf_head.integrations import dino as vmf_dino

K, P, NCROPS = 32, 8, 4

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def _networks(norm_last_layer=False, seed=0):
    student, teacher = D.build_networks(K, norm_last_layer=norm_last_layer, bottleneck_dim=P, seed=seed)
    if not norm_last_layer:  # spread the norms so that the correction differs between prototypes
        g = torch.Generator().manual_seed(seed + 1)
        norms = 0.5 + 1.5 * torch.rand(K, 1, generator=g)
        student.head.last_layer.weight_g.data.copy_(norms)
        teacher.head.last_layer.weight_g.data.copy_(norms)
    return student, teacher


def _dino_loss():
    # warm-up over 3 of 5 epochs: the three steps below see three different teacher temperatures
    return D.DINOLoss(K, NCROPS, 0.04, 0.07, 3, 5, student_temp=0.1, center_momentum=0.8)


@pytest.mark.parametrize("centering", ["probability", "logit"])
def test_three_training_steps_match_the_rederivation(centering):
    student, teacher = _networks()
    dino_loss = _dino_loss()
    loss_fn = vmf_dino.patch(student, teacher, dino_loss, centering=centering)
    optimizer = torch.optim.AdamW(D.get_params_groups(student), lr=0.05)
    center = (
        torch.full((K,), 1.0 / K, dtype=torch.float64)
        if centering == "probability"
        else torch.zeros(K, dtype=torch.float64)
    )
    g_start = student.head.last_layer.weight_g.detach().clone()
    for epoch in range(3):
        expected = {}

        def observe(student_output, teacher_output):
            temp = float(dino_loss.teacher_temp_schedule[epoch])
            q, stat = ref.teacher_targets(
                teacher_output.detach(), ref.norms_of(teacher.head.last_layer).detach(), temp, P, center, centering
            )
            logits = ref.student_logits(student_output.detach(), ref.norms_of(student.head.last_layer).detach(), 0.1, P)
            expected["loss"] = ref.multicrop(logits, q, NCROPS, 2).item()
            expected["stat"] = stat

        loss = D.train_step(
            student,
            teacher,
            teacher,
            loss_fn,
            D.crops(n_local=NCROPS - 2, seed=epoch),
            optimizer,
            epoch,
            momentum=0.7,
            observe=observe,
        )
        assert loss.item() == pytest.approx(expected["loss"], abs=1e-5)
        center = 0.8 * center + 0.2 * expected["stat"]
        torch.testing.assert_close(loss_fn.center.double().flatten(), center, atol=1e-6, rtol=0)
    # the norms learnt (student) and followed by EMA (teacher)
    assert not torch.allclose(student.head.last_layer.weight_g, g_start)
    assert not torch.allclose(teacher.head.last_layer.weight_g, g_start)


def test_gradient_reaches_the_prototype_norms():
    student, teacher = _networks()
    loss_fn = vmf_dino.patch(student, teacher, _dino_loss())
    images = D.crops(n_local=NCROPS - 2)
    # detached outputs: the only path to weight_g is the vMF correction
    student_output = student(images).detach().requires_grad_()
    teacher_output = teacher(images[:2]).detach()
    loss_fn(student_output, teacher_output, 1).backward()

    layer = student.head.last_layer
    g = layer.weight_g.detach().clone().requires_grad_()
    norms = (g.double().abs()).flatten()
    s_out = student_output.detach().double().requires_grad_()
    temp = float(loss_fn.teacher_temp_schedule[1])
    q, _ = ref.teacher_targets(
        teacher_output,
        ref.norms_of(teacher.head.last_layer).detach(),
        temp,
        P,
        torch.full((K,), 1.0 / K, dtype=torch.float64),
        "probability",
    )
    ref.multicrop(ref.student_logits(s_out, norms, 0.1, P), q, NCROPS, 2).backward()
    assert layer.weight_g.grad.abs().max() > 1e-4
    torch.testing.assert_close(layer.weight_g.grad.double(), g.grad.double(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(student_output.grad.double(), s_out.grad, atol=1e-6, rtol=1e-4)
    assert teacher.head.last_layer.weight_g.grad is None


def test_checkpoint_of_patched_run_loads_into_unpatched_dino():
    student, teacher = _networks()
    loss_fn = vmf_dino.patch(student, teacher, _dino_loss())
    optimizer = torch.optim.AdamW(D.get_params_groups(student), lr=0.05)
    for epoch in range(3):
        D.train_step(student, teacher, teacher, loss_fn, D.crops(n_local=NCROPS - 2, seed=epoch), optimizer, epoch, 0.7)
    buffer = io.BytesIO()
    # main_dino.py's save_dict
    torch.save(
        {
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": 3,
            "dino_loss": loss_fn.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)

    plain_student, plain_teacher = D.build_networks(K, norm_last_layer=False, bottleneck_dim=P, seed=7)
    plain_student.load_state_dict(checkpoint["student"])  # strict: same keys, same shapes
    plain_teacher.load_state_dict(checkpoint["teacher"])
    images = D.crops(n_local=0, seed=9)
    torch.testing.assert_close(plain_teacher(images), teacher(images), rtol=0, atol=0)
    # resuming: DINO restores the loss state and the optimizer as they were saved
    D.DINOLoss(K, NCROPS, 0.04, 0.07, 3, 5).load_state_dict(checkpoint["dino_loss"])
    resumed = vmf_dino.patch(plain_student, plain_teacher, _dino_loss())
    resumed.load_state_dict(checkpoint["dino_loss"], strict=False)
    torch.testing.assert_close(resumed.center, loss_fn.center, rtol=0, atol=0)
    # a plain DINO checkpoint's logit center is refused by a probability-centered run
    with pytest.raises(ValueError, match="not a probability vector"):
        resumed.load_state_dict(D.DINOLoss(K, NCROPS, 0.04, 0.07, 3, 5).state_dict(), strict=False)
    torch.optim.AdamW(D.get_params_groups(plain_student)).load_state_dict(checkpoint["optimizer"])
    # eval_knn.py / eval_linear.py: --checkpoint_key teacher into a bare backbone
    backbone = D.TinyBackbone()
    backbone.fc = torch.nn.Identity()  # the evaluation scripts build the backbone with num_classes=0
    msg = D.load_pretrained_weights(backbone, checkpoint, "teacher")
    assert msg.missing_keys == [] and all(key.startswith("head.") for key in msg.unexpected_keys)
    torch.testing.assert_close(backbone.proj.weight, teacher.backbone.proj.weight, rtol=0, atol=0)


def test_frozen_norms_warn_and_make_logit_centering_exactly_dino():
    student, teacher = _networks(norm_last_layer=True)
    dino_loss = _dino_loss()
    with pytest.warns(FrozenNormsWarning, match="norm_last_layer false"):
        patched = vmf_dino.patch(student, teacher, dino_loss, centering="logit")
    images = D.crops(n_local=NCROPS - 2)
    with torch.no_grad():
        student_output, teacher_output = student(images), teacher(images[:2])
    for epoch in range(2):
        expected = dino_loss(student_output, teacher_output, epoch)
        torch.testing.assert_close(patched(student_output, teacher_output, epoch), expected, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(patched.center, dino_loss.center, atol=1e-6, rtol=1e-6)


def test_free_norms_do_not_warn():
    student, teacher = _networks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenNormsWarning)
        vmf_dino.patch(student, teacher, _dino_loss())


def test_works_through_distributed_data_parallel(tmp_path):
    """The student inside DistributedDataParallel (one process, gloo), as main_dino.py builds it."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        losses = []
        for wrap in (False, True):
            student, teacher = _networks()
            module = student
            if wrap:
                student = torch.nn.parallel.DistributedDataParallel(student)
            loss_fn = vmf_dino.patch(student, teacher, _dino_loss())
            optimizer = torch.optim.AdamW(D.get_params_groups(student), lr=0.05)
            run = [
                D.train_step(
                    student, teacher, teacher, loss_fn, D.crops(n_local=NCROPS - 2, seed=e), optimizer, e, 0.7
                ).item()
                for e in range(2)
            ]
            losses.append(run)
            assert module.head.last_layer.weight_g.grad.abs().max() > 0
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    finally:
        torch.distributed.destroy_process_group()


def test_bad_inputs_raise():
    student, teacher = _networks()
    with pytest.raises(TypeError, match="student: no module"):
        vmf_dino.patch(student.backbone, teacher, _dino_loss())
    both = torch.nn.ModuleDict({"s": student, "t": teacher})
    with pytest.raises(ValueError, match="several heads"):
        vmf_dino.patch(both, teacher, _dino_loss())
    with pytest.raises(ValueError, match="dino_loss is built for K = 16 prototypes but the heads have K = 32"):
        vmf_dino.patch(student, teacher, D.DINOLoss(16, NCROPS, 0.04, 0.07, 3, 5))
    with pytest.raises(ValueError, match="centering"):
        vmf_dino.patch(student, teacher, _dino_loss(), centering="mean")
    with pytest.raises(TypeError, match=r"dino_loss must be facebookresearch/dino's DINOLoss .* without ncrops"):
        vmf_dino.patch(student, teacher, torch.nn.CrossEntropyLoss())
