"""DINO's projection head, read as a von Mises-Fisher mixture (DINO-vMF).

Govindarajan et al., "DINO as a von Mises-Fisher mixture model", ICLR 2023. The head maps a backbone
feature to ``y = mlp(x) / ||mlp(x)||`` on the sphere S^{p-1} and returns the raw logits ``w_k^T y``
for K prototypes ``w_k`` (the rows of a weight-normalised last layer). With temperature tau,
``w_k^T y / tau = kappa_k mu_k^T y`` where ``mu_k = w_k / ||w_k||`` and ``kappa_k = ||w_k|| / tau``; the
DINO-vMF loss adds ``log C_p(kappa_k)`` to these logits, for which it needs ``prototype_norms()``.

:class:`VMFPrototypeHead` is a drop-in replacement for ``DINOHead`` of facebookresearch/dino (same
constructor, same attribute and parameter names, same state-dict keys and shapes, same initialisation,
same output). :class:`VMFLinearPrototypeHead` is the layout of facebookresearch/dinov3's ``DINOHead``,
whose prototypes are the rows of a plain ``nn.Linear``: no weight normalisation, every norm free.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_int
from ._mlp import build_mlp, init_linear
from .weight_norm import WeightNormLinear

__all__ = ["VMFLinearPrototypeHead", "VMFPrototypeHead"]


class VMFPrototypeHead(nn.Module):
    """Projection MLP, L2 normalisation and K weight-normalised prototypes, as DINO's ``DINOHead``.

    Args:
        in_dim: feature dimension of the backbone output.
        out_dim: K, the number of prototypes (65536 in DINO).
        use_bn: BatchNorm1d after each hidden Linear.
        norm_last_layer: freeze every prototype norm at ``||w_k|| = 1``. DINO's default; DINO-vMF needs
            ``False`` so that the norms, hence the concentrations ``kappa_k = ||w_k|| / tau``, are learnt.
        nlayers: number of Linear layers in the MLP (>= 1).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: p, the dimension of the space holding the sphere S^{p-1} and the prototypes.

    Attributes:
        mlp: ``nn.Linear`` (nlayers=1) or an ``nn.Sequential`` of Linear[, BatchNorm1d], GELU, ..., Linear.
        last_layer: :class:`WeightNormLinear` with parameters ``weight_g`` (K, 1) and ``weight_v`` (K, p),
            the keys ``last_layer.weight_g`` / ``last_layer.weight_v`` of DINO's checkpoints.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        check_int("out_dim", out_dim, minimum=1)
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if use_bn else None
        self.mlp = build_mlp(in_dim, bottleneck_dim, nlayers=nlayers, hidden_dim=hidden_dim, norm=norm, act=nn.GELU)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    @property
    def p(self) -> int:
        """Dimension of the ambient space of the sphere S^{p-1} (= bottleneck_dim)."""
        return self.last_layer.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (..., in_dim) -> points ``y`` on S^{p-1}, shape (..., p)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits ``w_k^T y`` (..., K) for features ``x`` (..., in_dim); no temperature, no normaliser."""
        return self.last_layer(self.embed(x))

    def prototype_norms(self) -> torch.Tensor:
        """``||w_k|| = |g_k|``, shape (K,), differentiable (no gradient flows when the norms are frozen)."""
        return self.last_layer.norms()


class VMFLinearPrototypeHead(nn.Module):
    """Projection MLP, L2 normalisation and K prototypes in a plain linear layer, as DINOv3's ``DINOHead``.

    Args (DINOv3's): ``in_dim``, ``out_dim`` (K), ``use_bn``, ``nlayers`` (0 counts as 1),
    ``hidden_dim``, ``bottleneck_dim`` (p), ``mlp_bias`` (biases of the MLP's Linear layers).

    Attributes:
        mlp: as :class:`VMFPrototypeHead`'s.
        last_layer: ``nn.Linear(p, K, bias=False)``; ``||w_k||`` is the norm of row k of its weight, the
            key ``last_layer.weight`` of DINOv3's checkpoints.

    Initialisation: every Linear weight ~ N(0, 0.02) truncated to [-2, 2], biases 0, at construction and
    again by :meth:`init_weights` (DINOv3 builds on the meta device and calls it later), so that
    ``||w_k|| ~ 0.02 sqrt(p)`` at the start.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        check_int("out_dim", out_dim, minimum=1)
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if use_bn else None
        self.mlp = build_mlp(
            in_dim,
            bottleneck_dim,
            nlayers=max(nlayers, 1),
            hidden_dim=hidden_dim,
            norm=norm,
            act=nn.GELU,
            bias=mlp_bias,
        )
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        init_linear(self.last_layer)

    def init_weights(self) -> None:
        """DINOv3's ``init_weights``: the initialisation above, drawn in module order."""
        self.apply(init_linear)

    @property
    def p(self) -> int:
        """Dimension of the ambient space of the sphere S^{p-1} (= bottleneck_dim)."""
        return self.last_layer.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (..., in_dim) -> points ``y`` on S^{p-1}, shape (..., p)."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def forward(self, x: torch.Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> torch.Tensor:
        """Raw logits ``w_k^T y`` (..., K); ``no_last_layer``: ``y`` (..., p); ``only_last_layer``: ``x`` is
        already ``y``. No temperature, no normaliser."""
        if not only_last_layer:
            x = self.embed(x)
        return x if no_last_layer else self.last_layer(x)

    def prototype_norms(self) -> torch.Tensor:
        """``||w_k||``, the row norms of ``last_layer.weight``, shape (K,), float32, differentiable. Under
        FSDP the weight is whole only inside the forward: read the norms there (see
        :class:`vmf_head.integrations._common.CapturedNorms`)."""
        return torch.linalg.vector_norm(self.last_layer.weight, dim=1, dtype=torch.float32)
