"""Which code ran an operator: the integrations, or the core they call.

Each operator is charged to the innermost frame of the vmf_head package on the Python stack when it
ran: a frame under ``vmf_head/integrations/`` is the integration's own code, any other vmf_head frame
the core's (``functional``, ``normalizer``, ``ops``), no vmf_head frame the caller's (a stand-in, torch).
:class:`AttributedSyncCounter` does this for the syncing operators of ``sync_ops.SyncCounter``,
:class:`OpsByOwner` for every operator.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from sync_ops import SyncCounter
from torch.utils._python_dispatch import TorchDispatchMode

import vmf_head

_PACKAGE = str(Path(vmf_head.__file__).parent)
_INTEGRATIONS = str(Path(_PACKAGE) / "integrations")


def _charged_to() -> str:
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_PACKAGE):
            return "integration" if filename.startswith(_INTEGRATIONS) else "core"
        frame = frame.f_back
    return "caller"


class AttributedSyncCounter(SyncCounter):
    """``syncs`` as :class:`SyncCounter`; ``by_owner["integration" | "core" | "caller"]`` splits them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_owner: dict[str, Counter] = {"integration": Counter(), "core": Counter(), "caller": Counter()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = Counter(self.syncs)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        new = self.syncs - before
        if new:
            self.by_owner[_charged_to()].update(new)
        return out


class OpsByOwner(TorchDispatchMode):
    """``counts["integration" | "core" | "caller"]``: Counter of the ATen operator names each one ran."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, Counter] = {"integration": Counter(), "core": Counter(), "caller": Counter()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[_charged_to()][func._schema.name.replace("::", ".")] += 1
        return func(*args, **(kwargs or {}))


LOSS_METHODS = ("softmax_center_teacher", "update_center", "sinkhorn_knopp_teacher", "forward", "forward_masked")


def record_loss_calls(model, mode: type[TorchDispatchMode]) -> list[tuple[str, TorchDispatchMode]]:
    """From now on, run every call of a loss method of ``model.dino_loss`` / ``model.ibot_patch_loss``
    under a fresh ``mode()``; the returned list receives ``(method name, mode)`` per call."""
    calls: list[tuple[str, TorchDispatchMode]] = []

    def recorded(name, method):
        def run(*args, **kwargs):
            with mode() as counter:
                out = method(*args, **kwargs)
            calls.append((name, counter))
            return out

        return run

    for attr in ("dino_loss", "ibot_patch_loss"):
        loss = getattr(model, attr)
        for name in LOSS_METHODS:
            if hasattr(loss, name):
                setattr(loss, name, recorded(name, getattr(loss, name)))
    return calls


def check_no_sync(calls: list[tuple[str, AttributedSyncCounter]]) -> None:
    """Assert that nothing synced in ``calls``, neither the integration's code nor the core it calls
    (the message says whose code asked for each sync)."""
    assert calls, "no loss method ran"
    found = [
        (name, {owner: dict(c) for owner, c in counter.by_owner.items() if c})
        for name, counter in calls
        if counter.syncs
    ]
    assert not found, found
