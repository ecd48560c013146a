"""iBOT's projection head, read as a von Mises-Fisher mixture (iBOT-vMF).

iBOT (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022) sends the [CLS]
token and the patch tokens through one projection MLP, then through two prototype layers: ``last_layer``
(K prototypes, for [CLS]) and ``last_layer2`` (K2 prototypes, for patches), or through ``last_layer``
alone when ``shared_head=True``. As in DINO-vMF (Govindarajan et al., ICLR 2023) the outputs are the raw
logits ``w_k^T y`` with ``y`` on S^{p-1}; the vMF loss needs the prototype norms of both layers.

The module is a drop-in replacement for ``models.head.iBOTHead`` of bytedance/ibot (same constructor
for the options listed below, same attribute and state-dict names, same initialisation, same outputs).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_int, check_tensor
from ._mlp import build_mlp
from .weight_norm import WeightNormLinear

__all__ = ["iBOTvMFHead"]

_NORMS = {"bn": nn.BatchNorm1d, "syncbn": nn.SyncBatchNorm, "ln": nn.LayerNorm}
_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}


class iBOTvMFHead(nn.Module):
    """Projection MLP, L2 normalisation and weight-normalised prototypes for [CLS] and patch tokens.

    Args:
        in_dim: feature dimension of the backbone tokens.
        out_dim: K, the number of [CLS] prototypes.
        patch_out_dim: K2, the number of patch prototypes; ignored when ``shared_head`` (then K2 = K).
        norm: norm after each hidden Linear: None, ``'bn'``, ``'syncbn'`` or ``'ln'``. As in iBOT, one
            norm module is shared by all hidden layers (state-dict keys ``mlp.1.*``, ``mlp.4.*``, ... hold
            the same tensors). iBOT's ``'csyncbn'`` / ``'psyncbn'`` are not supported.
        act: ``'gelu'`` or ``'relu'``.
        last_norm: must be None. iBOT can normalise the logits after the prototype layer (an affine-free
            batch norm; its training script never does); the results would no longer be ``w_k^T y``, which
            is what the vMF normaliser ``log C_p(||w_k|| / tau)`` corrects.
        nlayers, hidden_dim, bottleneck_dim: as :class:`VMFPrototypeHead`; bottleneck_dim is p.
        norm_last_layer: freeze all prototype norms at 1 (iBOT's default). iBOT-vMF needs ``False``.
        shared_head: use ``last_layer`` for the patch tokens too (``last_layer2`` is then the same module).

    Attributes:
        mlp, last_layer: as in :class:`VMFPrototypeHead`.
        last_layer2: :class:`WeightNormLinear` (K2, p) for the patch tokens, or ``last_layer`` itself.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        patch_out_dim: int = 8192,
        norm: str | None = None,
        act: str = "gelu",
        last_norm: str | None = None,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        shared_head: bool = False,
    ) -> None:
        super().__init__()
        if norm is not None and norm not in _NORMS:
            raise ValueError(f"norm must be None or one of {sorted(_NORMS)}, got {norm!r}")
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        if last_norm is not None:
            raise ValueError(
                f"last_norm must be None, got {last_norm!r}: a norm applied to the logits makes them something "
                "other than w_k^T y, which the vMF log-normaliser correction assumes"
            )
        check_int("out_dim", out_dim, minimum=1)
        if not shared_head:
            check_int("patch_out_dim", patch_out_dim, minimum=1)
        shared_norm = _NORMS[norm](hidden_dim) if norm is not None else None
        self.mlp = build_mlp(
            in_dim,
            bottleneck_dim,
            nlayers=nlayers,
            hidden_dim=hidden_dim,
            norm=None if shared_norm is None else (lambda: shared_norm),
            act=_ACTS[act],
        )
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)
        if shared_head:
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim, freeze_norm=norm_last_layer)

    @property
    def p(self) -> int:
        """Dimension of the ambient space of the sphere S^{p-1} (= bottleneck_dim)."""
        return self.last_layer.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone tokens (..., in_dim) -> points ``y`` on S^{p-1}, shape (..., p)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Raw logits ``w_k^T y``, as iBOT's head returns them.

        - ``x`` of shape (B, in_dim) (e.g. [CLS] features of local crops): the [CLS] logits (B, K).
        - ``x`` of shape (B, N, in_dim), token 0 being [CLS]: the tuple ``(cls_logits (B, K),
          patch_logits (B, N-1, K2))``.
        """
        x = check_tensor("x", x, dims=(2, 3), shape="(B, in_dim) or (B, N, in_dim) with token 0 = [CLS]")
        if x.dim() == 2:
            return self.last_layer(self.embed(x))
        if x.shape[1] == 0:
            raise ValueError(f"x must hold the [CLS] token and the patch tokens (N >= 1), got shape {tuple(x.shape)}")
        y = self.embed(x)
        return self.last_layer(y[:, 0]), self.last_layer2(y[:, 1:])

    def prototype_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||w_k||)_k`` of the [CLS] prototypes (K,) and of the patch prototypes (K2,), differentiable.

        With ``shared_head`` the second tensor is the first.
        """
        cls_norms = self.last_layer.norms()
        if self.last_layer2 is self.last_layer:
            return cls_norms, cls_norms
        return cls_norms, self.last_layer2.norms()
