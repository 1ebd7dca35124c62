"""The cache layout of an HF causal LM, read off the model itself: which attention kinds it masks, what each
layer keeps (K/V, conv and recurrent state) and in which shapes, found by tiny probe forwards; and the probes'
shared checks (the model is causal; logits agree within a dtype's tolerance)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from specpass import attention_adapters
from specpass.cache_spec import CHUNKED, CONV, FULL, KEY, RECURRENT, SLIDING, VALUE, CacheSpec, CacheTensor
from specpass.errors import SpecPassError
from specpass.hf_cache import cache_argument, text_config

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
    config = text_config(model.config)
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


def tolerance(dtype: torch.dtype) -> float:
    """Relative logit error that still counts as "the same computation" (reordered float sums)."""
    return {torch.float16: 1.5e-2, torch.bfloat16: 6e-2}.get(dtype, 1e-4)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def probe_ids(model: nn.Module, n: int) -> torch.Tensor:
    """n fixed token ids inside the vocabulary (the values do not matter, only that they differ)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    return (torch.arange(n, device=device) * 7 + 3).remainder(vocab)[None]


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own logits for ``ids``, without a cache, with the explicit positions 0..n-1 that HF's
    generate() passes too (some models would otherwise count from an offset, e.g. RoBERTa's padding_idx + 1)."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, position_ids=positions, use_cache=False).logits


def _check_causal(model: nn.Module) -> None:
    """A causal LM's logits for a prefix do not depend on later tokens: refuse bidirectional models."""
    name = type(model).__name__
    ids = probe_ids(model, 4)
    try:
        with torch.no_grad():
            full = forward_logits(model, ids)
            prefix = forward_logits(model, ids[:, :3])
    except Exception as e:  # noqa: BLE001 - the model's own forward fails: nothing we can capture
        raise SpecPassError(f"{name}: the model's own forward failed on a 4-token probe: {error_summary(e)}") from e
    err = rel_err(full[:, :3], prefix)
    if err > tolerance(full.dtype):
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
    argument = cache_argument(model)
    ids = probe_ids(model, 2)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{argument: cache})
    except Exception as e:  # noqa: BLE001 - any failure here means the model is not a decoder we can drive
        raise SpecPassError(f"{name}: a probe forward with a KV cache failed: {error_summary(e)}") from e
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


def error_summary(e: BaseException) -> str:
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
