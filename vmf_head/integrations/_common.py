"""What every integration needs: find the prototype layers inside the user's models, read their norms.

The codebases we patch (facebookresearch/dino, bytedance/ibot, facebookresearch/dinov2, lightly) hold
their prototypes in the last linear layer of the projection head, ``last_layer`` (iBOT: also
``last_layer2`` for patch tokens), as ``torch.nn.utils.weight_norm(nn.Linear(p, K, bias=False))``, so
that ``w_k = g_k v_k / ||v_k||`` and ``||w_k|| = |g_k|`` (docs/design.md, section 1); facebookresearch/dinov3's is a
plain ``nn.Linear(p, K, bias=False)``, whose row norms are free. What the training scripts hand around
is that head inside wrappers: DINO's/iBOT's ``MultiCropWrapper(backbone, head)``, often inside
``DistributedDataParallel``; DINOv2's heads sit in a ``ModuleDict`` inside FSDP, DINOv3's under FSDP2's
``fully_shard`` (and ``torch.compile``).

The integrations never replace these layers. They read ``||w_k||`` from them at every step, so parameter
names, optimizer groups, DDP's parameter registry and checkpoints are exactly those of the unpatched run.
Sharded heads are read while they run (:class:`CapturedNorms`), when their parameters are whole.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = [
    "CapturedNorms",
    "FrozenNormsWarning",
    "copy_schedule",
    "device_of",
    "find_head",
    "prototype_layers",
    "prototype_norms",
    "prototype_shape",
    "require_attributes",
    "schedule_arguments",
    "unwrap",
    "warn_if_frozen",
]


class FrozenNormsWarning(UserWarning):
    """The student's prototype norms cannot change, so the vMF correction is a constant."""


def _wrapper_types() -> tuple[type, ...]:
    types: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    return tuple(types)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` / FSDP wrappers (any depth)."""
    wrappers = _wrapper_types()
    while isinstance(model, wrappers):
        model = model.module
    return model


def find_head(model: nn.Module, layer_names: tuple[str, ...] = ("last_layer",), *, role: str) -> nn.Module:
    """The unique module of ``model`` (itself or a submodule) holding prototype layers ``layer_names``.

    ``model`` may be the head itself, DINO's/iBOT's ``MultiCropWrapper``, or either inside
    ``DistributedDataParallel``. ``role`` ("student", "teacher") only makes the error messages precise.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or holds no such module.
        ValueError: it holds several (e.g. a model owning both the student and the teacher head).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{role} must be an nn.Module (the network or its projection head), got {type(model).__name__}")
    inner = unwrap(model)
    found = [
        (name, module)
        for name, module in inner.named_modules()
        if all(isinstance(getattr(module, attr, None), nn.Module) for attr in layer_names)
    ]
    wanted = " and ".join(f"`{attr}`" for attr in layer_names)
    if not found:
        raise TypeError(
            f"{role}: no module of {type(inner).__name__} has a prototype layer {wanted} (the last linear layer "
            "of a DINO/iBOT projection head); pass the head, the MultiCropWrapper holding it, or either inside "
            "DistributedDataParallel"
        )
    if len(found) > 1:
        names = ", ".join(repr(name or "<the model itself>") for name, _ in found)
        raise ValueError(
            f"{role}: {type(inner).__name__} holds several heads with {wanted} ({names}); pass the {role}'s head itself"
        )
    return found[0][1]


def prototype_shape(layer: nn.Module) -> tuple[int, int]:
    """``(K, p)``: number of prototypes and their dimension, from a linear prototype layer."""
    try:
        return int(layer.out_features), int(layer.in_features)
    except AttributeError:
        raise TypeError(
            f"prototype layer {type(layer).__name__} has no in_features/out_features; expected a linear layer"
        ) from None


def prototype_layers(
    student: nn.Module, teacher: nn.Module, n_prototypes: int, *, loss_name: str
) -> tuple[nn.Module, nn.Module]:
    """The prototype layers ``last_layer`` of the one head in ``student`` and in ``teacher``
    (:func:`find_head`), checked to have the same ``(K, p)`` and the ``n_prototypes`` of the loss
    ``loss_name`` (named in the error)."""
    student_layer = find_head(student, role="student").last_layer
    teacher_layer = find_head(teacher, role="teacher").last_layer
    shape = prototype_shape(student_layer)
    if prototype_shape(teacher_layer) != shape:
        raise ValueError(f"student prototypes (K, p) = {shape} but teacher prototypes {prototype_shape(teacher_layer)}")
    if n_prototypes != shape[0]:
        raise ValueError(f"{loss_name} is built for K = {n_prototypes} prototypes but the heads have K = {shape[0]}")
    return student_layer, teacher_layer


def _norm_source(layer: nn.Module) -> tuple[torch.Tensor, bool]:
    """The parameter the prototype norms of ``layer`` are a function of, and how: ``(g, False)`` for
    ``||w_k|| = |g_k|`` (weight-normalised layers, ``g`` of shape (K, 1)), ``(W, True)`` for the row norms
    of a plain weight ``W`` (K, p)."""
    if isinstance(getattr(layer, "weight_g", None), torch.Tensor):
        return layer.weight_g, False
    if torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
        original = layer.parametrizations.weight
        if not hasattr(original, "original0"):
            raise TypeError(f"{type(layer).__name__}.weight is parametrized, but not by weight_norm")
        return original.original0, False
    if isinstance(getattr(layer, "weight", None), torch.Tensor) and layer.weight.dim() == 2:
        return layer.weight, True
    raise TypeError(
        f"cannot read prototype norms from {type(layer).__name__}: expected a (weight-normalised) linear layer"
    )


def _norms_of(source: torch.Tensor, rows: bool) -> torch.Tensor:
    """(K,) norms from :func:`_norm_source`'s parameter: float32 (float32 arithmetic for half
    weights), float64 for float64 weights."""
    dtype = torch.promote_types(source.dtype, torch.float32)
    if rows:
        return torch.linalg.vector_norm(source, dim=1, dtype=dtype)
    return source.abs().reshape(-1).to(dtype)


def prototype_norms(layer: nn.Module) -> torch.Tensor:
    """``||w_k||`` for every row of a prototype layer, shape (K,), float32 (float64 for float64
    weights), differentiable.

    Accepted layers (weight ``W`` of shape (K, p)):

    - :class:`vmf_head.nn.WeightNormLinear` and ``torch.nn.utils.weight_norm``'d linears (DINO, iBOT,
      DINOv2, lightly): ``|g_k|`` read from ``weight_g`` (K, 1);
    - ``torch.nn.utils.parametrizations.weight_norm``'d linears: ``|g_k|`` from ``original0``;
    - plain ``nn.Linear`` (DINOv3): the row norms of ``weight``.

    The value is computed from the parameters as they are now, so call this every step. Half-precision
    parameters (FSDP mixed precision) are promoted: the concentrations ``||w_k|| / tau`` enter log C_p.
    """
    return _norms_of(*_norm_source(layer))


class _NormsBesideInput(torch.autograd.Function):
    """``(x, source) -> (x, norms)``: the prototype norms, computed where the layer's input enters it.

    The norms' backward must run while FSDP2 holds the layer's parameters unsharded. Computed on their
    own (``vector_norm(weight)`` in a hook), autograd may run their backward before the head's
    pre-backward hook has all-gathered the weight again, reading freed storage. Tied to the layer's
    input, this node runs only after the layer's own backward (which needs the gradient of that input),
    so after the all-gather and before the reshard that follows the head's backward. It saves
    ``source`` itself, no copy: FSDP2 frees and refills that same storage.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, source: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        norms = _norms_of(source, rows)
        ctx.save_for_backward(source, norms)
        ctx.rows = rows
        return x.view_as(x), norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x: torch.Tensor, grad_norms: torch.Tensor):
        source, norms = ctx.saved_tensors
        if ctx.rows:  # d||w_k|| / dw_k = w_k / ||w_k|| (0 for a zero row, as vector_norm's subgradient)
            scale = torch.where(norms > 0, grad_norms / norms, torch.zeros_like(norms))
            grad_source = source.float() * scale[:, None]
        else:  # d|g_k| / dg_k = sign(g_k)
            grad_source = (grad_norms * source.reshape(-1).float().sign()).view(source.shape)
        return grad_x, grad_source.to(source.dtype), None


# The layer attribute holding the norms of its latest forward. One module-level hook writing to the layer
# it runs on: under torch.compile (which does not guard on hooks) a graph traced for one head and reused
# for another head of the same class still records each head's own norms.
_NORMS_ATTRIBUTE = "_vmf_head_prototype_norms"


def _record_norms(layer: nn.Module, args: tuple) -> tuple:
    x, norms = _NormsBesideInput.apply(args[0], *_norm_source(layer))
    setattr(layer, _NORMS_ATTRIBUTE, norms)
    return (x, *args[1:])


class CapturedNorms:
    """The norms ``||w_k||`` (K,) of a prototype layer as of its latest forward, for a patched loss.

    A forward pre-hook on the layer (one per layer, shared by all readers) computes them from the
    parameters the layer runs with: under FSDP the unsharded ones, differentiable through
    :class:`_NormsBesideInput`. ``detach=True`` for the teacher (an EMA copy: no gradient). Calling the
    object returns the latest norms; before the layer's first forward it raises RuntimeError.
    """

    def __init__(self, layer: nn.Module, *, role: str, detach: bool) -> None:
        _norm_source(layer)  # a TypeError now rather than at the first forward
        if not any(hook is _record_norms for hook in layer._forward_pre_hooks.values()):
            layer.register_forward_pre_hook(_record_norms)
        self.layer, self.role, self.detach = layer, role, detach

    def __call__(self) -> torch.Tensor:
        norms = getattr(self.layer, _NORMS_ATTRIBUTE, None)
        if norms is None:
            raise RuntimeError(f"the {self.role} prototype layer has not run yet: call the head before the loss")
        return norms.detach() if self.detach else norms


def warn_if_frozen(layer: nn.Module, *, flag: str, stacklevel: int = 3) -> bool:
    """Warn (:class:`FrozenNormsWarning`) and return True if the student's norms cannot learn.

    ``flag`` names the codebase's switch that frees them (e.g. ``--norm_last_layer false``).
    """
    with torch.enable_grad():
        frozen = not prototype_norms(layer).requires_grad
    if frozen:
        warnings.warn(
            "the student's prototype norms are frozen (weight_g does not require grad), so the vMF correction "
            "log C_p(||w_k||/tau) is a constant of training; with all norms equal (DINO's weight_g = 1) it is the "
            f"same for every prototype and DINO-vMF equals DINO. Train with {flag} to learn the norms.",
            FrozenNormsWarning,
            stacklevel=stacklevel,
        )
    return frozen


def copy_schedule(source: object, target: nn.Module, name: str) -> None:
    """Copy ``source``'s temperature schedule ``name`` (numpy array or tensor) into ``target``'s buffer.

    The vMF loss is built from arguments reconstructed from the original loss; copying the values
    afterwards makes the two schedules identical element by element, including forms the arguments
    cannot express (iBOT's ``mim_start_epoch`` prefix).
    """
    buffer = getattr(target, name, None)
    if not isinstance(buffer, torch.Tensor):
        raise AttributeError(f"{type(target).__name__} has no schedule buffer {name!r}")
    buffer.copy_(torch.as_tensor(getattr(source, name)).detach().to(dtype=buffer.dtype, device=buffer.device))


def schedule_arguments(schedule) -> tuple[float, float, int, int]:
    """``(warmup_temp, final_temp, warmup_epochs, nepochs)`` to construct a vMF loss with a schedule of the
    same length as ``schedule`` (a DINO-style per-epoch array); :func:`copy_schedule` then sets its values.

    DINO's ``linspace(warmup, final, W)`` does not determine ``W`` from the array (W = 1 and W = 2 both
    give ``[warmup, final, ...]``), hence a constant schedule here and the element-wise copy after.
    """
    values = [float(v) for v in schedule]
    if not values:
        raise ValueError("the teacher temperature schedule is empty (nepochs = 0)")
    return values[0], values[-1], 0, len(values)


def require_attributes(name: str, obj: object, attrs: tuple[str, ...], what: str) -> None:
    """TypeError naming ``name`` unless ``obj`` has every attribute in ``attrs`` (e.g. a loss of the
    codebase being patched, ``what``)."""
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        raise TypeError(
            f"{name} must be {what} (with {', '.join(attrs)}), got {type(obj).__name__} without {', '.join(missing)}"
        )


def device_of(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """Device of the first buffer or parameter of ``module`` (``default`` / CPU when it has none)."""
    for tensor in (*module.buffers(), *module.parameters()):
        return tensor.device
    return default or torch.device("cpu")
