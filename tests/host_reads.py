"""Count the reads of tensor values by the host that ``ddr_core`` code makes, per calling function.

On a GPU each such read (``.cpu()``, ``.item()``, ``.tolist()``, ``.numpy()``, ``bool()``/``float()``/``int()``
of a tensor, a blocking ``.to(device)``) synchronises the host with the device: the CPU waits for the GPU to
finish everything queued so far, then the GPU idles until the CPU queues more. On the CPU nothing waits, but the
calls are the same, so a :class:`torch.overrides.TorchFunctionMode` counts them there (issue #19 item 5).
``to(..., non_blocking=True)`` is not counted (no stream synchronisation); ``to(dtype)`` moves nothing.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

READS = frozenset({"cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"})


def _moves_blocking(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call names a device and does not ask for a non-blocking copy."""
    if kwargs.get("non_blocking") or any(arg is True for arg in args[2:4]):
        return False
    return "device" in kwargs or any(isinstance(arg, str | torch.device) for arg in args[1:2])


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads:``; ``reads.by_function`` counts ``(qualified function name, method)`` of the
    ``ddr_core`` code that made each read (``capture_activations.<locals>.hook``, ``_timestep_value``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_function: Counter[tuple[str, str]] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS or (name == "to" and _moves_blocking(args, kwargs)):
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("ddr_core"):
                self.by_function[(caller.f_code.co_qualname, "to(device)" if name == "to" else name)] += 1
        return func(*args, **kwargs)

    def count(self, function: str, method: str | None = None) -> int:
        """Reads made by ``function`` (its qualified name), of ``method`` only when given."""
        return sum(n for (where, what), n in self.by_function.items()
                   if where == function and (method is None or what == method))
