"""The README's training-step example runs as written (at K = 1024 instead of 65536, to stay small),
and the gradient reaches the prototype norms as its comment says."""

from __future__ import annotations

from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_step_runs():
    text = README.read_text()
    code = text.split("A DINO-vMF training step:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "65536" in code and "loss.backward()" in code
    scope: dict = {}
    exec(compile(code.replace("65536", "1024"), "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"])
    grad = scope["student_head"].last_layer.weight_g.grad
    assert grad is not None and grad.abs().sum() > 0
