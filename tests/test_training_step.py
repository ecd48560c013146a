"""What a GPU user's training step pays besides the arithmetic, checked on the CPU (docs/loss.md, "A GPU
training step"):

* no operation that would synchronise the host with a GPU (counted with ``tests/sync_ops.py``) in a
  loss step, forward and backward, with default options, for every loss module and the losses the
  integrations build (DINO, iBOT, lightly's DINO and iBOT terms, solo-learn); on a GPU the same steps
  run under ``torch.cuda.set_sync_debug_mode("error")``;
* ``torch.compile(fullgraph=True)`` of every loss module's call and of the README's training step
  (head + loss + backward), and a whole teacher-temperature warm-up compiles once (dynamo's counters);
* ``import vmf_head`` loads neither Triton nor ``torch._dynamo``.

Each step is run once before it is counted: the first call per order uploads cached constants (a
one-time host-to-device copy), which is not a per-step cost.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import standins.dino as D
import standins.ibot as I
import standins.solo as S
import torch
from sync_ops import count_syncs
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from vmf_head import DINOvMFLoss, VMFPrototypeHead, iBOTvMFLoss, log_vmf_normalizer, prototype_log_normalizer
from vmf_head import functional as F
from vmf_head.integrations import dino as vmf_dino
from vmf_head.integrations import ibot as vmf_ibot

K, K2, P, NCROPS, B, N = 32, 24, 8, 4, 3, 6
CENTERINGS = ["logit", "probability", "sinkhorn"]

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def _counted(step) -> dict:
    step()  # warm-up: cached constants
    return dict(count_syncs(step)[1])


def _dino_step(centering, epoch=1):
    loss_fn = DINOvMFLoss(K, NCROPS, 0.04, 0.07, 2, 4, p=P, centering=centering)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(NCROPS * B, K, generator=g).requires_grad_()
    teacher = torch.randn(2 * B, K, generator=g)
    norms = (torch.rand(K, generator=g) + 0.5).requires_grad_()

    def step():
        loss_fn(student, teacher, epoch, norms, norms.detach()).backward()

    return step


def _ibot_step(centering):
    loss_fn = iBOTvMFLoss(K, K2, 2, 2, 0.04, 0.07, 0.04, 0.07, 2, 4, p=P, centering=centering)
    g = torch.Generator().manual_seed(1)
    s_cls, s_patch = torch.randn(2 * B, K, generator=g).requires_grad_(), torch.randn(2 * B, N, K2, generator=g)
    t = (torch.randn(2 * B, K, generator=g), torch.randn(2 * B, N, K2, generator=g))
    local = torch.randn(2 * B, K, generator=g).requires_grad_()
    masks = [torch.rand(B, 2, 3, generator=g) < 0.5 for _ in range(4)]
    norms = tuple((torch.rand(k, generator=g) + 0.5).requires_grad_() for k in (K, K2))

    def step():
        losses = loss_fn((s_cls, s_patch.requires_grad_()), t, local, masks, 1, norms, tuple(n.detach() for n in norms))
        losses["loss"].backward()

    return step


@pytest.mark.parametrize("centering", CENTERINGS)
def test_dino_loss_step_has_no_host_sync(centering):
    assert _counted(_dino_step(centering)) == {}


@pytest.mark.parametrize("centering", CENTERINGS)
def test_ibot_loss_step_has_no_host_sync(centering):
    assert _counted(_ibot_step(centering)) == {}


def test_epoch_as_a_tensor_step_has_no_host_sync():
    assert _counted(_dino_step("probability", epoch=torch.tensor(1))) == {}


def test_integration_losses_have_no_host_sync():
    """The losses DINO's and iBOT's one-line patches return, in their codebases' own training step
    (stand-ins): the loss call, its backward and the head's forward counted together."""
    student, teacher = D.build_networks(K, bottleneck_dim=P)
    dino_loss = vmf_dino.patch(student, teacher, D.DINOLoss(K, 4, 0.04, 0.07, 2, 4))
    images = D.crops(batch=B)

    def dino_step():
        dino_loss(student(images), teacher(images[:2]), 1).backward()

    assert _counted(dino_step) == {}
    student, teacher = I.build_networks(K, K2, bottleneck_dim=P, shared_head_teacher=False)
    ibot_loss = vmf_ibot.patch(student, teacher, I.iBOTLoss(K, K2, 2, 2, 0.04, 0.07, 0.04, 0.07, 2, 4))
    images, masks = I.crops_and_masks(batch=B)

    def ibot_step():
        student_output = student(images[:2], mask=masks[:2])
        student.backbone.masked_im_modeling = False
        local = student(images[2:])[0]
        student.backbone.masked_im_modeling = True
        ibot_loss(student_output, teacher(images[:2]), local, masks, 1)["loss"].backward()

    assert _counted(ibot_step) == {}


def test_lightly_loss_has_no_host_sync():
    pytest.importorskip("lightly")
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead

    from vmf_head.integrations import lightly as vmf_lightly

    torch.manual_seed(0)
    student_head = DINOProjectionHead(12, 24, P, K, norm_last_layer=False)
    teacher_head = DINOProjectionHead(12, 24, P, K)
    criterion = vmf_lightly.patch(student_head, teacher_head, DINOLoss(K, warmup_teacher_temp_epochs=2))
    views = [torch.randn(B, 12) for _ in range(4)]

    def step():
        criterion([teacher_head(v).detach() for v in views[:2]], [student_head(v) for v in views], epoch=1).backward()

    assert _counted(step) == {}


def _lightly_ibot_step():
    """A step of lightly's iBOT term patched (``patch_ibot``): the heads on the masked tokens' features,
    then the loss; ``inputs()`` a new mask of the same number of masked tokens at every call."""
    from lightly.loss import IBOTPatchLoss
    from lightly.models.modules import DINOv2ProjectionHead

    from vmf_head.integrations import lightly as vmf_lightly

    torch.manual_seed(0)
    student_head, teacher_head = DINOv2ProjectionHead(12, 24, P, K), DINOv2ProjectionHead(12, 24, P, K)
    criterion = vmf_lightly.patch_ibot(student_head, teacher_head, IBOTPatchLoss(K))
    g = torch.Generator().manual_seed(5)

    def step(features, mask, teacher_temp):
        with torch.no_grad():
            teacher_out = teacher_head(features)
        return criterion(teacher_out, student_head(features), mask, teacher_temp=teacher_temp)

    def inputs(masked=7):
        mask = torch.zeros(B * N, dtype=torch.bool)
        mask[torch.randperm(B * N, generator=g)[:masked]] = True
        return torch.randn(masked, 12, generator=g), mask.view(B, 2, 3)

    return student_head, step, inputs


def _solo_method():
    from vmf_head.integrations import solo as vmf_solo

    torch.manual_seed(0)
    return vmf_solo.patch(S.DINO(S.config(num_prototypes=K, bottleneck_dim=P)))


def test_lightly_ibot_and_solo_losses_have_no_host_sync():
    pytest.importorskip("lightly")
    _, step, inputs = _lightly_ibot_step()
    features, mask = inputs()
    temp = torch.tensor(0.05)
    assert _counted(lambda: step(features, mask, temp).backward()) == {}
    assert _counted(lambda: step(features, mask, 0.05).backward()) == {}
    method, batch = _solo_method(), S.batch(size=B)
    method.current_epoch = 1
    method.on_train_epoch_start()
    assert _counted(lambda: method.training_step(batch, 0).backward()) == {}


def test_lightly_ibot_and_solo_losses_compile_once_per_shape():
    """One graph (fullgraph, AOTAutograd) for lightly's patched iBOT step over masks and 0-d tensor
    temperatures that change at every call, and one for solo-learn's whole training step over 4 epochs
    set as ``.epoch``; values and gradients those of eager."""
    pytest.importorskip("lightly")
    results = []
    for compile_it in (True, False):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        student_head, step, inputs = _lightly_ibot_step()
        fn = torch.compile(step, backend=counter, fullgraph=True) if compile_it else step
        losses = [fn(*inputs(), torch.tensor(0.04 + 0.01 * i)) for i in range(4)]
        for loss in losses:
            loss.backward()
        assert counter.frame_count == (1 if compile_it else 0)
        method = _solo_method()
        training_step = torch.compile(method.training_step, backend=counter, fullgraph=True) if compile_it else None
        for epoch in range(4):
            method.current_epoch = epoch
            method.on_train_epoch_start()
            losses.append((training_step or method.training_step)(S.batch(size=B, seed=epoch), 0))
            losses[-1].backward()
        assert counter.frame_count == (2 if compile_it else 0)
        results.append(
            (
                torch.stack([loss.detach() for loss in losses]),
                student_head.last_layer.weight_g.grad,
                method.head.last_layer.weight_g.grad,
                method.dino_loss_func.center,
            )
        )
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_normaliser_and_pure_functions_have_no_host_sync():
    weight = torch.randn(K, P, requires_grad=True)
    kappa = torch.logspace(-3, 8, 50, requires_grad=True)
    student = torch.randn(NCROPS * B, K, requires_grad=True)
    targets = torch.softmax(torch.randn(2 * B, K), -1)

    def step():
        out = prototype_log_normalizer(weight, 0.1).sum() + log_vmf_normalizer(kappa, 256).sum()
        out = out + F.multicrop_cross_entropy(student, targets, n_views=NCROPS, student_temp=0.1)
        out.backward()

    assert _counted(step) == {}


def test_the_counter_sees_syncs():
    """The counter is not blind: .item(), bool(), a Python list made a tensor and a boolean mask count."""
    x = torch.randn(4)
    assert count_syncs(lambda: (x.sum().item(), bool(x[0] > 0), torch.tensor([1.0, 2.0]), x[x > 0]))[1] == {
        "aten._local_scalar_dense": 2,
        "aten.lift_fresh": 1,
        "aten.index.Tensor with a bool mask": 1,
    }


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("centering", CENTERINGS)
def test_dino_loss_compiles_once_for_a_whole_warm_up(centering):
    """A 0-d tensor epoch over 12 epochs of a 10-epoch warm-up: one graph (fullgraph, no recompile);
    a Python int: dynamo specialises the first value, then compiles one symbolic graph (2 in all)."""
    for epoch_of, most in ((torch.tensor, 1), (int, 2)):
        torch._dynamo.reset()
        counter = CompileCounter()
        loss_fn = DINOvMFLoss(K, NCROPS, 0.04, 0.07, 10, 20, p=P, centering=centering)
        compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
        g = torch.Generator().manual_seed(2)
        for epoch in range(12):
            student = torch.randn(NCROPS * B, K, generator=g).requires_grad_()
            norms = (torch.rand(K, generator=g) + 0.5).requires_grad_()
            compiled(student, torch.randn(2 * B, K, generator=g), epoch_of(epoch), norms, norms.detach()).backward()
        assert 1 <= counter.frame_count <= most, (epoch_of, counter.frame_count)


@pytest.mark.parametrize("centering", CENTERINGS)
def test_ibot_loss_compiles_in_one_graph_with_aot_autograd(centering):
    """fullgraph=True through AOTAutograd (fake tensors, the custom ops' fake implementations): the
    compiled loss, centers and gradients equal the eager ones."""
    results = []
    for compile_it in (True, False):
        torch._dynamo.reset()
        loss_fn = iBOTvMFLoss(K, K2, 2, 2, 0.04, 0.07, 0.04, 0.07, 2, 4, p=P, centering=centering)
        fn = torch.compile(loss_fn, backend="aot_eager", fullgraph=True) if compile_it else loss_fn
        g = torch.Generator().manual_seed(3)
        s_cls = torch.randn(2 * B, K, generator=g).requires_grad_()
        s_patch = torch.randn(2 * B, N, K2, generator=g).requires_grad_()
        t = (torch.randn(2 * B, K, generator=g), torch.randn(2 * B, N, K2, generator=g))
        local = torch.randn(2 * B, K, generator=g)
        masks = torch.rand(2 * B, N, generator=g) < 0.5
        norms = tuple((torch.rand(k, generator=g) + 0.5).requires_grad_() for k in (K, K2))
        for epoch in range(3):
            losses = fn((s_cls, s_patch), t, local, masks, torch.tensor(epoch), norms, tuple(n.detach() for n in norms))
        losses["loss"].backward()
        results.append((losses["loss"], loss_fn.center, loss_fn.center2, s_cls.grad, s_patch.grad, norms[0].grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_python_float_temperature_compiles_in_two_graphs():
    """lightly's example passes its teacher temperature as a Python float that changes every step:
    fullgraph works, dynamo specialises the first value and then traces one graph for all others, and
    the values are those of eager."""
    lightly = pytest.importorskip("lightly.loss")
    from lightly.models.modules import DINOProjectionHead

    from vmf_head.integrations import lightly as vmf_lightly

    results = []
    for compile_it in (True, False):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        torch.manual_seed(0)
        s_head, t_head = DINOProjectionHead(12, 24, P, K, norm_last_layer=False), DINOProjectionHead(12, 24, P, K)
        criterion = vmf_lightly.patch(s_head, t_head, lightly.DINOLoss(K, warmup_teacher_temp_epochs=2))
        views = [torch.randn(B, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]

        def step(temp):
            return criterion([t_head(v).detach() for v in views[:2]], [s_head(v) for v in views], teacher_temp=temp)

        fn = torch.compile(step, backend=counter, fullgraph=True) if compile_it else step
        losses = [fn(temp) for temp in (0.04, 0.05, 0.06, 0.07)]
        assert counter.frame_count == (2 if compile_it else 0)
        results.append(torch.stack([loss.detach() for loss in losses]))
    torch.testing.assert_close(*results, rtol=1e-5, atol=1e-6)


def test_integration_losses_compile_in_one_graph():
    """The losses of DINO's and lightly's one-line patches under torch.compile(fullgraph=True)
    (AOTAutograd), with the heads' forward in the graph: the same loss and norm gradient as eager."""
    lightly = pytest.importorskip("lightly.loss")
    from lightly.models.modules import DINOProjectionHead

    from vmf_head.integrations import lightly as vmf_lightly

    results = []
    for compile_it in (True, False):
        torch._dynamo.reset()
        student, teacher = D.build_networks(K, bottleneck_dim=P)
        dino_loss = vmf_dino.patch(student, teacher, D.DINOLoss(K, 4, 0.04, 0.07, 2, 4))
        torch.manual_seed(0)
        s_head, t_head = DINOProjectionHead(12, 24, P, K, norm_last_layer=False), DINOProjectionHead(12, 24, P, K)
        criterion = vmf_lightly.patch(s_head, t_head, lightly.DINOLoss(K, warmup_teacher_temp_epochs=2))
        images, views = (
            D.crops(batch=B),
            [torch.randn(B, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)],
        )

        def step(epoch):
            a = dino_loss(student(images), teacher(images[:2]), epoch)
            b = criterion([t_head(v).detach() for v in views[:2]], [s_head(v) for v in views], epoch=1)
            return a + b

        fn = torch.compile(step, backend="aot_eager", fullgraph=True) if compile_it else step
        loss = fn(torch.tensor(1))
        loss.backward()
        results.append((loss.detach(), student.head.last_layer.weight_g.grad, s_head.last_layer.weight_g.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_readme_training_step_compiles_in_one_graph():
    """The README's step (head -> logits -> correction -> centering -> loss, then backward) under
    torch.compile(fullgraph=True) with Inductor: one graph for 3 epochs, the same loss and gradients
    as eager."""
    results = []
    for compile_it in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        student_head = VMFPrototypeHead(12, K, norm_last_layer=False, hidden_dim=32, bottleneck_dim=P)
        teacher_head = VMFPrototypeHead(12, K, norm_last_layer=False, hidden_dim=32, bottleneck_dim=P)
        teacher_head.load_state_dict(student_head.state_dict())
        loss_fn = DINOvMFLoss(K, NCROPS, 0.04, 0.07, 2, 4, p=student_head.p)

        def step(features, epoch):
            student_out = student_head(features)
            with torch.no_grad():
                teacher_out = teacher_head(features[: 2 * B])
            return loss_fn(
                student_out,
                teacher_out,
                epoch,
                student_norms=student_head.prototype_norms(),
                teacher_norms=teacher_head.prototype_norms(),
            )

        counter = CompileCounterWithBackend("inductor")
        fn = torch.compile(step, fullgraph=True, backend=counter) if compile_it else step
        g = torch.Generator().manual_seed(4)
        for epoch in range(3):
            loss = fn(torch.randn(NCROPS * B, 12, generator=g), torch.tensor(epoch))
            loss.backward()
        assert counter.frame_count == (1 if compile_it else 0)
        results.append((loss.detach(), student_head.last_layer.weight_g.grad.clone(), loss_fn.center.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_import_loads_neither_triton_nor_dynamo():
    code = "import sys, vmf_head; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("centering", CENTERINGS)
def test_gpu_steps_run_under_sync_debug_mode_error(centering):
    """The fused kernels' steps (and Sinkhorn's reference step) on CUDA: any synchronising call raises."""
    loss_fn = DINOvMFLoss(4096, 10, 0.04, 0.07, 2, 4, p=256, centering=centering).cuda()
    ibot = iBOTvMFLoss(4096, 1024, 2, 8, 0.04, 0.07, 0.04, 0.07, 2, 4, p=256, centering=centering).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(10 * 8, 4096, device="cuda", generator=g).requires_grad_()
    teacher = torch.randn(2 * 8, 4096, device="cuda", generator=g)
    norms = (torch.rand(4096, device="cuda", generator=g) + 0.5).requires_grad_()
    patch = torch.randn(2 * 8, 49, 1024, device="cuda", generator=g).requires_grad_()
    t_patch = torch.randn(2 * 8, 49, 1024, device="cuda", generator=g)
    masks = torch.rand(2 * 8, 49, device="cuda", generator=g) < 0.4
    p_norms = (torch.rand(1024, device="cuda", generator=g) + 0.5).requires_grad_()

    def step():
        loss_fn(student, teacher, 1, norms, norms.detach()).backward()
        losses = ibot(
            (student[:16], patch),
            (teacher, t_patch),
            student[16:],
            masks,
            1,
            (norms, p_norms),
            (norms.detach(), p_norms.detach()),
        )
        losses["loss"].backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
