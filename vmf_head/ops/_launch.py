"""Host-side helpers every kernel module uses to launch: device, grid size, interpretation."""

from __future__ import annotations

import contextlib

import torch
import triton

# Programs per streaming multiprocessor that the grids aim for (enough to hide memory latency).
_PROGRAMS_PER_SM = 4
# Grid size aimed for when kernels run in the interpreter (CPU): small, but > 1 so splits are used.
_INTERPRETER_PROGRAMS = 4


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was built under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors).
    Triton decides that when ``@triton.jit`` runs, i.e. when the kernel's module is imported."""
    return type(kernel).__name__ == "InterpretedFunction"


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def target_programs(device: torch.device) -> int:
    """How many programs a grid should have to fill ``device``."""
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def split(n_items: int, n_wanted: int) -> tuple[int, int]:
    """Cut n_items into at most n_wanted (>= 1) contiguous pieces: (items per piece, pieces)."""
    per = triton.cdiv(n_items, max(1, min(n_wanted, n_items)))
    return per, triton.cdiv(n_items, per)
