"""Give the draft program an early exit after layer k: final norm and LM head on layer k's output
(LayerSkip, Elhoushi et al., 2024; Kangaroo, Liu et al., 2024).

The uses of the last layer's output outside the decoder stack (the final norm, or the head where a model has
none) read layer k's output instead, optionally through a trained exit adapter (Kangaroo's idea, here a
low-rank residual correction: specpass.tune.adapter). Layers after k are erased, their KV writes included.
The draft's KV for layers <= k is exactly the target's, since it is the same computation on the same tokens.
"""

from __future__ import annotations

import torch

from specpass.errors import SpecPassError
from specpass.passes.manager import PassResult, erase_unused, tag
from specpass.structure import nodes_by_layer

ADAPTER_NAME = "specpass_exit_adapter"


def insert_early_exit(gm: torch.fx.GraphModule, structure, cfg) -> PassResult:
    """Feed layer ``cfg.exit_layer``'s output (through ``cfg.adapter``, if any) to the final norm and head."""
    n_layers = len(structure.layers)
    k = cfg.exit_layer
    if k is None:
        raise SpecPassError("insert_early_exit: no exit layer configured (cfg.exit_layer is None)")
    if not 0 <= k < n_layers - 1:
        raise SpecPassError(f"insert_early_exit: exit layer {k} must lie in [0, {n_layers - 2}] for {n_layers} layers")
    by_layer = nodes_by_layer(gm, structure.layers_path)
    in_layers = {n for nodes in by_layer.values() for n in nodes}
    last = structure.layers[-1].output
    exits = [u for u in last.users if u not in in_layers]
    if not exits:
        raise SpecPassError(
            f"insert_early_exit: the last layer's output {last.name} has 0 uses outside the decoder layers "
            f"({len(last.users)} uses in all)"
        )
    hidden = structure.layers[k].output
    if cfg.adapter is not None:
        gm.add_submodule(ADAPTER_NAME, cfg.adapter)
        with gm.graph.inserting_after(hidden):
            adapted = gm.graph.call_module(ADAPTER_NAME, (hidden,))
        adapted.meta["val"] = hidden.meta["val"]
        tag(adapted, "insert_early_exit")
        hidden = adapted
    for user in exits:
        user.replace_input_with(last, hidden)
    erased = erase_unused(gm, [n for i in range(k + 1, n_layers) for n in by_layer[i]])
    if erased == 0:
        raise SpecPassError(f"insert_early_exit: no node of layers {k + 1}..{n_layers - 1} could be erased")
    return PassResult(gm, True, len(exits))
