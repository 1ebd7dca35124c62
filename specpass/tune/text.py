"""Calibration's first stage: the calibration text, the model's own greedy continuations of calibration prompts.

Generated once with the compiled plain programs (``generate_text``: the stage's cost, and what a resumed search
keeps, as token ids), then teacher-forced through HF (``teacher_force``) to read every layer's hidden state and
the final distribution; the token frequencies of the model's own predictions rank the vocabulary for a pruned
draft head (FR-Spec, Zhao et al., 2025).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn

from specpass.errors import SpecPassError
from specpass.progress import progress_bar
from specpass.tokenization import chat_ids

log = logging.getLogger("specpass.tune")

#: built-in calibration prompts: a spread of tasks (chat, code, maths, extraction, translation, summary)
DEFAULT_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works and when to use one.",
    "What are the main causes of inflation? Answer in a few sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Translate into French: The weather is nice today and we are going to the park.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "List five tips for staying productive while working from home.",
    "If a train travels 120 km in 1.5 hours, what is its average speed? Show your steps.",
    "Describe the water cycle to a ten-year-old.",
    "Write an email to a colleague asking to reschedule a meeting to Thursday.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe for a simple tomato pasta.",
    "Explain the theory of evolution by natural selection.",
    "Write a haiku about autumn leaves.",
    "What are the benefits of regular exercise?",
    "Solve for x: 3x + 7 = 22. Explain each step.",
    "Write a SQL query that returns the ten most recent orders from an orders table.",
    "Compare renewable and non-renewable energy sources.",
    "What should I pack for a three-day hiking trip?",
    "Explain what a neural network is in simple terms.",
    "Write a limerick about a cat who loves to code.",
    "How do vaccines train the immune system?",
    "Give three arguments for and against school uniforms.",
    "Extract the dates from this text: The meeting moved from 3 May 2021 to 14 June 2021.",
)


@dataclasses.dataclass
class Text:
    """Teacher-forced calibration text: per position, hidden states and the target's choice."""

    hidden: dict[int, torch.Tensor]  # layer k -> (P, H) hidden state after layer k (every layer but the last)
    target: torch.Tensor  # (P,) the model's greedy next token at each position
    target_logits: torch.Tensor  # (P, N_max) the model's logits over the frequency-ranked ids
    generated: torch.Tensor  # (P,) bool: the next token is the model's own continuation (runs are valid)
    held_out: torch.Tensor  # (P,) bool: evaluation positions (prompts not used for frequencies or training)
    input_ids: list[torch.Tensor]  # per calibration sequence, (1, T) ids for skip-set scoring
    prompt_lens: list[int]  # per sequence, where the model's own continuation starts
    ranked: torch.Tensor  # (V,) the vocabulary by how often the model predicts each token, most frequent first

    def prompts(self) -> list[torch.Tensor]:
        """The calibration prompts, without the model's continuations."""
        return [s[:, :n] for s, n in zip(self.input_ids, self.prompt_lens, strict=True)]


def prompt_ids(model: nn.Module, prompts: Sequence | None, tokenizer) -> list[torch.Tensor]:
    """The calibration prompts as (1, n) ids: ``prompts`` (texts with ``tokenizer``, or token-id lists), else
    DEFAULT_PROMPTS through the chat template, else (no tokenizer) random token prompts."""
    device = next(model.parameters()).device
    if tokenizer is None:
        if prompts is not None and any(isinstance(p, str) for p in prompts):
            raise SpecPassError("calibration prompts given as text need a tokenizer: pass tokenizer=")
        if prompts is None:
            log.info("no tokenizer: calibrating on the model's continuations of random token prompts")
            vocab = model.get_output_embeddings().weight.shape[0]
            g = torch.Generator().manual_seed(0)
            return [torch.randint(0, vocab, (1, 8), generator=g).to(device) for _ in range(12)]
        return [torch.as_tensor(p, device=device).reshape(1, -1) for p in prompts]
    return [chat_ids(tokenizer, text).to(device) for text in prompts or DEFAULT_PROMPTS]


def generate_text(sm, prompts: list[torch.Tensor], new_tokens: int, progress: bool) -> list[list[int]]:
    """The model's greedy continuations of ``prompts`` with the compiled plain programs: per prompt, the ids
    of prompt and continuation, and where the continuation starts (its last element)."""
    # A prompt longer than the cache allows keeps its end: calibration needs in-distribution continuations,
    # not whole prompts, and a cache sized to one short request must still calibrate.
    new_tokens = min(new_tokens, sm.max_cache_len // 2)
    if new_tokens < 2:
        raise SpecPassError(
            f"max_cache_len={sm.max_cache_len} is too small to calibrate a draft: pass max_cache_len >= 4, "
            "or speculate=False"
        )
    if len(prompts) < 2:
        raise SpecPassError(f"calibration needs at least 2 prompts, got {len(prompts)}: pass more prompts=")
    keep, truncated, sequences = sm.max_cache_len - new_tokens, 0, []
    for ids in progress_bar(prompts, desc="specpass: calibration text", unit="prompt", enabled=progress):
        if ids.shape[1] > keep:
            ids, truncated = ids[:, -keep:], truncated + 1
        out = sm.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
        sequences.append([*out[0].tolist(), ids.shape[1]])
    if truncated:
        log.info(
            "kept the last %d tokens of %d calibration prompts (max_cache_len=%d)", keep, truncated, sm.max_cache_len
        )
    return sequences


def teacher_force(model: nn.Module, n_layers: int, sequences: list[list[int]], vocab_sizes: Sequence[int]) -> Text:
    """Read the hidden states and final logits of ``generate_text``'s sequences through HF; the last third of
    them are held out (neither ranked nor trained on)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    seqs = [torch.tensor([s[:-1]], device=device) for s in sequences]
    starts = [s[-1] for s in sequences]
    n_eval = max(1, len(seqs) // 3)
    all_hidden: dict[int, list] = {k: [] for k in range(n_layers - 1)}
    targets, finals, generated, held_out = [], [], [], []
    with torch.no_grad():
        for j, seq in enumerate(seqs):
            out = model(seq, output_hidden_states=True)
            hs = out.hidden_states  # hs[k + 1]: the output of layer k (k < n_layers - 1)
            for k in range(n_layers - 1):
                all_hidden[k].append(hs[k + 1][0, :-1])
            targets.append(out.logits[0, :-1].argmax(-1))
            finals.append(out.logits[0, :-1])
            t = seq.shape[1] - 1
            gen = torch.zeros(t, dtype=torch.bool)
            gen[starts[j] - 1 :] = True  # position i predicts token i + 1: from the prompt's last token on
            generated.append(gen)
            held_out.append(torch.full((t,), j >= len(seqs) - n_eval))
    target = torch.cat(targets)
    held = torch.cat(held_out)
    # FR-Spec: rank the vocabulary by how often the model itself predicts each token (training prompts only).
    counts = torch.bincount(target[~held], minlength=vocab).float()
    counts += torch.bincount(target, minlength=vocab).float() * 1e-6  # ties: a held-out sighting ranks first
    n_max = min(max(vocab_sizes), vocab)
    ranked = counts.argsort(descending=True)
    return Text(
        hidden={k: torch.cat(v) for k, v in all_hidden.items()},
        target=target,
        target_logits=torch.cat(finals)[:, ranked[:n_max]],
        generated=torch.cat(generated),
        held_out=held,
        input_ids=seqs,
        prompt_lens=starts,
        ranked=ranked,
    )
