"""vmf-head: von Mises-Fisher prototype heads and losses for DINO and iBOT (DINO-vMF, iBOT-vMF)."""

from .functional import vmf_logits
from .nn import DINOvMFLoss, VMFLinearPrototypeHead, VMFPrototypeHead, iBOTvMFHead, iBOTvMFLoss
from .normalizer import log_vmf_normalizer, prototype_log_normalizer, vmf_mean_resultant_length

__version__ = "0.3.0"

__all__ = [
    "DINOvMFLoss",
    "VMFLinearPrototypeHead",
    "VMFPrototypeHead",
    "iBOTvMFHead",
    "iBOTvMFLoss",
    "log_vmf_normalizer",
    "prototype_log_normalizer",
    "vmf_logits",
    "vmf_mean_resultant_length",
]
