"""End to end on real Gemma 3 270M weights (the second bundled model): its conversion, and specpass's plain
compiled decoding equal to HF eager's greedy output, on prompts long enough that the sliding-window layers
really slide (the window is 512 tokens)."""

from __future__ import annotations

import pytest
import torch

import specpass
from specpass.bench import compare_outputs, load_questions, resolve_prompts, stratified_sample
from specpass.models import chat_ids

pytestmark = pytest.mark.slow

NAME = "gemma-3-270m"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gemma():
    from specpass import models

    return models.load(NAME)


def test_gemma_is_bundled_and_converted(gemma):
    from specpass import models

    model, tokenizer = gemma
    assert NAME in models.available()
    config = model.config
    assert config.model_type == "gemma3_text" and config.vocab_size == 262144 and config.num_hidden_layers == 18
    assert config.sliding_window == 512 and "sliding_attention" in config.layer_types
    assert model.config.tie_word_embeddings
    assert "Gemma Terms of Use" in models.BUNDLED[NAME].notice


def test_plain_greedy_equals_hf_including_prompts_past_the_sliding_window(gemma):
    model, tokenizer = gemma
    questions = load_questions(resolve_prompts(None))
    prompts = [chat_ids(tokenizer, q["turns"][0]) for q in stratified_sample(questions, 3)]
    long_ones = sorted((chat_ids(tokenizer, q["turns"][0]) for q in questions), key=lambda ids: -ids.shape[1])
    window = model.config.sliding_window
    long_ones = [ids for ids in long_ones if window < ids.shape[1] <= 900][:2]
    assert len(long_ones) == 2, "the dev split should hold prompts longer than the sliding window"
    cases = prompts + long_ones
    sm = specpass.optimize(
        model, speculate=False, max_cache_len=max(ids.shape[1] for ids in cases) + NEW_TOKENS, progress=False
    )
    near_ties = []
    for ids in cases:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        out = sm.generate(ids, max_new_tokens=NEW_TOKENS)
        diff = compare_outputs(model, ids, ref, out)
        if diff is not None:
            assert diff["near_tie"], diff
            near_ties.append(diff)
    print(
        f"{len(cases)} prompts ({[ids.shape[1] for ids in cases]} tokens); near-ties tolerated: {near_ties or 'none'}"
    )
