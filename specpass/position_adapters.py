"""Positions from the program's ``position_ids`` for models whose position embeddings count from the cache.

Some decoders never read ``position_ids``: the decoder halves of encoder-decoder models (BART, mBART, Marian,
Pegasus, PLBart, MVP, Blenderbot, BigBird-Pegasus, TrOCR) and RoFormer look up a learned or sinusoidal table
at ``arange(past_key_values_length, past_key_values_length + q) + offset``, with ``past_key_values_length``
taken from ``cache.get_seq_length()``. A runtime-owned cache has no length to give (slots are not positions:
a draft tree's positions follow its depth), so during capture only, each such table is made to look up the
program's ``position_ids`` instead (plus the module's own offset, e.g. BART's 2), which is what HF's generate
computes for a sequence without gaps.

A table qualifies structurally: an ``nn.Embedding`` whose ``forward`` takes ``past_key_values_length``, and
whose own output for a probe (past length 3, 2 tokens) equals the lookup the adapter will do. Anything else
(e.g. TrOCR's padding-aware sinusoidal table, not an ``nn.Embedding``) is left alone, and capture's validation
refuses the model as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
from torch import nn

from specpass.errors import SpecPassError

_PAST = "past_key_values_length"


@dataclasses.dataclass(frozen=True)
class PositionTable:
    """One position-embedding table that takes its positions from the cache length, and how to index it."""

    path: str
    module: nn.Embedding
    offset: int  # table row of position 0 (BART's learned positions start at row 2)
    batched: bool  # the module returns (B, q, D); else (q, D), one row of positions shared by the batch

    def lookup(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The module's output for the program's (B, q) positions, in the module's own output shape."""
        if self.batched:
            return nn.Embedding.forward(self.module, position_ids + self.offset)
        if position_ids.shape[0] != 1:
            raise SpecPassError(
                f"{self.path} ({type(self.module).__name__}) shares one row of positions across the batch; "
                "specpass captures it for one sequence only"
            )
        return nn.Embedding.forward(self.module, position_ids[0] + self.offset)


def _probe(module: nn.Embedding, first_param: str, past: int, q: int) -> torch.Tensor | None:
    """The module's own output for ``q`` tokens after ``past`` cached ones, or None if it cannot be called so."""
    device = module.weight.device
    # The first argument is either the token ids or their shape, by the module's own parameter name.
    first = (
        torch.Size((1, q)) if first_param.endswith("shape") else torch.zeros((1, q), dtype=torch.long, device=device)
    )
    try:
        with torch.no_grad():
            out = module(first, **{_PAST: past})
    except Exception:  # noqa: BLE001 - a table we cannot probe is a table we do not adapt
        return None
    return out if isinstance(out, torch.Tensor) else None


def find_position_tables(model: nn.Module) -> list[PositionTable]:
    """Every position table of ``model`` that takes its positions from ``past_key_values_length`` (see above).

    Runs a probe through each candidate, so call it outside tracing.
    """
    tables = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Embedding):
            continue
        try:
            params = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            continue
        if _PAST not in params or params[0] == _PAST:
            continue
        past, q = 3, 2
        offset = getattr(module, "offset", 0)
        if not isinstance(offset, int) or past + q + offset > module.num_embeddings:
            continue
        out = _probe(module, params[0], past, q)
        if out is None or out.dim() not in (2, 3) or out.shape[-2:] != (q, module.embedding_dim):
            continue
        with torch.no_grad():
            want = nn.Embedding.forward(module, torch.arange(past, past + q, device=module.weight.device) + offset)
        if out.reshape(-1, q, module.embedding_dim)[0].equal(want):
            tables.append(PositionTable(path, module, offset, batched=out.dim() == 3))
    return tables


@contextlib.contextmanager
def program_positions(tables: list[PositionTable], position_ids: torch.Tensor):
    """While the block runs (the capture's trace), each table looks up ``position_ids``, whatever it is passed."""
    saved = []
    for table in tables:
        # An instance attribute shadows the class's forward; nn.Module.__call__ (and its hooks) stay as they are.
        saved.append(vars(table.module).get("forward"))
        table.module.forward = lambda *args, _table=table, **kwargs: _table.lookup(position_ids)
    try:
        yield
    finally:
        for table, previous in zip(tables, saved, strict=True):
            if previous is None:
                del table.module.forward
            else:
                table.module.forward = previous
