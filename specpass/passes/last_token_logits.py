"""Compute the LM head for the last query position only (prefill needs no other logits).

HF's ``logits_to_keep=1``, as a graph rewrite: the head's input ``h`` (B, q, H) becomes ``h[:, -1:]``, so a
prefill of q tokens runs the (vocab x hidden) head once instead of q times.
"""

from __future__ import annotations

import torch

from specpass.errors import SpecPassError
from specpass.passes.manager import PassResult, tag

_SLICE = torch.ops.aten.slice.Tensor


def last_token_logits(gm: torch.fx.GraphModule, structure, cfg=None) -> PassResult:
    """Slice the LM head's input to the last position (HF ``logits_to_keep``)."""
    head = structure.lm_head
    hidden = head.args[0]
    val = hidden.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 3:
        raise SpecPassError(f"LM head input {hidden.name} is not (B, q, H): {getattr(val, 'shape', None)}")
    with gm.graph.inserting_before(head):
        last = gm.graph.call_function(_SLICE, (hidden, 1, -1, 9223372036854775807))
    last.meta["val"] = val[:, -1:]
    tag(last, "last_token_logits", head)
    head.replace_input_with(hidden, last)
    # The output's shape changed from (B, q, V) to (B, 1, V).
    out_val = head.meta.get("val")
    if isinstance(out_val, torch.Tensor):
        head.meta["val"] = out_val[:, -1:]
    return PassResult(gm, True, 1)
