"""``vmf_head.integrations.solo`` against solo-learn's ``DINO`` method.

Every test runs on ``standins/solo.py``, which restates solo-learn's ``DINOLoss``, ``DINOHead`` and
``DINO`` method (on the part of its Lightning base class a step uses) from solo-learn's interfaces.
With ``SOLO_LEARN_REPO`` pointing at a vturrisi/solo-learn checkout, every test runs a second time on
solo-learn's own ``solo/methods/dino.py`` (``DINO``, ``DINOHead``), ``solo/losses/dino.py``
(``DINOLoss``) and the ``solo/utils`` they import, loaded from the checkout on today's torch; only
their Lightning base class ``solo.methods.base.BaseMomentumMethod`` is the stand-in's (solo-learn's
pulls in Lightning 2.1 and every backbone). The expected losses are re-derived in
``_integration_reference.py`` (float64, scipy Bessel functions, the double loop over view pairs).
"""

from __future__ import annotations

import importlib
import io
import os
import sys
import types
import warnings

import _integration_reference as ref
import pytest
import torch
import torch.nn.functional as F
from standins import solo as S

from vmf_head.integrations import FrozenNormsWarning
from vmf_head.integrations import solo as vmf_solo

K, P = 32, 8
REPO = os.environ.get("SOLO_LEARN_REPO")

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def _load_solo_learn() -> type:
    """solo-learn's ``DINO`` class from ``REPO``: its packages are entered in ``sys.modules`` without
    their ``__init__`` (which imports every method and backbone), with the stand-in's base class."""
    if not REPO:
        pytest.skip("set SOLO_LEARN_REPO to a vturrisi/solo-learn checkout to run its own DINO, DINOHead and DINOLoss")
    for module in ("omegaconf", "timm"):  # imported by solo/methods/dino.py and solo/utils/misc.py
        pytest.importorskip(module, reason=f"solo-learn's DINO imports {module}")
    packages = {
        "solo": [],
        **{f"solo.{name}": [os.path.join(REPO, "solo", name)] for name in ("losses", "methods", "utils")},
    }
    for name, path in packages.items():
        package = types.ModuleType(name)
        package.__path__ = path
        sys.modules[name] = package
    base = types.ModuleType("solo.methods.base")
    base.BaseMomentumMethod = S.BaseMomentumMethod
    sys.modules[base.__name__] = base
    try:
        return importlib.import_module("solo.methods.dino").DINO
    except ImportError as error:
        pytest.skip(f"solo-learn at {REPO} does not import: {error}")


@pytest.fixture(scope="module", params=["stand-in", "solo-learn"])
def dino_class(request):
    if request.param == "stand-in":
        yield S.DINO
        return
    before = set(sys.modules)
    try:
        yield _load_solo_learn()
    finally:
        for name in set(sys.modules) - before:
            if name == "solo" or name.startswith("solo."):
                del sys.modules[name]


def _method(dino_class, norm_last_layer=False, seed=0):
    torch.manual_seed(seed)
    method = dino_class(S.config(num_prototypes=K, bottleneck_dim=P, norm_last_layer=norm_last_layer))
    if not norm_last_layer:  # spread the norms so that the correction differs between prototypes
        g = torch.Generator().manual_seed(seed + 1)
        norms = 0.5 + 1.5 * torch.rand(K, 1, generator=g)
        method.head.last_layer.weight_g.data.copy_(norms)
        method.momentum_head.last_layer.weight_g.data.copy_(norms)
    return method


def _optimizer(method):
    return torch.optim.AdamW([{"params": list(group["params"])} for group in method.learnable_params], lr=0.05)


def _expected(method, batch, temp, center, centering="probability"):
    """The float64 loss of solo-learn's DINO step on ``batch`` and the center's batch statistic."""
    with torch.no_grad():
        large = batch[1][:2]
        student = torch.cat([method(x)["z"] for x in large])
        teacher = torch.cat([method.momentum_forward(x)["z"] for x in large])
    q, stat = ref.teacher_targets(
        teacher, ref.norms_of(method.momentum_head.last_layer).detach(), temp, P, center, centering
    )
    logits = ref.student_logits(student, ref.norms_of(method.head.last_layer).detach(), 0.1, P)
    return ref.multicrop(logits, q, 2, 2).item(), stat


@pytest.mark.parametrize("centering", ["probability", "logit"])
def test_training_epochs_with_free_norms_match_the_rederivation(dino_class, centering):
    """Three epochs of one step: the epoch reaches the loss through ``on_train_epoch_start`` (warm-up
    0.04 -> 0.07 over 2 epochs), the last layer is frozen in epoch 0 (``freeze_last_layer=1``) and
    learns after."""
    method = vmf_solo.patch(_method(dino_class), centering=centering)
    optimizer = _optimizer(method)
    center = torch.full((K,), 1.0 / K, dtype=torch.float64) if centering == "probability" else torch.zeros(K).double()
    g_start = method.head.last_layer.weight_g.detach().clone()
    for epoch, temp in zip(range(3), (0.04, 0.07, 0.07)):
        method.current_epoch = epoch
        method.on_train_epoch_start()
        batch = S.batch(seed=epoch)
        expected, stat = _expected(method, batch, temp, center, centering)
        loss = S.train_step(method, batch, optimizer)
        assert loss.item() == pytest.approx(expected, abs=1e-5)
        center = 0.9 * center + 0.1 * stat
        torch.testing.assert_close(method.dino_loss_func.center.double().flatten(), center, atol=1e-6, rtol=0)
        if epoch == 0:
            torch.testing.assert_close(method.head.last_layer.weight_g, g_start, rtol=0, atol=0)
    assert not torch.allclose(method.head.last_layer.weight_g, g_start)
    assert method.dino_loss_func.epoch == 2


def test_gradient_reaches_the_prototype_norms(dino_class):
    """The gradient of ``weight_g`` is the re-derivation's through both paths: the logits
    ``g_k v_k^T y / ||v_k||`` and the correction ``log C_p(|g_k| / tau)``."""
    method = vmf_solo.patch(_method(dino_class))
    batch = S.batch(seed=3)
    method.training_step(batch, 0).backward()

    layer = method.head.last_layer
    g = layer.weight_g.detach().double().requires_grad_()
    v = layer.weight_v.detach().double()
    leaf = type("Leaf", (), {"weight_g": g, "weight_v": v})()
    with torch.no_grad():
        y = torch.cat([F.normalize(method.head.mlp(method.backbone(x)), dim=-1) for x in batch[1]]).double()
        teacher = torch.cat([method.momentum_forward(x)["z"] for x in batch[1]])
    student = y @ (g * v / v.norm(dim=1, keepdim=True)).T
    q, _ = ref.teacher_targets(
        teacher,
        ref.norms_of(method.momentum_head.last_layer).detach(),
        0.04,
        P,
        torch.full((K,), 1.0 / K, dtype=torch.float64),
        "probability",
    )
    ref.multicrop(ref.student_logits(student, ref.norms_of(leaf), 0.1, P), q, 2, 2).backward()
    assert layer.weight_g.grad.abs().max() > 1e-4
    torch.testing.assert_close(layer.weight_g.grad.double(), g.grad, atol=1e-6, rtol=1e-4)


def test_equal_norms_and_logit_centering_are_solo_learns_loss(dino_class):
    """Frozen norms (solo-learn's default) and ``centering="logit"``: the patched method trains as the
    plain one, step by step, loss and center."""
    plain = _method(dino_class, norm_last_layer=True)
    with pytest.warns(FrozenNormsWarning, match=r"method_kwargs\.norm_last_layer=False"):
        patched = vmf_solo.patch(_method(dino_class, norm_last_layer=True), centering="logit")
    optimizers = [_optimizer(plain), _optimizer(patched)]
    for epoch in range(4):
        batch = S.batch(seed=10 + epoch)
        losses = []
        for method, optimizer in zip((plain, patched), optimizers):
            method.current_epoch = epoch
            method.on_train_epoch_start()
            losses.append(S.train_step(method, batch, optimizer).detach())
        torch.testing.assert_close(losses[1], losses[0], atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(patched.dino_loss_func.center, plain.dino_loss_func.center, atol=1e-6, rtol=1e-6)


def test_epoch_attribute_as_solo_learn_sets_it(dino_class):
    method = _method(dino_class)
    method.dino_loss_func.epoch = 3
    loss = vmf_solo.patch(method).dino_loss_func
    assert loss.epoch == 3 and int(loss.epoch_index) == 3  # carried over
    loss.epoch = torch.tensor(1)
    assert int(loss.epoch_index) == 1
    with pytest.raises(ValueError, match=r"epoch must be in \[0, nepochs\) = \[0, 4\)"):
        loss.epoch = 4
    with pytest.raises(TypeError, match=r"epoch must be an int \(an index into the teacher_temp schedule\), got float"):
        loss.epoch = 1.0
    assert "epoch_index" not in loss.state_dict()


def test_checkpoints_have_solo_learns_keys_both_ways(dino_class):
    """The patched method's state dict has the plain one's keys and shapes; a plain (logit) checkpoint
    resumes a ``centering="logit"`` run and a patched checkpoint loads into the plain method."""
    plain, patched = _method(dino_class), vmf_solo.patch(_method(dino_class, seed=1), centering="logit")
    S.train_step(patched, S.batch(seed=4), _optimizer(patched))
    state = patched.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer))
    x = S.batch(seed=5)[1][0]
    torch.testing.assert_close(plain(x)["z"], patched(x)["z"], rtol=0, atol=0)
    torch.testing.assert_close(plain.dino_loss_func.center, patched.dino_loss_func.center, rtol=0, atol=0)
    resumed = vmf_solo.patch(_method(dino_class, seed=2), centering="logit")
    resumed.load_state_dict(plain.state_dict())
    torch.testing.assert_close(resumed.dino_loss_func.center, plain.dino_loss_func.center, rtol=0, atol=0)
    # probability centering refuses a logit center (docs/loss.md): start a vMF run from scratch
    with pytest.raises(ValueError, match="not a probability vector"):
        vmf_solo.patch(_method(dino_class, seed=2)).load_state_dict(plain.state_dict())


def test_free_norms_do_not_warn_and_errors_name_the_argument(dino_class):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenNormsWarning)
        vmf_solo.patch(_method(dino_class))
    with pytest.raises(TypeError, match="method must be solo-learn's DINO method"):
        vmf_solo.patch(torch.nn.Linear(2, 2))
    method = _method(dino_class)
    method.dino_loss_func = torch.nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"method\.dino_loss_func must be solo-learn's DINOLoss"):
        vmf_solo.patch(method)
    method = _method(dino_class)
    method.dino_loss_func = S.DINOLoss(K + 1, 0.04, 0.07, 2, 4)
    with pytest.raises(
        ValueError, match=r"method.dino_loss_func is built for K = 33 prototypes but the heads have K = 32"
    ):
        vmf_solo.patch(method)
