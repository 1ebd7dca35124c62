"""Add each candidate exit layer's greedy token to the verify program's outputs: DEL's shadow tokens (Zarch et
al., 2025, "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative Decoding").

DEL picks the draft's exit layer each round from how often an early exit *would have* agreed with the tokens
verification has already accepted. For every verified position, the target's hidden state after layer k
through the final norm and head is exactly what an early-exit draft at k computes for that position (same
layers, same prefix, same K/V), so its argmax is the draft's token there. This pass copies the final norm and
the head (the nodes between the last layer's output and the logits) once per exit in ``cfg.exits``, reading
layer k's output, and returns ``(logits, tokens_k1, tokens_k2, ...)``, each (B, q) int64. With
``cfg.vocab_ids`` the copies use those head rows only, as the pruned draft head does (passes/prune_lm_head.py),
which also keeps the extra heads cheap.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from specpass.errors import SpecPassError
from specpass.passes.manager import PassResult, tag
from specpass.structure import nodes_by_layer

_LINEAR = torch.ops.aten.linear.default
_ARGMAX = torch.ops.aten.argmax.default
_INDEX = torch.ops.aten.index.Tensor


def _head_tail(gm: torch.fx.GraphModule, structure) -> list[torch.fx.Node]:
    """The nodes after the last decoder layer that compute the logits from its output (final norm, head)."""
    in_layers = {n for nodes in nodes_by_layer(gm, structure.layers_path).values() for n in nodes}
    last, head = structure.layers[-1].output, structure.lm_head
    after, stack = set(), [last]
    while stack:
        for user in stack.pop().users:
            if user not in after and user not in in_layers and user.op == "call_function":
                after.add(user)
                stack.append(user)
    before, stack = {head}, [head]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in before:
                before.add(parent)
                stack.append(parent)
    return [n for n in gm.graph.nodes if n in after and n in before]


def exit_predictions(gm: torch.fx.GraphModule, structure, cfg) -> PassResult:
    """Return, besides the logits, the greedy token of an early exit after each layer in ``cfg.exits``."""
    exits, n_layers = tuple(cfg.exits), len(structure.layers)
    if not exits:
        raise SpecPassError("exit_predictions: no exit layers configured (cfg.exits is empty)")
    if any(not 0 <= k < n_layers - 1 for k in exits) or len(set(exits)) != len(exits):
        raise SpecPassError(f"exit_predictions: exits {list(exits)} must be distinct layers in [0, {n_layers - 2}]")
    tail = _head_tail(gm, structure)
    linears = [n for n in tail if n.target is _LINEAR]
    if len(linears) != 1 or linears[0] is not structure.lm_head:
        raise SpecPassError(
            f"exit_predictions: expected the head's aten.linear as the one linear after the last layer, found "
            f"{len(linears)} linears among {len(tail)} nodes"
        )
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0]
    leaves = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if len(leaves) != 1:
        raise SpecPassError(f"exit_predictions: the program returns {len(leaves)} values, expected the logits alone")

    head = structure.lm_head
    swap = {}  # with vocab_ids: the head's weight (and bias) -> their rows, shared by every copy
    ids = cfg.vocab_ids
    if ids is not None:
        gm.register_buffer("specpass_exit_vocab_ids", ids.to(device=head.meta["val"].device, dtype=torch.long))
        with gm.graph.inserting_before(output):
            rows = gm.graph.get_attr("specpass_exit_vocab_ids")
            rows.meta["val"] = gm.specpass_exit_vocab_ids
            for arg in head.args[1:3]:
                if isinstance(arg, torch.fx.Node):
                    swap[arg] = gm.graph.call_function(torch.ops.aten.index_select.default, (arg, 0, rows))
                    tag(swap[arg], "exit_predictions", head)
    preds = []
    for k in exits:
        env = {**swap, structure.layers[-1].output: structure.layers[k].output}
        with gm.graph.inserting_before(output):
            for node in tail:
                env[node] = gm.graph.node_copy(node, lambda n, env=env: env.get(n, n))
                tag(env[node], "exit_predictions", node)
            logits = env[head]
            val = head.meta["val"]
            if ids is not None:
                logits.meta["val"] = val.new_empty((*val.shape[:-1], ids.numel()))
            token = gm.graph.call_function(_ARGMAX, (logits, -1))
            if ids is not None:  # pruned column -> token id
                tag(token, "exit_predictions", head)
                token.meta["val"] = val.new_empty(val.shape[:-1], dtype=torch.long)
                token = gm.graph.call_function(_INDEX, (rows, [token]))
        tag(token, "exit_predictions", head)
        token.meta["val"] = val.new_empty(val.shape[:-1], dtype=torch.long)
        preds.append(token)
    # A pytree codegen unflattens the outputs by its spec: one leaf becomes a tuple of 1 + len(exits).
    output.args = ((leaves[0], *preds),)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None:
        gm.graph._codegen.pytree_info = info._replace(out_spec=pytree.tree_structure(tuple(range(1 + len(preds)))))
    gm.recompile()
    return PassResult(gm, True, len(exits))
