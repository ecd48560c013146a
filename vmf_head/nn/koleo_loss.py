"""KoLeoPrototypeLoss: the KoLeo entropy estimator on the prototype directions ("KoLeo-proto")."""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_int, check_real
from ..functional.koleo import koleo_prototype_loss

__all__ = ["KoLeoPrototypeLoss"]


class KoLeoPrototypeLoss(nn.Module):
    """``weight x`` KoLeo-proto, the regulariser of Govindarajan et al., "On partial prototype collapse in
    the DINO family of self-supervised methods" (BMVC 2024, arXiv 2410.14060): DINOv2's KoLeo
    estimator applied to the K prototype directions, which pushes every prototype away from its
    nearest neighbour so that they do not merge into near-duplicates.

    Value and gradient: :func:`vmf_head.functional.koleo_prototype_loss` (chunked nearest neighbour,
    no K x K matrix, no host sync, ``torch.compile``-able, FSDP2-sharded layers gathered).

    Args:
        weight: the factor the term is multiplied by before it is added to the training loss, >= 0.
        eps: floor of the row norms and offset inside the log (DINOv2's 1e-8), > 0.
        chunk_size: rows per block of the nearest-neighbour search (None: a 64 MiB float32 block).

    Shapes: the forward takes the (K, p) prototypes, or the prototype layer, or the head holding it as
    ``last_layer`` (the student's: the teacher is an EMA copy without gradient); it returns a 0-d tensor
    (float32, float64 for float64 prototypes).

    Example::

        head = vmf_head.VMFPrototypeHead(384, 65536, norm_last_layer=False)
        koleo = vmf_head.nn.KoLeoPrototypeLoss(weight=0.1)
        loss = dino_loss(student_out, teacher_out, epoch, ...) + koleo(head)  # rows of last_layer.weight_v
        loss.backward()
    """

    def __init__(self, weight: float = 1.0, eps: float = 1e-8, *, chunk_size: int | None = None) -> None:
        super().__init__()
        self.weight = check_real("weight", weight, low=0.0)
        self.eps = check_real("eps", eps, low=0.0, open_low=True)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)

    def forward(self, prototypes: torch.Tensor | nn.Module) -> torch.Tensor:
        """``weight * koleo_prototype_loss(prototypes, eps)``: a 0-d tensor."""
        return self.weight * koleo_prototype_loss(prototypes, self.eps, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, eps={self.eps}"
