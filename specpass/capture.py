"""Capture a Hugging Face causal LM as a torch.export graph with a runtime-owned KV cache.

The exported program's signature is the contract between capture, the passes and the runtime::

    logits = program(input_ids, position_ids, cache_position, *masks, *kv)

- ``input_ids``, ``position_ids``: (B, q) int64; ``q`` is dynamic.
- ``cache_position``: (q,) int64, the cache slot each query token's K/V is written to. Slots and positions
  differ on purpose: a draft tree writes its nodes to consecutive scratch slots while their rotary
  positions follow tree depth.
- ``masks``: one additive float mask (B, 1, q, max_cache_len) per attention kind of the model (``full``,
  and ``sliding`` for sliding-window layers), 0 where a query may attend and ``finfo.min`` elsewhere.
  The runtime builds them, so causal, padded and tree attention are all the same program.
- ``kv``: 2 * num_layers tensors (B, num_kv_heads, max_cache_len, head_dim), K then V per layer, written
  in place with ``aten.index_copy_``. The runtime owns them; the graph never allocates a cache.

transformers' own export recipe (``TorchExportableModuleWithStaticCache``) takes neither a mask nor position
ids, so it cannot verify trees; hence this wrapper.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from specpass.errors import SpecPassError

log = logging.getLogger("specpass.capture")

FULL = "full_attention"
SLIDING = "sliding_attention"


# --------------------------------------------------------------------------------------------------------
# The runtime-owned cache, as transformers sees it during tracing.
# --------------------------------------------------------------------------------------------------------
def _cache_classes():
    # Imported lazily: transformers is only needed to capture, not to run an engine.
    from transformers.cache_utils import Cache, CacheLayerMixin

    class RuntimeLayer(CacheLayerMixin):
        """One layer's K/V: caller-owned buffers, written at explicit slots."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.slots = keys, values, slots
            self.is_initialized = True
            self.dtype, self.device = keys.dtype, keys.device

        def lazy_initialization(self, key_states, value_states):  # buffers exist already
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self.slots, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, self.slots, value_states.to(self.values.dtype))
            return self.keys, self.values

        def get_mask_sizes(self, query_length):
            return self.keys.shape[2], 0

        def get_seq_length(self):
            # Only consulted when position ids are missing; we always pass them.
            return 0

        def get_max_length(self):
            return self.keys.shape[2]

    class RuntimeCache(Cache):
        def __init__(self, layers):
            super().__init__(layers=layers)

    return RuntimeLayer, RuntimeCache


class CaptureWrapper(nn.Module):
    """Adapts an HF causal LM to the specpass program signature (see the module docstring)."""

    def __init__(self, model: nn.Module, mask_kinds: tuple[str, ...], layer_types: tuple[str, ...] | None):
        super().__init__()
        self.model = model
        self.mask_kinds = mask_kinds
        self.layer_types = layer_types

    def forward(self, input_ids, position_ids, cache_position, *rest):
        n_masks = len(self.mask_kinds)
        masks, kv = rest[:n_masks], rest[n_masks:]
        layer_cls, cache_cls = _cache_classes()
        cache = cache_cls([layer_cls(kv[2 * i], kv[2 * i + 1], cache_position) for i in range(len(kv) // 2)])
        if self.layer_types is not None:
            # Models with per-layer attention kinds take a {kind: mask} mapping.
            attention_mask: Any = dict(zip(self.mask_kinds, masks))
        else:
            attention_mask = masks[0]
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            cache_position=cache_position,
            return_dict=True,
        )
        return out.logits


# --------------------------------------------------------------------------------------------------------
# Model facts the runtime needs
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Shapes of the runtime-owned KV cache and masks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_cache_len: int
    dtype: torch.dtype
    mask_kinds: tuple[str, ...]  # order of the mask inputs
    sliding_window: int | None  # window of the ``sliding_attention`` mask, if any

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["mask_kinds"] = list(self.mask_kinds)
        return d

    @classmethod
    def from_json(cls, d: dict) -> CacheSpec:
        d = dict(d)
        d["dtype"] = getattr(torch, d["dtype"])
        d["mask_kinds"] = tuple(d["mask_kinds"])
        return cls(**d)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _attention_layout(config) -> tuple[tuple[str, ...], tuple[str, ...] | None, int | None]:
    """(mask kinds in input order, per-layer kinds if the model takes a mask mapping, sliding window)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds = tuple(sorted(set(layer_types)))
        unknown = set(kinds) - {FULL, SLIDING}
        if unknown:
            raise SpecPassError(
                f"unsupported attention layer types {sorted(unknown)} (supported: {FULL}, {SLIDING}); "
                "specpass handles softmax attention with full or sliding-window masks only"
            )
        if SLIDING in kinds and not window:
            raise SpecPassError("config has sliding_attention layers but no sliding_window")
        return kinds, tuple(layer_types), (window if SLIDING in kinds else None)
    # Mistral-style: one kind for every layer, sliding when the config sets a window and the model uses it.
    use_sliding = getattr(config, "use_sliding_window", True)
    if window and use_sliding:
        return (SLIDING,), None, window
    return (FULL,), None, None


def cache_spec(model: nn.Module, max_cache_len: int, dtype: torch.dtype | None = None) -> CacheSpec:
    """Derive the KV-cache layout from an HF model by running one tiny probe through its attention."""
    config = _text_config(model.config)
    kinds, _, window = _attention_layout(config)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not n_layers:
        raise SpecPassError(f"{type(model).__name__}: config has no num_hidden_layers; cannot size the KV cache")
    # Head geometry differs in naming across architectures; a probe forward reads it off the real K states.
    shapes = _probe_kv_shapes(model)
    if len(shapes) != n_layers:
        raise SpecPassError(
            f"{type(model).__name__}: expected {n_layers} attention layers writing the KV cache, saw {len(shapes)}"
        )
    if len(set(shapes)) != 1:
        raise SpecPassError(f"{type(model).__name__}: layers have different KV shapes {sorted(set(shapes))}")
    n_kv, head_dim = shapes[0]
    param = next(model.parameters())
    return CacheSpec(n_layers, n_kv, head_dim, max_cache_len, dtype or param.dtype, kinds, window)


def _probe_kv_shapes(model: nn.Module) -> list[tuple[int, int]]:
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the model is not a decoder we can drive
        raise SpecPassError(f"{type(model).__name__}: a probe forward with a KV cache failed: {e}") from e
    shapes = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            raise SpecPassError(f"{type(model).__name__}: a cache layer holds no (B, H, T, D) keys")
        shapes.append((keys.shape[1], keys.shape[3]))
    return shapes


# --------------------------------------------------------------------------------------------------------
# Structure: where things are in the captured graph
# --------------------------------------------------------------------------------------------------------
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


def _module_path_of(node: torch.fx.Node) -> list[str]:
    return [_strip(p) for p, _ in _stack_paths(node)]


def analyze(gm: torch.fx.GraphModule, wrapper: CaptureWrapper, n_masks: int) -> Structure:
    """Annotate an exported wrapper graph; raise SpecPassError naming whatever is missing."""
    model = wrapper.model
    name = type(model).__name__
    named = dict(wrapper.named_modules())
    config = _text_config(model.config)
    n_layers = config.num_hidden_layers

    # 1. The decoder-layer list: the ModuleList with num_hidden_layers entries.
    candidates = [p for p, m in named.items() if isinstance(m, nn.ModuleList) and len(m) == n_layers and p]
    if not candidates:
        raise SpecPassError(
            f"{name}: decoder layers not found: no nn.ModuleList of num_hidden_layers={n_layers} modules"
        )
    layers_path = min(candidates, key=len)

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

    # 3. Per-layer nodes from nn_module_stack.
    prefix = layers_path + "."
    by_layer: dict[int, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for p in _module_path_of(node):
            if p.startswith(prefix):
                idx = p[len(prefix) :].split(".")[0]
                if idx.isdigit():
                    by_layer.setdefault(int(idx), []).append(node)
                    break
    if len(by_layer) != n_layers:
        raise SpecPassError(
            f"{name}: expected {n_layers} decoder layers in the graph under '{layers_path}', found {len(by_layer)}"
        )
    layers = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for i in range(n_layers):
        nodes = by_layer[i]
        inside = set(nodes)
        # The layer's output: its last node whose value leaves the layer with the hidden shape.
        outs = [n for n in nodes if any(u not in inside for u in n.users) and _is_hidden(n)]
        # The layer's input: the hidden-state node from outside that the layer reads first.
        ins = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and _is_hidden(a) and a.op != "placeholder":
                    ins.append(a)
        if not outs or not ins:
            raise SpecPassError(f"{name}: layer {i} residual input/output not found in the graph")
        attn = [n for n in nodes if n.target == _SDPA]
        if not attn:
            attn = [n for n in nodes if n.target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)]
        if not attn:
            raise SpecPassError(f"{name}: layer {i} has no attention node (scaled_dot_product_attention/softmax)")
        layers.append(
            LayerInfo(
                index=i,
                module_path=f"{layers_path}.{i}",
                input=min(ins, key=order.__getitem__),
                output=max(outs, key=order.__getitem__),
                attention=attn,
            )
        )

    # 4. Final norm: the module between the last layer and the head (any norm-like module outside the layers).
    last_out = layers[-1].output
    final_norm = None
    final_norm_path = None
    head_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and head_path in _module_path_of(n)]
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
            if order[final_norm] < order[node] < order[head_nodes[0]] and final_norm_path in _module_path_of(node):
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


def _is_hidden(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 3 and val.dtype.is_floating_point


# --------------------------------------------------------------------------------------------------------
# capture()
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CapturedGraph:
    """The exported program of an HF causal LM, its structure, and the cache layout it expects."""

    exported: torch.export.ExportedProgram
    gm: torch.fx.GraphModule  # unlifted training IR: parameters as attributes, KV inputs mutated in place
    structure: Structure
    spec: CacheSpec
    model_type: str


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise SpecPassError(f"{name} is not a Hugging Face model (no .config); pass an AutoModelForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        raise SpecPassError(
            f"{name} is an encoder-decoder model; specpass needs a decoder-only causal LM (AutoModelForCausalLM)"
        )
    if not (hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None):
        raise SpecPassError(f"{name} has no LM head (get_output_embeddings() is None); it is not a causal LM")
    if not getattr(config, "is_decoder", True) and "CausalLM" not in name and "LMHead" not in name:
        raise SpecPassError(f"{name} is not a causal LM; load it with AutoModelForCausalLM")


def example_inputs(spec: CacheSpec, q: int = 2, batch: int = 1, device=None):
    """Placeholder inputs for export and compilation (values do not matter, shapes do)."""
    ids = torch.zeros((batch, q), dtype=torch.long, device=device)
    pos = torch.arange(q, device=device).expand(batch, q).contiguous()
    slots = torch.arange(q, device=device)
    masks = [torch.zeros((batch, 1, q, spec.max_cache_len), dtype=spec.dtype, device=device) for _ in spec.mask_kinds]
    kv = [
        torch.zeros((batch, spec.num_kv_heads, spec.max_cache_len, spec.head_dim), dtype=spec.dtype, device=device)
        for _ in range(2 * spec.num_layers)
    ]
    return (ids, pos, slots, *masks, *kv)


def capture(model: nn.Module, *, max_cache_len: int = 1024) -> CapturedGraph:
    """Export ``model`` to a training-IR graph with a runtime-owned KV cache; see the module docstring."""
    _check_model(model)
    if max_cache_len < 2:
        raise SpecPassError(f"max_cache_len must be >= 2, got {max_cache_len}")
    config = _text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and max_cache_len > limit:
        raise SpecPassError(
            f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings={limit}; pass a smaller one"
        )
    attn_impl = getattr(model.config, "_attn_implementation", None)
    if attn_impl not in (None, "sdpa", "eager"):
        raise SpecPassError(
            f"attention implementation '{attn_impl}' cannot take an explicit mask; "
            "load the model with attn_implementation='sdpa'"
        )
    model.eval()
    spec = cache_spec(model, max_cache_len)
    kinds, layer_types, _ = _attention_layout(config)
    wrapper = CaptureWrapper(model, kinds, layer_types).eval()
    args = example_inputs(spec, q=2, device=next(model.parameters()).device)
    q = Dim("q", min=1, max=max_cache_len)
    # The varargs (*masks, *kv) form one pytree entry of the signature.
    dynamic = ({1: q}, {1: q}, {0: q}, (*[{2: q} for _ in kinds], *[None] * (2 * spec.num_layers)))
    try:
        with torch.no_grad():
            exported = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
    except SpecPassError:
        raise
    except Exception as e:  # noqa: BLE001 - surface any tracing failure as a capture error with its cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecPassError(f"{type(model).__name__}: torch.export failed: {type(e).__name__}: {first}") from e
    gm = exported.module()
    structure = analyze(gm, wrapper, len(kinds))
    if len(structure.kv) != 2 * spec.num_layers:
        raise SpecPassError(f"captured graph has {len(structure.kv)} KV inputs, expected {2 * spec.num_layers}")
    log.info("captured %s: %d layers, %d graph nodes", type(model).__name__, spec.num_layers, len(exported.graph.nodes))
    return CapturedGraph(exported, gm, structure, spec, getattr(config, "model_type", "?"))
