"""The eager loss step moves no more B x K data than it does now: a count, not a timing.

``benchmarks/traffic.py`` counts the bytes the ATen operators of a step read and write on tensors of
at least one view's size (B x K). The count, in units of one view (B x K float32), does not depend on
B or K, so it is checked at a small shape. The least any implementation can move is 22 views (the 10
student views read and their gradient written, the 2 teacher views read); DINO's eager loss moves 332.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vmf_head import DINOvMFLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from traffic import count_traffic

B, K, NCROPS = 8, 1024, 10


@pytest.mark.parametrize(
    ("centering", "norms", "views"), [("probability", True, 169), ("logit", False, 151)], ids=["DINO-vMF", "DINO"]
)
def test_eager_step_traffic_does_not_grow(centering, norms, views):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(NCROPS * B, K, generator=g) * 0.3).requires_grad_()
    teacher = torch.randn(2 * B, K, generator=g) * 0.3
    student_norms = (torch.rand(K, generator=g) + 0.5).requires_grad_()
    loss = DINOvMFLoss(K, NCROPS, 0.04, 0.07, 30, 100, p=256, centering=centering, backend="reference")
    extra = (student_norms, student_norms.detach() * 1.01) if norms else ()
    loss(student, teacher, 0, *extra).backward()  # first-call work is not the step's traffic
    student.grad = None  # (a gradient accumulated into an existing .grad would add 3 views)
    traffic = count_traffic(lambda: loss(student, teacher, 0, *extra).backward(), B * K)
    assert traffic.total / (B * K * 4) <= views
