"""Weight-normalised linear layer holding the vMF prototypes.

Weight normalisation (Salimans & Kingma, NeurIPS 2016) writes each row of a weight matrix as

    w_k = g_k * v_k / ||v_k||,        so that  ||w_k|| = |g_k|.

In DINO-vMF (Govindarajan et al., ICLR 2023) the rows are the prototypes: ``mu_k = w_k / ||w_k||`` is the
mean direction of mixture component k and ``kappa_k = ||w_k|| / tau`` its concentration.

The layer stores exactly the parameters that ``torch.nn.utils.weight_norm(nn.Linear(p, K, bias=False))``
creates (``weight_g`` of shape (K, 1), ``weight_v`` of shape (K, p), in that order), so checkpoints of
DINO, iBOT, DINOv2 and lightly heads load into it and back unchanged. It is a plain module rather than that
function because the function is deprecated (torch 2.14 emits a FutureWarning on every call), and its
replacement, ``torch.nn.utils.parametrizations.weight_norm``, names the parameters
``parametrizations.weight.original0/1`` instead. State dicts in that newer layout are accepted on load too.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_int

__all__ = ["WeightNormLinear"]

# Key suffixes written by torch.nn.utils.parametrizations.weight_norm(module, "weight", dim=0).
_PARAMETRIZED_KEYS = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


class WeightNormLinear(nn.Module):
    """Bias-free linear map ``x -> x @ W^T`` with rows ``w_k = g_k v_k / ||v_k||``.

    Args:
        in_features: p, the dimension of the inputs (the sphere S^{p-1} lives in R^p).
        out_features: K, the number of rows (prototypes).
        freeze_norm: if True, ``weight_g`` does not require gradients, so every row keeps the norm
            ``|g_k|`` (1 after construction). This is what DINO's ``norm_last_layer=True`` does.

    Parameters:
        weight_g: (K, 1), initialised to 1.
        weight_v: (K, p), initialised like ``nn.Linear``'s weight (Kaiming-uniform, bound 1/sqrt(p)),
            which is what DINO's head leaves in it.

    Shapes: input (..., p), output (..., K), same floating dtype as the input (under autocast, as
    ``F.linear``).
    """

    def __init__(self, in_features: int, out_features: int, *, freeze_norm: bool = False) -> None:
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        self.in_features = in_features
        self.out_features = out_features
        # Registration order g, v matches torch.nn.utils.weight_norm, so parameters() lines up with
        # DINO's head (optimizer state dicts index parameters by position).
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_norm)
        v = torch.empty(out_features, in_features)
        # Same call, hence same random stream, as nn.Linear.reset_parameters: a seeded model
        # initialises identically to DINO's.
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W (K, p), ``w_k = g_k v_k / ||v_k||``; differentiable in g and v."""
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def norms(self) -> torch.Tensor:
        """Row norms ``||w_k|| = |g_k|``, shape (K,), differentiable in ``weight_g``."""
        return self.weight_g.abs().squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., p) -> ``x @ W^T`` (..., K)."""
        return F.linear(x, self.weight)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # nn.Module.load_state_dict works on a copy of the caller's dict (and gives each child its own
        # filtered copy), so renaming the newer parametrization keys here changes nothing the caller sees.
        for new_suffix, legacy_name in _PARAMETRIZED_KEYS.items():
            key = prefix + new_suffix
            if key in state_dict and prefix + legacy_name not in state_dict:
                state_dict[prefix + legacy_name] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        frozen = "" if self.weight_g.requires_grad else ", norm frozen"
        return f"in_features={self.in_features}, out_features={self.out_features}{frozen}"
