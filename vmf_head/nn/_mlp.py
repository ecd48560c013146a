"""The projection MLP shared by the DINO and iBOT prototype heads.

Both codebases build the same network in front of the prototype layer (Caron et al., ICCV 2021, sec. 3.1;
Zhou et al., ICLR 2022): ``nlayers`` Linear layers, the hidden ones followed by an optional norm and an
activation, the last one mapping to the bottleneck of dimension p; Linear weights drawn from a normal
with std 0.02 truncated to [-2, 2], biases zero. Building and initialising in the same order as they do
consumes the random stream in the same way, so a seeded head starts from the same weights as theirs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._validation import check_int

__all__ = ["TokenSequential", "build_mlp", "init_linear"]


class TokenSequential(nn.Sequential):
    """``nn.Sequential`` whose batch norms normalise the last dimension of (..., C) inputs.

    ``nn.BatchNorm1d`` reads dimension 1 as the channels, which is wrong for token inputs (B, N, C).
    Flattening to (B*N, C) gives each channel the statistics over all B*N tokens, as iBOT's permuting
    ``CustomSequential`` does. The state dict is that of a plain ``nn.Sequential``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            if isinstance(module, (nn.BatchNorm1d, nn.SyncBatchNorm)) and x.dim() > 2:
                x = module(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            else:
                x = module(x)
        return x


def init_linear(module: nn.Module) -> None:
    """DINO's initialisation of a Linear: weight ~ N(0, 0.02) truncated to [-2, 2], bias 0 (others untouched)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_mlp(
    in_dim: int,
    bottleneck_dim: int,
    *,
    nlayers: int,
    hidden_dim: int,
    norm: Callable[[], nn.Module] | None,
    act: Callable[[], nn.Module],
    bias: bool = True,
) -> nn.Module:
    """Projection MLP (..., in_dim) -> (..., bottleneck_dim), initialised as DINO initialises it.

    Args:
        nlayers: number of Linear layers (>= 1); with 1 the MLP is a single ``nn.Linear``.
        norm: called once per hidden layer for the module that follows its Linear, or None for no norm.
            Returning the same instance each time shares it between layers (iBOT does that).
        act: called once per hidden layer for the activation.
        bias: whether the Linear layers have biases (DINOv3's ``mlp_bias``).
    """
    for name, value in (
        ("in_dim", in_dim),
        ("bottleneck_dim", bottleneck_dim),
        ("nlayers", nlayers),
        ("hidden_dim", hidden_dim),
    ):
        check_int(name, value, minimum=1)
    if nlayers == 1:
        mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim, bias=bias)
    else:
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(nlayers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=bias))
            if norm is not None:
                layers.append(norm())
            layers.append(act())
            width = hidden_dim
        layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
        mlp = TokenSequential(*layers)
    mlp.apply(init_linear)
    return mlp
