"""Skip decoder layers, or their attention / MLP sublayers, in the draft program (Draft&Verify, SWIFT).

Draft&Verify (Zhang et al., 2023) and SWIFT (Xia et al., 2024) draft with the model itself minus a set of
layers. As a graph rewrite: every use of a skipped layer's output reads the layer's input instead, and the
layer's nodes, its KV writes included, are erased. A skipped sublayer's output becomes zeros, so the residual
add around it passes its input through. The draft's KV for the layers it does run is approximate; the verify
program rewrites those slots, so only the draft's own tokens ever read it.
"""

from __future__ import annotations

import torch

from specpass.errors import SpecPassError
from specpass.passes.manager import PassResult, erase_unused, tag
from specpass.structure import module_path_of, nodes_by_layer

_ZEROS_LIKE = torch.ops.aten.zeros_like.default
_MLP_NAMES = ("mlp", "ffn", "feed_forward", "block_sparse_moe")


def skip_layers(gm: torch.fx.GraphModule, structure, cfg) -> PassResult:
    """Route each skipped layer's input to its output's uses; zero skipped sublayers' outputs."""
    n_layers = len(structure.layers)
    wanted = set(cfg.skip_layers) | set(cfg.skip_attention) | set(cfg.skip_mlp)
    bad = sorted(i for i in wanted if not 0 <= i < n_layers)
    if bad:
        raise SpecPassError(f"skip_layers: layer indices {bad} out of range for a {n_layers}-layer model")
    if len(set(cfg.skip_layers)) >= n_layers:
        raise SpecPassError(f"skip_layers: skipping all {n_layers} layers leaves no draft model")
    if not wanted:
        raise SpecPassError("skip_layers: nothing to skip (0 layers, 0 attention and 0 MLP sublayers configured)")
    by_layer = nodes_by_layer(gm, structure.layers_path)
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    matches = 0
    missing = sorted(i for i in wanted if i not in by_layer)
    if missing:
        raise SpecPassError(f"skip_layers: layers {missing} are not in the graph (after the early exit?)")
    for i in sorted(wanted):
        layer = structure.layers[i]
        inside = set(by_layer[i])
        if i in cfg.skip_layers:
            source = replaced.get(layer.input, layer.input)  # the previous layer may be skipped too
            outside = [u for u in layer.output.users if u not in inside]
            if not outside:
                raise SpecPassError(f"skip_layers: layer {i}'s output {layer.output.name} has no use outside the layer")
            for user in outside:
                user.replace_input_with(layer.output, source)
            replaced[layer.output] = source
            erase_unused(gm, by_layer[i])
            matches += 1
            continue
        for kind, chosen in (("attention", cfg.skip_attention), ("mlp", cfg.skip_mlp)):
            if i in chosen:
                _zero_sublayer(gm, layer, by_layer[i], kind, replaced.get(layer.input, layer.input))
                matches += 1
    return PassResult(gm, True, matches)


def _zero_sublayer(gm, layer, nodes, kind: str, layer_input: torch.fx.Node) -> None:
    """Replace the output of layer ``layer``'s attention or MLP submodule with zeros of the same shape."""
    prefix = layer.module_path + "."
    children: dict[str, list[torch.fx.Node]] = {}
    for node in nodes:
        for path in module_path_of(node):
            if path.startswith(prefix):
                children.setdefault(prefix + path[len(prefix) :].split(".")[0], []).append(node)
                break
    # A linear-attention or state-space layer has no attention node: its mixer is skipped whole (skip_layers),
    # not as an attention sublayer.
    attention_child = next((c for c, ns in children.items() if layer.attention and layer.attention[0] in ns), None)
    if kind == "attention":
        child = attention_child
    else:
        child = next((c for c in children if c.rsplit(".", 1)[-1] in _MLP_NAMES), None)
    if child is None:
        raise SpecPassError(
            f"skip_layers: layer {layer.index} has no {kind} submodule (children: {sorted(children) or 'none'})"
        )
    inside = set(children[child])
    outs = [n for n in children[child] if any(u not in inside for u in n.users)]
    if len(outs) != 1:
        raise SpecPassError(f"skip_layers: {child} has {len(outs)} outputs leaving it, expected 1")
    out = outs[0]
    if out.meta["val"].shape != layer_input.meta["val"].shape:
        raise SpecPassError(f"skip_layers: {child}'s output shape differs from the residual stream's")
    with gm.graph.inserting_before(out):
        zeros = gm.graph.call_function(_ZEROS_LIKE, (layer_input,))
    zeros.meta["val"] = out.meta["val"]
    tag(zeros, "skip_layers", out)
    for user in [u for u in out.users if u not in inside]:
        user.replace_input_with(out, zeros)
    erase_unused(gm, children[child])
