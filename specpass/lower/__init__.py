"""Lower rewritten GraphModules to callables: ``inductor`` (AOTInductor), ``compile`` (torch.compile), ``eager`` (as
they are) or ``tensorrt``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specpass.errors import SpecPassError
from specpass.lower.inductor import PendingProgram, lower_inductor

BACKENDS = ("inductor", "compile", "eager", "tensorrt")


def lower(
    gm: torch.fx.GraphModule,
    backend: str,
    *,
    name: str,
    example_args: tuple,
    dynamic_shapes: tuple,
    pipeline: tuple = (),
    few_tokens: bool = False,
    background: bool = False,
    isa: str | None = None,
) -> Callable[..., torch.Tensor]:
    """One program -> a callable with the same signature (``dynamic_shapes`` as for torch.export).

    ``pipeline``: the passes that rewrote ``gm`` (part of the program cache's key). ``few_tokens``: a decode,
    verify or draft program, not the prefill (the inductor backend runs its own kernels there on one thread).
    ``background``: the inductor backend may return a ``PendingProgram`` compiling in a child process (``resolve``
    gives the program). ``isa``: the x86-64 level the inductor backend compiles a CPU program for
    (lower/cpu_target.py; default: this CPU's best)."""
    if backend == "eager":
        return _eager_layouts(gm)
    if backend == "inductor":
        return lower_inductor(
            gm, example_args, dynamic_shapes, name, pipeline, few_tokens=few_tokens, background=background, isa=isa
        )
    if backend == "compile":
        from specpass.lower.torch_compile import lower_torch_compile

        return lower_torch_compile(gm, name)
    if backend == "tensorrt":
        from specpass.lower.tensorrt import lower_tensorrt

        return lower_tensorrt(gm, example_args, dynamic_shapes, name)
    raise SpecPassError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve(program):
    """The program itself, once compiled: waits for a ``PendingProgram`` of ``lower(..., background=True)``."""
    if not isinstance(program, PendingProgram):
        return program
    done = program.result()
    if getattr(program, "waits_on_host", False):  # set by the caller while it was compiling
        done.waits_on_host = True
    return done


def cancel(program) -> None:
    """Stop a ``PendingProgram``'s child process, if it still runs (nothing for any other program)."""
    if isinstance(program, PendingProgram):
        program.cancel()


def _eager_layouts(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make a graph run eagerly whatever layout its kernels return: ``aten.view`` runs as ``aten.reshape`` (a
    view where the strides allow, else a copy) and ``view_as_complex`` gets a contiguous input.

    Export records a view where the fake tensors' strides allowed one, but eager kernels may return other
    layouts than their fake counterparts (CPU SDPA with some masks and query lengths), and passes may leave a
    transposed result (linear_operand_order); the compiled backends plan their own layouts.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
        elif node.target == torch.ops.aten.view_as_complex.default:
            with gm.graph.inserting_before(node):
                dense = gm.graph.call_function(torch.ops.aten.contiguous.default, (node.args[0],))
            node.replace_input_with(node.args[0], dense)
    gm.recompile()
    return gm


__all__ = ["BACKENDS", "cancel", "lower", "resolve"]
