"""Tiny random-init models of any Hugging Face causal-LM architecture: the architecture's default config shrunk
to a couple of layers and a few hundred thousand parameters (the coverage check's models, and the tests')."""

from __future__ import annotations

from collections.abc import Iterable

N_LAYERS = 2
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
VOCAB = 256
MAX_POSITIONS = 256
#: shorter than the coverage check's 6-token prompt + 4 new tokens, so that the window changes the result
SLIDING_WINDOW = 4

# attribute -> tiny value; applied where the default config has a larger int
# fmt: off
_SHRINK = {
    # width
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "embed_dim": HIDDEN, "word_embed_proj_dim": HIDDEN,
    "embedding_size": HIDDEN, "n_embed": HIDDEN, "embedding_dim": HIDDEN, "attention_hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN, "ffn_dim": 2 * HIDDEN, "n_inner": 2 * HIDDEN, "ffn_hidden_size": 2 * HIDDEN,
    "d_ff": 2 * HIDDEN, "decoder_ffn_dim": 2 * HIDDEN, "encoder_ffn_dim": 2 * HIDDEN, "dim_ff": 2 * HIDDEN,
    "moe_intermediate_size": HIDDEN // 2, "shared_expert_intermediate_size": HIDDEN // 2,
    "expert_intermediate_size": HIDDEN // 2,
    # depth
    "num_hidden_layers": N_LAYERS, "n_layer": N_LAYERS, "n_layers": N_LAYERS, "num_layers": N_LAYERS,
    "decoder_layers": N_LAYERS, "encoder_layers": N_LAYERS, "num_decoder_layers": N_LAYERS, "num_blocks": N_LAYERS,
    # heads
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM, "global_head_dim": 2 * HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_size": HEAD_DIM, "d_head": HEAD_DIM,
    "rotary_dim": HEAD_DIM // 2,
    # MLA (deepseek-style)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # linear attention / SSM
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": HEAD_DIM, "linear_num_heads": HEADS, "mamba_d_state": 16,
    "mamba_n_heads": 4, "mamba_d_head": 16, "state_size": 16, "mamba_head_dim": 16, "ssm_state_size": 16,
    "n_groups": 1, "mamba_n_groups": 1, "time_step_rank": 8,
    # MoE
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "num_group": 1, "num_expert_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1, "num_shared_experts": 1, "moe_k": 2,
    # hybrids: an attention layer and a MoE layer within two layers
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
    # vocab and positions
    "vocab_size": VOCAB, "decoder_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "max_position_embeddings": MAX_POSITIONS, "n_positions": MAX_POSITIONS, "max_seq_len": MAX_POSITIONS,
    "n_ctx": MAX_POSITIONS, "context_length": MAX_POSITIONS,
    # misc per-model widths and windows
    "hidden_size_per_layer_input": 16, "laurel_rank": 8, "sliding_window": SLIDING_WINDOW,
    "window_size": SLIDING_WINDOW, "attention_chunk_size": SLIDING_WINDOW, "num_memory_blocks": 2,
    "global_attn_every_n_layers": 2, "hidden_size_global": HIDDEN, "encoder_hash_byte_group_vocab": 2 * VOCAB,
}
# attribute -> tiny value where the default config leaves it None but the modeling code needs a number
_FILL_NONE = {
    "head_dim": HEAD_DIM, "num_key_value_heads": KV_HEADS, "num_experts_per_tok": 2, "n_routed_experts": 4,
    "n_shared_experts": 1,
}
# fmt: on
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
# lists of layer indices (rather than one entry per layer)
_LAYER_INDEX_LISTS = ("full_attn_idxs", "mlp_only_layers", "attn_layer_indices", "attn_layer_idx")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shrink_dict(d: dict) -> dict:
    """Shrink one config dict (recursing into sub-config dicts); returns a new dict."""
    original, d = d, dict(d)
    old_layers = next((d[k] for k in _LAYER_COUNT_KEYS if _is_int(d.get(k)) and d[k] > 0), None)
    shares_kv = _is_int(d.get("num_kv_shared_layers")) and d["num_kv_shared_layers"] > 0
    multi_head = _is_int(d.get("num_key_value_heads")) and d["num_key_value_heads"] == d.get("num_attention_heads")
    for key, value in list(d.items()):
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            d[key] = _shrink_dict(value)
        elif key in _SHRINK and _is_int(value) and value > _SHRINK[key]:
            d[key] = _SHRINK[key]
        elif key in _FILL_NONE and value is None:
            d[key] = _FILL_NONE[key]
    if multi_head:  # some configs allow no grouped-query attention
        d["num_key_value_heads"] = d["num_attention_heads"]
    _make_consistent(d)
    new_layers = next((d[k] for k in _LAYER_COUNT_KEYS if _is_int(d.get(k)) and d[k] > 0), None)
    if old_layers and new_layers and new_layers < old_layers:
        keep = _layers_to_keep(d.get("layer_types"), old_layers, new_layers)
        if shares_kv and isinstance(d.get("layer_types"), list):
            # Gemma 3n: the last layers reuse the KV of earlier layers of their kind, so keep that feature with
            # twice the layers: [one of each kind] + [the same kinds again, sharing].
            keep = keep + [old_layers - len(keep) + i for i in range(len(keep))]
            kinds = [d["layer_types"][i] for i in keep[: len(keep) // 2]]
            d["layer_types"] = list(d["layer_types"])
            for j, i in enumerate(keep[len(keep) // 2 :]):
                d["layer_types"][i] = kinds[j]
            d["num_kv_shared_layers"] = len(keep) // 2
            for k in _LAYER_COUNT_KEYS:
                if _is_int(d.get(k)) and d[k] == new_layers:
                    d[k] = len(keep)
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_layers and key not in _LAYER_INDEX_LISTS:
                d[key] = [value[i] for i in keep]
            elif key in _LAYER_INDEX_LISTS and isinstance(value, list):
                d[key] = [keep.index(i) for i in value if i in keep]
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                # per-layer overrides keyed by layer index: keep the kept layers', scaled like the base sizes
                d[key] = {
                    type(k)(keep.index(int(k))): _scale_overrides(v, original, d) if isinstance(v, dict) else v
                    for k, v in value.items()
                    if int(k) in keep
                }
    # Token ids must lie inside the shrunk vocabulary.
    vocab = d.get("vocab_size")
    if _is_int(vocab):
        for key, value in list(d.items()):
            if key.endswith(("_token_id", "_token_index", "_token_ids")):
                if _is_int(value) and value >= vocab:
                    d[key] = vocab - 1 - (sum(map(ord, key)) % 8)
                elif isinstance(value, list):
                    d[key] = [v if not _is_int(v) or v < vocab else vocab - 1 - (i % 8) for i, v in enumerate(value)]
    return d


def _scale_overrides(overrides: dict, original: dict, shrunk: dict) -> dict:
    """A layer's size overrides, scaled by the factor its base size shrank (512 over a base 256 -> 2x base)."""
    out = dict(overrides)
    for key, value in overrides.items():
        base, new = original.get(key), shrunk.get(key)
        if _is_int(value) and _is_int(base) and _is_int(new) and base > 0:
            out[key] = max(1, value * new // base)
    return out


def _make_consistent(d: dict) -> None:
    """Re-establish the relations between sizes that configs validate (after shrinking them independently)."""
    hidden, heads = d.get("hidden_size"), d.get("num_attention_heads")
    kv = d.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv) and heads % kv:
        d["num_key_value_heads"] = 1
    if _is_int(d.get("qk_rope_head_dim")):
        # MLA: rotary embeddings cover the rope part of the query/key head only.
        if "head_dim" in d:
            d["head_dim"] = d["qk_rope_head_dim"]
        if _is_int(d.get("qk_nope_head_dim")) and "qk_head_dim" in d:
            d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    if _is_int(d.get("d_head")) and _is_int(d.get("d_model")) and _is_int(d.get("n_head")):
        d["d_head"] = d["d_model"] // d["n_head"]
    # Mamba mixers: heads * head_dim == expand * hidden.
    if _is_int(hidden):
        for heads_key, dim_key, expand_key in (
            ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
            ("num_heads", "head_dim", "expand"),
        ):
            n, dim, expand = d.get(heads_key), d.get(dim_key), d.get(expand_key)
            if _is_int(n) and _is_int(dim) and isinstance(expand, (int, float)) and not isinstance(expand, bool):
                d[dim_key] = max(1, int(expand * hidden) // n)
                for width_key in ("mamba_intermediate_size", "mamba_d_ssm"):
                    if _is_int(d.get(width_key)):
                        d[width_key] = d[heads_key] * d[dim_key]
    if isinstance(d.get("axial_pos_embds_dim"), (list, tuple)) and _is_int(hidden):
        d["axial_pos_embds_dim"] = [hidden // 2, hidden - hidden // 2]
    head_dim = d.get("head_dim") or (hidden // heads if _is_int(hidden) and _is_int(heads) else None)
    for params in _rope_dicts(d.get("rope_parameters") or d.get("rope_scaling")):
        section = params.get("mrope_section")
        if isinstance(section, list) and head_dim:
            params["mrope_section"] = _rescale(section, head_dim // 2)
    if d.get("is_decoder") is False and not d.get("is_encoder_decoder"):
        # BERT-style models are causal LMs only as decoders (HF warns otherwise).
        d["is_decoder"] = True


def _rope_dicts(rope) -> Iterable[dict]:
    if isinstance(rope, dict):
        if any(isinstance(v, dict) for v in rope.values()):
            for v in rope.values():
                if isinstance(v, dict):
                    yield v
        else:
            yield rope


def _rescale(parts: list[int], total: int) -> list[int]:
    s = sum(parts)
    out = [max(1, p * total // s) for p in parts]
    out[0] += total - sum(out)
    return out


def _layers_to_keep(layer_types, old: int, new: int) -> list[int]:
    """Layer indices to keep: the first layer of every distinct kind, then the first others, in order."""
    keep: list[int] = []
    if isinstance(layer_types, list) and len(layer_types) == old:
        seen = set()
        for i, kind in enumerate(layer_types):
            if kind not in seen and len(keep) < new:
                seen.add(kind)
                keep.append(i)
    for i in range(old):
        if len(keep) >= new:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def tiny_config(model_type: str):
    """The default config of ``model_type``, shrunk to a model of a few hundred thousand parameters."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    d = _shrink_dict(config.to_dict())
    d.pop("transformers_version", None)
    tiny = type(config).from_dict(d)
    tiny.use_cache = True
    return tiny


def build_tiny_model(model_type: str, **overrides):
    """A tiny random-init fp32 model of ``model_type`` in eval mode (raises whatever transformers raises);
    ``overrides`` are set on its shrunk config."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Plain greedy decoding on both sides: a default config's logits processors (forced EOS, bad words, ...) are
    # generate() settings, not the architecture under test.
    model.generation_config = GenerationConfig()
    if hasattr(model, "set_default_language") and getattr(config, "languages", None):
        model.set_default_language(config.languages[0])  # X-MOD needs one
    for p in model.parameters():
        p.requires_grad_(False)
    return model
