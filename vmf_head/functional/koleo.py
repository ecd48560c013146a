"""KoLeo on the prototypes ("KoLeo-proto"): a regulariser against partial prototype collapse.

Govindarajan, Sidén, Roll, Lindsten, "On partial prototype collapse in the DINO family of
self-supervised methods", BMVC 2024 (arXiv 2410.14060), apply the Kozachenko-Leonenko entropy
estimator (Sablayrolles et al., ICLR 2019, "Spreading vectors for similarity search"), which DINOv2
applies to its features, to the K prototype directions instead:

    u_k = w_k / max(||w_k||, eps),     nn(k) = argmax_{j != k} u_k^T u_j,
    L = -(1/K) sum_k log(||u_k - u_nn(k) + delta||_2 + eps),    delta = 1e-8 (added to every coordinate).

This is the value of DINOv2's ``KoLeoLoss`` on the same rows (``dinov2/loss/koleo_loss.py``): its
normalisation ``eps``, its ``nn.PairwiseDistance(2, eps=1e-8)`` (which adds ``delta`` to the
difference, so that duplicates are at distance ``sqrt(p) * 1e-8``, not 0), the log's ``eps``, the
arithmetic in float32 or wider with autocast off. One difference, in a case that never arises in
training: DINOv2 marks the diagonal of the similarity matrix with -1 instead of excluding it, so a
row whose every other row is exactly antipodal (K = 2, ``u_2 = -u_1``) may be paired with itself
there; here ``nn(k)`` is always another row.

The nearest-neighbour search never holds the K x K similarity matrix: rows are compared with all K
prototypes in chunks (a custom operator, opaque to ``torch.compile``, without gradient, since the
argmax is piecewise constant); only the K distances to the chosen neighbours are differentiated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_int, check_real, check_tensor
from .vmf import no_autocast

__all__ = ["koleo_prototype_loss", "prototype_directions"]

# nn.PairwiseDistance(2, eps=1e-8) as DINOv2 builds it: ||a - b + 1e-8||_2, whatever the loss's eps.
_DISTANCE_OFFSET = 1e-8
# Default chunk: rows per block such that the block of similarities holds at most 2^24 numbers
# (64 MiB in float32), whatever K.
_CHUNK_ELEMENTS = 2**24


def prototype_directions(weight: torch.Tensor | nn.Module) -> torch.Tensor:
    """The (K, p) matrix whose rows point along the prototypes, as a differentiable parameter view.

    ``weight`` may be the matrix itself, a prototype layer, or a head holding one as ``last_layer``:

    - weight-normalised layers (:class:`vmf_head.nn.WeightNormLinear`, ``torch.nn.utils.weight_norm``:
      ``weight_v``; ``torch.nn.utils.parametrizations.weight_norm``: ``original1``): the rows of v,
      whose directions are the prototypes' (``w_k = g_k v_k / ||v_k||``);
    - a plain linear layer (DINOv3): the rows of ``weight``.

    Under FSDP2 (``fully_shard``, outside the forward) this is the layer's sharded DTensor.
    """
    if isinstance(weight, torch.Tensor):
        return weight
    if not isinstance(weight, nn.Module):
        raise TypeError(
            "weight must be a (K, p) tensor of prototypes, a prototype layer or a head with `last_layer`, "
            f"got {type(weight).__name__}"
        )
    layer = weight.last_layer if isinstance(getattr(weight, "last_layer", None), nn.Module) else weight
    if isinstance(getattr(layer, "weight_v", None), torch.Tensor):
        return layer.weight_v
    if torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
        original = layer.parametrizations.weight
        if not hasattr(original, "original1"):
            raise TypeError(f"{type(layer).__name__}.weight is parametrized, but not by weight_norm")
        return original.original1
    if isinstance(getattr(layer, "weight", None), torch.Tensor):
        return layer.weight
    raise TypeError(
        f"cannot find prototypes in {type(weight).__name__}: expected a (weight-normalised) linear layer "
        "or a head with such a layer as `last_layer`"
    )


@torch.library.custom_op("vmf_head::nearest_other_row", mutates_args=())
def _nearest_other_row(u: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """For each row k of ``u`` (K, p), the index of the other row with the largest inner product
    (the first such index on ties, as ``torch.max``), in blocks of ``chunk_size`` rows against all K."""
    k = u.shape[0]
    nearest = torch.empty(k, dtype=torch.long, device=u.device)
    for start in range(0, k, chunk_size):
        sims = u[start : start + chunk_size] @ u.T
        # Block row i is prototype start + i: exclude it from its own search.
        sims.diagonal(offset=start).fill_(-torch.inf)
        nearest[start : start + sims.shape[0]] = sims.argmax(dim=1)
    return nearest


@_nearest_other_row.register_fake
def _(u: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return u.new_empty(u.shape[0], dtype=torch.long)


def koleo_prototype_loss(
    weight: torch.Tensor | nn.Module, eps: float = 1e-8, *, chunk_size: int | None = None
) -> torch.Tensor:
    """KoLeo-proto: ``-(1/K) sum_k log(||u_k - u_nn(k) + 1e-8|| + eps)`` over the prototype directions.

    The formula, and how it matches DINOv2's ``KoLeoLoss``, are in this module's docstring. Scaling a
    row or permuting the rows does not change the value; it is smaller when the prototypes are spread
    out, and its gradient pushes every prototype away from its nearest neighbour.

    Args:
        weight: the (K, p) prototypes (K >= 2), any float dtype (computed in float32, float64 stays
            float64, autocast off), or a module holding them (see :func:`prototype_directions`). A
            DTensor (a layer sharded by FSDP2) is gathered with ``full_tensor()``, so every rank gets the
            single-process value and the gradient flows back to its shard.
        eps: floor of the row norms in the normalisation and offset inside the log, > 0 (DINOv2's
            ``eps``, 1e-8).
        chunk_size: rows compared with all K prototypes at a time in the nearest-neighbour search;
            default ``max(1, 2**24 // K)`` (a 64 MiB float32 block). It does not change the value.

    Returns:
        A 0-d tensor, float32 (float64 for float64 prototypes), differentiable with respect to the
        prototypes (through the distances; the choice of neighbours is not differentiated).
    """
    w = prototype_directions(weight)
    w = check_tensor("weight", w, dims=2, shape="(K, p) of prototypes")
    k, p = w.shape
    if k < 2 or p < 1:
        raise ValueError(f"weight must hold K >= 2 prototypes of dimension p >= 1, got shape {tuple(w.shape)}")
    eps = check_real("eps", eps, low=0.0, open_low=True)
    chunk_size = max(1, _CHUNK_ELEMENTS // k) if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
    if hasattr(w, "full_tensor"):
        w = w.full_tensor()
    dtype = torch.promote_types(w.dtype, torch.float32)
    with no_autocast(w.device):
        u = F.normalize(w.to(dtype), p=2.0, dim=1, eps=eps)
        nearest = _nearest_other_row(u.detach(), min(chunk_size, k))
        distance = torch.pairwise_distance(u, u[nearest], p=2.0, eps=_DISTANCE_OFFSET)
        return -torch.log(distance + eps).mean()
