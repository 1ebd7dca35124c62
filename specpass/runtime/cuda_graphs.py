"""Replay programs as CUDA graphs: one graph per (token count, mask width) bucket, with static input buffers.

A decode step of a small model on a GPU is bound by kernel launches, not by the GPU: HF eager decodes the
default model at 28-40 tok/s on an H200, no faster than 2 CPU cores. A CUDA graph replays all of a step's
kernels with one launch. It needs fixed shapes and addresses: the runtime's KV cache has them already
(preallocated, written in place), the mask width comes in multiples of ``WINDOW_BUCKET`` and the token count
of a decode, verify or draft step is small, so each (q, width) pair gets its own graph, captured the first
time it is met. Before each replay the call's ids, positions, slots and masks are copied into that graph's
static buffers. Prefill (any prompt length) is not captured.

A replay's output lives in the graph's memory and the next replay of the same bucket overwrites it: callers
use a program's logits before they call it again, as the decode loops do.

Off CUDA, ``GraphedProgram`` runs the same bookkeeping without graphs (static buffers; outputs copied into
tensors that the next call overwrites), so that CPU tests meet every aliasing hazard a graph has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from specpass.errors import SpecPassError


@dataclasses.dataclass
class _Bucket:
    inputs: list[torch.Tensor]  # static ids, positions, slots and masks
    outputs: torch.Tensor | tuple[torch.Tensor, ...]  # static too: each replay writes them
    replay: Callable[[], None]


class GraphedProgram:
    """``program`` (the specpass signature) replayed from one CUDA graph per (token count, mask width).

    ``n_inputs``: the leading arguments copied into static buffers (ids, positions, slots, the masks); the rest,
    the KV cache, must be the same tensors at every call. ``pool``: a CUDA graph memory pool the programs of
    one model share (they never run at the same time).
    """

    def __init__(self, program: Callable, n_inputs: int, *, pool=None):
        self.program = program
        self.n_inputs = n_inputs
        self.pool = pool
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self._kv_ptr: int | None = None

    def __call__(self, *args):
        n = self.n_inputs
        kv_ptr = args[n].data_ptr()
        if self._kv_ptr is None:
            self._kv_ptr = kv_ptr
        elif kv_ptr != self._kv_ptr:  # the graphs write K/V at the addresses they were captured with
            raise RuntimeError("GraphedProgram called with another KV cache than the one its graphs captured")
        key = (args[0].shape[-1], args[n - 1].shape[-1])
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = self._capture(args)
        for static, a in zip(bucket.inputs, args[:n], strict=True):
            static.copy_(a)
        bucket.replay()
        return bucket.outputs

    def _capture(self, args) -> _Bucket:
        n = self.n_inputs
        inputs = [a.clone() for a in args[:n]]
        call = (*inputs, *args[n:])
        if inputs[0].device.type != "cuda":
            return self._emulate(inputs, call)
        # Warm up outside the capture, on a side stream as torch.cuda.graph expects: lazy kernel loading and the
        # allocator's first growth must not happen inside it. This is the call's own computation; the replay
        # that follows writes the same K/V to the same slots again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.program(*call)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.program(*call)
        except RuntimeError as e:  # e.g. a copy between host and device inside the program
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecPassError(
                f"a program of this model cannot be captured as a CUDA graph ({first}); "
                "pass cuda_graphs=False to specpass.optimize()"
            ) from e
        return _Bucket(inputs, outputs, graph.replay)

    def _emulate(self, inputs: list[torch.Tensor], call: tuple) -> _Bucket:
        first = self.program(*call)
        outputs = tuple(t.clone() for t in first) if isinstance(first, tuple) else first.clone()

        def replay() -> None:
            result = self.program(*call)
            if isinstance(result, tuple):
                for static, t in zip(outputs, result, strict=True):
                    static.copy_(t)
            else:
                outputs.copy_(result)

        return _Bucket(inputs, outputs, replay)


def waits_on_host(gm: torch.fx.GraphModule) -> bool:
    """Whether a graph sizes tensors by their data (nonzero(), .item(): MoE routing that gathers each expert's
    tokens): the host must wait for the GPU there, which a CUDA graph cannot capture."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return any(free_unbacked_symbols(node.meta.get("val")) for node in gm.graph.nodes if node.op == "call_function")


def graph_pool(device: torch.device):
    """A memory pool for the graphs of one model's programs (None off CUDA)."""
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None
