"""Pure functions (no state) behind the DINO-vMF / iBOT-vMF modules, like ``torch.nn.functional``."""

from ._distributed import global_batch_means
from .centering import CENTERINGS, center_teacher, logit_centering, probability_centering, sinkhorn_centering
from .dino_loss import dino_vmf_loss, ibot_patch_vmf_loss, masked_token_weights, multicrop_cross_entropy
from .koleo import koleo_prototype_loss, prototype_directions
from .vmf import vmf_correction, vmf_corrections, vmf_logits

__all__ = [
    "CENTERINGS",
    "center_teacher",
    "dino_vmf_loss",
    "global_batch_means",
    "ibot_patch_vmf_loss",
    "koleo_prototype_loss",
    "logit_centering",
    "masked_token_weights",
    "multicrop_cross_entropy",
    "probability_centering",
    "prototype_directions",
    "sinkhorn_centering",
    "vmf_correction",
    "vmf_corrections",
    "vmf_logits",
]
