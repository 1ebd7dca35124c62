"""End-to-end generate(): equality with HF, stopping, streaming, sampling statistics, input errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import chi2_pvalue
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import specpass
from specpass.runtime.sampling import SamplingConfig, greedy, warp

VOCAB = 96

#: the tiny-model tests that check a torch version (`python -m pytest -m compat` runs them on the installed torch)
pytestmark = pytest.mark.compat


def _tiny(arch: str, vocab: int = VOCAB):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Random weights give flat logits; sharpen them so greedy paths are far from ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def llama():
    model = _tiny("llama")
    return model, specpass.optimize(model, speculate=False, backend="eager", max_cache_len=96)


def _hf(model, ids, n, **kw):
    # An explicit mask: otherwise HF treats prompt tokens equal to pad_token_id as padding.
    mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_inductor_greedy_equals_hf(arch):
    model = _tiny(arch)
    sm = specpass.optimize(model, speculate=False, backend="inductor", max_cache_len=128)
    for seed, (plen, n) in enumerate([(5, 24), (17, 40), (1, 12)]):
        ids = torch.randint(0, VOCAB, (1, plen), generator=torch.Generator().manual_seed(seed))
        ref = _hf(model, ids, n)
        out = sm.generate(ids, max_new_tokens=n)
        assert out.tolist() == ref.tolist(), f"{arch}: prompt {plen} tokens diverges from HF"
        assert sm.last_stats.new_tokens == n and sm.last_stats.prompt_tokens == plen


def test_eager_greedy_equals_hf_across_attention_widths(llama):
    model, sm = llama
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(3))
    # 60 + 30 tokens cross the 64-slot attention-width bucket boundary.
    assert sm.generate(ids, max_new_tokens=30).tolist() == _hf(model, ids, 30).tolist()


def test_eos_stops_like_hf(llama):
    model, sm = llama
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    free = sm.generate(ids, max_new_tokens=20)[0, 6:].tolist()
    eos = free[5]  # a token that greedy decoding produces at step 5 (or earlier)
    ref = _hf(model, ids, 20, eos_token_id=eos)
    out = sm.generate(ids, max_new_tokens=20, eos_token_id=eos)
    assert out.tolist() == ref.tolist()
    assert out[0, -1].item() == eos and out.shape[1] <= 6 + 6


def test_left_padding_is_ignored_like_hf(llama):
    model, sm = llama
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros((1, 3), dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros((1, 3), dtype=torch.long), torch.ones((1, 8), dtype=torch.long)], dim=1)
    out = sm.generate(padded, attention_mask=mask, max_new_tokens=10)
    assert out[0, :8].tolist() == ids[0].tolist()  # prompt returned without the padding
    assert out.tolist() == _hf(model, ids, 10).tolist()


class _Recorder:
    def __init__(self):
        self.calls, self.ended = [], False

    def put(self, value):
        self.calls.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_each_token(llama):
    _, sm = llama
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    rec = _Recorder()
    out = sm.generate(ids, max_new_tokens=5, streamer=rec)
    assert rec.calls[0] == ids[0].tolist()
    assert [c[0] for c in rec.calls[1:]] == out[0, 4:].tolist() and rec.ended


def test_a_failed_generate_ends_its_stream_and_the_next_one_works(llama):
    model, sm = llama
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    sm.generate(ids, max_new_tokens=3)
    assert sm.last_stats is not None
    decode, calls = sm.programs["decode"], []

    def fails_at_the_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step failed")
        return decode(*args)

    sm.programs["decode"] = fails_at_the_third_step
    rec = _Recorder()
    try:
        with pytest.raises(RuntimeError, match="step failed"):
            sm.generate(ids, max_new_tokens=8, streamer=rec)
    finally:
        sm.programs["decode"] = decode
    assert rec.ended and len(rec.calls) == 4  # the prompt, prefill's token and two steps', then the end
    assert sm.last_stats is None  # not the previous call's numbers
    assert torch.equal(sm.generate(ids, max_new_tokens=8), _hf(model, ids, 8))
    assert sm.last_stats is not None and sm.last_stats.new_tokens == 8


class _CharTokenizer:
    """Each id decodes to one letter: enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings(llama):
    _, sm = llama
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(7))
    tok = _CharTokenizer()
    free = sm.generate(ids, max_new_tokens=12)[0, 4:].tolist()
    text = tok.decode(free)
    stop = text[3:5]
    out = sm.generate(ids, max_new_tokens=12, stop_strings=stop, tokenizer=tok)
    new_text = tok.decode(out[0, 4:].tolist())
    assert new_text.endswith(stop) and new_text == text[: text.index(stop) + len(stop)]
    with pytest.raises(specpass.SpecPassError, match="tokenizer"):
        sm.generate(ids, max_new_tokens=3, stop_strings="x")


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros((2, 3), dtype=torch.long), "batch size 2"),
        (torch.zeros((1, 0), dtype=torch.long), "shape"),
        (torch.zeros((1, 3)), "integer"),
        (torch.full((1, 3), VOCAB), "vocabulary"),
    ],
)
def test_bad_input_ids(llama, bad, match):
    _, sm = llama
    with pytest.raises(specpass.SpecPassError, match=match):
        sm.generate(bad, max_new_tokens=2)


def test_too_long_for_cache_and_bad_arguments(llama):
    _, sm = llama
    ids = torch.zeros((1, 90), dtype=torch.long)
    with pytest.raises(specpass.SpecPassError, match="max_cache_len"):
        sm.generate(ids, max_new_tokens=10)
    with pytest.raises(specpass.SpecPassError, match="max_new_tokens"):
        sm.generate(ids[:, :3], max_new_tokens=0)
    with pytest.raises(specpass.SpecPassError, match="temperature"):
        sm.generate(ids[:, :3], max_new_tokens=2, do_sample=True, temperature=0.0)
    model = sm.model
    with pytest.raises(specpass.SpecPassError, match="backend"):
        specpass.optimize(model, speculate=False, backend="nope")


def test_hf_generate_options_are_accepted_when_off_and_refused_when_they_would_change_the_output(llama):
    model, sm = llama
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    plain = sm.generate(ids, max_new_tokens=4)
    same = sm.generate(ids, max_new_tokens=4, num_beams=1, repetition_penalty=1.0, pad_token_id=0, use_cache=True)
    assert torch.equal(same, plain)
    for option in ({"num_beams": 2}, {"repetition_penalty": 1.2}, {"min_new_tokens": 3}):
        with pytest.raises(specpass.SpecPassError, match=f"{next(iter(option))}=.* not supported by specpass"):
            sm.generate(ids, max_new_tokens=4, **option)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'"):
        sm.generate(ids, max_tokens=4)


# ---- sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(True, 0.7, None, None),
        SamplingConfig(True, 1.0, 5, None),
        SamplingConfig(True, 1.3, None, 0.8),
        SamplingConfig(True, 0.9, 20, 0.9),
    ],
)
def test_warp_matches_hf_warpers(cfg):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits.clone()
    if cfg.temperature != 1.0:
        ref = TemperatureLogitsWarper(cfg.temperature)(None, ref)
    if cfg.top_k:
        ref = TopKLogitsWarper(cfg.top_k)(None, ref)
    if cfg.top_p is not None:
        ref = TopPLogitsWarper(cfg.top_p)(None, ref)
    assert torch.equal(torch.isinf(warp(logits, cfg)), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(warp(logits, cfg)[finite], ref[finite])


def _first_token_counts(sm, ids, n, **kw):
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(sm.model.config.vocab_size)
    for _ in range(n):
        out = sm.generate(ids, max_new_tokens=1, do_sample=True, generator=gen, **kw)
        counts[out[0, -1]] += 1
    return counts


def test_greedy_picks_what_argmax_picks():
    # greedy() is torch.max's index (faster than argmax): the first of tied maxima, the first NaN, any row.
    rows = [
        [1.0, 3.0, 3.0, 2.0],
        [1.0, float("nan"), 3.0, float("nan")],
        [float("-inf")] * 4,
        [float("inf"), 0.0, float("inf"), 1.0],
        [-2.0, -1.0, -1.0, -5.0],
    ]
    generator = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 4, (6, 49152), generator=generator).float()  # many ties, long enough to vectorize
    wide[2, 30000] = float("nan")
    for logits in (torch.tensor(rows), wide, wide[3], torch.randn(2, 3, 1000, generator=generator)):
        assert torch.equal(greedy(logits), logits.argmax(dim=-1))


def test_sampling_distribution_chi_square_with_negative_control():
    model = _tiny("llama", vocab=8)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.15)  # a spread-out distribution over 8 tokens
    sm = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=16)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    cfg = dict(temperature=0.8, top_k=6, top_p=0.95)
    probs = warp(logits[None], SamplingConfig(True, **cfg)).softmax(-1)[0]
    counts = _first_token_counts(sm, ids, 3000, **cfg)
    assert chi2_pvalue(counts, probs) > 1e-3
    # Negative control: the same counts against the unwarped distribution must be rejected.
    assert chi2_pvalue(counts, logits.softmax(-1)) < 1e-6


def _quiet_generate(sm, ids):
    """``sm.generate(ids)``, failing on any warning: specpass follows HF's default length without one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return sm.generate(ids)


def _hf_default_length(model, ids):
    """HF ``generate`` at its default length, without the UserWarning it gives for using it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _hf(model, ids, None)


def test_generation_config_defaults_and_unsupported_settings(llama):
    model, sm = llama
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    # Neither max_new_tokens nor max_length set: HF generates 20 new tokens; a model's max_length counts
    # the prompt too.
    assert _quiet_generate(sm, ids).shape[1] == 25 == _hf_default_length(model, ids).shape[1]
    model.generation_config.max_length = 12
    try:
        assert _quiet_generate(sm, ids).shape[1] == 12 == _hf_default_length(model, ids).shape[1]
    finally:
        model.generation_config.max_length = None
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(specpass.SpecPassError, match="repetition_penalty"):
            sm.generate(ids, max_new_tokens=3)
    finally:
        model.generation_config.repetition_penalty = None
