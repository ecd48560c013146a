"""Prototype heads against independent stand-ins of DINO's and iBOT's heads.

``DINOHeadRef`` and ``IBOTHeadRef`` are the stand-ins of ``tests/standins`` (re-implementations written
from the interfaces of facebookresearch/dino ``vision_transformer.DINOHead`` and bytedance/ibot
``models.head.iBOTHead``): the last layer is ``torch.nn.utils.weight_norm(nn.Linear(p, K, bias=False))``
with ``weight_g`` filled with 1, exactly as those codebases build it, so their state dicts carry the
legacy ``weight_g`` / ``weight_v`` keys of real checkpoints. ``cancel_gradients_last_layer`` and
``get_params_groups`` restate DINO's ``utils`` functions of the same names.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from standins.dino import DINOHead as DINOHeadRef
from standins.dino import cancel_gradients_last_layer, get_params_groups
from standins.ibot import iBOTHead as IBOTHeadRef
from torch import nn

from vmf_head import VMFPrototypeHead, iBOTvMFHead
from vmf_head.nn import WeightNormLinear

DIMS = dict(in_dim=12, out_dim=40, hidden_dim=24, bottleneck_dim=6)


def _group_names(model) -> list[list[str]]:
    """DINO's ``get_params_groups`` of ``model``, as parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in get_params_groups(model)]


def _seeded(cls, seed, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs)


def _assert_same_state(a: nn.Module, b: nn.Module, exact: bool = True):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], msg=key)


def _free_norms(head: nn.Module, seed: int = 5):
    """Give every weight-norm layer random norms of both signs, as a DINO-vMF run would learn them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("weight_g"):
                param.copy_(torch.randn(param.shape, generator=gen) * 2)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


DINO_CONFIGS = [dict(), dict(nlayers=1), dict(nlayers=2, use_bn=True), dict(nlayers=4, norm_last_layer=False)]


@pytest.mark.parametrize("cfg", DINO_CONFIGS)
def test_seeded_head_starts_from_dinos_weights(cfg):
    ours = _seeded(VMFPrototypeHead, 0, **DIMS, **cfg)
    ref = _seeded(DINOHeadRef, 0, **DIMS, **cfg)
    _assert_same_state(ours, ref)
    # Same order and trainability: DINO's optimizer state dicts index parameters by position.
    assert [(n, p.shape, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in ref.named_parameters()
    ]
    assert ours.last_layer.weight_g.shape == (DIMS["out_dim"], 1)
    assert ours.last_layer.weight_v.shape == (DIMS["out_dim"], DIMS["bottleneck_dim"])


@pytest.mark.parametrize("cfg", DINO_CONFIGS)
def test_dino_checkpoint_loads_and_gives_dinos_output(cfg):
    ref = _seeded(DINOHeadRef, 1, **DIMS, **cfg)
    _free_norms(ref)
    ours = _seeded(VMFPrototypeHead, 2, **DIMS, **cfg)
    ours.load_state_dict(_roundtrip(ref.state_dict()), strict=True)
    x = torch.randn(9, DIMS["in_dim"])
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    _assert_same_state(ours, ref, exact=False)  # batch-norm running statistics moved the same way


@pytest.mark.parametrize("cfg", DINO_CONFIGS)
def test_our_checkpoint_loads_into_dinos_head(cfg):
    ours = _seeded(VMFPrototypeHead, 3, **DIMS, **cfg)
    _free_norms(ours)
    ref = _seeded(DINOHeadRef, 4, **DIMS, **cfg)
    ref.load_state_dict(_roundtrip(ours.state_dict()), strict=True)
    x = torch.randn(9, DIMS["in_dim"])
    torch.testing.assert_close(ref(x), ours(x), rtol=1e-6, atol=1e-6)


def test_parametrizations_checkpoint_loads():
    """State dicts of torch.nn.utils.parametrizations.weight_norm (the non-deprecated API) load too."""
    ref = _seeded(DINOHeadRef, 6, **DIMS, norm_last_layer=False)
    _free_norms(ref)
    new = nn.utils.parametrizations.weight_norm(nn.Linear(DIMS["bottleneck_dim"], DIMS["out_dim"], bias=False))
    with torch.no_grad():
        new.parametrizations.weight.original0.copy_(ref.last_layer.weight_g)
        new.parametrizations.weight.original1.copy_(ref.last_layer.weight_v)
    ref.last_layer = new
    state = ref.state_dict()
    assert "last_layer.parametrizations.weight.original0" in state
    ours = VMFPrototypeHead(**DIMS, norm_last_layer=False)
    ours.load_state_dict(state, strict=True)
    assert "last_layer.parametrizations.weight.original0" in state  # the caller's dict is left alone
    x = torch.randn(5, DIMS["in_dim"])
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_prototype_norms_are_row_norms_with_gradient():
    ref = _seeded(DINOHeadRef, 7, **DIMS, norm_last_layer=False)
    _free_norms(ref)
    ours = VMFPrototypeHead(**DIMS, norm_last_layer=False)
    ours.load_state_dict(ref.state_dict())
    g = ref.last_layer.weight_g.detach().double().numpy()
    v = ref.last_layer.weight_v.detach().double().numpy()
    w = g * v / np.linalg.norm(v, axis=1, keepdims=True)
    norms = ours.prototype_norms()
    assert norms.shape == (DIMS["out_dim"],)
    np.testing.assert_allclose(norms.detach().numpy(), np.linalg.norm(w, axis=1), rtol=1e-6)
    np.testing.assert_allclose(norms.detach().numpy(), np.abs(g[:, 0]), rtol=0)
    assert ours.p == DIMS["bottleneck_dim"]

    # d/dg sum_k c_k |g_k| = c_k sign(g_k)
    c = torch.randn(DIMS["out_dim"])
    (norms * c).sum().backward()
    torch.testing.assert_close(
        ours.last_layer.weight_g.grad[:, 0], c * torch.sign(ours.last_layer.weight_g.detach()[:, 0])
    )

    # The logits' gradients reach g and v exactly as through DINO's legacy weight norm.
    ours.zero_grad()
    x, r = torch.randn(7, DIMS["in_dim"]), torch.randn(7, DIMS["out_dim"])
    (ours(x) * r).sum().backward()
    (ref(x) * r).sum().backward()
    for name in ("weight_g", "weight_v"):
        torch.testing.assert_close(
            getattr(ours.last_layer, name).grad, getattr(ref.last_layer, name).grad, rtol=1e-5, atol=1e-6
        )


def test_norm_last_layer_freezes_unit_norms():
    head = VMFPrototypeHead(**DIMS)  # norm_last_layer=True is DINO's default
    assert not head.last_layer.weight_g.requires_grad
    assert torch.equal(head.prototype_norms(), torch.ones(DIMS["out_dim"]))
    w = head.last_layer.weight.detach().double().numpy()
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
    head(torch.randn(4, DIMS["in_dim"])).sum().backward()
    assert head.last_layer.weight_g.grad is None
    assert head.last_layer.weight_v.grad is not None
    assert not head.prototype_norms().requires_grad
    assert VMFPrototypeHead(**DIMS, norm_last_layer=False).prototype_norms().requires_grad


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_train_loop_utilities_see_the_same_names(norm_last_layer):
    def wrapped(cls, seed):
        # DINO wraps the head as MultiCropWrapper(backbone, head): parameter names gain a "head." prefix.
        torch.manual_seed(seed)
        return nn.ModuleDict(
            {
                "backbone": nn.Linear(3, DIMS["in_dim"]),
                "head": cls(**DIMS, norm_last_layer=norm_last_layer, use_bn=True),
            }
        )

    ours, ref = wrapped(VMFPrototypeHead, 0), wrapped(DINOHeadRef, 0)
    assert _group_names(ours) == _group_names(ref)
    regularized, _ = _group_names(ours)
    assert ("head.last_layer.weight_g" in regularized) is (not norm_last_layer)  # (K, 1): 2-D, decayed as in DINO

    x = torch.randn(6, 3)
    ours["head"](ours["backbone"](x)).sum().backward()
    cancel_gradients_last_layer(epoch=0, model=ours, freeze_last_layer=1)
    for name, param in ours.named_parameters():
        if "last_layer" in name:
            assert param.grad is None, name
        elif param.requires_grad:
            assert param.grad is not None, name


IBOT_CONFIGS = [
    dict(),
    dict(shared_head=True),
    dict(norm="bn", norm_last_layer=False),
    dict(norm="ln", act="relu", nlayers=2),
    dict(nlayers=1, shared_head=True, norm_last_layer=False),
]


@pytest.mark.parametrize("cfg", IBOT_CONFIGS)
def test_ibot_head_matches_ibot(cfg):
    kwargs = dict(DIMS, patch_out_dim=20, **cfg)
    ours, ref = _seeded(iBOTvMFHead, 0, **kwargs), _seeded(IBOTHeadRef, 0, **kwargs)
    _assert_same_state(ours, ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]

    _free_norms(ref)
    ours.load_state_dict(_roundtrip(ref.state_dict()), strict=True)
    x = torch.randn(4, 7, DIMS["in_dim"])
    cls_logits, patch_logits = ours(x)
    cls_ref, patch_ref = ref(x)
    k2 = DIMS["out_dim"] if cfg.get("shared_head") else 20
    assert cls_logits.shape == (4, DIMS["out_dim"]) and patch_logits.shape == (4, 6, k2)
    torch.testing.assert_close(cls_logits, cls_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch_logits, patch_ref, rtol=1e-5, atol=1e-6)
    _assert_same_state(ours, ref, exact=False)  # includes iBOT's one batch norm shared by the hidden layers

    local_cls = torch.randn(5, DIMS["in_dim"])  # 2-D input (local crops): the [CLS] logits alone
    torch.testing.assert_close(ours(local_cls), ref(local_cls), rtol=1e-5, atol=1e-6)

    _free_norms(ours, seed=9)
    ref.load_state_dict(_roundtrip(ours.state_dict()), strict=True)
    torch.testing.assert_close(ref(local_cls), ours(local_cls), rtol=1e-5, atol=1e-6)


def test_ibot_prototype_norms_shared_and_separate():
    separate = iBOTvMFHead(**DIMS, patch_out_dim=20, norm_last_layer=False)
    _free_norms(separate)
    cls_norms, patch_norms = separate.prototype_norms()
    assert separate.last_layer2 is not separate.last_layer
    assert cls_norms.shape == (DIMS["out_dim"],) and patch_norms.shape == (20,)
    torch.testing.assert_close(patch_norms, separate.last_layer2.weight_g.detach().abs()[:, 0])
    patch_norms.sum().backward()
    assert separate.last_layer.weight_g.grad is None and separate.last_layer2.weight_g.grad is not None

    shared = iBOTvMFHead(**DIMS, patch_out_dim=20, shared_head=True)
    assert shared.last_layer2 is shared.last_layer
    cls_norms, patch_norms = shared.prototype_norms()
    assert patch_norms is cls_norms and cls_norms.shape == (DIMS["out_dim"],)
    assert not any("last_layer2" in n for n, _ in shared.named_parameters())
    assert "last_layer2.weight_g" in shared.state_dict()  # as iBOT's shared head writes it


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=DIMS["out_dim"], max_size=DIMS["out_dim"]))
def test_scaling_v_rows_leaves_output_unchanged(scales):
    torch.manual_seed(0)
    head = VMFPrototypeHead(**DIMS, norm_last_layer=False).double()
    _free_norms(head)
    x = torch.randn(5, DIMS["in_dim"], dtype=torch.float64)
    before, norms_before = head(x), head.prototype_norms()
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.tensor(scales, dtype=torch.float64)[:, None])
    torch.testing.assert_close(head(x), before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.prototype_norms(), norms_before, rtol=0, atol=0)


def test_no_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = iBOTvMFHead(**DIMS, patch_out_dim=20)
        head(torch.randn(2, 3, DIMS["in_dim"]))
        VMFPrototypeHead(**DIMS).load_state_dict(VMFPrototypeHead(**DIMS).state_dict())


def test_sync_batchnorm_conversion_keeps_output():
    # DINO converts batch norms with nn.SyncBatchNorm.convert_sync_batchnorm when the head has any.
    head = _seeded(VMFPrototypeHead, 0, **DIMS, use_bn=True).eval()
    x = torch.randn(4, DIMS["in_dim"])
    expected = head(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    torch.testing.assert_close(converted(x), expected)


@pytest.mark.parametrize(
    "build",
    [
        lambda: VMFPrototypeHead(12, 0),
        lambda: VMFPrototypeHead(12, 40, nlayers=0),
        lambda: VMFPrototypeHead(12, 40, bottleneck_dim=0),
        lambda: iBOTvMFHead(12, 40, last_norm="bn"),
        lambda: iBOTvMFHead(12, 40, norm="csyncbn"),
        lambda: iBOTvMFHead(12, 40, act="tanh"),
        lambda: iBOTvMFHead(12, 40, patch_out_dim=0),
        lambda: iBOTvMFHead(12, 40, hidden_dim=8, bottleneck_dim=4, patch_out_dim=8)(torch.randn(2, 3, 4, 12)),
        lambda: iBOTvMFHead(12, 40, hidden_dim=8, bottleneck_dim=4, patch_out_dim=8)(torch.randn(2, 0, 12)),
    ],
)
def test_bad_arguments_raise_value_error(build):
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: WeightNormLinear(6, 2.5), "out_features"),
        (lambda: VMFPrototypeHead(12, "40"), "out_dim"),
        (lambda: iBOTvMFHead(12, 40, hidden_dim=8, bottleneck_dim=4, patch_out_dim=8)([1.0]), "x"),
    ],
)
def test_arguments_of_the_wrong_type_raise_type_error_naming_them(build, name):
    with pytest.raises(TypeError, match=f"^{name} must be"):
        build()


@pytest.mark.parametrize("integer", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32])
def test_numpy_integers_are_accepted(integer):
    head = VMFPrototypeHead(integer(12), integer(40), hidden_dim=integer(16), bottleneck_dim=integer(8))
    assert head.last_layer.weight_v.shape == (40, 8) and head(torch.randn(3, 12)).shape == (3, 40)
    ibot = iBOTvMFHead(
        integer(12),
        integer(40),
        patch_out_dim=integer(24),
        hidden_dim=integer(16),
        bottleneck_dim=integer(8),
        nlayers=integer(2),
    )
    cls, patch = ibot(torch.randn(2, 5, 12))
    assert cls.shape == (2, 40) and patch.shape == (2, 4, 24)
