"""Prompts as token ids: a chat's first user turn, the way the bench, calibration and the demo all prompt."""

from __future__ import annotations

import torch


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """(1, n) ids of ``text`` as the first user turn of a chat, ready for the answer (raw text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = enc["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
