"""What the sweep scripts share: the default model on stratified Spec-Bench dev prompts, and one timed pass of a plan."""

from __future__ import annotations

import torch

import specpass
from specpass.bench import load_questions, resolve_prompts, stratified_sample
from specpass.models import default_model
from specpass.runtime.generate import RANK_DEPTHS
from specpass.tokenization import chat_ids


def chat_prompts(tokenizer, num_prompts: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The first turns of ``num_prompts`` Spec-Bench dev questions, stratified by category, as chat ids."""
    questions = stratified_sample(load_questions(resolve_prompts(None)), num_prompts)
    return [chat_ids(tokenizer, q["turns"][0]).to(device) for q in questions]


def compiled_default_model(num_prompts: int):
    """The default model compiled for plain decoding (plans are swapped in per setting) and its chat prompts."""
    model, tokenizer = default_model()
    return specpass.optimize(model, speculate=False, max_cache_len=1024), chat_prompts(tokenizer, num_prompts)


def run(sm, prompts, plan, max_new_tokens: int):
    """Greedy outputs, tokens/s, tau (tokens per verify step), tokens fed to the verifier per step, and the
    recycled-token (hits, tries) per depth and rank, over all prompts."""
    sm.plan = plan
    sm.recycled.next.clear()  # each setting starts cold: a table from an earlier run holds these very outputs
    outs, tokens, seconds, steps, nodes = [], 0, 0.0, 0, 0
    hits, tries = torch.zeros(RANK_DEPTHS, sm.recycled.k), torch.zeros(RANK_DEPTHS)
    for ids in prompts:
        outs.append(sm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False))
        s = sm.last_stats
        tokens, seconds, steps = tokens + s.new_tokens, seconds + s.total_s, steps + s.steps
        nodes += s.tree_nodes or s.steps + sum(s.drafted)  # a chain step verifies its root + drafts
        if s.rank_tries:
            hits += torch.tensor(s.rank_hits, dtype=torch.float)
            tries += torch.tensor(s.rank_tries, dtype=torch.float)
    return outs, tokens / seconds, tokens / steps, nodes / max(steps, 1), (hits, tries)
