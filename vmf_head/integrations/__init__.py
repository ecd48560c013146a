"""Drop-in patches that turn a DINO, iBOT, DINOv2, DINOv3, lightly or solo-learn training into its vMF version.

One added line per codebase (see ``docs/integrations/``):

- :func:`vmf_head.integrations.dino.patch` (facebookresearch/dino, ``main_dino.py``),
- :func:`vmf_head.integrations.ibot.patch` (bytedance/ibot, ``main_ibot.py``),
- :func:`vmf_head.integrations.dinov2.patch` (facebookresearch/dinov2, ``dinov2/train/train.py``),
- :func:`vmf_head.integrations.dinov3.patch` (facebookresearch/dinov3, ``dinov3/train/train.py``),
- :func:`vmf_head.integrations.lightly.patch` (lightly's ``DINOLoss``, with ``DINOProjectionHead`` or
  ``DINOv2ProjectionHead``) and :func:`vmf_head.integrations.lightly.patch_ibot` (lightly's ``IBOTPatchLoss``),
- :func:`vmf_head.integrations.solo.patch` (solo-learn's ``DINO`` method),

or none at all with the runner ``python -m vmf_head.run {dino,ibot,dinov2,dinov3} SCRIPT ARGS`` (:mod:`vmf_head.run`).
The patches read the prototype norms from the codebase's own heads and leave models, parameter names and
checkpoints exactly as they were (:mod:`vmf_head.integrations._common`).
"""

from . import dino, dinov2, dinov3, ibot, lightly, solo
from ._common import FrozenNormsWarning

__all__ = ["FrozenNormsWarning", "dino", "dinov2", "dinov3", "ibot", "lightly", "solo"]
