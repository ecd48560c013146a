"""Argument checks shared by every layer of the package: one message format, one rule per kind.

Each check names the argument and says what is accepted. Integers may be Python or NumPy integers
(bools are refused: ``True`` is not a count); real numbers may be Python or NumPy reals. Temperatures
may also be 0-d floating tensors (a schedule kept on the device): their value is not read here, since
reading it would synchronise a GPU step; the losses check it on the device instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

_SYMBOLIC = (torch.SymInt, torch.SymFloat)


def _kind(value: object) -> str:
    return type(value).__name__


def check_int(name: str, value: object, *, minimum: int | None = None, what: str = "") -> int:
    """``value`` as an int (Python, NumPy or symbolic); TypeError unless it is an integer, ValueError
    below ``minimum``. ``what`` explains the argument in the message (e.g. "the bottleneck dim")."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int{what and f' ({what})'}, got {_kind(value)} {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{what and f' ({what})'}, got {value!r}")
    return value  # type: ignore[return-value]


def check_real(
    name: str, value: object, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``); TypeError
    for a non-real (str, bool, tensor, None), ValueError for NaN, infinities or a value outside."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {_kind(value)} {value!r}")
    if isinstance(value, _SYMBOLIC) or torch.compiler.is_compiling():
        # a number torch.compile traces as an input (a changing temperature) has no value to read here
        return value  # type: ignore[return-value]
    value = float(value)
    bracket = "(" if open_low else "["
    if not (math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {high}], got {value!r}")
    return value


def check_temperature(name: str, value: object) -> float | torch.Tensor:
    """A temperature: a positive finite real number, or a 0-d floating tensor (returned as it is)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a positive number or a 0-d floating tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a positive number or a 0-d floating tensor, got {_kind(value)} {value!r}")
    return check_real(name, value, low=0.0, open_low=True)


def temperature_tensor(tau: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A checked temperature as the 0-d float64 tensor on ``device`` that the operators take: a number
    is filled in on the device (``torch.full``: no host-to-device copy), a tensor cast and moved."""
    if isinstance(tau, torch.Tensor):
        return tau.detach().to(device=device, dtype=torch.float64)
    if torch.compiler.is_compiling():  # a product keeps a traced temperature an input of the graph
        return torch.ones((), dtype=torch.float64, device=device) * tau
    return torch.full((), tau, dtype=torch.float64, device=device)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_tensor(
    name: str,
    value: object,
    *,
    dims: int | tuple[int, ...] | None = None,
    floating: bool | None = True,
    shape: str = "",
) -> torch.Tensor:
    """``value`` if it is a tensor with ``dims`` dimensions, of a floating dtype when ``floating``, of
    a bool or integer one (a mask) when False, of any when None.

    TypeError names the argument and the type or dtype received; ValueError the shape. ``shape``
    describes the expected layout in the message (e.g. "(K,)").
    """
    layout = f" {shape}" if shape else ""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{layout}, got {_kind(value)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name} must be a bool (or 0/1 integer) mask, got {value.dtype}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else dims
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}{layout}, got shape {tuple(value.shape)}")
    return value
