"""Modules holding state: prototype heads and losses."""

from .dino_head import VMFPrototypeHead
from .ibot_head import iBOTvMFHead
from .weight_norm import WeightNormLinear
