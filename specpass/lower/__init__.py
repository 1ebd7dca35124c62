"""Lower rewritten GraphModules to callables: ``eager`` (as they are) or ``inductor`` (torch.compile)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specpass.errors import SpecPassError
from specpass.lower.inductor import lower_inductor

BACKENDS = ("inductor", "eager")


def lower(gm: torch.fx.GraphModule, backend: str, *, dynamic: bool) -> Callable[..., torch.Tensor]:
    """One program -> a callable with the same signature; ``dynamic`` means the query length varies."""
    if backend == "eager":
        return gm
    if backend == "inductor":
        return lower_inductor(gm, dynamic=dynamic)
    raise SpecPassError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "lower"]
