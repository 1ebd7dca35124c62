"""Capture a Hugging Face causal LM as a torch.export graph with a runtime-owned cache.

The exported program's signature is the contract between capture, the passes and the runtime::

    logits = program(input_ids, position_ids, cache_position, *masks, *cache)

- ``input_ids``, ``position_ids``: (B, q) int64; ``q`` is dynamic (but see recurrent state below).
- ``cache_position``: (q,) int64, the cache slot each query token's K/V is written to. Slots and positions
  differ on purpose: a draft tree writes its nodes to consecutive scratch slots while their rotary
  positions follow tree depth.
- ``masks``: one additive float mask (B, 1, q, W) per attention kind of the model (``full``; ``sliding``
  for sliding-window layers; ``chunked`` for Llama 4's chunked layers), 0 where a query may attend and
  ``finfo.min`` elsewhere. The width W <= max_cache_len is dynamic too: attention reads the first W cache
  slots only. The runtime builds the masks, so causal, padded and tree attention are all the same program.
- ``cache``: the tensors of ``CacheSpec.tensors``, layer by layer. An attention layer has K and V (B, heads,
  max_cache_len + 1, head_dim), each of its own shape (multi-head latent attention's K and V head dims
  differ, Gemma 4's layers differ), written in place with ``aten.index_copy_``. A linear-attention or
  state-space layer has its conv state and recurrent state, which each call reads and overwrites. A layer
  that reuses another layer's K/V (Gemma 3n) or keeps nothing (MLP-only layers) has none. The runtime owns
  them all; the graph never allocates a cache.

The graph's inputs are named ``input_ids, position_ids, cache_position, mask_full_attention`` / ... (one per
kind, in ``CacheSpec.mask_kinds`` order), then ``k_0, v_0, conv_1, recurrent_1, ...``; calls stay positional.

Recurrent state: transformers' linear-attention and state-space layers choose their code path from the query
length in Python (a one-token recurrent step; a chunked scan, or a loop over tokens, otherwise), which
torch.export can only trace for one length at a time. Such models are captured per query length
(``CapturedGraph.at``), and the runtime runs a call as pieces of power-of-two lengths (runtime/pieces.py).

transformers' own export recipe (``TorchExportableModuleWithStaticCache``) takes neither a mask nor position
ids, so it cannot verify trees; hence this wrapper.

Every capture checks itself before it returns: the model must be causal (a prefix's logits do not depend on
later tokens), and the captured graph, run like the runtime runs it (a prefill, then one-token steps; for
recurrent state also two-token steps), must reproduce the model's own forward. A model that takes its
positions from a source the runtime does not provide, or is an encoder, fails here with a ``SpecPassError``
that says so, instead of generating different tokens later. Models whose attention or positions ignore the
inputs they are given get an adapter while they are traced (attention_adapters.py: BLOOM's ALiBi, GPT-Neo's
local attention; position_adapters.py: position tables counted from the cache length).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from specpass import attention_adapters, position_adapters
from specpass.cache_spec import CHUNKED, CONV, FULL, KEY, RECURRENT, SLIDING, VALUE, CacheSpec, CacheTensor
from specpass.errors import SpecPassError
from specpass.runtime.kv_cache import KVCache

log = logging.getLogger("specpass.capture")


# --------------------------------------------------------------------------------------------------------
# The runtime-owned cache, as transformers sees it during tracing.
# --------------------------------------------------------------------------------------------------------
def _cache_classes():
    # Imported lazily: transformers is only needed to capture, not to run an engine.
    from transformers import cache_utils
    from transformers.cache_utils import Cache, CacheLayerMixin

    # transformers 5.23 keeps linear-attention and state-space state in its Cache; older ones do not.
    LinearAttentionCacheLayerMixin = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)

    class RuntimeLayer(CacheLayerMixin):
        """One attention layer's K/V: caller-owned buffers, written at explicit slots."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, width):
            super().__init__()
            self.keys, self.values, self.slots, self.width = keys, values, slots, width
            self.is_initialized = True
            self.dtype, self.device = keys.dtype, keys.device

        def lazy_initialization(self, *args, **kwargs):  # buffers exist already
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self.slots, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, self.slots, value_states.to(self.values.dtype))
            # Attend to the first `width` slots only (the mask's width): a static cache has max_cache_len
            # slots, but a sequence uses its first few, and attention over the rest would be wasted work.
            return self.keys[:, :, : self.width], self.values[:, :, : self.width]

        def get_mask_sizes(self, query_length):
            return self.keys.shape[2], 0

        def get_seq_length(self):
            # Only consulted when position ids are missing; we always pass them.
            return 0

        def get_max_length(self):
            return self.keys.shape[2]

    linear_bases = (LinearAttentionCacheLayerMixin,) if LinearAttentionCacheLayerMixin is not None else ()

    class RuntimeStateLayer(*linear_bases, RuntimeLayer):
        """A linear-attention or state-space layer's conv and recurrent state (and K/V where the layer also
        attends, as Falcon-H1's): caller-owned buffers holding the state after the committed tokens.

        It always reports a previous state: the runtime zeroes the buffers for a new sequence, and a zero state
        continued is what transformers computes from none. Updates overwrite the buffers in place.
        """

        def __init__(self, kv, conv: list, recurrent: list, slots, width):
            if LinearAttentionCacheLayerMixin is None:
                raise SpecPassError(
                    "models with recurrent state need transformers >= 5.23 (its linear-attention cache)"
                )
            LinearAttentionCacheLayerMixin.__init__(self, number_of_states=max(len(conv), len(recurrent)))
            if kv is not None:
                RuntimeLayer.__init__(self, *kv, slots, width)
            for i, t in enumerate(conv):
                self.conv_states[i], self.conv_kernel_size[i] = t, t.shape[-1]
                self.is_conv_states_initialized[i] = self.has_previous_state[i] = True
            for i, t in enumerate(recurrent):
                self.recurrent_states[i] = t
                self.is_recurrent_states_initialized[i] = self.has_previous_state[i] = True
            first = (conv or recurrent)[0]
            self.dtype, self.device = first.dtype, first.device

        def lazy_initialization(self, *args, **kwargs):
            pass

        def update_conv_state(self, conv_states, state_idx: int = 0, **kwargs):
            # The causal conv reads the kept inputs before the new ones; the last kernel-size columns are kept.
            state = self.conv_states[state_idx]
            full = torch.cat([state, conv_states.to(state.dtype)], dim=-1)
            state.copy_(full[..., -state.shape[-1] :])
            return full

        def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
            self.recurrent_states[state_idx].copy_(recurrent_states)
            return self.recurrent_states[state_idx]

    class RuntimeCache(Cache):
        def __init__(self, layers):
            super().__init__(layers=layers)

    return RuntimeLayer, RuntimeStateLayer, RuntimeCache


def runtime_cache(spec: CacheSpec, tensors, slots: torch.Tensor, width):
    """The transformers ``Cache`` over the runtime's tensors (in ``spec.tensors`` order), one layer per cache layer."""
    layer_cls, state_cls, cache_cls = _cache_classes()
    per_layer: dict[int, dict[str, list]] = {}
    for t, x in zip(spec.tensors, tensors, strict=True):
        per_layer.setdefault(t.layer, {}).setdefault(t.kind, []).append(x)
    layers = []
    for i in range(spec.num_layers):
        held = per_layer.get(i, {})
        kv = (held[KEY][0], held[VALUE][0]) if KEY in held else None
        if not held:  # a layer that reuses another's K/V (Gemma 3n) or keeps none (MLP-only) holds a place only
            from transformers.cache_utils import DummyLayer  # only here: older transformers lack it

            layers.append(DummyLayer())
        elif CONV in held or RECURRENT in held:
            layers.append(state_cls(kv, held.get(CONV, []), held.get(RECURRENT, []), slots, width))
        else:
            layers.append(layer_cls(*kv, slots, width))
    return cache_cls(layers)


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the cache: ``past_key_values``, or ``cache_params`` (Mamba-style)."""
    params = inspect.signature(model.forward).parameters
    for name in ("past_key_values", "cache_params"):
        if name in params:
            return name
    raise SpecPassError(
        f"{type(model).__name__}.forward takes no past_key_values (or cache_params): the model cannot decode with "
        "a cache; specpass needs one"
    )


class _MaskMapping(dict):
    """The {layer type: mask} mapping models with per-layer kinds take; kinds without a mask input (linear
    attention, state-space, MLP-only layers) read None, as for an unpadded batch in transformers."""

    def __missing__(self, key):
        return None


class CaptureWrapper(nn.Module):
    """Adapts an HF causal LM to the specpass program signature (see the module docstring)."""

    def __init__(self, model: nn.Module, spec: CacheSpec, layer_types: tuple[str, ...] | None):
        super().__init__()
        self.model = model
        self.spec = spec
        self.layer_types = layer_types
        self.cache_argument = _cache_argument(model)
        # Position tables that count from the cache length read the program's position_ids instead.
        self.position_tables = position_adapters.find_position_tables(model)

    def forward(self, input_ids, position_ids, cache_position, *rest):
        n_masks = len(self.spec.mask_kinds)
        masks, tensors = rest[:n_masks], rest[n_masks:]
        cache = runtime_cache(self.spec, tensors, cache_position, masks[0].shape[-1])
        if self.cache_argument == "cache_params":
            # State-space models (Mamba, Mamba2): no attention, no positions; every other argument would flow
            # into their **kwargs and down to the scan kernels.
            out = self.model(input_ids=input_ids, cache_params=cache, use_cache=True, return_dict=True)
            return out.logits
        mask_map = _MaskMapping(zip(self.spec.mask_kinds, masks, strict=True))
        # Models with per-layer attention kinds take a {kind: mask} mapping.
        attention_mask: Any = mask_map if self.layer_types is not None else masks[0]
        adapter = attention_adapters.FORWARD_ADAPTERS.get(getattr(_text_config(self.model.config), "model_type", None))
        with (
            (
                adapter(self.model, mask_map) if adapter is not None else contextlib.nullcontext(attention_mask)
            ) as attention_mask,
            position_adapters.program_positions(self.position_tables, position_ids),
        ):
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
def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


#: layer types whose attention reads something besides the K/V of its own tokens, with why specpass refuses them
_UNSUPPORTED_KINDS = {
    "indexed_attention": "DeepSeek sparse attention's indexer keeps a key cache of its own and selects each "
    "query's top-k keys; that selection can differ between a prefill and one-token steps (exact ties after its "
    "ReLU), so verification could not be lossless",
    "compressed_sparse_attention": "attention over compressed key blocks that the runtime cache does not hold",
    "heavily_compressed_attention": "attention over compressed key blocks that the runtime cache does not hold",
}
_MASKED_KINDS = (FULL, SLIDING, CHUNKED)


def _attention_layout(
    config, builds_sliding_mask: bool | None = None
) -> tuple[tuple[str, ...], tuple[str, ...] | None, int | None]:
    """(mask kinds in input order, per-layer kinds if the model takes a mask mapping, sliding window).

    ``builds_sliding_mask``: whether the model's own forward built a sliding-window mask (seen by the probe);
    a config can carry a ``sliding_window`` that the model never applies. Layer types without a mask of their
    own (linear attention, state-space, Falcon-H1's ``hybrid``) add the full causal mask, which is what their
    attention half reads; the capture's self-check catches any layer type that needs something else.
    """
    layer_types, window = attention_adapters.layer_kinds(config)
    if layer_types:
        present = set(layer_types)
        refused = sorted(present & set(_UNSUPPORTED_KINDS))
        if refused:
            raise SpecPassError(
                f"unsupported attention layer types {refused}: " + "; ".join(_UNSUPPORTED_KINDS[k] for k in refused)
            )
        kinds = present & set(_MASKED_KINDS)
        if present - kinds:
            kinds.add(FULL)
        if any("sliding" in k for k in present):
            kinds.add(SLIDING)
        if SLIDING in kinds and not window:
            raise SpecPassError("config has sliding_attention layers but no sliding_window")
        if CHUNKED in kinds and not getattr(config, "attention_chunk_size", None):
            raise SpecPassError("config has chunked_attention layers but no attention_chunk_size")
        return tuple(sorted(kinds)), tuple(layer_types), (window if SLIDING in kinds else None)
    # Mistral-style: one kind for every layer, sliding when the model builds a sliding-window mask.
    if builds_sliding_mask is None:
        builds_sliding_mask = bool(window) and getattr(config, "use_sliding_window", True)
    if builds_sliding_mask:
        if not window:
            raise SpecPassError("the model builds a sliding-window mask but its config has no sliding_window")
        return (SLIDING,), None, window
    return (FULL,), None, None


@contextlib.contextmanager
def _recording_sliding_masks():
    """Record whether transformers builds a sliding-window causal mask while the block runs.

    Modeling files import ``create_sliding_window_causal_mask`` by name, but it takes its mask function from
    the ``masking_utils`` module, so replacing that one attribute sees every sliding mask built.
    """
    from transformers import masking_utils

    name = "sliding_window_causal_mask_function"
    original = getattr(masking_utils, name, None)
    calls: list[int] = []
    if original is None:
        yield None
        return

    def recording(sliding_window, *args, **kwargs):
        calls.append(sliding_window)
        return original(sliding_window, *args, **kwargs)

    setattr(masking_utils, name, recording)
    try:
        yield calls
    finally:
        setattr(masking_utils, name, original)


def cache_spec(model: nn.Module, max_cache_len: int, dtype: torch.dtype | None = None) -> CacheSpec:
    """Derive the cache layout from an HF model by running one tiny probe through it: K/V shapes per attention
    layer (multi-head latent attention's K and V head dims differ, Gemma 4's layers differ), conv and
    recurrent state per linear-attention or state-space layer."""
    name = type(model).__name__
    config = _text_config(model.config)
    _attention_layout(config)  # refuse unsupported layer types before running anything
    n_layers = getattr(config, "num_hidden_layers", None)
    if not n_layers:
        raise SpecPassError(f"{name}: config has no num_hidden_layers; cannot size the KV cache")
    _check_causal(model)
    # Head geometry differs in naming across architectures; a probe forward reads it off the real states.
    with _recording_sliding_masks() as sliding:
        layout = _probe_cache(model)
    kinds, _, window = _attention_layout(config, None if sliding is None else bool(sliding))
    # A layer may keep nothing: Gemma 3n's last layers reuse an earlier layer's K/V (handed over by the model
    # itself, not through the cache), Nemotron-H has MLP-only layers. The capture's self-check proves it.
    if len(layout) != n_layers:
        raise SpecPassError(f"{name}: the model's cache has {len(layout)} layers for num_hidden_layers={n_layers}")
    model_dtype = dtype or next(model.parameters()).dtype
    tensors = []
    for i, held in enumerate(layout):
        for kind in (KEY, VALUE, CONV, RECURRENT):
            for index, (shape, state_dtype) in enumerate(held.get(kind, [])):
                kv = kind in (KEY, VALUE)
                tensors.append(CacheTensor(i, kind, shape, model_dtype if kv else state_dtype, index))
    chunk = getattr(config, "attention_chunk_size", None) if CHUNKED in kinds else None
    return CacheSpec(n_layers, max_cache_len, model_dtype, kinds, window, tuple(tensors), chunk)


def _tolerance(dtype: torch.dtype) -> float:
    """Relative logit error that still counts as "the same computation" (reordered float sums)."""
    return {torch.float16: 1.5e-2, torch.bfloat16: 6e-2}.get(dtype, 1e-4)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def _probe_ids(model: nn.Module, n: int) -> torch.Tensor:
    """n fixed token ids inside the vocabulary (the values do not matter, only that they differ)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    return (torch.arange(n, device=device) * 7 + 3).remainder(vocab)[None]


def _forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own logits for ``ids``, without a cache, with the explicit positions 0..n-1 that HF's
    generate() passes too (some models would otherwise count from an offset, e.g. RoBERTa's padding_idx + 1)."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, position_ids=positions, use_cache=False).logits


def _check_causal(model: nn.Module) -> None:
    """A causal LM's logits for a prefix do not depend on later tokens: refuse bidirectional models."""
    name = type(model).__name__
    ids = _probe_ids(model, 4)
    try:
        with torch.no_grad():
            full = _forward_logits(model, ids)
            prefix = _forward_logits(model, ids[:, :3])
    except Exception as e:  # noqa: BLE001 - the model's own forward fails: nothing we can capture
        raise SpecPassError(f"{name}: the model's own forward failed on a 4-token probe: {_summary(e)}") from e
    err = _rel_err(full[:, :3], prefix)
    if err > _tolerance(full.dtype):
        hint = " (set config.is_decoder=True to use it as a causal LM)" if hasattr(model.config, "is_decoder") else ""
        raise SpecPassError(
            f"{name} is not causal: its logits for a prefix change when a later token is appended (relative "
            f"change {err:.1e}), i.e. bidirectional attention as in an encoder{hint}; specpass needs a causal LM"
        )


def _probe_cache(model: nn.Module) -> list[dict[str, list[tuple[tuple[int, ...], torch.dtype]]]]:
    """Per cache layer, what it keeps: {kind: [(shape without batch, dtype), ...]}, from a probe forward with a
    DynamicCache. K/V shapes are (heads, head_dim)."""
    from transformers.cache_utils import DynamicCache

    name = type(model).__name__
    argument = _cache_argument(model)
    ids = _probe_ids(model, 2)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{argument: cache})
    except Exception as e:  # noqa: BLE001 - any failure here means the model is not a decoder we can drive
        raise SpecPassError(f"{name}: a probe forward with a KV cache failed: {_summary(e)}") from e
    layout = []
    for layer in getattr(cache, "layers", []):
        held: dict[str, list] = {}
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.numel() > 0:
            if keys.dim() != 4 or values.dim() != 4:
                raise SpecPassError(f"{name}: a cache layer holds keys of shape {tuple(keys.shape)}, not (B, H, T, D)")
            held[KEY] = [((keys.shape[1], keys.shape[3]), keys.dtype)]
            held[VALUE] = [((values.shape[1], values.shape[3]), values.dtype)]
        for kind, attr in ((CONV, "conv_states"), (RECURRENT, "recurrent_states")):
            states = [t for t in (getattr(layer, attr, None) or {}).values() if isinstance(t, torch.Tensor)]
            if states:
                held[kind] = [(tuple(t.shape[1:]), t.dtype) for t in states]
        layout.append(held)
    if not any(layout):
        raise SpecPassError(
            f"{name} writes no keys/values to the KV cache it is given (no past_key_values support); "
            "specpass needs a model that decodes with a KV cache"
        )
    return layout


def _summary(e: BaseException) -> str:
    """'Type: first line of the message (at transformers/models/x/modeling_x.py:123 in fn)'."""
    text = str(e).strip()
    out = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    if len(out) > 240:
        out = out[:237] + "..."
    where = None
    tb = e.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/transformers/" in path:
            where = f"{path[path.index('transformers/') :]}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return f"{out} (at {where})" if where else out


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


def module_path_of(node: torch.fx.Node) -> list[str]:
    return [_strip(p) for p, _ in _stack_paths(node)]


def analyze(gm: torch.fx.GraphModule, wrapper: CaptureWrapper, spec: CacheSpec) -> Structure:
    """Annotate an exported wrapper graph; raise SpecPassError naming whatever is missing."""
    model = wrapper.model
    n_masks = len(spec.mask_kinds)
    attending = {t.layer for t in spec.tensors if t.is_kv}
    name = type(model).__name__
    named = dict(wrapper.named_modules())
    config = _text_config(model.config)
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


# --------------------------------------------------------------------------------------------------------
# capture()
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CapturedGraph:
    """The exported program of an HF causal LM, its structure, and the cache layout it expects.

    ``query_len``: None when the graph takes any number of tokens per call. Models with recurrent state are
    captured per number of tokens instead (see capture()): this graph takes exactly ``query_len``, ``at(q)``
    exports the same model for q, and a call of more tokens is split into pieces of at most
    ``max_query_len`` (runtime/pieces.py).
    """

    exported: torch.export.ExportedProgram
    gm: torch.fx.GraphModule  # unlifted training IR: parameters as attributes, KV inputs mutated in place
    structure: Structure
    spec: CacheSpec
    model_type: str
    query_len: int | None = None
    max_query_len: int | None = None
    wrapper: CaptureWrapper | None = dataclasses.field(default=None, repr=False)
    _by_len: dict = dataclasses.field(default_factory=dict, repr=False)

    def at(self, query_len: int) -> CapturedGraph:
        """The same model captured for calls of exactly ``query_len`` tokens (exported once, then cached)."""
        if self.query_len is None or query_len == self.query_len:
            return self
        if query_len not in self._by_len:
            with _quiet_transformers():
                graph = _export(self.wrapper, self.spec, query_len)
            graph.max_query_len, graph._by_len = self.max_query_len, self._by_len
            self._by_len[query_len] = graph
        return self._by_len[query_len]


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise SpecPassError(f"{name} is not a Hugging Face model (no .config); pass an AutoModelForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        raise SpecPassError(
            f"{name} is an encoder-decoder model; specpass needs a decoder-only causal LM (AutoModelForCausalLM)"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise SpecPassError(f"{name}: LM head not found (get_output_embeddings() is None); it is not a causal LM")
    # Encoders with an LM head (BERT and friends) pass these checks; the causality probe refuses them.


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


#: models with recurrent state: the longest call one program runs; longer ones are split (runtime/pieces.py)
MAX_PIECE = 64

#: the cache length when none is given, if the model's positions reach that far
DEFAULT_CACHE_LEN = 1024


def position_limit(model: nn.Module) -> int | None:
    """The model's maximum number of positions, where its config says."""
    config = _text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def default_cache_len(model: nn.Module) -> int:
    """``DEFAULT_CACHE_LEN``, or the model's position limit where that is smaller."""
    limit = position_limit(model)
    return min(DEFAULT_CACHE_LEN, limit) if limit else DEFAULT_CACHE_LEN


def capture(model: nn.Module, *, max_cache_len: int | None = None) -> CapturedGraph:
    """Export ``model`` to a training-IR graph with a runtime-owned KV cache; see the module docstring.

    ``max_cache_len``: the longest prompt + answer; default ``default_cache_len(model)``.
    """
    _check_model(model)
    if max_cache_len is None:
        max_cache_len = default_cache_len(model)
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int):
        raise SpecPassError(f"max_cache_len must be an int, got {max_cache_len!r}")
    if max_cache_len < 2:
        raise SpecPassError(f"max_cache_len must be >= 2, got {max_cache_len}")
    limit = position_limit(model)
    if limit and max_cache_len > limit:
        raise SpecPassError(
            f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings={limit}; pass a smaller one"
        )
    text_config = _text_config(model.config)
    floor = getattr(text_config, "floor_scale", None)
    if getattr(text_config, "attn_temperature_tuning", False) and floor and max_cache_len >= floor:
        # Its scale is log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1, with pos counted from the
        # cache length rather than position_ids; below floor_scale - 1 it is exactly 1 whatever the count.
        raise SpecPassError(
            f"{type(model).__name__}: Llama 4's attention temperature tuning counts positions from the cache "
            f"length, which a runtime-owned cache does not provide; it is exact for max_cache_len <= {floor - 1}: "
            "pass a smaller one"
        )
    attn_impl = getattr(model.config, "_attn_implementation", None)
    if attn_impl not in (None, "sdpa", "eager"):
        raise SpecPassError(
            f"attention implementation '{attn_impl}' cannot take an explicit mask; "
            "load the model with attn_implementation='sdpa'"
        )
    model.eval()
    with _quiet_transformers():
        return _capture(model, max_cache_len)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings while specpass traces and checks the model (e.g. that a reference kernel stands
    in for a fused one) are about HF's eager path, not about the compiled programs: keep them out of specpass's
    output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _capture(model: nn.Module, max_cache_len: int) -> CapturedGraph:
    spec = cache_spec(model, max_cache_len)
    config = _text_config(model.config)
    declared = attention_adapters.layer_kinds(config)[0]
    layer_types = tuple(declared) if declared else None
    wrapper = CaptureWrapper(model, spec, layer_types).eval()
    if not spec.has_state:
        captured = _export(wrapper, spec, None)
        n = min(5, spec.max_cache_len)
        _validate({None: captured}, model, spec, [max(1, n - 2)] + [1] * (n - max(1, n - 2)))
    else:
        # transformers' linear-attention and state-space layers branch on the query length in Python (a
        # one-token recurrent step, a chunked scan otherwise, loops over tokens or chunks), which torch.export
        # can only trace for one length at a time: each length gets a program of its own (CapturedGraph.at).
        captured = _export(wrapper, spec, 1)
        captured.max_query_len = MAX_PIECE
        _validate({1: captured}, model, spec, [1] * min(5, spec.max_cache_len))
        try:
            _validate({1: captured, 2: captured.at(2)}, model, spec, [1, 2, 2][: max(1, spec.max_cache_len - 2)])
        except SpecPassError as e:
            # Mamba's reference scan ignores the previous state when it reads several tokens, so its calls
            # of several tokens are not the model: run them one token at a time (still lossless).
            captured.max_query_len = 1
            log.info("%s: calls of several tokens run one token at a time: %s", type(model).__name__, e)
    log.info(
        "captured %s: %d layers, %d graph nodes", type(model).__name__, spec.num_layers, len(captured.gm.graph.nodes)
    )
    return captured


def _export(wrapper: CaptureWrapper, spec: CacheSpec, query_len: int | None) -> CapturedGraph:
    """Export ``wrapper`` for any number of tokens per call (``query_len=None``) or exactly ``query_len``."""
    model = wrapper.model
    args = example_inputs(spec, q=query_len or 2, device=next(model.parameters()).device)

    def export(proof_free: bool):
        flat = program_dynamic_shapes(spec, dynamic_q=query_len is None, rewritten=proof_free)
        # The wrapper's varargs (*masks, *cache) form one pytree entry of its signature.
        return export_program(wrapper, args, (*flat[:3], flat[3:]))

    try:
        try:
            exported = export(False)
        except Exception as e:  # noqa: BLE001
            # Guards that hold for every q but that export cannot prove (Llama 4: q * min(64, 64 q) == 64 q):
            # export again without demanding the proof; the check below sees whether q stayed symbolic.
            if query_len is not None or "Constraints violated (q)" not in str(e):
                raise
            exported = export(True)
    except SpecPassError:
        raise
    except Exception as e:  # noqa: BLE001 - surface any tracing failure as a capture error with its cause
        raise SpecPassError(f"{type(model).__name__}: torch.export failed: {_summary(e)}") from e
    gm = exported.module()
    _rename_inputs(gm, spec)
    structure = analyze(gm, wrapper, spec)
    if len(structure.kv) != len(spec.tensors):
        raise SpecPassError(f"captured graph has {len(structure.kv)} cache inputs, expected {len(spec.tensors)}")
    if query_len is None and not isinstance(structure.input_ids.meta["val"].shape[1], torch.SymInt):
        raise SpecPassError(
            f"{type(model).__name__}: torch.export fixed the number of tokens per call instead of keeping it dynamic"
        )
    width = structure.masks[0].meta["val"].shape[-1]
    if not isinstance(width, torch.SymInt) and _reads(structure.masks[0]):
        # The runtime attends to as few slots as a sequence needs; a width fixed at export would fail there.
        raise SpecPassError(
            f"{type(model).__name__}: torch.export fixed the attention mask width at {width} instead of keeping it "
            "dynamic; the model's attention specialises on the key length"
        )
    config = _text_config(model.config)
    return CapturedGraph(exported, gm, structure, spec, getattr(config, "model_type", "?"), query_len, wrapper=wrapper)


def input_names(spec: CacheSpec) -> list[str]:
    """The captured program's argument names, in order: ids, positions, slots, one mask per kind, the cache."""
    return ["input_ids", "position_ids", "cache_position", *[f"mask_{kind}" for kind in spec.mask_kinds], *spec.names()]


def _rename_inputs(gm: torch.fx.GraphModule, spec: CacheSpec) -> None:
    """Give the placeholders readable, stable names (export calls the varargs ``rest_0, rest_1, ...``).

    The unlifted module flattens its inputs with a pytree codegen whose argument list is the placeholder
    names, so that list is renamed with them; calling stays positional and unchanged.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = input_names(spec)
    if len(placeholders) != len(names):
        raise SpecPassError(f"captured graph has {len(placeholders)} inputs; expected {len(names)}: {names}")
    taken = {n.name for n in gm.graph.nodes if n.op != "placeholder"} & set(names)
    for node in gm.graph.nodes:  # free the names first (no op node is called k_0 today, but be sure)
        if node.name in taken:
            node._rename(f"{node.name}_op")
    for node, name in zip(placeholders, names, strict=True):
        node.target = name
        node._rename(name)
        if node.name != name:
            raise SpecPassError(f"could not rename the graph input {node.name!r} to {name!r}")
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        codegen.pytree_info = info._replace(orig_args=list(names))
    gm.recompile()


def _validate(graphs: dict, model: nn.Module, spec: CacheSpec, steps: list[int]) -> None:
    """Run the captured graph as the runtime will (a prefill, then steps of ``steps[1:]`` tokens) against the
    model's own full forward, on a few tokens: a model that computes something else than its eager self
    (positions taken from the cache length, masks rebuilt from a 2D mask, ...) is refused here, not discovered
    in generate(). ``graphs``: query length -> CapturedGraph (``None``: any length)."""
    name = type(model).__name__
    n = sum(steps)
    ids = _probe_ids(model, n)
    with torch.no_grad():
        try:
            want = _forward_logits(model, ids)
        except Exception as e:  # noqa: BLE001 - the model's own forward fails: nothing to compare against
            raise SpecPassError(f"{name}: the model's own forward failed on a {n}-token probe: {_summary(e)}") from e

        cache = KVCache(spec, device=ids.device)
        start = 0
        for k, q in enumerate(steps):
            slots = torch.arange(start, start + q, device=ids.device)
            # The prefill attends to every slot, the decode steps to as few as cover the sequence: both ends of
            # the dynamic mask width.
            width = spec.max_cache_len if k == 0 else max(2, start + q)
            cache.length = start
            masks = cache.chain_masks(q, width)
            graph = graphs.get(q, graphs.get(None))
            try:
                got = graph.gm(ids[:, start : start + q], slots[None], slots, *masks, *cache.tensors)
            except Exception as e:  # noqa: BLE001 - the graph does not run on the runtime's inputs
                raise SpecPassError(f"{name}: the captured graph fails on a {q}-token step: {_summary(e)}") from e
            err = _rel_err(got, want[:, start : start + q])
            if not err <= _tolerance(want.dtype):  # NaN fails too
                step = "the prefill" if k == 0 else f"decode step {k}"
                why = ""
                if not _reads(graph.structure.position_ids) and graph.wrapper.cache_argument != "cache_params":
                    why = (
                        "; the graph never reads position_ids: the model derives positions another way (e.g. from "
                        "the cache length), which a runtime-owned cache does not provide"
                    )
                raise SpecPassError(
                    f"{name}: the captured graph does not reproduce the model: its logits differ from the model's "
                    f"own forward at {step} of {q} token(s) (relative error {err:.1e}){why}"
                )
            start += q


def _reads(node: torch.fx.Node) -> bool:
    """Whether any computation uses ``node`` (export's input guards and metadata asserts do not count)."""
    for user in node.users:
        if user.op == "call_module" and str(user.target).startswith("_guards"):
            continue
        if user.op == "call_function" and "assert" in getattr(user.target, "__name__", str(user.target)):
            continue
        return True
    return False
