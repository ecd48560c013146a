"""Modules holding state: prototype heads and losses."""

from .centered_loss import CenteredLoss
from .dino_head import VMFLinearPrototypeHead, VMFPrototypeHead
from .dino_loss import DINOvMFLoss
from .ibot_head import iBOTvMFHead
from .ibot_loss import iBOTvMFLoss
from .koleo_loss import KoLeoPrototypeLoss
from .weight_norm import WeightNormLinear

__all__ = [
    "CenteredLoss",
    "DINOvMFLoss",
    "KoLeoPrototypeLoss",
    "VMFLinearPrototypeHead",
    "VMFPrototypeHead",
    "WeightNormLinear",
    "iBOTvMFHead",
    "iBOTvMFLoss",
]
