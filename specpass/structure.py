"""Where things are in a captured graph: its layers, final norm, LM head and inputs, found from
``nn_module_stack`` (the passes' map of the graph)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from specpass.cache_spec import CacheSpec
from specpass.errors import SpecPassError
from specpass.hf_cache import CaptureWrapper, text_config


@dataclasses.dataclass
class LayerInfo:
    index: int
    module_path: str  # e.g. "model.layers.3" (in the wrapper: "model.model.layers.3")
    input: torch.fx.Node  # residual stream entering the layer
    output: torch.fx.Node  # residual stream leaving the layer
    attention: list[torch.fx.Node]  # scaled_dot_product_attention nodes (or the eager softmax)


@dataclasses.dataclass
class Structure:
    """Graph annotations found from ``nn_module_stack``: layers, final norm, LM head and inputs."""

    layers_path: str
    layers: list[LayerInfo]
    final_norm: torch.fx.Node | None  # output node of the final norm module
    final_norm_path: str | None
    lm_head: torch.fx.Node  # the logits node
    lm_head_path: str
    input_ids: torch.fx.Node
    position_ids: torch.fx.Node
    cache_position: torch.fx.Node
    masks: list[torch.fx.Node]
    kv: list[torch.fx.Node]

    def summary(self) -> dict:
        return {
            "layers_path": self.layers_path,
            "num_layers": len(self.layers),
            "final_norm": self.final_norm_path,
            "lm_head": self.lm_head_path,
            "attention_nodes_per_layer": sorted({len(layer.attention) for layer in self.layers}),
        }


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _stack_paths(node: torch.fx.Node) -> list[tuple[str, type | str]]:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())


def _strip(path: str) -> str:
    # torch.export spells paths as "L['self'].model.layers[3]" or "model.layers.3" depending on version.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.split("."):
        while "[" in part:
            head, _, rest = part.partition("[")
            idx, _, part = rest.partition("]")
            if head:
                out.append(head)
            out.append(idx.strip("'\""))
        if part:
            out.append(part)
    return ".".join(out)


def module_path_of(node: torch.fx.Node) -> list[str]:
    return [_strip(p) for p, _ in _stack_paths(node)]


def analyze(gm: torch.fx.GraphModule, wrapper: CaptureWrapper, spec: CacheSpec) -> Structure:
    """Annotate an exported wrapper graph; raise SpecPassError naming whatever is missing."""
    model = wrapper.model
    n_masks = len(spec.mask_kinds)
    attending = {t.layer for t in spec.tensors if t.is_kv}
    name = type(model).__name__
    named = dict(wrapper.named_modules())
    config = text_config(model.config)
    n_layers = config.num_hidden_layers

    # 1. The decoder-layer list: a ModuleList of num_hidden_layers entries that the graph runs, every one of
    #    them (a multimodal model's vision tower can have as many layers, but text-only decoding skips it).
    candidates = [p for p, m in named.items() if isinstance(m, nn.ModuleList) and len(m) == n_layers and p]
    if not candidates:
        raise SpecPassError(
            f"{name}: decoder layers not found: no nn.ModuleList of num_hidden_layers={n_layers} modules"
        )
    by_candidate = {p: nodes_by_layer(gm, p) for p in candidates}
    complete = [p for p in candidates if len(by_candidate[p]) == n_layers]
    if not complete:
        found = ", ".join(f"'{p}' runs {len(by_candidate[p])}" for p in candidates)
        raise SpecPassError(
            f"{name}: decoder layers not found: expected {n_layers} layers in the graph under one ModuleList "
            f"of num_hidden_layers={n_layers} modules; {found}"
        )
    layers_path = min(complete, key=len)
    by_layer = by_candidate[layers_path]

    # 2. LM head: the module of get_output_embeddings().
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise SpecPassError(f"{name}: LM head not found (get_output_embeddings() returned None)")
    head_path = next((p for p, m in named.items() if m is head), None)
    if head_path is None:
        raise SpecPassError(f"{name}: LM head module is not a submodule of the model")

    # The unlifted module's placeholders are exactly the flattened user inputs, in signature order.
    user_inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(user_inputs) < 3 + n_masks:
        raise SpecPassError(f"{name}: captured graph has {len(user_inputs)} user inputs, expected >= {3 + n_masks}")
    input_ids, position_ids, cache_position = user_inputs[:3]
    masks = user_inputs[3 : 3 + n_masks]
    kv = user_inputs[3 + n_masks :]

    # 3. Per-layer residual input/output and attention nodes. The residual stream is (B, q, hidden), or
    #    (n, B, q, hidden) where a model carries several streams (Gemma 3n's AltUp).
    hidden = getattr(config, "hidden_size", None)
    layers = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for i in range(n_layers):
        nodes = by_layer[i]
        inside = set(nodes)
        # The layer's output: its last node whose value leaves the layer with the hidden shape.
        outs = [n for n in nodes if any(u not in inside for u in n.users) and _is_hidden(n, hidden)]
        # The layer's input: the previous layer's output if this layer reads it, else the first hidden-state node
        # from outside that it reads (rotary cos/sin are 3D too, hence the hidden-size check).
        ins = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and _is_hidden(a, hidden) and a.op != "placeholder":
                    ins.append(a)
        if not outs or not ins:
            raise SpecPassError(f"{name}: layer {i} residual input/output not found in the graph")
        previous = layers[-1].output if layers else None
        layer_input = previous if previous in ins else min(ins, key=order.__getitem__)
        attn = [n for n in nodes if n.target == _SDPA]
        if not attn:
            attn = [n for n in nodes if n.target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)]
        if not attn and i in attending:
            raise SpecPassError(f"{name}: layer {i} has no attention node (scaled_dot_product_attention/softmax)")
        layers.append(
            LayerInfo(
                index=i,
                module_path=f"{layers_path}.{i}",
                input=layer_input,
                output=max(outs, key=order.__getitem__),
                attention=attn,
            )
        )

    # 4. Final norm: the module between the last layer and the head (any norm-like module outside the layers).
    last_out = layers[-1].output
    final_norm = None
    final_norm_path = None
    head_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and head_path in module_path_of(n)]
    if not head_nodes:
        raise SpecPassError(f"{name}: no graph node belongs to the LM head '{head_path}'")
    lm_head = max(head_nodes, key=order.__getitem__)
    for node in gm.graph.nodes:
        if order[node] <= order[last_out] or order[node] >= order[head_nodes[0]] or node.op != "call_function":
            continue
        for p, cls in _stack_paths(node):
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            if "norm" in cls_name.lower() or "norm" in _strip(p).rsplit(".", 1)[-1].lower():
                final_norm, final_norm_path = node, _strip(p)
                break
    # final_norm stays the *last* node of that module: walk forward while nodes belong to it.
    if final_norm is not None:
        for node in gm.graph.nodes:
            if order[final_norm] < order[node] < order[head_nodes[0]] and final_norm_path in module_path_of(node):
                final_norm = node
    return Structure(
        layers_path=layers_path,
        layers=layers,
        final_norm=final_norm,
        final_norm_path=final_norm_path,
        lm_head=lm_head,
        lm_head_path=head_path,
        input_ids=input_ids,
        position_ids=position_ids,
        cache_position=cache_position,
        masks=list(masks),
        kv=list(kv),
    )


def nodes_by_layer(gm: torch.fx.GraphModule, layers_path: str) -> dict[int, list[torch.fx.Node]]:
    """Graph nodes per layer index of the ModuleList at ``layers_path``, from nn_module_stack."""
    prefix = layers_path + "."
    by_layer: dict[int, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for p in module_path_of(node):
            if p.startswith(prefix):
                idx = p[len(prefix) :].split(".")[0]
                if idx.isdigit():
                    by_layer.setdefault(int(idx), []).append(node)
                    break
    return by_layer


def _is_hidden(node: torch.fx.Node, hidden: int | None = None) -> bool:
    """A residual-stream value: float (B, q, hidden), or (n, B, q, hidden) for models with several streams."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point or val.dim() not in (3, 4):
        return False
    if hidden is None:
        return val.dim() == 3
    # Compare static sizes only: ``==`` on a symbolic size would guard on it and specialise the graph.
    last = val.shape[-1]
    return isinstance(last, int) and last == hidden
