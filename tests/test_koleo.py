"""KoLeo on the prototypes against a straightforward re-derivation of DINOv2's ``KoLeoLoss`` (the whole
K x K similarity matrix, its diagonal marked, the row-wise max, ``nn.PairwiseDistance``), its gradient,
its properties, and how it runs: compiled, without host syncs, on modules, sharded by FSDP2."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sync_ops import count_syncs
from torch import nn

from vmf_head import VMFPrototypeHead
from vmf_head.functional import koleo_prototype_loss, prototype_directions
from vmf_head.nn import KoLeoPrototypeLoss, VMFLinearPrototypeHead, WeightNormLinear


def dinov2_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo loss on the rows of ``x``, written out: normalise with ``eps``, all inner products,
    the diagonal set to -1, the first row-wise maximum, then ``||a - b + 1e-8||`` and ``-mean log(d + eps)``."""
    u = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    dots = u @ u.T
    dots.fill_diagonal_(-1.0)
    nearest = dots.max(dim=1).indices
    distance = nn.PairwiseDistance(p=2, eps=1e-8)(u, u[nearest])
    return -torch.log(distance + eps).mean()


def _rows(k: int, p: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _with_ties(k: int, p: int, seed: int) -> torch.Tensor:
    """Random rows with exact duplicates (scaled copies: the same direction), a zero row, and a row with
    two equally near neighbours (an exact tie in the nearest-neighbour search)."""
    w = _rows(k, p, seed)
    w[1] = 3.0 * w[0]
    w[k - 1] = 0.5 * w[0]
    w[2] = 0.0
    w[3:6] = 0.0
    w[3, 0] = 2.0  # e_1, and (0.6, +-0.8) at the same angle from it, nearer than any random row
    w[4, 0], w[4, 1] = 0.6, 0.8
    w[5, 0], w[5, 1] = 0.6, -0.8
    return w


@pytest.mark.parametrize("k, p", [(2, 3), (5, 2), (64, 16), (300, 8)])
def test_equals_dinov2_on_random_rows(k, p):
    w = _rows(k, p, seed=k * p)
    torch.testing.assert_close(koleo_prototype_loss(w), dinov2_koleo(w), rtol=1e-12, atol=0)


def test_equals_dinov2_with_duplicates_zero_rows_and_ties():
    w = _with_ties(40, 6, seed=3)
    got = koleo_prototype_loss(w)
    torch.testing.assert_close(got, dinov2_koleo(w), rtol=1e-12, atol=0)
    # Duplicates are at distance ||1e-8 * ones(p)|| = sqrt(p) * 1e-8, not 0, as nn.PairwiseDistance makes it.
    assert float(got) > -math.log(math.sqrt(6) * 1e-8 + 1e-8) * 3 / 40


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(2, 9), st.integers(1, 70), st.integers(0, 2**31 - 1), st.booleans())
def test_equals_dinov2_for_any_chunk_size(k, p, chunk_size, seed, duplicates):
    w = _rows(k, p, seed)
    if duplicates and k >= 4:
        w[k // 2] = 2.0 * w[0]
        w[k - 1] = w[1]
    expected = dinov2_koleo(w)
    torch.testing.assert_close(koleo_prototype_loss(w, chunk_size=chunk_size), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("eps", [1e-8, 1e-3, 0.5])
def test_eps_is_dinov2_forward_eps(eps):
    w = _with_ties(30, 5, seed=7)
    torch.testing.assert_close(koleo_prototype_loss(w, eps), dinov2_koleo(w, eps), rtol=1e-12, atol=0)


def test_float32_and_half_inputs_compute_in_float32():
    w = _rows(50, 8, seed=1, dtype=torch.float32)
    out = koleo_prototype_loss(w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dinov2_koleo(w), rtol=1e-6, atol=0)
    half = koleo_prototype_loss(w.to(torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, dinov2_koleo(w.to(torch.bfloat16).float()), rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is off inside, as in DINOv2
        torch.testing.assert_close(koleo_prototype_loss(w), out, rtol=0, atol=0)


def test_antipodal_pair_is_the_one_difference_from_dinov2():
    # DINOv2's diagonal of -1 ties with the exactly antipodal row, so its first-index maximum pairs row 0
    # with itself (distance ||(1e-8, 1e-8)||); the nearest *other* row is at distance 2.
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    expected = -math.log(math.hypot(2 + 1e-8, 1e-8) + 1e-8) / 2 - math.log(math.hypot(2 - 1e-8, 1e-8) + 1e-8) / 2
    assert float(koleo_prototype_loss(w)) == pytest.approx(expected, rel=1e-15)
    itself = -math.log(math.hypot(1e-8, 1e-8) + 1e-8) / 2 - math.log(math.hypot(2 - 1e-8, 1e-8) + 1e-8) / 2
    assert float(dinov2_koleo(w)) == pytest.approx(itself, rel=1e-15)


def test_gradient_is_dinov2s_and_passes_gradcheck():
    w = _with_ties(24, 5, seed=11).requires_grad_()
    (grad,) = torch.autograd.grad(koleo_prototype_loss(w), w)
    (expected,) = torch.autograd.grad(dinov2_koleo(w), w)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    x = _rows(12, 4, seed=12).requires_grad_()  # no duplicates: the loss is smooth around x
    assert torch.autograd.gradcheck(lambda t: koleo_prototype_loss(t, chunk_size=5), (x,))


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 40), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_invariant_to_row_scaling_rotation_and_permutation(k, p, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(k, p, generator=gen, dtype=torch.float64)
    value = koleo_prototype_loss(w)
    scales = torch.exp(3 * torch.randn(k, 1, generator=gen, dtype=torch.float64))
    rotation = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))[0]
    permutation = torch.randperm(k, generator=gen)
    # The 1e-8 offset inside the distance is not rotation invariant: an error of about 1e-8 / distance.
    torch.testing.assert_close(koleo_prototype_loss(scales * w), value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(koleo_prototype_loss(w @ rotation), value, rtol=0, atol=1e-6)
    torch.testing.assert_close(koleo_prototype_loss(w[permutation]), value, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1.5, 1.5), min_size=2, max_size=30, unique=True),
    st.floats(0.05, 0.95),
    st.integers(2, 6),
    st.integers(0, 2**31 - 1),
)
def test_spreading_the_prototypes_lowers_the_loss(angles, shrink, p, seed):
    # Prototypes on a great circle at the given angles (within [-1.5, 1.5], at least 1e-3 apart).
    # Multiplying every angle by `shrink` < 1 multiplies the chord 2 sin(g / 2) of every gap g <= 3 by
    # sin(shrink g / 2) / sin(g / 2) <= sin(1.5 shrink) / sin(1.5) < 1 (the ratio grows with g), so every
    # nearest-neighbour distance shrinks at least that much and the loss grows at least by -log of it.
    angles = sorted(angles)
    assume(min(b - a for a, b in itertools.pairwise(angles)) >= 1e-3)
    plane = torch.linalg.qr(torch.randn(p, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    theta = torch.tensor(angles, dtype=torch.float64)

    def on_circle(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.cos(), t.sin()], dim=1) @ plane.T

    spread, packed = koleo_prototype_loss(on_circle(theta)), koleo_prototype_loss(on_circle(shrink * theta))
    assert float(packed - spread) >= -math.log(math.sin(1.5 * shrink) / math.sin(1.5)) - 1e-6


def test_modules_give_the_rows_of_their_directions():
    torch.manual_seed(0)
    head = VMFPrototypeHead(16, 40, norm_last_layer=False, bottleneck_dim=8)
    v = head.last_layer.weight_v
    assert prototype_directions(head) is v and prototype_directions(head.last_layer) is v
    torch.testing.assert_close(koleo_prototype_loss(head), koleo_prototype_loss(head.last_layer.weight))
    koleo_prototype_loss(head).backward()
    assert head.last_layer.weight_v.grad is not None and head.last_layer.weight_g.grad is None
    linear_head = VMFLinearPrototypeHead(16, 40, bottleneck_dim=8)
    assert prototype_directions(linear_head) is linear_head.last_layer.weight
    linear = nn.Linear(8, 40, bias=False)
    parametrized = torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 40, bias=False))
    assert prototype_directions(linear) is linear.weight
    assert prototype_directions(parametrized) is parametrized.parametrizations.weight.original1
    torch.testing.assert_close(koleo_prototype_loss(parametrized), koleo_prototype_loss(parametrized.weight))
    with pytest.warns(FutureWarning):
        legacy = torch.nn.utils.weight_norm(nn.Linear(8, 40, bias=False))
    assert prototype_directions(legacy) is legacy.weight_v


def test_module_is_weight_times_the_function():
    w = _rows(30, 6, seed=5).requires_grad_()
    module = KoLeoPrototypeLoss(weight=0.25, chunk_size=7)
    torch.testing.assert_close(module(w), 0.25 * koleo_prototype_loss(w), rtol=1e-15, atol=0)
    assert "weight=0.25" in repr(module)
    assert float(KoLeoPrototypeLoss(weight=0.0)(w).detach()) == 0.0


def test_compiles_in_one_graph_with_the_eager_value_and_gradient():
    torch._dynamo.reset()
    w = _rows(70, 8, seed=2, dtype=torch.float32).requires_grad_()
    compiled = torch.compile(lambda x: koleo_prototype_loss(x, chunk_size=16), fullgraph=True)
    value = compiled(w)
    (grad,) = torch.autograd.grad(value, w)
    (eager_grad,) = torch.autograd.grad(koleo_prototype_loss(w), w)
    torch.testing.assert_close(value, koleo_prototype_loss(w), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_no_host_sync_in_forward_and_backward():
    head = VMFPrototypeHead(16, 300, norm_last_layer=False, bottleneck_dim=8)

    def step():
        koleo_prototype_loss(head, chunk_size=64).backward()

    _, syncs = count_syncs(step)
    assert not syncs, syncs


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: koleo_prototype_loss(torch.ones(4)), ValueError, "weight must be 2-D"),
        (lambda: koleo_prototype_loss(torch.ones(1, 4)), ValueError, "K >= 2 prototypes"),
        (lambda: koleo_prototype_loss(torch.ones(3, 4, dtype=torch.long)), TypeError, "floating dtype"),
        (lambda: koleo_prototype_loss(torch.ones(3, 4), eps=0.0), ValueError, "eps must be"),
        (lambda: koleo_prototype_loss(torch.ones(3, 4), chunk_size=0), ValueError, "chunk_size must be"),
        (lambda: koleo_prototype_loss([[1.0, 0.0], [0.0, 1.0]]), TypeError, "got list"),
        (lambda: koleo_prototype_loss(nn.ReLU()), TypeError, "cannot find prototypes in ReLU"),
        (lambda: KoLeoPrototypeLoss(weight=-0.1), ValueError, "weight must be"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


# Two gloo processes, each holding half of the prototype rows (FSDP2 fully_shard) and half of a batch. The
# KoLeo term is taken between the forward and the backward: on the sharded rows (a DTensor, gathered) when
# the layer is resharded after its forward, on the unsharded parameter when it is the root module (FSDP2
# keeps the root's parameters whole until the backward). Either way every rank gets the single-process
# value, and the step's gradient (FSDP2 averages the data term over the ranks) is the single-process
# gradient on the whole batch. K = 33 leaves FSDP2 an uneven split (17 + 16 rows).
FSDP_CASES = [("linear", 32, True), ("weight_norm", 33, True), ("linear", 33, False)]


def _layer(kind: str, k: int) -> nn.Module:
    torch.manual_seed(k)
    layer = nn.Linear(8, k, bias=False) if kind == "linear" else WeightNormLinear(8, k)
    with torch.no_grad():
        source = prototype_directions(layer)
        source[5] = 2.0 * source[0]  # a duplicate
    return layer.double()


def _value_and_grad(kind: str, k: int, resharded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    layer = _layer(kind, k)
    model = nn.Sequential(layer) if resharded else layer
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        if resharded:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh)
        rank, world = dist.get_rank(), dist.get_world_size()
        x = x[rank * 6 // world : (rank + 1) * 6 // world]
    data_term = model(x).square().mean()
    assert hasattr(prototype_directions(layer), "full_tensor") == (dist.is_initialized() and resharded)
    value = koleo_prototype_loss(layer, chunk_size=5)
    assert not hasattr(value, "full_tensor")
    (data_term + value).backward()
    grad = prototype_directions(layer).grad
    return value.detach(), grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _fsdp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({case: _value_and_grad(*case) for case in FSDP_CASES}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_prototypes_give_the_single_process_value_and_gradient(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for case in FSDP_CASES:
        value, grad = _value_and_grad(*case)
        for r in ranks:
            torch.testing.assert_close(r[case][0], value, rtol=1e-14, atol=0, msg=str(case))
            torch.testing.assert_close(r[case][1], grad, rtol=1e-12, atol=1e-14, msg=str(case))
