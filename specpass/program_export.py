"""How every specpass program is exported: placeholder inputs, dynamic shapes of the program signature, and
``torch.export`` with torch's own deprecation chatter kept out (capture, the lowerings' re-export, the pass
manager)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.export import Dim

from specpass.cache_spec import CacheSpec


def example_inputs(spec: CacheSpec, q: int = 2, batch: int = 1, device=None, width: int | None = None):
    """Placeholder inputs for export and compilation (values do not matter, shapes do).

    ``width`` is the masks' key width (the number of cache slots attended to), by default all of them.
    """
    if width is None:
        width = spec.max_cache_len
    ids = torch.zeros((batch, q), dtype=torch.long, device=device)
    pos = torch.arange(q, device=device).expand(batch, q).contiguous()
    slots = torch.arange(q, device=device)
    masks = [torch.zeros((batch, 1, q, width), dtype=spec.dtype, device=device) for _ in spec.mask_kinds]
    cache = [torch.zeros(t.buffer_shape(batch, spec.buffer_len), dtype=t.dtype, device=device) for t in spec.tensors]
    return (ids, pos, slots, *masks, *cache)


def program_dynamic_shapes(spec: CacheSpec, *, dynamic_q: bool, rewritten: bool = False) -> tuple:
    """torch.export dynamic shapes for the flat program signature (input_ids, ..., *masks, *kv).

    The masks' key width W is always dynamic (programs attend to the first W cache slots, W >= every slot
    used); the query length q is dynamic for programs that take a variable number of tokens (prefill).
    """
    if dynamic_q and rewritten:
        # A rewritten graph may carry guards that hold for every q >= 1 but that export cannot prove from the
        # range alone (e.g. q * min(16, 32 q) == 16 q); AUTO keeps q symbolic without demanding a proof.
        q = Dim.AUTO(min=1, max=spec.max_cache_len)
    else:
        q = Dim("q", min=1, max=spec.max_cache_len) if dynamic_q else None
    # AUTO, not a named Dim: torch <= 2.12 cannot simplify guards on the width such as
    # min(16 * width, 32 * width) == 16 * width, which hold for every width, and a named Dim demands that proof
    # ("Constraints violated (width)"); capture() checks that the width stayed symbolic.
    width = Dim.AUTO(min=2, max=spec.max_cache_len)
    per_query = (lambda dim: {dim: q}) if dynamic_q else (lambda dim: None)
    masks = [{2: q, 3: width} if dynamic_q else {3: width} for _ in spec.mask_kinds]
    return (per_query(1), per_query(1), per_query(0), *masks, *[None] * len(spec.tensors))


@contextlib.contextmanager
def quiet_compile():
    """Silence torch's deprecation chatter inside specpass's own export and compile calls (not globally):
    torch 2.13 warns about its own pytree internals (``isinstance(treespec, LeafSpec)``) once per pickled
    graph, from code the user cannot change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
        yield


def export_program(module: nn.Module, args: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """``torch.export.export`` as every specpass program is exported: capture, and the lowerings' re-export."""
    with torch.no_grad(), quiet_compile():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
