"""The runtime-owned cache as transformers sees it while a model is traced, and the wrapper that gives an HF
causal LM the specpass program signature (capture.py's docstring).

transformers' ``Cache`` layers are replaced by layers over the runtime's own tensors, written in place at
explicit slots; the wrapper passes positions, slots and masks to the model and adapts the models whose attention
or positions ignore them (attention_adapters.py, position_adapters.py).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from specpass import attention_adapters, position_adapters
from specpass.cache_spec import CONV, KEY, RECURRENT, VALUE, CacheSpec
from specpass.errors import SpecPassError


def text_config(config):
    """The text model's config (a multimodal config keeps it apart; a text-only one is its own)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


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


def cache_argument(model: nn.Module) -> str:
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
        self.cache_argument = cache_argument(model)
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
        adapter = attention_adapters.FORWARD_ADAPTERS.get(getattr(text_config(self.model.config), "model_type", None))
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
