"""What optimize() does with default arguments: a cache that fits the model, and no warnings from torch's
internals during its compile."""

from __future__ import annotations

import warnings

import torch
from conftest import tiny_llama

import specpass
from specpass.capture import DEFAULT_CACHE_LEN, default_cache_len, rounded_cache_len
from specpass.lower import program_cache


def test_a_model_with_512_positions_optimizes_with_default_arguments():
    model = tiny_llama(max_position_embeddings=512).eval()
    sm = specpass.optimize(model, speculate=False, backend="eager", progress=False)
    assert sm.max_cache_len == 512
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(sm.generate(ids, max_new_tokens=8), want)


def test_the_default_cache_is_1024_where_the_model_reaches_that_far():
    assert DEFAULT_CACHE_LEN == 1024
    assert default_cache_len(tiny_llama(max_position_embeddings=4096)) == 1024
    assert default_cache_len(tiny_llama(max_position_embeddings=64)) == 64


def test_a_cache_sized_for_a_run_is_rounded_up_within_the_models_positions():
    model = tiny_llama(max_position_embeddings=300)
    assert rounded_cache_len(model, 105, 128) == 128  # the demo's default prompt and answer
    assert rounded_cache_len(model, 128, 128) == 128
    assert rounded_cache_len(model, 260, 128) == 300  # not past the positions the model has
    assert rounded_cache_len(model, 301, 128) == 384  # past them already: capture says so, not this


def test_optimize_emits_no_leafspec_or_torch_deprecation_warnings(monkeypatch):
    monkeypatch.setenv(program_cache.ENV_SWITCH, "0")  # a real compile, not a cache hit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specpass.optimize(tiny_llama().eval(), speculate=False, max_cache_len=32, progress=False)
    chatter = [w for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)]
    assert not chatter, [f"{w.category.__name__}: {w.message}" for w in chatter]
    # the filter is scoped to specpass's own calls: it does not leak out of them
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    assert len(after) == 1
