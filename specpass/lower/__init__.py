"""Lower rewritten GraphModules to callables: ``inductor`` (AOTInductor), ``compile`` (torch.compile), ``eager`` (as
they are) or ``tensorrt``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specpass.errors import SpecPassError
from specpass.lower.inductor import lower_inductor

BACKENDS = ("inductor", "compile", "eager", "tensorrt")


def lower(
    gm: torch.fx.GraphModule,
    backend: str,
    *,
    name: str,
    example_args: tuple,
    dynamic_shapes: tuple,
    pipeline: tuple = (),
) -> Callable[..., torch.Tensor]:
    """One program -> a callable with the same signature (``dynamic_shapes`` as for torch.export).

    ``pipeline``: the passes that rewrote ``gm`` (part of the program cache's key)."""
    if backend == "eager":
        return gm
    if backend == "inductor":
        return lower_inductor(gm, example_args, dynamic_shapes, name, pipeline)
    if backend == "compile":
        from specpass.lower.torch_compile import lower_torch_compile

        return lower_torch_compile(gm, name)
    if backend == "tensorrt":
        from specpass.lower.tensorrt import lower_tensorrt

        return lower_tensorrt(gm, example_args, dynamic_shapes, name)
    raise SpecPassError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "lower"]
