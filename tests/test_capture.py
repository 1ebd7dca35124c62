"""Capture across architectures: structure, logits against HF eager, sliding windows, greedy end to end, errors.

Every model is a tiny random-init fp32 config built here (hidden 64, 2 layers, 4 heads, vocabulary 128), so the
whole file runs in well under a minute on two cores. One ``specpass.optimize(model, backend="eager")`` per
architecture is shared by the structure, logits and generate tests: its ``captured`` is what ``capture`` returns.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf
from torch import nn

import specpass
from specpass import SpecPassError
from specpass.cache_spec import FULL, SLIDING
from specpass.capture import input_names
from specpass.runtime.generate import _run, _run_tree, _step
from specpass.runtime.kv_cache import KVCache
from specpass.runtime.tree import DraftTree

VOCAB = 128
HIDDEN = 64
WINDOW = 4  # sliding window; the test sequences are longer
MAX_CACHE_LEN = 24
PROMPT = 6
DECODE_STEPS = 3  # after the prompt: positions 0..8, so a window of 4 matters
NEW_TOKENS = 6
_ATTENTION_OPS = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.softmax.int,
    torch.ops.aten._softmax.default,
)

#: the tiny-model tests that check a torch version (`python -m pytest -m compat` runs them on the installed torch)
pytestmark = pytest.mark.compat

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4)
_LLAMA_LIKE = dict(_COMMON, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    make: object  # () -> model
    final_norm: str  # module path of the final norm inside the capture wrapper
    lm_head: str = "model.lm_head"
    sliding: bool = False  # some layers use a sliding-window mask


def _llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_LLAMA_LIKE))


def _qwen2():
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LLAMA_LIKE))


def _qwen2_sliding():
    # Layers from max_window_layers on use the window: layer_types = [full, sliding].
    config = tf.Qwen2Config(**_LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    return tf.Qwen2ForCausalLM(config)


def _qwen3():
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_LLAMA_LIKE, head_dim=16))


def _mistral():
    return tf.MistralForCausalLM(tf.MistralConfig(**_LLAMA_LIKE, sliding_window=WINDOW))


def _mixtral():
    config = tf.MixtralConfig(**_LLAMA_LIKE, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)
    return tf.MixtralForCausalLM(config)


def _gemma():
    return tf.GemmaForCausalLM(tf.GemmaConfig(**_LLAMA_LIKE, head_dim=16))


def _gemma2():
    config = tf.Gemma2Config(
        **_LLAMA_LIKE,
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0,  # small caps so that capping changes the logits
        final_logit_softcapping=3.0,
    )
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    return tf.Gemma2ForCausalLM(config)


def _gemma3():
    config = tf.Gemma3TextConfig(
        **_LLAMA_LIKE,
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    return tf.Gemma3ForCausalLM(config)


def _phi():
    return tf.PhiForCausalLM(tf.PhiConfig(**_COMMON, intermediate_size=128, max_position_embeddings=64))


def _phi3():
    return tf.Phi3ForCausalLM(tf.Phi3Config(**_LLAMA_LIKE, pad_token_id=0))


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64))


def _gpt_neox():
    config = tf.GPTNeoXConfig(**_COMMON, intermediate_size=128, max_position_embeddings=64, rotary_pct=0.5)
    return tf.GPTNeoXForCausalLM(config)


def _opt():
    config = tf.OPTConfig(**_COMMON, ffn_dim=128, word_embed_proj_dim=HIDDEN, max_position_embeddings=64)
    return tf.OPTForCausalLM(config)


def _olmo():
    return tf.OlmoForCausalLM(tf.OlmoConfig(**_LLAMA_LIKE, pad_token_id=0))


def _stablelm():
    return tf.StableLmForCausalLM(tf.StableLmConfig(**_LLAMA_LIKE))


def _starcoder2():
    return tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**_LLAMA_LIKE, sliding_window=WINDOW))


def _falcon():
    config = tf.FalconConfig(**_COMMON, max_position_embeddings=64, new_decoder_architecture=True, num_kv_heads=2)
    return tf.FalconForCausalLM(config)


def _gpt_bigcode():
    config = tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)
    return tf.GPTBigCodeForCausalLM(config)


ARCHS = {
    a.name: a
    for a in [
        Arch("llama", _llama, "model.model.norm"),
        Arch("qwen2", _qwen2, "model.model.norm"),
        Arch("qwen2-sliding", _qwen2_sliding, "model.model.norm", sliding=True),
        Arch("qwen3", _qwen3, "model.model.norm"),
        Arch("mistral", _mistral, "model.model.norm", sliding=True),
        Arch("mixtral", _mixtral, "model.model.norm", sliding=True),
        Arch("gemma", _gemma, "model.model.norm"),
        Arch("gemma2", _gemma2, "model.model.norm", sliding=True),
        Arch("gemma3", _gemma3, "model.model.norm", sliding=True),
        Arch("phi", _phi, "model.model.final_layernorm"),
        Arch("phi3", _phi3, "model.model.norm"),
        Arch("gpt2", _gpt2, "model.transformer.ln_f"),
        Arch("gpt_neox", _gpt_neox, "model.gpt_neox.final_layer_norm"),
        Arch("opt", _opt, "model.model.decoder.final_layer_norm"),
        Arch("olmo", _olmo, "model.model.norm"),
        Arch("stablelm", _stablelm, "model.model.norm"),
        Arch("starcoder2", _starcoder2, "model.model.norm", sliding=True),
        Arch("falcon", _falcon, "model.transformer.ln_f"),
        Arch("gpt_bigcode", _gpt_bigcode, "model.transformer.ln_f"),
    ]
}


def _build(arch: Arch) -> nn.Module:
    torch.manual_seed(0)
    model = arch.make().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # Decode to the full length on both sides: no EOS, and no logits processors from the config.
    model.generation_config = tf.GenerationConfig(pad_token_id=0)
    return model


@pytest.fixture(scope="module")
def optimized():
    """``optimized(name) -> (model, SpecModel)``, built once per architecture for this module."""
    made: dict[str, tuple[nn.Module, specpass.SpecModel]] = {}

    def get(name: str):
        if name not in made:
            model = _build(ARCHS[name])
            made[name] = (
                model,
                specpass.optimize(model, speculate=False, backend="eager", max_cache_len=MAX_CACHE_LEN),
            )
        return made[name]

    return get


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _run_chain(gm, spec, ids: torch.Tensor) -> torch.Tensor:
    """The runtime's way: prefill the prompt, then one token per step; the logits of every position."""
    cache = KVCache(spec)
    steps = [ids[:, :PROMPT]] + [ids[:, i : i + 1] for i in range(PROMPT, ids.shape[1])]
    return torch.cat([_step(gm, cache, chunk) for chunk in steps], dim=1)


# --------------------------------------------------------------------------------------------------------
# (a) structure
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ARCHS))
def test_structure(optimized, name):
    model, sm = optimized(name)
    cg, arch = sm.captured, ARCHS[name]
    s = cg.structure
    assert cg.spec.num_layers == 2
    assert len(s.layers) == 2
    assert [layer.index for layer in s.layers] == [0, 1]
    assert [len(layer.attention) for layer in s.layers] == [1, 1], "one attention node per layer"
    # SDPA, or the eager softmax where the model needs it (Gemma 2's attention-logit softcapping)
    assert all(layer.attention[0].target in _ATTENTION_OPS for layer in s.layers)
    assert s.final_norm is not None and s.final_norm_path == arch.final_norm
    assert s.lm_head_path == arch.lm_head
    assert s.lm_head.meta["val"].shape[-1] == VOCAB
    for layer in s.layers:  # the residual stream enters and leaves every layer as (B, q, hidden)
        assert layer.input.meta["val"].shape[-1] == HIDDEN and layer.output.meta["val"].shape[-1] == HIDDEN
    expected_kinds = {"full_attention", "sliding_attention"} & set(cg.spec.mask_kinds)
    assert (SLIDING in expected_kinds) == arch.sliding
    if arch.sliding:
        assert cg.spec.sliding_window == WINDOW


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_inputs_have_readable_names(optimized, name):
    cg = optimized(name)[1].captured
    names = [n.name for n in cg.gm.graph.nodes if n.op == "placeholder"]
    assert names == input_names(cg.spec)
    assert names[:3] == ["input_ids", "position_ids", "cache_position"]
    assert names[-4:] == ["k_0", "v_0", "k_1", "v_1"]
    assert [n.name for n in cg.structure.masks] == [f"mask_{k}" for k in cg.spec.mask_kinds]
    assert cg.structure.kv[0].name == "k_0" and cg.structure.input_ids.name == "input_ids"
    assert "def forward(self, input_ids, position_ids, cache_position, mask_" in cg.gm.code


def test_structure_analysis_keeps_sizes_symbolic():
    # hidden size == max_cache_len: comparing a symbolic mask width with the hidden size must not specialise it.
    model = _build(ARCHS["llama"])
    cg = specpass.capture(model, max_cache_len=HIDDEN)
    mask = cg.structure.masks[0].meta["val"]
    assert isinstance(mask.shape[2], torch.SymInt) and isinstance(mask.shape[3], torch.SymInt)
    assert all(isinstance(n.meta["val"].shape[1], torch.SymInt) for n in (cg.structure.input_ids, cg.structure.lm_head))


# --------------------------------------------------------------------------------------------------------
# (b, c) logits through the captured graph against HF eager
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ARCHS))
def test_prefill_and_decode_logits_match_hf(optimized, name):
    model, sm = optimized(name)
    cg = sm.captured
    ids = _ids(PROMPT + DECODE_STEPS)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = _run_chain(cg.gm, cg.spec, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n, a in ARCHS.items() if a.sliding])
def test_sliding_window_matters(optimized, name):
    # The same graph with the sliding mask swapped for the full causal one must *not* match HF: so the
    # sequence is longer than the window and the window is really applied (not just ignored by both sides).
    model, sm = optimized(name)
    cg = sm.captured
    ids = _ids(PROMPT + DECODE_STEPS)
    assert ids.shape[1] > cg.spec.sliding_window == WINDOW
    # The runtime builds every mask kind from spec.mask_kinds: call them all "full" for the control run.
    unwindowed_spec = dataclasses.replace(cg.spec, mask_kinds=(FULL,) * len(cg.spec.mask_kinds))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = _run_chain(cg.gm, cg.spec, ids)
        unwindowed = _run_chain(cg.gm, unwindowed_spec, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (unwindowed[:, WINDOW:] - want[:, WINDOW:]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------------
# (d) end to end
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_generate_matches_hf(optimized, name):
    model, sm = optimized(name)
    prompt = _ids(PROMPT, seed=1)
    with torch.no_grad():
        want = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    got = sm.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert want.shape[1] == PROMPT + NEW_TOKENS
    assert got.tolist() == want.tolist()


# --------------------------------------------------------------------------------------------------------
# Unsupported models and bad arguments: SpecPassError with the reason
# --------------------------------------------------------------------------------------------------------
def test_bert_encoder_is_refused():
    torch.manual_seed(0)
    config = tf.BertConfig(**_COMMON, intermediate_size=128, max_position_embeddings=64, is_decoder=False)
    model = tf.BertLMHeadModel(config).eval()
    with pytest.raises(SpecPassError, match=r"BertLMHeadModel is not causal.*bidirectional.*is_decoder=True"):
        specpass.capture(model, max_cache_len=16)


def test_bert_as_decoder_is_supported():
    torch.manual_seed(0)
    config = tf.BertConfig(**_COMMON, intermediate_size=128, max_position_embeddings=64, is_decoder=True)
    model = tf.BertLMHeadModel(config).eval()
    cg = specpass.capture(model, max_cache_len=16)
    assert len(cg.structure.layers) == 2 and cg.structure.layers_path == "model.bert.encoder.layer"


def test_t5_encoder_decoder_is_refused():
    config = tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
    model = tf.T5ForConditionalGeneration(config).eval()
    with pytest.raises(SpecPassError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        specpass.capture(model, max_cache_len=16)


def test_missing_decoder_layers_are_named():
    model = _build(ARCHS["llama"])
    # Same computation, but the layers no longer sit in a ModuleList of num_hidden_layers modules.
    model.model.layers = nn.Sequential(*model.model.layers)
    with pytest.raises(SpecPassError, match=r"decoder layers not found: no nn.ModuleList of num_hidden_layers=2"):
        specpass.capture(model, max_cache_len=16)


def test_model_without_kv_cache_is_refused():
    config = tf.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)
    model = tf.OpenAIGPTLMHeadModel(config).eval()
    with pytest.raises(SpecPassError, match="takes no past_key_values"):
        specpass.capture(model, max_cache_len=16)


def test_positions_from_cache_length_follow_position_ids():
    # BART's decoder ignores position_ids and counts positions from the cache length; during capture its position
    # table reads the program's position_ids instead (specpass/position_adapters.py), so a draft tree's nodes get
    # their depth's position, not their slot's: a sibling at slot 4, position 3 computes what the same token at
    # slot 3, position 3 computes in a chain.
    config = tf.BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
        encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.BartForCausalLM(config).eval()
    cg = specpass.capture(model, max_cache_len=16)  # validated against the model's own forward
    gm, spec = cg.gm, cg.spec
    ids = _ids(5)
    logits = {}
    for name, ancestors in (("chain", [[True, True], [False, True]]), ("tree", [[True, False], [False, True]])):
        cache = KVCache(spec)
        gm(ids[:, :3], torch.arange(3)[None], torch.arange(3), *cache.chain_masks(3), *cache.tensors)
        cache.commit(3)
        depth = torch.tensor([0, 1] if name == "chain" else [0, 0])
        masks = cache.tree_masks(torch.tensor(ancestors), depth)
        logits[name] = gm(ids[:, 3:5], (3 + depth)[None], torch.arange(3, 5), *masks, *cache.tensors)
    # the chain's second token sits at position 4, the tree's sibling at position 3: different positions...
    assert not torch.allclose(logits["chain"][:, 1], logits["tree"][:, 1], atol=1e-4)
    # ...and the sibling equals a chain of the context and that token alone
    cache = KVCache(spec)
    chain = gm(ids[:, [0, 1, 2, 4]], torch.arange(4)[None], torch.arange(4), *cache.chain_masks(4), *cache.tensors)
    torch.testing.assert_close(logits["tree"][:, 1], chain[:, 3], rtol=1e-4, atol=1e-5)


def test_positions_from_cache_length_are_refused():
    # TrOCR's sinusoidal table counts positions from the cache length and the padding tokens, which no adapter
    # reproduces: the capture-time check against the model's own forward catches it, rather than generate()
    # silently diverging.
    config = tf.TrOCRConfig(
        vocab_size=VOCAB, d_model=HIDDEN, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
        max_position_embeddings=64, use_learned_position_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.TrOCRForCausalLM(config).eval()
    with pytest.raises(SpecPassError, match=r"does not reproduce the model.*never reads position_ids"):
        specpass.capture(model, max_cache_len=16)


def test_bloom_alibi_counts_positions_from_the_mask():
    # BLOOM builds ALiBi from a 2D mask; capture builds it from each query's row of the 4D mask instead, which
    # gives a key its position even where slot and position differ: node 3 below is expanded by a second call
    # and sees node 2, written by the first call at slot length + 2 but at position length + 1.
    config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(config).eval()
    captured = specpass.capture(model, max_cache_len=16)
    prefix = _ids(6)[0].tolist()
    cache = KVCache(captured.spec)
    tree = DraftTree(prefix[-1], budget=4, max_depth=3)
    tree.add(0, 11)
    tree.add(0, 22)
    with torch.no_grad():
        _run(captured.gm, cache, torch.tensor([prefix[:-1]]))
        cache.commit(len(prefix) - 1)
        _run_tree(captured.gm, cache, tree)
        tree.add(2, 33)
        got = _run_tree(captured.gm, cache, tree, first=3)[0, 0]
        want = model(torch.tensor([prefix + [22, 33]])).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unsupported_layer_types_are_refused():
    from specpass.tiny_models import build_tiny_model

    model = build_tiny_model("deepseek_v32")
    with pytest.raises(SpecPassError, match=r"unsupported attention layer types \['indexed_attention'\]: DeepSeek"):
        specpass.capture(model, max_cache_len=16)


@pytest.mark.parametrize("bad", [0, 1, -4, 2.5, "16", True, 65])  # None: the default (test_defaults.py)
def test_bad_max_cache_len(bad):
    model = _build(ARCHS["llama"])  # max_position_embeddings=64
    with pytest.raises(SpecPassError, match="max_cache_len"):
        specpass.capture(model, max_cache_len=bad)


def test_not_a_causal_lm():
    with pytest.raises(SpecPassError, match="not a Hugging Face model"):
        specpass.capture(nn.Linear(2, 2), max_cache_len=16)
    model = tf.LlamaModel(tf.LlamaConfig(**_LLAMA_LIKE))  # no LM head
    with pytest.raises(SpecPassError, match="LM head not found"):
        specpass.capture(model, max_cache_len=16)
