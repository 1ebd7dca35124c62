"""Graph passes. Each pass is one file with one function ``(gm, structure, cfg) -> PassResult``.

The order below is the only place passes are sequenced.
"""

from specpass.passes.draft_config import DraftConfig
from specpass.passes.exact_lowbit import exact_lowbit
from specpass.passes.exit_predictions import exit_predictions
from specpass.passes.fold_gqa_heads import fold_gqa_heads
from specpass.passes.fused_attention import fused_attention
from specpass.passes.inline_attention import inline_attention
from specpass.passes.insert_early_exit import insert_early_exit
from specpass.passes.last_token_logits import last_token_logits
from specpass.passes.linear_operand_order import linear_operand_order
from specpass.passes.manager import PassResult, clone_graph_module, run_passes
from specpass.passes.prune_lm_head import prune_lm_head
from specpass.passes.skip_layers import skip_layers
from specpass.passes.tree_verify import tree_verify

#: programs -> the passes that derive them from the captured graph, in order. ``decode`` computes the
#: unchanged target model for every query position: one token in plain decoding, the verified chain in
#: speculative decoding. ``verify`` is decode's graph proven able to score a draft tree in one pass (it
#: rewrites nothing, so the lowered decode program serves it). ``verify_exits`` is decode that also returns
#: each DEL exit's token. ``draft`` and ``verify_exits`` passes take a DraftConfig (see draft_pipeline).
#: ``exact_lowbit`` runs after the passes that add linear layers (exits, a pruned head) and everywhere, prefill
#: included, so that no program reads a packed matrix's fp32 copy; ``linear_operand_order`` comes last wherever a
#: program runs a few tokens per call (not in prefill): it rewrites every linear layer left in fp32.
#: ``fused_attention`` takes the few-query SDPA calls to specpass's kernel; ``inline_attention`` writes out the
#: ones it leaves.
PIPELINES = {
    "prefill": (fold_gqa_heads, last_token_logits, exact_lowbit),
    "decode": (fold_gqa_heads, fused_attention, inline_attention, exact_lowbit, linear_operand_order),
    "verify": (fold_gqa_heads, fused_attention, inline_attention, exact_lowbit, linear_operand_order, tree_verify),
    "verify_exits": (
        fold_gqa_heads,
        fused_attention,
        inline_attention,
        exit_predictions,
        exact_lowbit,
        linear_operand_order,
    ),
    "draft": (
        fold_gqa_heads,
        fused_attention,
        inline_attention,
        insert_early_exit,
        skip_layers,
        prune_lm_head,
        exact_lowbit,
        linear_operand_order,
    ),
}

#: the draft passes a DraftConfig can leave out (what it does not configure)
_DRAFT_OPTIONAL = {
    insert_early_exit: lambda cfg: cfg.exit_layer is not None,
    skip_layers: lambda cfg: bool(cfg.skip_layers or cfg.skip_attention or cfg.skip_mlp),
    prune_lm_head: lambda cfg: cfg.vocab_ids is not None,
}


def draft_pipeline(cfg: DraftConfig) -> tuple:
    """The ``draft`` pipeline restricted to the passes ``cfg`` configures (order kept)."""
    return tuple(p for p in PIPELINES["draft"] if p not in _DRAFT_OPTIONAL or _DRAFT_OPTIONAL[p](cfg))


def with_options(pipeline: tuple, *, exact_lowbit: bool = True) -> tuple:
    """``pipeline`` without the passes the user turned off: ``optimize(model, exact_lowbit=False)`` uses none of
    specpass's C++ kernels (so that an engine compiled so needs no compiler where it runs)."""
    off = () if exact_lowbit else ("exact_lowbit", "fused_attention")
    return tuple(p for p in pipeline if p.__name__ not in off)


__all__ = [
    "PIPELINES",
    "DraftConfig",
    "PassResult",
    "clone_graph_module",
    "draft_pipeline",
    "exact_lowbit",
    "exit_predictions",
    "fold_gqa_heads",
    "fused_attention",
    "inline_attention",
    "insert_early_exit",
    "last_token_logits",
    "linear_operand_order",
    "prune_lm_head",
    "run_passes",
    "skip_layers",
    "tree_verify",
    "with_options",
]
