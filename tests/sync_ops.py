"""Count the operations of a step that would synchronise the host with a GPU.

On the CPU nothing synchronises, so these tests look at what a step *asks for*: every ATen operator
that reaches the dispatcher passes through a ``TorchDispatchMode``, and the ones below need the host to
wait for the device on CUDA (they read a value, or their output shape depends on the data), or copy a
Python value to the device (``lift_fresh``: ``torch.tensor(python_data)``). A GPU run adds
``torch.cuda.set_sync_debug_mode("error")`` on top (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that read device data on the host, or whose output shape depends on the data.
SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(t), float(t), int(t)
    "aten.is_nonzero",
    "aten.equal",
    "aten.lift_fresh",  # torch.tensor(python data): a host-to-device copy
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
}


def _bool_index(args) -> bool:
    # x[mask] and x[mask] = v run nonzero(mask) inside the kernel
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: step()`` then ``c.syncs`` is a Counter of the syncing ops seen."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.replace("::", ".")
        overload = f"{name}.{func._overloadname}"
        if name in SYNC_OPS:
            self.syncs[name] += 1
        elif overload in ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default") and _bool_index(
            args
        ):
            self.syncs[f"{overload} with a bool mask"] += 1
        elif name in ("aten._to_copy", "aten.copy_") and _device_to_host(func, args, kwargs or {}):
            self.syncs[f"{name} to the host"] += 1
        return func(*args, **(kwargs or {}))


def _device_to_host(func, args, kwargs) -> bool:
    src = args[1] if func._schema.name == "aten::copy_" else args[0]
    dst_device = args[0].device if func._schema.name == "aten::copy_" else kwargs.get("device")
    return (
        isinstance(src, torch.Tensor)
        and src.device.type not in ("cpu", "meta")
        and dst_device is not None
        and torch.device(dst_device).type == "cpu"
    )


def count_syncs(fn, *args, **kwargs) -> tuple[object, Counter]:
    """Run ``fn(*args, **kwargs)`` under a :class:`SyncCounter`: ``(result, syncs)``."""
    with SyncCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter.syncs
