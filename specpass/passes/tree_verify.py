"""Check that the verify program can score a token tree in one pass: SpecInfer / Medusa / EAGLE-2 tree attention.

A tree of T nodes is verified by one forward pass over T query tokens whose attention mask says which nodes
each one sees (the committed prefix and its ancestors) and whose positions are prefix length + depth, while
the K/V of node i is written at slot length + i (runtime/kv_cache.py). That is only correct if the graph
1. attends through the explicit mask inputs: every attention reads a mask derived from a mask input and is
   not ``is_causal`` (a causal flag would let each node see the nodes before it in slot order: its siblings);
2. takes every position from ``position_ids``: ``cache_position`` (the write slots) may only index the K/V
   writes. A model that derives rotary angles or position embeddings from the slots would give a node the
   position of its slot, not of its depth.
The capture wrapper builds graphs like this, and this pass proves it for the graph at hand (structure, not
text: ATen overloads and dtypes from ``meta["val"]``), so that a model that breaks it fails at compile time
with the node that breaks it, not with a wrong token.
"""

from __future__ import annotations

import torch

from specpass.errors import SpecPassError
from specpass.passes.manager import PassResult

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
# Where a slot index may end up: the in-place K/V writes of the static cache, index argument 2.
_KV_WRITES = {torch.ops.aten.index_copy_.default, torch.ops.aten.index_copy.default}
# Bookkeeping that reads the input without computing from it.
_CHECKS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten.sym_size.int}


def _derives_from(node: torch.fx.Node, sources: set[torch.fx.Node]) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in sources:
            return True
        for parent in n.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def _is_float(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else "top level"
    return f"{node.name} ({node.target}, in {path})"


def tree_verify(gm: torch.fx.GraphModule, structure, cfg=None) -> PassResult:
    """Prove that attention reads the mask inputs and positions come from position_ids (tree attention)."""
    masks = set(structure.masks)
    attention = [node for layer in structure.layers for node in layer.attention]
    if not attention:
        raise SpecPassError("tree_verify: found 0 attention nodes in the verify program (expected one per layer)")
    for node in attention:
        if node.target == _SDPA:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
            if causal or not isinstance(mask, torch.fx.Node) or not _derives_from(mask, masks):
                raise SpecPassError(
                    f"tree_verify: attention {_where(node)} does not read the mask inputs "
                    f"(attn_mask={getattr(mask, 'name', mask)}, is_causal={causal}); a token tree cannot be verified "
                    "in one pass with it: use speculate=False or chain drafts (plan.tree_budget=0)"
                )
        elif not _derives_from(node, masks):  # the eager softmax of attention scores
            raise SpecPassError(f"tree_verify: attention {_where(node)} does not read the mask inputs")

    # Follow cache_position through integer-valued ops; any float computation it reaches reads positions
    # from slots. The K/V writes it indexes stop the walk (their outputs are the cache, not positions).
    slots, stack = {structure.cache_position}, [structure.cache_position]
    while stack:
        for user in stack.pop().users:
            if user.op == "output" or user.target in _CHECKS or user in slots:
                continue
            if user.op != "call_function" or user.target in _KV_WRITES and user.args[2] in slots:
                continue
            if _is_float(user):
                raise SpecPassError(
                    f"tree_verify: the write slots (cache_position) feed {_where(user)}: this model computes from "
                    "cache slots, so tree nodes would get their slot's position, not their depth's; "
                    "use chain drafts (plan.tree_budget=0)"
                )
            slots.add(user)
            stack.append(user)
    return PassResult(gm, False, len(attention))
