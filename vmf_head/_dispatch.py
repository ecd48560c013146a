"""Backend dispatch: the one place that decides whether a call runs a Triton kernel or the reference.

Every public function with a ``backend=`` argument (the log-normaliser, the losses and their pure
functions) asks :func:`use_triton`:

* ``"reference"``: plain PyTorch, any device;
* ``"triton"``: the op's Triton kernels, for CUDA tensors, or CPU tensors when the kernel module was
  imported under ``TRITON_INTERPRET=1`` (Triton's interpreter); an error where they cannot run;
* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton imports and the op supports the
  call, ``"reference"`` otherwise.

Kernel modules (``vmf_head.ops.*``) are imported on first use, so ``import vmf_head`` loads neither
Triton nor ``torch._dynamo``; callers import the kernel functions they run once ``use_triton`` said
yes. Triton decides when a kernel module is imported whether its kernels
are compiled or interpreted; each module records that in its ``INTERPRETED`` flag.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ._validation import check_choice

BACKENDS = ("auto", "triton", "reference")


def _log_normalizer_kernels() -> ModuleType:
    from .ops import log_normalizer

    return log_normalizer


def _cross_entropy_kernels() -> ModuleType:
    from .ops import cross_entropy

    return cross_entropy


# How to import the kernel module of each op (which imports Triton).
_IMPORTS = {"log_normalizer": _log_normalizer_kernels, "cross_entropy": _cross_entropy_kernels}
_imported: dict[str, ModuleType | ImportError] = {}


def check_backend(backend: object) -> str:
    return check_choice("backend", backend, BACKENDS)


def kernels(op: str) -> ModuleType | ImportError:
    """The kernel module of ``op``, or the ImportError that importing it (hence Triton) raised; cached."""
    if op not in _imported:
        try:
            _imported[op] = _IMPORTS[op]()
        except ImportError as exc:
            _imported[op] = exc
    return _imported[op]


def problem(op: str, device: torch.device) -> str:
    """Why ``op``'s Triton kernels cannot run on tensors of ``device`` here ('' if they can)."""
    module = kernels(op)
    if isinstance(module, ImportError):
        return f"Triton is not available (importing the {op} kernels failed: {module})"
    if device.type == "cuda" or (device.type == "cpu" and module.INTERPRETED):
        return ""
    if device.type == "cpu":
        return (
            "Triton kernels run on CUDA tensors; CPU tensors only through Triton's interpreter, which "
            "needs TRITON_INTERPRET=1 in the environment before vmf_head's kernels are first used"
        )
    return f"Triton kernels run on CUDA tensors, got a tensor on {device.type!r}"


def use_triton(backend: str, op: str, device: torch.device, unsupported: str = "") -> bool:
    """True when ``op`` should run its Triton kernels for tensors on ``device``.

    ``unsupported`` is the reason the kernels cannot do this particular call ('' when they can): then
    ``"auto"`` takes the reference and ``"triton"`` raises ValueError with the reason.
    """
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return False
    if unsupported:
        if backend == "auto":
            return False
        raise ValueError(f"backend='triton' cannot run this call: {unsupported}; use backend='reference' or 'auto'")
    reason = problem(op, device)
    if reason and backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run here: {reason}. Use backend='reference' or 'auto'.")
    return not reason
